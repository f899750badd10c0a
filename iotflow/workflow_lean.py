"""Workflows and gateway profiles without pydantic: msgspec mirrors for the edge gateway.

The pydantic models of ``iotflow.workflow`` are the authority. Importing
pydantic and building those models costs an edge process about 9-10 MiB
resident, a sixth of its budget, so the gateway reads its declarations
through these frozen msgspec Structs first:

* ``load_workflow(data)`` / ``load_profile(data)`` convert plain data to the
  mirrors (strictly: no coercion, so ``"10"`` is not a number here). The
  checks beyond types (the component graph, positive durations, ...) are the
  functions below, which the pydantic models run too.
* Whatever the mirrors refuse goes to pydantic, which decides: its
  ``ConfigError`` names the field, or, when it accepts (a coercion the
  mirrors do not make), its model is returned. Both kinds of object offer the
  same fields and methods (the methods live in the mixins here), and
  ``dump`` gives pydantic's JSON form of either.

A property test shows that the mirrors accept nothing pydantic refuses and
that both dump the same data.

Example::

    >>> wf = load_workflow({"name": "w", "components": [
    ...     {"name": "stats", "kind": "aggregate", "window": "10s"}]})
    >>> type(wf).__name__, wf.component("stats").window.total_seconds()
    ('LeanWorkflow', 10.0)
    >>> dump(wf)["components"][0]["window"]
    '10s'
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from iotflow.declarations import load_file
from iotflow.durations import LeanDuration, label, lean_duration

__all__ = [
    "NAME_PATTERN",
    "LeanGatewayProfile",
    "LeanWorkflow",
    "dump",
    "load_profile",
    "load_workflow",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Python's ``$`` also matches before a final newline, pydantic's (Rust) regex does not
_NAME = msgspec.Meta(pattern=NAME_PATTERN.removesuffix("$") + r"\Z")
_MAX = sys.float_info.max  # an upper bound that refuses inf, as allow_inf_nan=False does

# what each kind may take as input (by the input's kind; "readings" is the source)
INPUTS: dict[str, set[str]] = {
    "filter": {"readings", "filter"},
    "aggregate": {"readings", "filter"},
    "patterns": {"readings", "filter", "aggregate"},
    "command_sequence": {"patterns"},
    "forward": {"readings", "filter"},
}


# -- checks and methods shared with the pydantic models -------------------------------------


def check_latency_budget(v: timedelta | None) -> None:
    if v is not None and v <= timedelta(0):
        raise ValueError(f"latency_budget {v} must be positive, e.g. '50ms'")


def check_aggregate(window: timedelta, allowed_lateness: timedelta) -> None:
    if window <= timedelta(0):
        raise ValueError(f"window {window} must be positive, e.g. '10s'")
    if allowed_lateness < timedelta(0):
        raise ValueError(f"allowed_lateness {allowed_lateness} must be zero or positive")


def check_patterns_named(patterns: list[dict[str, Any]]) -> None:
    for i, p in enumerate(patterns):
        for key in ("name", "kind"):
            if not isinstance(p.get(key), str):
                raise ValueError(f"patterns[{i}] needs a {key} (a string)")


def check_graph(components: list[Any]) -> None:
    """Names are unique, each input exists earlier and suits the component's kind."""
    kinds: dict[str, str] = {}
    for i, c in enumerate(components):
        if c.name in kinds or c.name == "readings":
            raise ValueError(f"components[{i}].name {c.name!r} is used twice (or is 'readings')")
        source = "readings" if c.input == "readings" else kinds.get(c.input)
        if source is None:
            earlier = ", ".join(kinds) or "none"
            raise ValueError(
                f"components[{i}].input: {c.input!r} is not readings nor an earlier component; "
                f"earlier components: {earlier}"
            )
        if source not in INPUTS[c.kind]:
            allowed = " or ".join(sorted(INPUTS[c.kind]))
            raise ValueError(
                f"components[{i}].input: a {c.kind} component cannot take the output of "
                f"{c.input!r} (a {source}); it takes {allowed}"
            )
        if c.kind == "command_sequence":
            upstream = next(p for p in components if p.name == c.input)
            names = {p["name"] for p in upstream.patterns}
            unknown = sorted(set(c.on) - names)
            if unknown:
                raise ValueError(
                    f"components[{i}].on: {', '.join(unknown)} not among the patterns of "
                    f"{c.input!r} ({', '.join(sorted(names))})"
                )
        kinds[c.name] = c.kind


