"""The edge's CEP patterns without pydantic: msgspec mirrors of the per-reading kinds.

``operators.cep_patterns`` (pydantic) is the authority; an edge gateway reads
the patterns its per-reading engine runs (``threshold``, ``rate``, ``absence``
without ``after``; ``operators.cep_rows``) through these frozen Structs, as
``iotflow.workflow_lean`` does for workflows: ``load_patterns(data)`` returns a
``LeanPatternSet`` when the mirrors accept the data (strictly, no coercion),
and otherwise ``PatternSet``'s verdict, its model or its ``ConfigError``.
Both offer the fields and methods the engine reads; the checks and methods
beyond types live here and the pydantic models run them too. A property test
shows that the mirrors accept nothing pydantic refuses, that both dump the
same data and that their fingerprints agree.

Example::

    >>> ps = load_patterns([{"name": "smoke", "kind": "threshold", "condition": "smoke > 0"}])
    >>> type(ps).__name__, ps.patterns[0].kind, sorted(ps.patterns[0].condition.names)
    ('LeanPatternSet', 'threshold', ['smoke'])
    >>> load_patterns([{"name": "x", "kind": "threshold", "condition": "t + 1"}])
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: pattern declaration is invalid: patterns[0].threshold.condition: condition 't + 1' is not a condition; compare it, e.g. 't + 1 > 30'
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

import msgspec
from msgspec.structs import force_setattr

from iotflow.durations import LeanDuration
from iotflow.durations import label as _label
from iotflow.workflow_lean import NAME_PATTERN, dump, load
from operators.expr import Expr

__all__ = [
    "BUILTIN_INPUT_FIELDS",
    "PLACEHOLDERS",
    "LeanPatternSet",
    "check_placeholders",
    "fingerprint",
    "load_patterns",
]

PLACEHOLDERS = ("{key}", "{pattern}")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_NAME = msgspec.Meta(pattern=NAME_PATTERN.removesuffix("$") + r"\Z")  # see workflow_lean

# the inputs every pattern set knows: key column, time column, span start column
BUILTIN_INPUT_FIELDS: dict[str, dict[str, str | None]] = {
    "readings": {"key": "device_id", "time": "ts_ms", "start": None},
    "windows": {"key": "key", "time": "window_end_ms", "start": "window_start_ms"},
    "commands": {"key": "key", "time": "ts_ms", "start": None},
}


# -- checks shared with the pydantic models ---------------------------------------------------


def positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"duration {_label(value)} must be positive, e.g. '30s'")
    return value


def not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"duration {_label(value)} must be zero or positive")
    return value


def condition(value: Expr, field_name: str) -> Expr:
    if not value.is_condition:
        raise ValueError(
            f"{field_name} {value.text!r} is not a condition; compare it, e.g. '{value.text} > 30'"
        )
    return value


def number(value: Expr, field_name: str) -> Expr:
    if value.is_condition:
        raise ValueError(
            f"{field_name} {value.text!r} is a condition; give a number such as 'temperature'"
        )
    return value


def check_placeholders(value: Any, where: str) -> Any:
    """Refuse a ``{...}`` in strings of ``value`` other than ``PLACEHOLDERS``."""
    if isinstance(value, str):
        for found in _PLACEHOLDER.findall(value):
            if found not in PLACEHOLDERS:
                raise ValueError(
                    f"{where} uses placeholder {found}; valid placeholders are {', '.join(PLACEHOLDERS)}"
                )
    elif isinstance(value, dict):
        for k, v in value.items():
            check_placeholders(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_placeholders(v, f"{where}[{i}]")
    return value


def check_names_and_inputs(patterns: list[Any], known: dict[str, Any]) -> None:
    names = [p.name for p in patterns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"pattern names must be unique; repeated: {', '.join(dupes)}")
    for i, p in enumerate(patterns):
        if p.input not in known:
            raise ValueError(
                f"patterns[{i}].input {p.input!r} is unknown; declare it under inputs or use one of "
                f"{', '.join(sorted(known))}"
            )


def fingerprint(patterns: list[Any], input_spec: Any, lateness: timedelta) -> str:
    """Identifies pattern definitions (pydantic or mirror: the same data, the same print)."""
    body = {
        "patterns": [dump(p) for p in patterns],
        "input": None if input_spec is None else dump(input_spec),
        "lateness": lateness.total_seconds(),
    }
    text = json.dumps(body, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ThresholdMethods:
    __slots__ = ()
    condition: Expr
    value: Expr | None

    def conditions(self) -> dict[str, Expr]:
        out = {"cond": self.condition}
        if self.value is not None:
            out["value"] = self.value
        return out


class ValueMethods:
    __slots__ = ()
    value: Expr

    def conditions(self) -> dict[str, Expr]:
        return {"value": self.value}


class AbsenceMethods:
    __slots__ = ()
    expect: Expr | None
    after: Expr | None

    def conditions(self) -> dict[str, Expr]:
        out: dict[str, Expr] = {}
        if self.expect is not None:
            out["expect"] = self.expect
        if self.after is not None:
            out["after"] = self.after
        return out


class PatternSetMethods:
    __slots__ = ()
    patterns: list[Any]
    allowed_lateness: timedelta

    def all_inputs(self) -> dict[str, Any]: ...  # each class knows its InputSpec type

    def fingerprint(self, input_name: str | None = None) -> str:
        """Identifies the definitions (of one input's patterns), so old state is never misread."""
        chosen = [p for p in self.patterns if input_name is None or p.input == input_name]
        spec = self.all_inputs()[input_name] if input_name else None
        return fingerprint(chosen, spec, self.allowed_lateness)


# -- the mirrors ----------------------------------------------------------------------------


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


def _expr(struct: Any, name: str, check: Any, *, optional: bool = False) -> None:
    """Parse the text in field ``name`` into an ``Expr`` (in place: a frozen Struct's
    ``__post_init__`` may); ``optional`` lets it be null."""
    text = getattr(struct, name)
    if text is None and optional:
        return
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string")
    force_setattr(struct, name, check(Expr.parse(text), name))


class _Tagged(_Struct, kw_only=True):
    @property
    def kind(self) -> str:
        return type(self).__struct_config__.tag  # type: ignore[return-value]

    @property
    def type(self) -> str:
        return type(self).__struct_config__.tag  # type: ignore[return-value]


class LeanDetect(_Tagged, tag_field="type", tag="detect", kw_only=True):
    pass


class LeanCommand(_Tagged, tag_field="type", tag="command", kw_only=True):
    device: str = "{key}"
    name: Annotated[str, msgspec.Meta(min_length=1)]
    params: dict[str, Any] = {}
    ttl: LeanDuration = LeanDuration(seconds=60)

    def __post_init__(self) -> None:
        positive(self.ttl)
        check_placeholders(self.device, "device")
        check_placeholders(self.name, "name")
        check_placeholders(self.params, "params")


class LeanTwinUpdate(_Tagged, tag_field="type", tag="twin_update", kw_only=True):
    device: str = "{key}"
    properties: Annotated[dict[str, Any], msgspec.Meta(min_length=1)]

    def __post_init__(self) -> None:
        check_placeholders(self.device, "device")
        check_placeholders(self.properties, "properties")


_Action = LeanDetect | LeanCommand | LeanTwinUpdate


class _LeanPattern(_Tagged, tag_field="kind", kw_only=True):
    name: Annotated[str, _NAME]
    input: Annotated[str, _NAME] = "readings"
    actions: list[_Action] = msgspec.field(default_factory=lambda: [LeanDetect()])
    description: str = ""


class LeanThreshold(_LeanPattern, ThresholdMethods, tag="threshold", kw_only=True):
    condition: Any  # its text; an Expr once built
    times: Annotated[int, msgspec.Meta(ge=1)] = 1
    value: Any = None
    after_match: Literal["skip_past_last_event", "no_skip"] = "skip_past_last_event"

    def __post_init__(self) -> None:
        _expr(self, "condition", condition)
        _expr(self, "value", number, optional=True)


class LeanRate(_LeanPattern, ValueMethods, tag="rate", kw_only=True):
    value: Any  # its text; an Expr once built
    exceeds: Annotated[float, msgspec.Meta(ge=0, le=1.7976931348623157e308)]
    per: LeanDuration = LeanDuration(minutes=1)
    direction: Literal["rises", "falls", "either"] = "rises"

    def __post_init__(self) -> None:
        _expr(self, "value", number)
        positive(self.per)


class LeanAbsence(_LeanPattern, AbsenceMethods, tag="absence", kw_only=True):
    """``absence`` without ``after`` (a heartbeat): the kind the edge runs."""

    within: LeanDuration
    expect: Any = None
    after: None = None  # with 'after' it is a sequence: the cloud's (pydantic decides)

    def __post_init__(self) -> None:
        positive(self.within)
        _expr(self, "expect", condition, optional=True)


class LeanInputSpec(_Struct, kw_only=True):
    key: Annotated[str, msgspec.Meta(min_length=1)]
    time: Annotated[str, msgspec.Meta(min_length=1)]
    start: str | None = None


_BUILTIN = {name: LeanInputSpec(**spec) for name, spec in BUILTIN_INPUT_FIELDS.items()}


class LeanPatternSet(_Struct, PatternSetMethods, kw_only=True):
    """``operators.cep_patterns.PatternSet``'s mirror for the per-reading kinds."""

    patterns: Annotated[list[LeanThreshold | LeanRate | LeanAbsence], msgspec.Meta(min_length=1)]
    inputs: dict[str, LeanInputSpec] = {}
    allowed_lateness: LeanDuration = LeanDuration(0)
    max_future_skew: LeanDuration | None = LeanDuration(hours=1)

    def __post_init__(self) -> None:
        not_negative(self.allowed_lateness)
        if self.max_future_skew is not None:
            positive(self.max_future_skew)
        check_names_and_inputs(self.patterns, self.all_inputs())

    def all_inputs(self) -> dict[str, Any]:
        return {**_BUILTIN, **self.inputs}


def load_patterns(data: Any) -> Any:
    """A ``LeanPatternSet`` from plain data (a list is taken as the patterns); when the
    mirrors refuse it, ``PatternSet``'s verdict (its model, or its ``ConfigError``)."""
    return load(LeanPatternSet, {"patterns": data} if isinstance(data, list) else data, _model)


def _model() -> Any:
    from operators.cep_patterns import PatternSet

    return PatternSet
