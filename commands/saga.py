"""Sagas: plans whose steps undo themselves when the whole cannot finish.

A ``SagaSpec`` is a ``PlanSpec`` whose every step declares its
``compensation``:

- ``none``: nothing to undo (a notification: it is idempotent by command id);
- ``restore`` or ``{restore: [prop, ...]}``: bring the device back to the
  reported state it had just before the step's command went out (by default
  the properties the command sets, e.g. the previous setpoint; a light can
  list ``[on, brightness]``). The commands that do it are found in the
  device's twin model (``TwinModel.commands_for``);
- ``{command: unlock, params: {}}``: a fixed command.

Guarantees of a ``SagaRun`` (a ``commands.coordinator.Coordinator``):

- All or nothing: the saga ends DONE (every critical step done or skipped by
  its condition), COMPENSATED (a critical step failed, the deadline passed or
  it was cancelled, and every step that ran was undone) or, only when
  ``max_compensation_attempts`` is set and runs out, STUCK with the devices
  that need a person named in the final event. It never ends with some steps
  applied and others undone.
- Exactly what was applied is undone: once a step fails no further step
  starts; the saga waits until every command in flight has its outcome, then
  compensates each device whose command was applied or may have been
  (sent but never confirmed: a restore sent to a device that did not change
  is harmless), never one that certainly did nothing (rejected, never sent,
  or the device answered failed).
- In reverse: steps are undone in the reverse order they started; a step's
  compensations all finish before those of the step before it go out (a
  STUCK device does not stop the others: doors still unlock).
- Compensations are retried: a compensation that does not finish DONE is
  sent again after a back-off (doubling from ``compensation_backoff`` up to
  ``compensation_backoff_max``) under a new command id
  (``.../undo/{i}#{attempt}``), without limit unless
  ``max_compensation_attempts`` is set. Every issue, retry and finish is a
  ``PlanEvent`` for the audit trail.
- Non-critical steps (``critical: false``, e.g. a notification) are reported
  when they fail but do not roll the saga back.

Example::

    >>> from datetime import UTC, datetime
    >>> from twins.registry import simulator_registry
    >>> saga = SagaSpec.model_validate({"name": "away", "steps": [
    ...     {"name": "doors", "target": "lock-0001", "command": "lock",
    ...      "compensation": {"command": "unlock"}},
    ...     {"name": "heat", "target": "hvac-0001", "command": "set_temperature",
    ...      "params": {"setpoint": 16}, "compensation": "restore"}]}).build(simulator_registry(), "away-1")
    >>> now = datetime(2026, 1, 1, tzinfo=UTC)
    >>> [c.name for c in saga.start(now, lambda d: {"setpoint": 21.0, "locked": 0})]
    ['lock']
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from commands.coordinator import Outcome, PlanEventKind, ReportedState, outcome_of
from commands.plans import (
    DeviceRun,
    ExpandedPlan,
    ExpandedStep,
    PlanRun,
    PlanSpec,
    PlanState,
    Step,
    StepStatus,
    request_parts,
)
from iotflow.declarations import load_file, validate
from iotflow.durations import Duration, label
from iotflow.errors import ConfigError, TwinRejected
from iotflow.events import Command, CommandEvent, from_ms, to_ms
from twins.models import TwinModel
from twins.registry import Registry

__all__ = [
    "Compensation",
    "SagaRun",
    "SagaSpec",
    "SagaStep",
    "load_saga",
    "saga_from_request",
    "undo_commands",
]


class Compensation(BaseModel):
    """How a saga step is undone: nothing, a restore of the previous state, or a fixed command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = None
    params: dict[str, Any] = {}
    restore: list[str] | None = None
    """Properties to restore; [] = those the step's command sets."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data == "restore":
            return {"restore": []}
        if data == "none":
            return {}
        if isinstance(data, str):
            raise ValueError(
                f"compensation {data[:40]!r} is not understood; write none, restore, "
                "{restore: [property, ...]} or {command: name, params: {...}}"
            )
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> Compensation:
        if self.command is not None and self.restore is not None:
            raise ValueError("a compensation is either a command or a restore, not both")
        if self.params and self.command is None:
            raise ValueError("params belong to a compensation command; give command too")
        return self

    def expand(
        self, registry: Registry, devices: tuple[str, ...], command: str, where: str
    ) -> dict[str, Any] | None:
        """Plain data for a run, checked for every device: ``{"command", "params"}``,
        ``{"restore": [...]}`` or None; ``ConfigError`` naming ``where`` when it cannot work."""
        if self.command is not None:
            checked: dict[str, Any] = {}
            for device_id in devices:
                try:
                    checked = registry.check_command(device_id, self.command, self.params)
                except TwinRejected as exc:
                    raise ConfigError(f"{where}: {exc.reason}") from None
            return {"command": self.command, "params": checked}
        if self.restore is None:
            return None
        for model_name in dict.fromkeys(registry.device(d).model for d in devices):
            model = registry.models[model_name]
            wanted = self.restore or list(model.commands[command].sets)
            if not wanted:
                raise ConfigError(
                    f"{where}: restore has nothing to restore: command {command!r} of model "
                    f"{model.name!r} sets no property; list the properties or use none"
                )
            for prop in wanted:
                if prop not in model.properties:
                    raise ConfigError(
                        f"{where}: restore names unknown property {prop!r} of model "
                        f"{model.name!r} (properties: {', '.join(model.properties)})"
                    )
                if not any(prop in spec.sets for spec in model.commands.values()):
                    raise ConfigError(
                        f"{where}: no command of model {model.name!r} sets {prop!r}, "
                        "so it cannot be restored"
                    )
        return {"restore": list(self.restore)}


def undo_commands(
    compensation: Mapping[str, Any],
    model: TwinModel,
    command: str,
    params: Mapping[str, Any],
    device_id: str,
    state: Mapping[str, Any],
) -> tuple[dict[str, Any] | None, list[list[Any]], list[str]]:
    """What undoes ``command`` on a device whose reported state is ``state`` right before it.

    Returns the previous values captured (restore only), the undo commands
    (``[[name, params], ...]``, empty when the command changes nothing that
    was reported) and notes for the audit (a property never reported, a
    previous value no command can set).
    """
    if "command" in compensation:
        return None, [[compensation["command"], dict(compensation["params"])]], []
    expected = model.commands[command].expected_state(params)
    props = compensation["restore"] or list(model.commands[command].sets)
    previous = {p: state[p] for p in props if p in state}
    notes = [f"{device_id} reported no {p} to restore" for p in props if p not in state]
    # a property the command sets to the value it already had has nothing to undo
    changes = {p: v for p, v in previous.items() if not (p in expected and expected[p] == v)}
    try:
        checked = {p: model.check_property(p, v) for p, v in changes.items()}
        undo = [[name, cmd_params] for name, cmd_params in model.commands_for(checked)]
    except TwinRejected as exc:
        undo = []
        notes.append(f"{device_id}: previous state cannot be restored: {exc.reason}")
    return previous, undo, notes


class SagaStep(Step):
    """A plan step with its compensation (required: write ``none`` when there is nothing to undo)."""

    compensation: Compensation
    critical: bool = True
    """Whether this step failing rolls the saga back (a notification need not)."""


class SagaSpec(PlanSpec):
    """A saga declaration: steps with compensations, and how compensations are retried."""

    steps: list[SagaStep] = Field(min_length=1)  # type: ignore[assignment]
    kind: ClassVar[str] = "saga"
    compensation_timeout: Duration = timedelta(seconds=30)
    """Expiry of each compensation command."""
    compensation_backoff: Duration = timedelta(seconds=1)
    compensation_backoff_max: Duration = timedelta(seconds=30)
    max_compensation_attempts: int | None = Field(None, ge=1)
    """None: retry compensations until they succeed (safety first); else give up to STUCK."""
    compensation_priority: int | None = None
    """Priority of compensation commands; None = the step's own priority."""
    deadline: Duration | None = None
    """Roll back when the saga has not finished within this long after its start."""

    @field_validator(
        "compensation_timeout", "compensation_backoff", "compensation_backoff_max", "deadline"
    )
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError(f"must be positive, got {label(value)}")
        return value

    def _expanded_step(
        self,
        step: Step,
        devices: tuple[str, ...],
        params: dict[str, Any],
        after: tuple[str, ...],
        registry: Registry,
    ) -> ExpandedStep:
        base = super()._expanded_step(step, devices, params, after, registry)
        comp: Compensation = step.compensation  # type: ignore[attr-defined]  # steps are SagaSteps
        where = f"{self.name}.steps.{step.name}.compensation"
        compensation = comp.expand(registry, devices, step.command, where)
        return ExpandedStep(
            **{**base.__dict__, "compensation": compensation, "critical": step.critical}
        )

    def _settings(self) -> dict[str, Any]:
        return {
            "compensation_timeout_s": self.compensation_timeout.total_seconds(),
            "compensation_backoff_s": self.compensation_backoff.total_seconds(),
            "compensation_backoff_max_s": self.compensation_backoff_max.total_seconds(),
            "max_compensation_attempts": self.max_compensation_attempts,
            "compensation_priority": self.compensation_priority,
            "deadline_s": None if self.deadline is None else self.deadline.total_seconds(),
        }

    def build(self, registry: Registry, plan_id: str) -> SagaRun:  # type: ignore[override]
        """A ready-to-start run (``plan_id`` must be new: it prefixes every command id)."""
        return SagaRun(self.expand(registry, plan_id))


