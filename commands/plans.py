"""Plans: device commands in steps, ordered as a sequence or a DAG, with conditions.

A ``PlanSpec`` (a pydantic declaration; dict, JSON or YAML through
``iotflow.declarations``) names steps. Each step sends one command with its
params to a *target*: one device, a list, a registry group (all of it, the
members matching dimensions, or the ``n`` members nearest to a device) or
every registered device matching dimensions.

Ordering:

- ``after`` lists the steps a step waits for. Left out, a step waits for the
  step declared before it, so a plain list is a sequence; ``after: []`` starts
  a step at once. A cycle is refused at load time with a ``ConfigError``
  naming the steps on it.
- A step starts once every step it waits for finished; its commands go out
  together, one per target device. Commands to one device are issued in
  dependency order, then declaration order, so the orchestrator's per-device
  FIFO delivers them in that order.

Conditions: ``when`` is an expression of the safe language of
``operators.expr`` (never ``eval``), evaluated per target device when the step
starts. A name that is a step this one depends on (directly or not) reads that
step's outcome (``'done'``, ``'failed'`` or ``'skipped'``); any other name reads
the device's latest reported state (``on == 1``, ``mode != 'off'``). A missing
value makes the condition false. A step without ``when`` runs only when all
the steps it waits for are ``'done'``, else it is skipped.

``PlanSpec.expand(registry, plan_id)`` checks every command against the
twins registry (device known, command and params valid) and resolves the
targets into an ``ExpandedPlan``, plain data that carries what it needs
(including the twin models of its devices). ``PlanRun`` executes it as a
``commands.coordinator.Coordinator``: a step is done when every device it ran
on acked done (or showed the expected state), failed when any did not; the
plan ends ``done`` when no step failed, ``failed`` otherwise. A plain plan does
not undo anything: that is what ``commands.saga`` adds.

Example::

    >>> from twins.registry import simulator_registry
    >>> spec = PlanSpec.model_validate({"name": "cool", "steps": [
    ...     {"name": "mode", "target": {"devices": ["hvac-0001", "hvac-0002"]},
    ...      "command": "set_mode", "params": {"mode": "cool"}},
    ...     {"name": "temp", "target": "hvac-0001", "command": "set_temperature",
    ...      "params": {"setpoint": 23.5}}]})
    >>> plan = spec.expand(simulator_registry(), "cool-1")
    >>> [(s.name, s.devices, s.after) for s in plan.steps]
    [('mode', ('hvac-0001', 'hvac-0002'), ()), ('temp', ('hvac-0001',), ('mode',))]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Self

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from commands.coordinator import Outcome, PlanEvent, PlanEventKind, ReportedState, outcome_of
from iotflow.declarations import load_file, validate
from iotflow.durations import Duration, label
from iotflow.errors import ConfigError, InvalidTransition, TwinRejected
from iotflow.events import Command, CommandEvent
from operators.expr import Expr
from twins.models import TwinModel, define_model
from twins.registry import Registry

__all__ = [
    "ExpandedPlan",
    "ExpandedStep",
    "PlanRun",
    "PlanSpec",
    "PlanState",
    "Step",
    "StepStatus",
    "Target",
    "load_plan",
    "plan_from_request",
    "request_parts",
    "run_id_problem",
    "topological_order",
]

_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PLAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
DEFAULT_TIMEOUT = timedelta(seconds=30)


class Target(BaseModel):
    """Which devices a step writes to.

    Exactly one of: ``device`` (one id; a bare string is short for it),
    ``devices`` (ids), ``group`` (a registry group: all members, or those
    matching ``where``, or the ``n`` nearest to the device ``nearest``), or
    ``where`` alone (every registered device whose metadata matches).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str | None = None
    devices: list[str] | None = None
    group: str | None = None
    where: dict[str, Any] | None = None
    nearest: str | None = None
    n: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _bare_device(cls, data: Any) -> Any:
        return {"device": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_selection(self) -> Target:
        direct = [k for k in ("device", "devices") if getattr(self, k) is not None]
        if len(direct) > 1:
            raise ValueError("give either device or devices, not both")
        if direct and (
            self.group is not None or self.where is not None or self.nearest is not None
        ):
            raise ValueError(f"{direct[0]} names devices directly; drop group, where and nearest")
        if not direct and self.group is None and self.where is None:
            raise ValueError("a target needs device, devices, group or where")
        if self.nearest is not None and (self.group is None or self.where is not None):
            raise ValueError("nearest picks members of a group: give group (and no where)")
        if self.n != 1 and self.nearest is None:
            raise ValueError("n counts the nearest devices; give nearest too")
        if self.devices is not None and not self.devices:
            raise ValueError("devices is empty")
        if self.where is not None and not self.where:
            raise ValueError("where is empty; give dimensions such as {floor: 2}")
        return self

    def resolve(self, registry: Registry) -> list[str]:
        """The device ids, in registry order (``devices`` keeps its own order, without repeats)."""
        if self.device is not None:
            ids = [self.device]
        elif self.devices is not None:
            ids = list(dict.fromkeys(self.devices))
        elif self.nearest is not None:
            ids = registry.nearest(self.group or "", self.nearest, self.n)
        elif self.group is not None:
            ids = registry.group(self.group)
            if self.where is not None:
                matching = set(registry.where(**self.where))
                ids = [d for d in ids if d in matching]
        else:
            ids = registry.where(**(self.where or {}))
        for device_id in ids:
            registry.device(device_id)  # unknown -> TwinRejected naming it
        return ids

    def describe(self) -> str:
        """A short text for messages: ``group 'lights' where {'floor': 2}``."""
        if self.device is not None:
            return f"device {self.device!r}"
        if self.devices is not None:
            return f"devices {self.devices[:3]!r}{'...' if len(self.devices) > 3 else ''}"
        if self.nearest is not None:
            return f"the {self.n} of group {self.group!r} nearest to {self.nearest!r}"
        text = f"group {self.group!r}" if self.group is not None else "devices"
        return text + (f" where {self.where!r}" if self.where is not None else "")


class Step(BaseModel):
    """One step: ``command`` with ``params`` to every device of ``target``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    target: Target
    command: str
    params: dict[str, Any] = {}
    after: list[str] | None = None
    """Steps to wait for; None (left out) = the step declared before, [] = none."""
    when: Expr | None = None
    timeout: Duration = DEFAULT_TIMEOUT
    """How long each command of this step may take before it expires (``expires_at``)."""
    priority: int = 0

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _STEP_NAME.fullmatch(value):
            raise ValueError(
                f"step name {value[:70]!r} must be an identifier (letters, digits, _; "
                "at most 64 characters), so conditions can name it"
            )
        return value

    @field_validator("when")
    @classmethod
    def _condition(cls, value: Expr | None) -> Expr | None:
        if value is not None and not value.is_condition:
            raise ValueError(
                f"when {value.text!r} is not a condition; compare something, e.g. 'on == 1'"
            )
        return value

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"timeout must be positive, got {label(value)}")
        return value


def _cycle(graph: Mapping[str, Iterable[str]], remaining: set[str]) -> list[str]:
    """One cycle among ``remaining`` (each has a dependency in ``remaining``)."""
    node = min(remaining)
    seen: list[str] = []
    while node not in seen:
        seen.append(node)
        node = min(dep for dep in graph[node] if dep in remaining)
    # followed backwards (node -> its dependency); shown in run order, each after the one before
    return [node, *reversed(seen[seen.index(node) :])]


def topological_order(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Nodes so that each comes after its dependencies; ties keep ``graph`` order.

    ``graph`` maps a node to the nodes it depends on. A cycle raises
    ``ConfigError`` naming it (``a -> b -> a``).
    """
    deps = {node: set(after) for node, after in graph.items()}
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(deps):
        ready = [n for n in deps if n not in done and deps[n] <= done]
        if not ready:
            cycle = _cycle(deps, set(deps) - done)
            raise ConfigError(
                "steps " + " -> ".join(cycle) + " form a cycle (each waits for the one before); "
                "a plan must be a DAG: drop one of these after entries"
            )
        order.extend(ready)
        done.update(ready)
    return order


class PlanSpec(BaseModel):
    """A plan declaration: a name and its steps (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    steps: list[Step] = Field(min_length=1)

    kind: ClassVar[str] = "plan"  # what ``build`` makes (not a field); SagaSpec says "saga"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _PLAN_ID.fullmatch(value):
            raise ValueError(
                f"name {value[:70]!r} must be 1..128 letters, digits or _.:@- (no '/', '+', '#', spaces)"
            )
        return value

    @model_validator(mode="after")
    def _dag(self) -> Self:
        names = [s.name for s in self.steps]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"step names must be unique; repeated: {', '.join(twice)}")
        graph = self.dependencies()
        for step in self.steps:
            for dep in graph[step.name]:
                if dep == step.name:
                    raise ValueError(f"step {step.name!r} waits for itself")
                if dep not in graph:
                    raise ValueError(
                        f"step {step.name!r} waits for unknown step {dep!r} (steps: {', '.join(names)})"
                    )
        try:
            topological_order(graph)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        ancestors = self.ancestors()
        for step in self.steps:
            if step.when is None:
                continue
            for name in sorted(step.when.names & set(names)):
                if name not in ancestors[step.name]:
                    raise ValueError(
                        f"step {step.name!r}: condition {step.when.text!r} reads the outcome of "
                        f"step {name!r}, which it does not wait for; add it to after"
                    )
        return self

    def dependencies(self) -> dict[str, tuple[str, ...]]:
        """Step -> the steps it waits for (``after`` left out = the step before)."""
        graph: dict[str, tuple[str, ...]] = {}
        previous: str | None = None
        for step in self.steps:
            if step.after is None:
                graph[step.name] = () if previous is None else (previous,)
            else:
                graph[step.name] = tuple(dict.fromkeys(step.after))
            previous = step.name
        return graph

    def ancestors(self) -> dict[str, frozenset[str]]:
        """Step -> every step it waits for, directly or not."""
        return _ancestors(self.dependencies())

    def expand(self, registry: Registry, plan_id: str) -> ExpandedPlan:
        """Resolve targets and check every command against the registry.

        ``ConfigError`` names the step and the device when a target is
        unknown or empty or a command does not fit a device's twin model.
        """
        if not _PLAN_ID.fullmatch(plan_id):
            raise ConfigError(f"plan id {plan_id[:70]!r} must be 1..128 letters, digits or _.:@-")
        graph = self.dependencies()
        steps = []
        device_models: dict[str, str] = {}
        for step in self.steps:
            devices, params = self._resolve(step, registry)
            for device_id in devices:
                device_models[device_id] = registry.device(device_id).model
            steps.append(self._expanded_step(step, devices, params, graph[step.name], registry))
        models = {
            name: registry.models[name].model_dump(
                mode="json", exclude={"name"}, exclude_defaults=True
            )
            for name in dict.fromkeys(device_models.values())
        }
        return ExpandedPlan(
            plan_id, self.kind, tuple(steps), models, device_models, self._settings()
        )

    def _resolve(self, step: Step, registry: Registry) -> tuple[tuple[str, ...], dict[str, Any]]:
        where = f"{self.name}.steps.{step.name}"
        try:
            devices = step.target.resolve(registry)
        except (ConfigError, TwinRejected) as exc:
            raise ConfigError(f"{where}.target: {exc}") from None
        if not devices:
            raise ConfigError(f"{where}.target: {step.target.describe()} matches no device")
        params: dict[str, Any] = {}
        for device_id in devices:
            try:
                params = registry.check_command(device_id, step.command, step.params)
            except TwinRejected as exc:
                raise ConfigError(f"{where}: {exc.reason}") from None
        return tuple(devices), params

    def _expanded_step(
        self,
        step: Step,
        devices: tuple[str, ...],
        params: dict[str, Any],
        after: tuple[str, ...],
        registry: Registry,
    ) -> ExpandedStep:
        return ExpandedStep(
            name=step.name,
            command=step.command,
            params=params,
            devices=devices,
            after=after,
            when=None if step.when is None else step.when.text,
            timeout_s=step.timeout.total_seconds(),
            priority=step.priority,
        )

    def _settings(self) -> dict[str, Any]:
        """Run settings carried by the expanded plan (sagas add theirs)."""
        return {}

    def build(self, registry: Registry, plan_id: str) -> PlanRun:
        """A ready-to-start run of this plan (``plan_id`` must be new: it prefixes every command id)."""
        return PlanRun(self.expand(registry, plan_id))


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` cannot name a run (it prefixes command ids), or None when it can."""
    if isinstance(run_id, str) and _PLAN_ID.fullmatch(run_id):
        return None
    return (
        f"run id {str(run_id)[:70]!r} must be 1..128 letters, digits or _.:@- "
        "(no '/', '+', '#', spaces), starting with a letter or digit"
    )


def request_parts(spec: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """Split a coordinator request ``{"type": ..., "id": run id, **declaration}``.

    The run id is required: it prefixes every command id, so a replayed
    request with the same id does nothing twice, and a new run needs a new id.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{what} request must be an object, got {type(spec).__name__}")
    run_id = spec.get("id")
    if run_id_problem(run_id) is not None:
        raise ConfigError(
            f"{what} request needs an id naming this run (1..128 letters, digits or _.:@-, "
            f"e.g. 'leaving-home-2026-01-01'), got {str(run_id)[:70]!r}"
        )
    return run_id, {k: v for k, v in spec.items() if k not in ("type", "id")}


def plan_from_request(spec: Mapping[str, Any], registry: Registry, now: datetime) -> PlanRun:
    """The orchestrator's builder for ``{"coordinator": {"type": "plan", "id": ..., ...}}``."""
    run_id, data = request_parts(spec, "plan")
    return validate(PlanSpec, data, "plan").build(registry, run_id)


def load_plan(source: str | Path | Mapping[str, Any]) -> PlanSpec:
    """A ``PlanSpec`` from a dict or a YAML/JSON file; ``ConfigError`` naming the field."""
    data = source if isinstance(source, Mapping) else load_file(source, "plan")
    return validate(PlanSpec, data, "plan")


@dataclass(frozen=True)
class ExpandedStep:
    """A step with its devices resolved and its params checked (plain data)."""

    name: str
    command: str
    params: dict[str, Any]
    devices: tuple[str, ...]
    after: tuple[str, ...]
    when: str | None
    timeout_s: float
    priority: int
    compensation: dict[str, Any] | None = None
    """Saga steps: ``{"command": ..., "params": ...}`` or ``{"restore": [properties]}``; None = nothing to undo."""
    critical: bool = True
    """Saga steps: whether its failure rolls the saga back."""


@dataclass(frozen=True)
class ExpandedPlan:
    """A plan ready to run: steps in declaration order, the twin models its devices use."""

    plan_id: str
    kind: str
    steps: tuple[ExpandedStep, ...]
    models: dict[str, dict[str, Any]]
    device_models: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str) -> ExpandedStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def twin_models(self) -> dict[str, TwinModel]:
        """The twin models, rebuilt from the plain data."""
        return {name: define_model(name, spec) for name, spec in self.models.items()}

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpandedPlan:
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"plan snapshot is not an expanded plan: {exc}") from None