class PatternsMethods:
    __slots__ = ()
    patterns: list[dict[str, Any]]
    allowed_lateness: timedelta
    max_future_skew: timedelta | None

    @property
    def pattern_kinds(self) -> list[str]:
        return [p["kind"] for p in self.patterns]

    def pattern_set(self, pattern_input: str = "readings") -> dict[str, Any]:
        """The ``PatternSet`` declaration (plain data) of these patterns on ``pattern_input``."""
        return {
            "patterns": [{"input": pattern_input, **p} for p in self.patterns],
            "allowed_lateness": self.allowed_lateness.total_seconds(),
            "max_future_skew": None
            if self.max_future_skew is None
            else self.max_future_skew.total_seconds(),
        }


class TrafficMethods:
    __slots__ = ()
    devices: int
    rate_hz: float
    reading_bytes: int

    @property
    def kbps(self) -> float:
        """Raw readings in kilobits per second."""
        return self.devices * self.rate_hz * self.reading_bytes * 8 / 1000


class WorkflowMethods:
    __slots__ = ()
    components: list[Any]

    def component(self, name: str) -> Any:
        """The component called ``name`` (``KeyError`` naming the known ones otherwise)."""
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(
            f"no component {name!r}; components: {', '.join(c.name for c in self.components)}"
        )


class ProfileMethods:
    __slots__ = ()
    memory_mb: float
    runtime_memory_mb: float

    @property
    def free_memory_mb(self) -> float:
        """Memory left for components once the edge runtime runs."""
        return self.memory_mb - self.runtime_memory_mb


# -- the mirrors -------------------------------------------------------------------------------

_NOT_NEGATIVE = msgspec.Meta(ge=0, le=_MAX)
_POSITIVE = msgspec.Meta(gt=0, le=_MAX)


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class LeanResources(_Struct, kw_only=True):
    memory_mb: Annotated[float, _NOT_NEGATIVE] = 0.0
    cpu_ghz: Annotated[float, _NOT_NEGATIVE] = 0.0


class _LeanComponent(_Struct, tag_field="kind", kw_only=True):
    name: Annotated[str, _NAME]
    input: str = "readings"
    placement: Literal["edge", "cloud", "auto"] = "auto"
    needs: LeanResources = LeanResources()
    latency_budget: LeanDuration | None = None
    offline: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        check_latency_budget(self.latency_budget)

    @property
    def kind(self) -> str:
        return type(self).__struct_config__.tag  # type: ignore[return-value]


class LeanFilter(_LeanComponent, tag="filter", kw_only=True):
    where: Annotated[str, msgspec.Meta(min_length=1)]


class LeanAggregate(_LeanComponent, tag="aggregate", kw_only=True):
    window: LeanDuration
    allowed_lateness: LeanDuration = LeanDuration(0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_aggregate(self.window, self.allowed_lateness)


class LeanPatterns(_LeanComponent, PatternsMethods, tag="patterns", kw_only=True):
    patterns: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]
    allowed_lateness: LeanDuration = LeanDuration(0)
    max_future_skew: LeanDuration | None = LeanDuration(hours=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patterns_named(self.patterns)


class LeanCommandStep(_Struct, kw_only=True):
    device: str = "{key}"
    name: Annotated[str, msgspec.Meta(min_length=1)]
    params: dict[str, Any] = {}
    ttl: LeanDuration = LeanDuration(seconds=60)


class LeanCommandSequence(_LeanComponent, tag="command_sequence", kw_only=True):
    on: Annotated[list[str], msgspec.Meta(min_length=1)]
    steps: Annotated[list[LeanCommandStep], msgspec.Meta(min_length=1)]


class LeanForward(_LeanComponent, tag="forward", kw_only=True):
    devices: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["*"]
    )