def load_saga(source: str | Path | Mapping[str, Any]) -> SagaSpec:
    """A ``SagaSpec`` from a dict or a YAML/JSON file; ``ConfigError`` naming the field."""
    data = source if isinstance(source, Mapping) else load_file(source, "saga")
    return validate(SagaSpec, data, "saga")


def saga_from_request(spec: Mapping[str, Any], registry: Registry, now: datetime) -> SagaRun:
    """The orchestrator's builder for ``{"coordinator": {"type": "saga", "id": ..., ...}}``."""
    run_id, data = request_parts(spec, "saga")
    return validate(SagaSpec, data, "saga").build(registry, run_id)


class SagaRun(PlanRun):
    """Runs an expanded saga (see the module docstring for the guarantees)."""

    snapshot_type = "saga"

    def __init__(self, plan: ExpandedPlan, state: Any = None) -> None:
        if plan.kind != "saga":
            raise ConfigError(
                f"plan {plan.plan_id!r} is a {plan.kind}, not a saga; build it from a SagaSpec"
            )
        super().__init__(plan, state)
        self._settings = plan.settings

    # -- public -----------------------------------------------------------------------------

    def cancel(self, now: datetime, reason: str = "cancelled") -> list[Command]:
        """Stop starting steps and undo what ran (after the commands in flight finish)."""
        if self.state is not PlanState.RUNNING:
            return []
        self._begin_rollback(now, None, reason)
        return self._advance(now, lambda _device: {})

    def stuck_devices(self) -> list[str]:
        """Devices whose compensation ran out of attempts."""
        return sorted(
            {
                device_id
                for run in self._run.steps.values()
                for device_id, dev in run.devices.items()
                if "stuck" in dev.undo_status
            }
        )

    # -- coordinator ------------------------------------------------------------------------------

    def on_timer(self, now: datetime, reported: ReportedState) -> list[Command]:
        if (
            self.state is PlanState.RUNNING
            and self._deadline_ms() is not None
            and to_ms(now) >= self._deadline_ms()
        ):
            return self.cancel(now, f"deadline of {self._settings['deadline_s']:g}s passed")
        if self.state is not PlanState.COMPENSATING:
            return []
        now_ms = to_ms(now)
        commands: list[Command] = []
        for step in self.plan.steps:
            for device_id, dev in self._run.steps[step.name].devices.items():
                for i, status in enumerate(dev.undo_status):
                    due = dev.undo_due_ms[i]
                    if status == "waiting" and due is not None and due <= now_ms:
                        commands.append(self._issue_undo(step, device_id, dev, i, now))
        return commands

    def next_timer(self) -> datetime | None:
        if self.state is PlanState.RUNNING:
            deadline = self._deadline_ms()
            return None if deadline is None else from_ms(deadline)
        if self.state is not PlanState.COMPENSATING:
            return None
        dues = [
            due
            for run in self._run.steps.values()
            for dev in run.devices.values()
            for status, due in zip(dev.undo_status, dev.undo_due_ms, strict=True)
            if status == "waiting" and due is not None
        ]
        return from_ms(min(dues)) if dues else None

    # -- forward hooks -----------------------------------------------------------------------------

    def start(self, now: datetime, reported: ReportedState) -> list[Command]:
        if self.state is PlanState.PENDING and self._settings.get("deadline_s") is not None:
            self._run.started_ms = to_ms(now)
        return super().start(now, reported)

    def _deadline_ms(self) -> int | None:
        deadline_s = self._settings.get("deadline_s")
        if deadline_s is None or self._run.started_ms is None:
            return None
        return self._run.started_ms + round(deadline_s * 1000)

    def _before_command(
        self, step: ExpandedStep, device_id: str, dev: DeviceRun, state: Mapping[str, Any]
    ) -> list[str]:
        if step.compensation is None:
            return []
        model = self.twin_model(device_id)
        dev.previous, dev.undo, notes = undo_commands(
            step.compensation, model, step.command, step.params, device_id, state
        )
        return notes

    def _after_device(
        self, name: str, device_id: str, now: datetime, reported: ReportedState
    ) -> list[Command]:
        dev = self._run.steps[name].devices[device_id]
        if (
            dev.status == "failed"
            and self.plan.step(name).critical
            and self.state is PlanState.RUNNING
        ):
            self._begin_rollback(now, name, f"{device_id}: {dev.detail or dev.outcome}")
        return []

    def _step_failed(self, name: str, now: datetime) -> None:
        if self.plan.step(name).critical and self.state is PlanState.RUNNING:
            self._begin_rollback(now, name, f"step {name} failed")

    def _begin_rollback(self, now: datetime, step: str | None, reason: str) -> None:
        self._run.failed_step = step
        self._run.reason = reason
        self._move(PlanState.DRAINING)
        in_flight = self._in_flight()
        self._emit(
            PlanEventKind.COMPENSATING,
            now,
            step=step,
            detail=f"rolling back ({reason}); waiting for {in_flight} commands in flight"
            if in_flight
            else f"rolling back ({reason})",
        )

    def _in_flight(self) -> int:
        return sum(run.in_flight for run in self._run.steps.values())

    def _advance(self, now: datetime, reported: ReportedState) -> list[Command]:
        if self.state is PlanState.RUNNING:
            return super()._advance(now, reported)
        if self.state is PlanState.DRAINING and self._in_flight() == 0:
            self._move(PlanState.COMPENSATING)
            return self._compensate_next(now)
        return []

    def _conclude(self, now: datetime) -> None:
        failed = [s.name for s in self.plan.steps if self.step_status(s.name) is StepStatus.FAILED]
        self._move(PlanState.DONE)
        detail = "every step done or skipped"
        if failed:
            detail += f"; non-critical steps failed: {', '.join(failed)}"
        self._emit(PlanEventKind.DONE, now, detail=detail)

    # -- compensation -------------------------------------------------------------------------------

    def _compensate_next(self, now: datetime) -> list[Command]:
        """Issue the compensations of the latest-started step not yet undone; conclude when none is left."""
        started = sorted(
            (run.started_seq, step)
            for step in self.plan.steps
            if (run := self._run.steps[step.name]).started_seq is not None and not run.undone
        )
        while started:
            _, step = started.pop()
            run = self._run.steps[step.name]
            targets = {
                device_id: dev
                for device_id, dev in run.devices.items()
                if dev.outcome in (Outcome.APPLIED, Outcome.UNKNOWN) and dev.undo
            }
            if not targets:
                run.undone = True
                why = (
                    "no compensation declared"
                    if step.compensation is None
                    else "nothing applied to undo"
                )
                self._emit(PlanEventKind.COMPENSATED, now, step=step.name, detail=why)
                continue
            commands = []
            for device_id, dev in targets.items():
                count = len(dev.undo or [])
                dev.undo_ids = [""] * count
                dev.undo_status = ["waiting"] * count
                dev.undo_attempts = [0] * count
                dev.undo_due_ms = [None] * count
                commands.extend(
                    self._issue_undo(step, device_id, dev, i, now) for i in range(count)
                )
            run.undo_open = len(commands)
            self._emit(
                PlanEventKind.COMPENSATING,
                now,
                step=step.name,
                detail=f"{len(commands)} compensation commands to {len(targets)} devices",
            )
            return commands
        stuck = self.stuck_devices()
        cause = self._run.reason or "rolled back"
        if stuck:
            self._move(PlanState.STUCK)
            self._emit(
                PlanEventKind.STUCK,
                now,
                step=self._run.failed_step,
                detail=f"{cause}; compensation gave up on {len(stuck)} devices: {', '.join(stuck[:20])}",
            )
        else:
            self._move(PlanState.COMPENSATED)
            self._emit(
                PlanEventKind.FAILED,
                now,
                step=self._run.failed_step,
                detail=f"{cause}; every applied step compensated",
            )
        return []

    def _issue_undo(
        self, step: ExpandedStep, device_id: str, dev: DeviceRun, i: int, now: datetime
    ) -> Command:
        name, params = dev.undo[i]  # type: ignore[index]
        dev.undo_attempts[i] += 1
        attempt = dev.undo_attempts[i]
        old = dev.undo_ids[i]
        if old:
            self._index.pop(old, None)
        command_id = f"{self.plan.plan_id}/{step.name}/{device_id}/undo/{i}" + (
            f"#{attempt}" if attempt > 1 else ""
        )
        dev.undo_ids[i] = command_id
        dev.undo_status[i] = "issued"
        dev.undo_due_ms[i] = None
        self._index[command_id] = (step.name, device_id, i)
        if attempt > 1:
            self._emit(
                PlanEventKind.COMPENSATING,
                now,
                step=step.name,
                device_id=device_id,
                command_id=command_id,
                detail=f"attempt {attempt} of {name}",
            )
        priority = self._settings.get("compensation_priority")
        return Command(
            command_id=command_id,
            device_id=device_id,
            name=name,
            params=dict(params),
            issued_at=now,
            expires_at=now + timedelta(seconds=self._settings["compensation_timeout_s"]),
            priority=step.priority if priority is None else priority,
            correlation_id=self.plan.plan_id,
        )

    def _on_undo_outcome(
        self,
        name: str,
        device_id: str,
        index: int,
        event: CommandEvent,
        now: datetime,
        reported: ReportedState,
    ) -> list[Command]:
        run = self._run.steps[name]
        dev = run.devices[device_id]
        if dev.undo_status[index] != "issued":
            return []
        if outcome_of(event) is Outcome.APPLIED:
            dev.undo_status[index] = "done"
            run.undo_open -= 1
        else:
            attempts = dev.undo_attempts[index]
            limit = self._settings.get("max_compensation_attempts")
            if limit is not None and attempts >= limit:
                dev.undo_status[index] = "stuck"
                run.undo_open -= 1
                self._emit(
                    PlanEventKind.STUCK,
                    now,
                    step=name,
                    device_id=device_id,
                    command_id=event.command_id,
                    detail=f"compensation failed {attempts} times ({event.kind.value}: {event.detail or 'no detail'}); giving up",
                )
            else:
                delay = min(
                    self._settings["compensation_backoff_s"] * 2 ** (attempts - 1),
                    self._settings["compensation_backoff_max_s"],
                )
                dev.undo_status[index] = "waiting"
                dev.undo_due_ms[index] = to_ms(now) + round(delay * 1000)
                self._emit(
                    PlanEventKind.COMPENSATION_RETRY,
                    now,
                    step=name,
                    device_id=device_id,
                    command_id=event.command_id,
                    detail=f"{event.kind.value}: {event.detail or 'no detail'}; retry in {delay:g}s",
                )
        if run.undo_open > 0:
            return []
        run.undone = True
        stuck = sum("stuck" in d.undo_status for d in run.devices.values())
        self._emit(
            PlanEventKind.COMPENSATED,
            now,
            step=name,
            detail=f"{sum(bool(d.undo_ids) for d in run.devices.values())} devices restored"
            + (f", {stuck} stuck" if stuck else ""),
        )
        return self._compensate_next(now)
