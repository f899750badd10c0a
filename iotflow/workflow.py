"""Declarative workflows: components with placement hints and resource needs, and gateway profiles.

A ``Workflow`` is a chain of components over device readings:

===================  ==============================================================
``filter``           keep the readings for which ``where`` holds (a condition in
                     the expression language of ``operators.expr``)
``aggregate``        tumbling ``window`` statistics per device and metric
                     (count, sum, avg, min, max), ``operators.windows``
``patterns``         CEP patterns (``operators.cep_patterns`` declarations)
``command_sequence`` commands issued in order when patterns ``on`` fire
``forward``          raw readings sent to the cloud (only where a workflow asks)
===================  ==============================================================

Each component names its ``input``: ``readings`` or an earlier component
(a filter's output are readings, an aggregate's are windows, a patterns
component feeds command sequences). Each says where it may run
(``placement``: ``edge``, ``cloud`` or ``auto``), what it needs
(``needs.memory_mb``, ``needs.cpu_ghz``), how fast its decisions must act
(``latency_budget``) and whether it must keep acting while the gateway's
uplink is down (``offline``). A ``GatewayProfile`` describes a gateway
(memory, CPU, connectivity). ``iotflow.placement.plan`` splits a workflow
between a gateway and the cloud.

Both are pydantic models that load from dicts, JSON or YAML
(``iotflow.declarations``); a wrong declaration fails at load time with a
``ConfigError`` naming the field. Expressions and pattern bodies are checked
where they are built (the edge flow and the cloud flows), with the same
messages as the pattern declarations themselves.

Example::

    >>> wf = Workflow.from_yaml('''
    ... name: kitchen-safety
    ... components:
    ...   - name: smoke
    ...     kind: patterns
    ...     latency_budget: 50ms
    ...     patterns:
    ...       - {name: smoke, kind: threshold, condition: smoke > 0,
    ...          actions: [{type: command, device: gas-valve, name: close}]}
    ...   - name: stats
    ...     kind: aggregate
    ...     window: 10s
    ... ''')
    >>> [(c.name, c.kind, c.placement) for c in wf.components]
    [('smoke', 'patterns', 'auto'), ('stats', 'aggregate', 'auto')]
    >>> Workflow.from_dict({"name": "x", "components": [{"name": "f", "kind": "filter", "where": "t > 1", "input": "nope"}]})
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: workflow declaration is invalid: declaration: components[0].input: 'nope' is not readings nor an earlier component; earlier components: none
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from iotflow.declarations import load_file, parse_text, validate
from iotflow.durations import Duration
from iotflow.workflow_lean import (
    NAME_PATTERN,
    PatternsMethods,
    ProfileMethods,
    TrafficMethods,
    WorkflowMethods,
    check_aggregate,
    check_graph,
    check_latency_budget,
    check_patterns_named,
)

__all__ = [
    "AggregateComponent",
    "CommandSequenceComponent",
    "CommandStep",
    "Component",
    "Connectivity",
    "FilterComponent",
    "ForwardComponent",
    "GatewayProfile",
    "PatternsComponent",
    "Placement",
    "Resources",
    "Traffic",
    "Workflow",
]

_NAME = NAME_PATTERN
Placement = Literal["edge", "cloud", "auto"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Model):
    """What a component needs on the machine that runs it, beyond the runtime itself."""

    memory_mb: float = Field(0.0, ge=0, allow_inf_nan=False)
    cpu_ghz: float = Field(0.0, ge=0, allow_inf_nan=False)


class _Component(_Model):
    name: str = Field(pattern=_NAME)
    input: str = "readings"
    placement: Placement = "auto"
    needs: Resources = Resources()
    # decisions must reach devices within this; shorter than the uplink's round trip: edge
    latency_budget: Duration | None = None
    # must keep acting while the gateway's uplink is down: edge
    offline: bool = False
    description: str = ""

    @field_validator("latency_budget")
    @classmethod
    def _positive(cls, v: timedelta | None) -> timedelta | None:
        check_latency_budget(v)
        return v


class FilterComponent(_Component):
    """Keep readings for which ``where`` (a condition, e.g. ``temperature > -40``) holds."""

    kind: Literal["filter"] = "filter"
    where: str = Field(min_length=1)


class AggregateComponent(_Component):
    """Tumbling windows of ``window`` per device and metric; ``allowed_lateness`` holds them open."""

    kind: Literal["aggregate"] = "aggregate"
    window: Duration
    allowed_lateness: Duration = timedelta(0)

    @model_validator(mode="after")
    def _durations(self) -> AggregateComponent:
        check_aggregate(self.window, self.allowed_lateness)
        return self


class PatternsComponent(_Component, PatternsMethods):
    """CEP patterns (each a pattern declaration of ``operators.cep_patterns``).

    On readings (``input`` readings or a filter) the patterns listen to input
    ``readings``; on an aggregate, to input ``windows``. ``allowed_lateness``
    and ``max_future_skew`` are those of a ``PatternSet``.
    """

    kind: Literal["patterns"] = "patterns"
    patterns: list[dict[str, Any]] = Field(min_length=1)
    allowed_lateness: Duration = timedelta(0)
    max_future_skew: Duration | None = timedelta(hours=1)

    @field_validator("patterns")
    @classmethod
    def _named(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        check_patterns_named(v)
        return v


class CommandStep(_Model):
    """One command of a sequence; ``{key}`` in ``device`` is the detection's key."""

    device: str = "{key}"
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    ttl: Duration = timedelta(seconds=60)