class LeanTraffic(_Struct, TrafficMethods, kw_only=True):
    devices: Annotated[int, msgspec.Meta(ge=1)]
    rate_hz: Annotated[float, _POSITIVE]
    reading_bytes: Annotated[int, msgspec.Meta(ge=1)] = 100


class LeanWorkflow(_Struct, WorkflowMethods, kw_only=True):
    """``iotflow.workflow.Workflow``'s mirror (see the module docstring)."""

    name: Annotated[str, _NAME]
    version: Annotated[int, msgspec.Meta(ge=0)] = 0
    components: Annotated[
        list[LeanFilter | LeanAggregate | LeanPatterns | LeanCommandSequence | LeanForward],
        msgspec.Meta(min_length=1),
    ]
    traffic: LeanTraffic | None = None

    def __post_init__(self) -> None:
        check_graph(self.components)


class LeanConnectivity(_Struct, kw_only=True):
    uplink_kbps: Annotated[float, _POSITIVE]
    rtt: LeanDuration = LeanDuration(milliseconds=100)
    availability: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.99


class LeanGatewayProfile(_Struct, ProfileMethods, kw_only=True):
    """``iotflow.workflow.GatewayProfile``'s mirror."""

    name: Annotated[str, _NAME]
    memory_mb: Annotated[float, _POSITIVE]
    cpu_ghz: Annotated[float, _POSITIVE]
    runtime_memory_mb: Annotated[float, _NOT_NEGATIVE] = 60.0
    connectivity: LeanConnectivity


# -- loading and dumping ------------------------------------------------------------------------


def decode_hook(kind: type, value: Any) -> Any:
    """msgspec's ``dec_hook`` for the mirrors: durations in the declarations' forms."""
    if kind is LeanDuration:
        return lean_duration(value)
    raise NotImplementedError(f"no decoder for {kind}")  # msgspec: a type this hook does not take


def lean(kind: type[Any], data: Any) -> Any | None:
    """``data`` as the mirror ``kind``, or None when the mirror refuses it."""
    try:
        return msgspec.convert(data, kind, dec_hook=decode_hook)
    except (msgspec.ValidationError, ValueError):
        return None


def load(mirror: type[Any], data: Any, authority: Callable[[], Any]) -> Any:
    """``data`` as ``mirror``; when the mirror refuses it, the verdict of the pydantic
    model's ``from_dict`` (``authority()`` imports and returns the model)."""
    found = lean(mirror, data)
    return found if found is not None else authority().from_dict(data)


def _workflow_model() -> Any:
    from iotflow.workflow import Workflow

    return Workflow


def _profile_model() -> Any:
    from iotflow.workflow import GatewayProfile

    return GatewayProfile


def load_workflow(data: Any) -> Any:
    """A ``LeanWorkflow`` from plain data or a ``.json``/``.yaml`` path; when the mirror
    refuses it, ``Workflow``'s verdict (its model, or its ``ConfigError``)."""
    if isinstance(data, str | Path):
        data = load_file(data, "workflow")
    return load(LeanWorkflow, data, _workflow_model)


def load_profile(data: Any) -> Any:
    """A ``LeanGatewayProfile`` (as ``load_workflow``; the authority is ``GatewayProfile``)."""
    if isinstance(data, str | Path):
        data = load_file(data, "gateway profile")
    return load(LeanGatewayProfile, data, _profile_model)


def dump(model: Any) -> dict[str, Any]:
    """pydantic's ``model_dump(mode="json")`` of a declaration, or the same data of a mirror."""
    if hasattr(model, "model_dump"):
        return model.model_dump(mode="json")
    return _plain(model)


def _plain(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        config = value.__struct_config__
        out = {} if config.tag_field is None else {config.tag_field: config.tag}
        for name in value.__struct_fields__:
            out[name] = _plain(getattr(value, name))
        return out
    if isinstance(value, timedelta):
        return label(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "is_condition"):  # an operators.expr.Expr: its text, as pydantic dumps it
        return value.text
    if isinstance(value, float) and not math.isfinite(value):
        return None  # as pydantic's JSON mode writes inf and nan (free-form fields may hold them)
    return value