class PlanState(StrEnum):
    """A run's lifecycle. Plans: RUNNING -> DONE | FAILED. Sagas add the undo path:
    RUNNING -> DRAINING (a step failed; waiting for commands in flight) -> COMPENSATING
    -> COMPENSATED | STUCK."""

    PENDING = "pending"
    RUNNING = "running"
    DRAINING = "draining"
    COMPENSATING = "compensating"
    DONE = "done"
    FAILED = "failed"
    COMPENSATED = "compensated"
    STUCK = "stuck"


_PLAN_MOVES: dict[PlanState, frozenset[PlanState]] = {
    PlanState.PENDING: frozenset({PlanState.RUNNING}),
    PlanState.RUNNING: frozenset(
        {PlanState.DONE, PlanState.FAILED, PlanState.DRAINING, PlanState.COMPENSATING}
    ),
    PlanState.DRAINING: frozenset({PlanState.COMPENSATING}),
    PlanState.COMPENSATING: frozenset({PlanState.COMPENSATED, PlanState.STUCK}),
    PlanState.DONE: frozenset(),
    PlanState.FAILED: frozenset(),
    PlanState.COMPENSATED: frozenset(),
    PlanState.STUCK: frozenset(),
}
TERMINAL_PLAN_STATES = frozenset(s for s, moves in _PLAN_MOVES.items() if not moves)


