"""Dry run: which writes a plan, saga or rollout would send, to which device, in which order.

``preview(spec, registry, twins)`` expands the declaration against the
registry, then runs the real coordinator (the same ``PlanRun``, ``SagaRun``
or ``RolloutRun`` the orchestrator hosts) against an in-memory copy of the
twins in which every command succeeds and takes the effect its twin model
declares (``CommandSpec.expected_state``). Nothing is sent and nothing
given is changed. The result lists:

- ``writes``: every command in issue order. ``batch`` groups the writes that
  go out together (one step's devices, one fill of a wave); a batch starts
  only after the one before finished. Each write carries the device's
  predicted state right after it.
- ``skipped``: devices or steps a condition leaves out, with the reason.
- ``undo``: for a saga, the compensations that would run if its last step
  failed (in the order they would go); for a rollout, the roll back of
  every device. They are computed from the predicted state before each
  write, exactly as a run captures it.
- ``final``: each touched device's predicted state at the end, and with
  ``behaviours`` (``twins.behaviours``) ``prediction``: a
  ``twins.simulation.Prediction`` over ``horizon`` with the writes applied
  one ``batch_interval`` apart, so slow properties (a room temperature
  following a new setpoint) are predicted too.

A declaration with an error raises ``ConfigError`` exactly as a run would.

Example::

    >>> from twins.registry import simulator_registry
    >>> from commands.plans import load_plan
    >>> plan = load_plan({"name": "eco", "steps": [
    ...     {"name": "warm", "target": "hvac-0001", "command": "set_temperature",
    ...      "params": {"setpoint": 19}},
    ...     {"name": "dim", "target": {"devices": ["light-0001", "light-0002"]},
    ...      "command": "set_brightness", "params": {"brightness": 40}, "when": "on == 1"}]})
    >>> twins = {"hvac-0001": {"setpoint": 21.0}, "light-0001": {"on": 1, "brightness": 80},
    ...          "light-0002": {"on": 0, "brightness": 80}}
    >>> print(preview(plan, simulator_registry(), twins).render())
    plan eco-preview (dry run; nothing sent): 2 writes in 2 batches
      #  batch  step  device      command          params             predicted state after
      1  1      warm  hvac-0001   set_temperature  {"setpoint":19.0}  {"setpoint":19.0}
      2  2      dim   light-0001  set_brightness   {"brightness":40}  {"on":1,"brightness":40}
    skipped:
      dim  light-0002  condition 'on == 1' is false
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from commands.coordinator import PlanEventKind
from commands.plans import PlanRun, PlanSpec
from commands.rollout import RolloutRun, RolloutSpec
from iotflow.errors import ConfigError
from iotflow.events import Command, CommandEvent, CommandEventKind
from twins.behaviours import Behaviours
from twins.registry import Registry
from twins.simulation import Prediction, simulate

__all__ = ["Preview", "PreviewWrite", "preview"]

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # a fixed clock: a dry run reads no clock


@dataclass(frozen=True)
class PreviewWrite:
    """One write the run would send."""

    order: int
    batch: int
    phase: str  # the step name, "wave N" or "undo <step>" / "rollback"
    device_id: str
    command: str
    params: dict[str, Any]
    predicted: dict[str, Any]  # the device's predicted state right after it


@dataclass(frozen=True)
class Preview:
    """What a dry run found (see the module docstring)."""

    plan_id: str
    kind: str
    writes: list[PreviewWrite]
    skipped: list[tuple[str, str, str]]  # (phase, device or "*", why)
    undo: list[PreviewWrite]
    final: dict[str, dict[str, Any]]
    prediction: Prediction | None = None
    notes: list[str] = field(default_factory=list)

    def devices(self) -> list[str]:
        """The devices written to, in first-write order."""
        return list(dict.fromkeys(w.device_id for w in self.writes))

    def render(self, *, limit: int = 200) -> str:
        """A text table: every write (up to ``limit``, then a count), skips and the undo plan."""
        batches = len({w.batch for w in self.writes})
        lines = [
            f"{self.kind} {self.plan_id} (dry run; nothing sent): "
            f"{len(self.writes)} writes in {batches} batches"
        ]
        lines.extend(_table(self.writes, limit, "predicted state after"))
        if self.skipped:
            lines.append("skipped:")
            width = max(len(s[0]) for s in self.skipped)
            dev_width = max(len(s[1]) for s in self.skipped)
            lines.extend(
                f"  {phase:<{width}}  {device:<{dev_width}}  {why}"
                for phase, device, why in self.skipped[:limit]
            )
        if self.undo:
            what = "if a step fails" if self.kind == "saga" else "if the rollout aborts"
            lines.append(f"undo {what} ({len(self.undo)} writes):")
            lines.extend(_table(self.undo, limit, "restores"))
        lines.extend(f"note: {n}" for n in self.notes[:limit])
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "plan_id": self.plan_id,
            "kind": self.kind,
            "writes": [vars(w) for w in self.writes],
            "skipped": [list(s) for s in self.skipped],
            "undo": [vars(w) for w in self.undo],
            "final": self.final,
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "notes": list(self.notes),
        }


def _compact(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _table(writes: list[PreviewWrite], limit: int, last: str) -> list[str]:
    if not writes:
        return []
    shown = writes[:limit]
    rows = [
        (
            str(w.order),
            str(w.batch),
            w.phase,
            w.device_id,
            w.command,
            _compact(w.params),
            _compact(w.predicted),
        )
        for w in shown
    ]
    head = ("#", "batch", "step", "device", "command", "params", last)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = [
        "  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1]
        for row in [head, *rows]
    ]
    if len(writes) > limit:
        out.append(f"  ... {len(writes) - limit} more")
    return out


def preview(
    spec: PlanSpec | RolloutSpec,
    registry: Registry,
    twins: Mapping[str, Mapping[str, Any]],
    *,
    plan_id: str | None = None,
    behaviours: Behaviours | None = None,
    start: datetime = _EPOCH,
    horizon: timedelta = timedelta(hours=1),
    batch_interval: timedelta = timedelta(seconds=1),
) -> Preview:
    """The writes ``spec`` (a plan, saga or rollout declaration) would send, sending nothing.

    ``twins`` maps device ids to their current reported state (what
    conditions read and what a restore would bring back); it is not changed.
    """
    if not isinstance(spec, RolloutSpec | PlanSpec):
        msg = f"preview takes a plan, saga or rollout declaration, got {type(spec).__name__}"
        raise ConfigError(msg)
    run_id = plan_id or f"{spec.name}-preview"
    coordinator: PlanRun | RolloutRun = spec.build(registry, run_id)
    kind = "rollout" if isinstance(spec, RolloutSpec) else spec.kind
    states = {d: dict(s) for d, s in copy.deepcopy(dict(twins)).items()}
    dry = _DryRun(coordinator, registry, states, start)
    dry.run()
    undo = _undo(coordinator, registry, dry)
    prediction = None
    if behaviours is not None:
        plan = [
            (batch_interval * (w.batch - 1), w.device_id, w.command, w.params) for w in dry.writes
        ]
        prediction = simulate(
            {d: dict(s) for d, s in twins.items()},
            behaviours,
            plan,
            registry=registry,
            start=start,
            horizon=max(horizon, batch_interval * len({w.batch for w in dry.writes})),
        )
    touched = dict.fromkeys(w.device_id for w in dry.writes)
    return Preview(
        plan_id=run_id,
        kind=kind,
        writes=dry.writes,
        skipped=dry.skipped(),
        undo=undo,
        final={d: dry.states.get(d, {}) for d in touched},
        prediction=prediction,
        notes=dry.notes,
    )


class _DryRun:
    """Drives a coordinator with every command succeeding at once, in batches."""

    def __init__(
        self, coordinator: Any, registry: Registry, states: dict[str, dict[str, Any]], now: datetime
    ) -> None:
        self.coordinator = coordinator
        self.registry = registry
        self.states = states
        self.now = now
        self.writes: list[PreviewWrite] = []
        self.before: dict[str, dict[str, Any]] = {}  # command id -> device state before it
        self.notes: list[str] = []
        self.events: list[Any] = []

    def reported(self, device_id: str) -> dict[str, Any]:
        return dict(self.states.get(device_id, {}))

    def run(self) -> None:
        batch = self._record(self.coordinator.start(self.now, self.reported), 1)
        number = 1
        while batch:
            number += 1
            following: list[Command] = []
            for command in batch:
                self.now += timedelta(milliseconds=1)
                event = CommandEvent(
                    command.command_id,
                    command.device_id,
                    CommandEventKind.DONE,
                    self.now,
                    applied=True,
                )
                following.extend(self.coordinator.on_outcome(event, self.now, self.reported))
            if not following and not self.coordinator.finished:
                due = self.coordinator.next_timer()
                if due is not None:  # a wave pause
                    self.now = max(self.now, due)
                    following = self.coordinator.on_timer(self.now, self.reported)
            batch = self._record(following, number)
        self.events.extend(self.coordinator.progress())

    def _record(self, commands: list[Command], batch: int) -> list[Command]:
        for command in commands:
            state = self.states.setdefault(command.device_id, {})
            self.before[command.command_id] = dict(state)
            model = self.registry.model_of(command.device_id)
            state.update(model.commands[command.name].expected_state(command.params))
            self.writes.append(
                PreviewWrite(
                    order=len(self.writes) + 1,
                    batch=batch,
                    phase=_phase(self.coordinator, command),
                    device_id=command.device_id,
                    command=command.name,
                    params=dict(command.params),
                    predicted=dict(state),
                )
            )
        self.events.extend(self.coordinator.progress())
        return commands

    def skipped(self) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        coordinator = self.coordinator
        if isinstance(coordinator, PlanRun):
            for step in coordinator.plan.steps:
                devices = coordinator.devices_of(step.name)
                if not devices:
                    why = next(
                        (
                            e.detail
                            for e in self.events
                            if e.step == step.name and e.kind is PlanEventKind.STEP_SKIPPED
                        ),
                        None,
                    )
                    out.append((step.name, "*", why or "not reached"))
                    continue
                out.extend(
                    (step.name, device, f"condition {step.when!r} is false")
                    for device, dev in devices.items()
                    if dev.status == "skipped"
                )
            self.notes.extend(coordinator.notes)
        return out


def _phase(coordinator: Any, command: Command) -> str:
    if isinstance(coordinator, RolloutRun):
        return f"wave {coordinator.status()['wave']}"
    return command.command_id.split("/")[1]


def _undo(coordinator: Any, registry: Registry, dry: _DryRun) -> list[PreviewWrite]:
    """The compensations a saga would send after its last step, or a rollout's roll back."""
    pairs: list[tuple[str, str, list[list[Any]]]] = []  # (phase, device, undo commands)
    if isinstance(coordinator, PlanRun) and coordinator.plan.kind == "saga":
        for name in reversed(coordinator.started_steps()):
            for device, dev in coordinator.devices_of(name).items():
                if dev.undo:
                    pairs.append((f"undo {name}", device, dev.undo))
    elif isinstance(coordinator, RolloutRun):
        for device in reversed(coordinator.updated_devices()):
            undo = coordinator.rollback_of(device)
            if undo:
                pairs.append(("rollback", device, undo))
    writes: list[PreviewWrite] = []
    states = {d: dict(s) for d, s in dry.states.items()}
    batch, last_phase = 0, None
    for phase, device, commands in pairs:
        if phase != last_phase:
            batch, last_phase = batch + 1, phase
        for name, params in commands:
            state = states.setdefault(device, {})
            state.update(registry.model_of(device).commands[name].expected_state(params))
            writes.append(
                PreviewWrite(len(writes) + 1, batch, phase, device, name, dict(params), dict(state))
            )
    return writes