class CommandSequenceComponent(_Component):
    """When one of the ``on`` patterns (of the input patterns component) fires, issue
    ``steps`` in order (on the edge: at once, in order; acknowledgments, retries and
    compensation are the cloud orchestrator's)."""

    kind: Literal["command_sequence"] = "command_sequence"
    on: list[str] = Field(min_length=1)
    steps: list[CommandStep] = Field(min_length=1)


class ForwardComponent(_Component):
    """Send raw readings to the cloud; ``devices`` are shell patterns of device ids."""

    kind: Literal["forward"] = "forward"
    devices: list[str] = Field(default_factory=lambda: ["*"], min_length=1)


Component = Annotated[
    FilterComponent
    | AggregateComponent
    | PatternsComponent
    | CommandSequenceComponent
    | ForwardComponent,
    Field(discriminator="kind"),
]


class Traffic(_Model, TrafficMethods):
    """The raw input a workflow expects (for bandwidth-driven placement)."""

    devices: int = Field(ge=1)
    rate_hz: float = Field(gt=0, allow_inf_nan=False)
    reading_bytes: int = Field(100, ge=1)


class Workflow(_Model, WorkflowMethods):
    """A named, versioned chain of components (see the module docstring)."""

    name: str = Field(pattern=_NAME)
    version: int = Field(0, ge=0)
    components: list[Component] = Field(min_length=1)
    traffic: Traffic | None = None

    @model_validator(mode="after")
    def _graph(self) -> Workflow:
        check_graph(self.components)
        return self

    # -- loading

    @classmethod
    def from_dict(cls, data: Any) -> Workflow:
        return validate(cls, data, "workflow")

    @classmethod
    def from_json(cls, text: str | bytes) -> Workflow:
        return cls.from_dict(parse_text(text, "json", "workflow"))

    @classmethod
    def from_yaml(cls, text: str) -> Workflow:
        return cls.from_dict(parse_text(text, "yaml", "workflow"))

    @classmethod
    def load(cls, path: str | Path) -> Workflow:
        return cls.from_dict(load_file(path, "workflow"))


class Connectivity(_Model):
    """A gateway's uplink: bandwidth, round trip to the cloud, share of time it is up."""

    uplink_kbps: float = Field(gt=0, allow_inf_nan=False)
    rtt: Duration = timedelta(milliseconds=100)
    availability: float = Field(0.99, gt=0, le=1)


class GatewayProfile(_Model, ProfileMethods):
    """What a gateway offers: ``memory_mb`` in all, of which ``runtime_memory_mb`` the
    edge process itself takes (its measured peak), ``cpu_ghz`` per core, connectivity.

    Example::

        >>> GatewayProfile.from_dict({"name": "pi3", "memory_mb": 1024, "cpu_ghz": 1.4,
        ...                           "connectivity": {"uplink_kbps": 2000, "rtt": "80ms"}}).free_memory_mb
        964.0
    """

    name: str = Field(pattern=_NAME)
    memory_mb: float = Field(gt=0, allow_inf_nan=False)
    cpu_ghz: float = Field(gt=0, allow_inf_nan=False)
    runtime_memory_mb: float = Field(60.0, ge=0, allow_inf_nan=False)
    connectivity: Connectivity

    @classmethod
    def from_dict(cls, data: Any) -> GatewayProfile:
        return validate(cls, data, "gateway profile")

    @classmethod
    def from_yaml(cls, text: str) -> GatewayProfile:
        return cls.from_dict(parse_text(text, "yaml", "gateway profile"))

    @classmethod
    def load(cls, path: str | Path) -> GatewayProfile:
        return cls.from_dict(load_file(path, "gateway profile"))