class StepStatus(StrEnum):
    """A step's outcome so far; DONE, FAILED and SKIPPED are what conditions read."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class DeviceRun(msgspec.Struct):
    """One device of one step: its command and what became of it (plain data)."""

    command_id: str | None = None
    status: str = "waiting"  # waiting, issued, skipped, done, failed
    outcome: str | None = None  # commands.coordinator.Outcome once finished
    detail: str | None = None
    previous: dict[str, Any] | None = None  # sagas: reported state before the step
    undo: list[list[Any]] | None = None  # sagas: [[name, params], ...] that restore it
    undo_ids: list[str] = []
    undo_status: list[str] = []  # per undo command: waiting, issued, done, failed, stuck
    undo_attempts: list[int] = []
    undo_due_ms: list[int | None] = []


class StepRun(msgspec.Struct):
    status: str = StepStatus.WAITING.value
    started_seq: int | None = None
    in_flight: int = 0  # forward commands issued and not finished
    undo_open: int = 0  # sagas: compensation commands not yet done or given up
    devices: dict[str, DeviceRun] = {}
    undone: bool = False  # sagas: its compensation finished


class RunState(msgspec.Struct):
    state: str = PlanState.PENDING.value
    seq: int = 0
    steps: dict[str, StepRun] = {}
    failed_step: str | None = None
    reason: str | None = None  # sagas: why it rolls back
    started_ms: int | None = None  # sagas with a deadline


class PlanRun:
    """Runs an ``ExpandedPlan`` as a ``Coordinator`` (see the module docstring).

    Guarantees: each (step, device) gets at most one command, with the id
    ``{plan_id}/{step}/{device_id}``; an outcome for an unknown command id or
    a second outcome for the same id changes nothing; the run finishes once,
    with a DONE or FAILED ``PlanEvent``.
    """

    snapshot_type = "plan"

    def __init__(self, plan: ExpandedPlan, state: RunState | None = None) -> None:
        self.plan = plan
        self.coordinator_id = plan.plan_id
        self._graph = {s.name: s.after for s in plan.steps}
        self._ancestors = _ancestors(self._graph)
        self._conditions = {s.name: Expr.parse(s.when) for s in plan.steps if s.when is not None}
        self._models: dict[str, TwinModel] | None = None
        self._events: list[PlanEvent] = []
        self.notes: list[str] = []  # what the audit should know (a missing previous value...)
        if state is None:
            state = RunState(steps={s.name: StepRun(devices={}) for s in plan.steps})
        self._run = state
        # command id -> (step, device, undo index or -1 for the forward command)
        self._index: dict[str, tuple[str, str, int]] = {}
        for name, step in state.steps.items():
            for device_id, dev in step.devices.items():
                if dev.command_id is not None:
                    self._index[dev.command_id] = (name, device_id, -1)
                for i, cid in enumerate(dev.undo_ids):
                    self._index[cid] = (name, device_id, i)

    # -- Coordinator protocol ---------------------------------------------------------------

    @property
    def state(self) -> PlanState:
        return PlanState(self._run.state)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_PLAN_STATES

    def step_status(self, name: str) -> StepStatus:
        return StepStatus(self._run.steps[name].status)

    def devices_of(self, name: str) -> dict[str, DeviceRun]:
        """The per-device record of a step (read-only use)."""
        return self._run.steps[name].devices

    def progress(self) -> list[PlanEvent]:
        events, self._events = self._events, []
        return events

    def started_steps(self) -> list[str]:
        """The steps that started, in the order they started."""
        runs = self._run.steps
        started = [name for name, run in runs.items() if run.started_seq is not None]
        return sorted(started, key=lambda name: runs[name].started_seq or 0)

    def start(self, now: datetime, reported: ReportedState) -> list[Command]:
        if self.state is not PlanState.PENDING:
            return []
        self._move(PlanState.RUNNING)
        self._emit(PlanEventKind.STARTED, now, detail=f"{len(self.plan.steps)} steps")
        return self._advance(now, reported)

    def on_outcome(
        self, event: CommandEvent, now: datetime, reported: ReportedState
    ) -> list[Command]:
        where = self._index.get(event.command_id)
        if where is None or self.finished:
            return []
        name, device_id, undo = where
        if undo >= 0:
            return self._on_undo_outcome(name, device_id, undo, event, now, reported)
        dev = self._run.steps[name].devices[device_id]
        if dev.status != "issued":
            return []  # a repeated outcome
        outcome = outcome_of(event)
        dev.status = "done" if outcome is Outcome.APPLIED else "failed"
        dev.outcome = outcome.value
        dev.detail = event.detail
        step = self._run.steps[name]
        step.in_flight -= 1
        if step.in_flight > 0:
            return self._after_device(name, device_id, now, reported)
        self._finish_step(name, now)
        return self._advance(now, reported)

    def on_timer(self, now: datetime, reported: ReportedState) -> list[Command]:
        return []

    def next_timer(self) -> datetime | None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": self.snapshot_type,
            "definition": self.plan.to_dict(),
            "state": msgspec.to_builtins(self._run),
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Self:
        if not isinstance(snap, Mapping) or snap.get("type") != cls.snapshot_type:
            got = snap.get("type") if isinstance(snap, Mapping) else type(snap).__name__
            raise ConfigError(f"snapshot of type {got!r} cannot restore a {cls.snapshot_type}")
        plan = ExpandedPlan.from_dict(snap.get("definition", {}))
        try:
            state = msgspec.convert(snap.get("state", {}), RunState)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{cls.snapshot_type} snapshot state is invalid: {exc}") from None
        if set(state.steps) != {s.name for s in plan.steps}:
            raise ConfigError(
                f"{cls.snapshot_type} snapshot state does not match its definition's steps"
            )
        return cls(plan, state)

    # -- forward path -------------------------------------------------------------------------

    def _advance(self, now: datetime, reported: ReportedState) -> list[Command]:
        """Start every step whose dependencies finished; finish the run when all did."""
        commands: list[Command] = []
        if self.state is not PlanState.RUNNING:
            return commands
        progressed = True
        while progressed and self.state is PlanState.RUNNING:
            progressed = False
            for step in self.plan.steps:
                run = self._run.steps[step.name]
                if run.status != StepStatus.WAITING or not self._ready(step.name):
                    continue
                commands.extend(self._launch(step, now, reported))
                progressed = True
        if self.state is PlanState.RUNNING and all(
            self.step_status(s.name) in (StepStatus.DONE, StepStatus.FAILED, StepStatus.SKIPPED)
            for s in self.plan.steps
        ):
            self._conclude(now)
        return commands

    def _ready(self, name: str) -> bool:
        return all(
            self.step_status(dep) in (StepStatus.DONE, StepStatus.FAILED, StepStatus.SKIPPED)
            for dep in self._graph[name]
        )

    def _launch(self, step: ExpandedStep, now: datetime, reported: ReportedState) -> list[Command]:
        run = self._run.steps[step.name]
        outcomes = {n: self.step_status(n).value for n in self._ancestors[step.name]}
        condition = self._conditions.get(step.name)
        if condition is None:
            blocking = [d for d in step.after if outcomes[d] != StepStatus.DONE]
            if blocking:
                run.status = StepStatus.SKIPPED.value
                why = ", ".join(f"{d} {outcomes[d]}" for d in blocking)
                self._emit(
                    PlanEventKind.STEP_SKIPPED, now, step=step.name, detail=f"waits for {why}"
                )
                return []
        self._run.seq += 1
        run.started_seq = self._run.seq
        run.status = StepStatus.RUNNING.value
        commands: list[Command] = []
        notes: list[str] = []
        expires = now + timedelta(seconds=step.timeout_s)
        for device_id in step.devices:
            dev = DeviceRun()
            run.devices[device_id] = dev
            state = reported(device_id)
            if condition is not None and not _holds(condition, state, outcomes, notes, device_id):
                dev.status = "skipped"
                continue
            notes.extend(self._before_command(step, device_id, dev, state))
            command_id = f"{self.plan.plan_id}/{step.name}/{device_id}"
            dev.command_id = command_id
            dev.status = "issued"
            self._index[command_id] = (step.name, device_id, -1)
            commands.append(
                Command(
                    command_id=command_id,
                    device_id=device_id,
                    name=step.command,
                    params=dict(step.params),
                    issued_at=now,
                    expires_at=expires,
                    priority=step.priority,
                    correlation_id=self.plan.plan_id,
                )
            )
        run.in_flight = len(commands)
        if not commands:
            run.status = StepStatus.SKIPPED.value
            self._emit(
                PlanEventKind.STEP_SKIPPED,
                now,
                step=step.name,
                detail=f"condition {step.when!r} false on every device",
            )
            return []
        skipped = len(step.devices) - len(commands)
        detail = f"{len(commands)} commands {step.command}" + (
            f", {skipped} devices skipped by condition" if skipped else ""
        )
        self.notes.extend(f"{step.name}: {note}" for note in notes)
        if notes:
            detail += (
                "; "
                + "; ".join(notes[:5])
                + (f" (+{len(notes) - 5} more)" if len(notes) > 5 else "")
            )
        self._emit(PlanEventKind.STEP_STARTED, now, step=step.name, detail=detail)
        return commands

    def _before_command(
        self, step: ExpandedStep, device_id: str, dev: DeviceRun, state: Mapping[str, Any]
    ) -> list[str]:
        """Hook: record what is needed before a command goes out (sagas capture state); notes for the event."""
        return []

    def _after_device(
        self, name: str, device_id: str, now: datetime, reported: ReportedState
    ) -> list[Command]:
        """Hook: a device of a running step finished while others are still in flight."""
        return []

    def _finish_step(self, name: str, now: datetime) -> None:
        run = self._run.steps[name]
        failed = {d: r for d, r in run.devices.items() if r.status == "failed"}
        if failed:
            run.status = StepStatus.FAILED.value
            first = next(iter(failed.items()))
            self._emit(
                PlanEventKind.STEP_FAILED,
                now,
                step=name,
                device_id=first[0],
                command_id=first[1].command_id,
                detail=f"{len(failed)} of {len(run.devices)} devices failed; first {first[0]}: {first[1].detail or first[1].outcome}",
            )
            self._step_failed(name, now)
        else:
            run.status = StepStatus.DONE.value
            done = sum(r.status == "done" for r in run.devices.values())
            self._emit(PlanEventKind.STEP_DONE, now, step=name, detail=f"{done} devices done")

    def _step_failed(self, name: str, now: datetime) -> None:
        """Hook: a plain plan carries on with the steps that do not depend on it."""

    def cancel(self, now: datetime, reason: str = "cancelled") -> list[Command]:
        """Start no further step; the plan ends FAILED once its commands in flight finish.

        A plain plan undoes nothing (a saga does). Returns the commands to send now
        (none for a plan; a saga's first compensations when nothing is in flight).
        """
        if self.state is not PlanState.RUNNING:
            return []
        self._run.reason = reason
        for step in self.plan.steps:
            run = self._run.steps[step.name]
            if run.status == StepStatus.WAITING:
                run.status = StepStatus.SKIPPED.value
                self._emit(PlanEventKind.STEP_SKIPPED, now, step=step.name, detail=reason)
        return self._advance(now, lambda _device: {})

    def _conclude(self, now: datetime) -> None:
        failed = [s.name for s in self.plan.steps if self.step_status(s.name) is StepStatus.FAILED]
        if self._run.reason is not None:
            self._move(PlanState.FAILED)
            self._emit(PlanEventKind.FAILED, now, detail=f"cancelled: {self._run.reason}")
        elif failed:
            self._move(PlanState.FAILED)
            self._emit(PlanEventKind.FAILED, now, detail=f"steps failed: {', '.join(failed)}")
        else:
            self._move(PlanState.DONE)
            self._emit(PlanEventKind.DONE, now, detail="every step done or skipped")

    def _on_undo_outcome(
        self,
        name: str,
        device_id: str,
        index: int,
        event: CommandEvent,
        now: datetime,
        reported: ReportedState,
    ) -> list[Command]:
        return []

    # -- helpers --------------------------------------------------------------------------------

    def _move(self, new: PlanState) -> None:
        have = self.state
        if new not in _PLAN_MOVES[have]:
            raise InvalidTransition(
                self.plan.plan_id, have.value, new.value, {s.value for s in _PLAN_MOVES[have]}
            )
        self._run.state = new.value

    def _emit(self, kind: PlanEventKind, now: datetime, **fields: Any) -> None:
        self._events.append(PlanEvent(self.plan.plan_id, kind, now, **fields))

    def twin_model(self, device_id: str) -> TwinModel:
        if self._models is None:
            self._models = self.plan.twin_models()
        return self._models[self.plan.device_models[device_id]]


def _holds(
    condition: Expr,
    state: Mapping[str, Any],
    outcomes: Mapping[str, str],
    notes: list[str],
    device_id: str,
) -> bool:
    """Whether a step's condition holds for a device; a missing value or a bad one is false."""
    env = {name: state.get(name) for name in condition.names}
    env.update(outcomes)
    try:
        return condition.evaluate(env) is True
    except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
        # a device reporting a value of an unexpected type must not stop the plan
        notes.append(f"{device_id}: condition not evaluated ({exc}); skipped")
        return False


def _ancestors(graph: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    for name in topological_order(graph):
        acc: set[str] = set()
        for dep in graph[name]:
            acc |= {dep} | found[dep]
        found[name] = frozenset(acc)
    return found
