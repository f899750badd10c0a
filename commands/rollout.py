"""Rolling fleet operations (a firmware update) in waves, with abort and roll back.

A ``RolloutSpec`` (pydantic; dict, JSON or YAML through
``iotflow.declarations``) sends one command to every device of a target
(``commands.plans.Target``), a wave at a time:

- ``canary``: the first wave's size in devices (optional), then ``waves``:
  cumulative percentages of the fleet (``[1, 10, 100]``: 1 %, then up to
  10 %, then everyone). Each wave has at least one device; the target's
  resolved order decides who goes first.
- ``max_in_flight``: at most this many commands of the rollout are
  unfinished at any time; the next goes out as soon as one finishes.
- ``success_threshold``: the fraction of a wave's devices that must end DONE
  for the next wave to start.
- ``abort``: ``max_failures`` (checked after every outcome) and
  ``failure_rate`` (failed / finished over the whole rollout, once at least
  ``min_finished`` devices finished), both checked after every outcome and
  at every wave's end. The first criterion that trips stops the rollout
  (as does a wave below its success threshold): no further command
  is issued, the commands in flight are waited for, then every device that
  was updated (or may have been: sent, never confirmed) is rolled back.
- ``rollback``: ``restore`` (default: the reported values the command sets,
  e.g. the previous ``firmware``, captured just before each device's
  command), a fixed ``{command, params}``, or ``none``. Rollback commands obey
  ``max_in_flight``, go newest update first, and are retried
  ``rollback_attempts`` times with a doubling back-off; a device still not
  rolled back is named in the final STUCK event.
- ``wave_pause``: a bake time between waves (the abort check runs before it).

Progress: ``PlanEvent`` items (STARTED, WAVE_STARTED, WAVE_DONE with counts,
ABORTED with the reason, ROLLED_BACK, and the terminal DONE, FAILED after a
complete roll back, or STUCK), and ``status()`` for counts at any time.
``snapshot()``/``RolloutRun.restore`` resume it after a restart where it
stopped; per outcome the work is constant, so 10,000 devices are cheap.

Example::

    >>> from twins.registry import simulator_registry
    >>> spec = RolloutSpec.model_validate({"name": "fw2", "target": {"devices": ["lock-0001"]},
    ...     "command": "unlock", "waves": [100]})
    >>> spec.waves, spec.abort.failure_rate
    ([100.0], 0.1)
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

from commands.coordinator import Outcome, PlanEvent, PlanEventKind, ReportedState, outcome_of
from commands.plans import _PLAN_ID, Target, request_parts
from commands.saga import Compensation, undo_commands
from iotflow.declarations import load_file, validate
from iotflow.durations import Duration, label
from iotflow.errors import ConfigError, InvalidTransition, TwinRejected
from iotflow.events import Command, CommandEvent, from_ms, to_ms
from twins.models import TwinModel, define_model
from twins.registry import Registry

__all__ = [
    "AbortCriteria",
    "RolloutRun",
    "RolloutSpec",
    "RolloutState",
    "load_rollout",
    "rollout_from_request",
]


class AbortCriteria(BaseModel):
    """When a rollout stops and rolls back; a criterion set to None is off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_rate: float | None = Field(0.1, gt=0, le=1)
    """Abort when failed / finished exceeds this (0.1 = 10 %)."""
    max_failures: int | None = Field(None, ge=1)
    """Abort once this many devices failed."""
    min_finished: int = Field(10, ge=1)
    """Judge the failure rate only once this many devices finished (a small canary is
    judged by ``success_threshold``)."""


class RolloutSpec(BaseModel):
    """A rollout declaration (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    target: Target
    command: str
    params: dict[str, Any] = {}
    canary: int | None = Field(None, ge=1)
    waves: list[float] = Field(default_factory=lambda: [1.0, 10.0, 100.0], min_length=1)
    max_in_flight: int = Field(100, ge=1)
    success_threshold: float = Field(0.9, ge=0, le=1)
    abort: AbortCriteria = Field(default_factory=AbortCriteria)
    rollback: Compensation = Field(default_factory=lambda: Compensation(restore=[]))
    timeout: Duration = timedelta(minutes=5)
    """Expiry of each command (``expires_at``)."""
    wave_pause: Duration = timedelta(0)
    rollback_attempts: int = Field(3, ge=1)
    rollback_backoff: Duration = timedelta(seconds=1)
    priority: int = 0

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _PLAN_ID.fullmatch(value):
            raise ValueError(f"name {value[:70]!r} must be 1..128 letters, digits or _.:@-")
        return value

    @field_validator("waves")
    @classmethod
    def _growing(cls, value: list[float]) -> list[float]:
        if any(not (0 < p <= 100) or math.isnan(p) for p in value):
            raise ValueError(f"wave percentages must be in (0, 100], got {value}")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"wave percentages are cumulative and must grow, got {value}")
        if value[-1] != 100:
            raise ValueError(
                f"the last wave must reach 100 (percent of the fleet), got {value[-1]:g}"
            )
        return value

    @field_validator("timeout", "rollback_backoff")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be positive, got {label(value)}")
        return value

    @field_validator("wave_pause")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError(f"must not be negative, got {label(value)}")
        return value

    def wave_bounds(self, fleet: int) -> list[int]:
        """Cumulative device counts at the end of each wave (empty waves left out)."""
        bounds: list[int] = []
        if self.canary is not None:
            bounds.append(min(self.canary, fleet))
        for percent in self.waves:
            end = min(fleet, max(1, math.ceil(fleet * percent / 100)))
            if not bounds or end > bounds[-1]:
                bounds.append(end)
        return bounds

    def expand(self, registry: Registry, rollout_id: str) -> dict[str, Any]:
        """Plain data for a run: devices in order, wave bounds, checked params, models, settings."""
        if not _PLAN_ID.fullmatch(rollout_id):
            raise ConfigError(
                f"rollout id {rollout_id[:70]!r} must be 1..128 letters, digits or _.:@-"
            )
        where = f"rollout {self.name}"
        try:
            devices = self.target.resolve(registry)
        except (ConfigError, TwinRejected) as exc:
            raise ConfigError(f"{where}.target: {exc}") from None
        if not devices:
            raise ConfigError(f"{where}.target: {self.target.describe()} matches no device")
        params: dict[str, Any] = {}
        device_models: dict[str, str] = {}
        checked_models: dict[str, dict[str, Any]] = {}
        for device_id in devices:
            model = registry.device(device_id).model
            device_models[device_id] = model
            if model in checked_models:
                continue  # same model, same params: checked once
            try:
                params = registry.check_command(device_id, self.command, self.params)
            except TwinRejected as exc:
                raise ConfigError(f"{where}: {exc.reason}") from None
            checked_models[model] = registry.models[model].model_dump(
                mode="json", exclude={"name"}, exclude_defaults=True
            )
        firsts = tuple(dict.fromkeys(device_models[d] for d in devices))
        representatives = tuple(next(d for d in devices if device_models[d] == m) for m in firsts)
        rollback = self.rollback.expand(
            registry, representatives, self.command, f"{where}.rollback"
        )
        return {
            "rollout_id": rollout_id,
            "command": self.command,
            "params": params,
            "devices": list(devices),
            "device_models": device_models,
            "models": checked_models,
            "bounds": self.wave_bounds(len(devices)),
            "max_in_flight": self.max_in_flight,
            "success_threshold": self.success_threshold,
            "abort": self.abort.model_dump(),
            "rollback": rollback,
            "timeout_s": self.timeout.total_seconds(),
            "wave_pause_s": self.wave_pause.total_seconds(),
            "rollback_attempts": self.rollback_attempts,
            "rollback_backoff_s": self.rollback_backoff.total_seconds(),
            "priority": self.priority,
        }

    def build(self, registry: Registry, rollout_id: str) -> RolloutRun:
        """A ready-to-start run (``rollout_id`` must be new: it prefixes every command id)."""
        return RolloutRun(self.expand(registry, rollout_id))


def load_rollout(source: str | Path | Mapping[str, Any]) -> RolloutSpec:
    """A ``RolloutSpec`` from a dict or a YAML/JSON file; ``ConfigError`` naming the field."""
    data = source if isinstance(source, Mapping) else load_file(source, "rollout")
    return validate(RolloutSpec, data, "rollout")


def rollout_from_request(spec: Mapping[str, Any], registry: Registry, now: datetime) -> RolloutRun:
    """The orchestrator's builder for ``{"coordinator": {"type": "rollout", "id": ..., ...}}``."""
    run_id, data = request_parts(spec, "rollout")
    return validate(RolloutSpec, data, "rollout").build(registry, run_id)


class RolloutState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"  # between waves, for wave_pause
    DRAINING = "draining"  # aborted; waiting for the commands in flight
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    ROLLED_BACK = "rolled_back"
    STUCK = "stuck"


R = RolloutState
_MOVES: dict[RolloutState, frozenset[RolloutState]] = {
    R.PENDING: frozenset({R.RUNNING}),
    R.RUNNING: frozenset({R.PAUSED, R.DRAINING, R.DONE}),
    R.PAUSED: frozenset({R.RUNNING, R.DRAINING}),
    R.DRAINING: frozenset({R.ROLLING_BACK}),
    R.ROLLING_BACK: frozenset({R.ROLLED_BACK, R.STUCK}),
    R.DONE: frozenset(),
    R.ROLLED_BACK: frozenset(),
    R.STUCK: frozenset(),
}

# device status codes (compact: a 10,000-device snapshot stays small)
_WAIT, _SENT, _DONE, _FAILED = "w", "s", "d", "f"
_UNDO_WAIT, _UNDO_SENT, _UNDONE, _UNDO_STUCK = "uw", "us", "u", "x"


class _State(msgspec.Struct):
    state: str = R.PENDING.value
    wave: int = 0
    next_index: int = 0  # next device (in order) to send to
    in_flight: int = 0
    done: int = 0
    failed: int = 0
    wave_done: int = 0
    wave_failed: int = 0
    resume_ms: int | None = None  # end of a wave pause
    reason: str | None = None
    status: dict[str, str] = {}  # device -> code, for devices that were sent something
    outcome: dict[str, str] = {}  # device -> Outcome of its update
    undo: dict[str, list[list[Any]]] = {}  # device -> rollback commands
    undo_queue: list[str] = []  # devices waiting for a rollback send, next at the end
    undo_attempts: dict[str, int] = {}
    undo_due_ms: dict[str, int] = {}  # device -> when its rollback may be re-sent
    undo_live: dict[str, int] = {}  # device -> rollback commands of this attempt unfinished
    undo_error: dict[str, str] = {}  # device -> why a rollback command of this attempt failed
    rolled_back: int = 0


class RolloutRun:
    """Runs an expanded rollout as a ``commands.coordinator.Coordinator``.

    Command ids: ``{rollout_id}/{command}/{device}`` for the update,
    ``{rollout_id}/rollback/{device}/{i}`` (``#n`` from the second attempt)
    for the roll back.
    """

    snapshot_type = "rollout"

    def __init__(self, definition: Mapping[str, Any], state: _State | None = None) -> None:
        self.d = dict(definition)
        self.coordinator_id: str = self.d["rollout_id"]
        self._devices: list[str] = self.d["devices"]
        self._bounds: list[int] = self.d["bounds"]
        self._models: dict[str, TwinModel] | None = None
        self._s = state or _State()
        self._events: list[PlanEvent] = []
        self._index_of = {device: i for i, device in enumerate(self._devices)}
        self._state = RolloutState(self._s.state)
        # (model, previous values) -> rollback commands: most devices share them
        self._undo_cache: dict[tuple[str, tuple[Any, ...]], list[list[Any]]] = {}

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> RolloutState:
        return self._state

    @property
    def finished(self) -> bool:
        return not _MOVES[self.state]

    def status(self) -> dict[str, Any]:
        """Counts for a progress display: state, wave, done, failed, in flight, rolled back."""
        s = self._s
        return {
            "state": s.state,
            "wave": s.wave,
            "waves": len(self._bounds),
            "devices": len(self._devices),
            "sent": len(s.status),
            "done": s.done,
            "failed": s.failed,
            "in_flight": s.in_flight,
            "rolled_back": s.rolled_back,
            "reason": s.reason,
        }

    def updated_devices(self) -> list[str]:
        """Devices whose update is (or may be) in place and not rolled back, in rollout order."""
        s = self._s
        return [
            d
            for d in sorted(s.outcome, key=self._index_of.__getitem__)
            if s.outcome[d] != Outcome.NOT_APPLIED and s.status[d] != _UNDONE
        ]

    def rollback_of(self, device: str) -> list[list[Any]]:
        """The commands (``[[name, params], ...]``) that would roll ``device`` back."""
        return [list(c) for c in self._s.undo.get(device, [])]

    def progress(self) -> list[PlanEvent]:
        events, self._events = self._events, []
        return events

    # -- coordinator ------------------------------------------------------------------------------

    def start(self, now: datetime, reported: ReportedState) -> list[Command]:
        if self.state is not R.PENDING:
            return []
        self._move(R.RUNNING)
        waves = ", ".join(str(b) for b in self._bounds)
        self._emit(
            PlanEventKind.STARTED,
            now,
            detail=f"{self.d['command']} to {len(self._devices)} devices in waves up to {waves}",
        )
        self._wave_started(now)
        return self._fill(now, reported)

    def on_outcome(
        self, event: CommandEvent, now: datetime, reported: ReportedState
    ) -> list[Command]:
        device, undo_index = self._parse(event.command_id)
        s = self._s
        if device is None:
            return []
        if undo_index is not None:
            return self._on_undo_outcome(device, undo_index, event, now)
        if s.status.get(device) != _SENT:
            return []  # unknown or repeated
        s.in_flight -= 1
        outcome = outcome_of(event)
        s.outcome[device] = outcome.value
        wave = self._wave_of(device)
        if outcome is Outcome.APPLIED:
            s.status[device] = _DONE
            s.done += 1
            if wave == s.wave:
                s.wave_done += 1
        else:
            s.status[device] = _FAILED
            s.failed += 1
            if wave == s.wave:
                s.wave_failed += 1
        if self.state is R.RUNNING:
            why = self._abort_reason()
            if why is not None:
                self._abort(now, why)
        if self.state is R.DRAINING:
            return self._drained(now)
        if self.state is not R.RUNNING:
            return []
        return self._fill(now, reported)

    def cancel(self, now: datetime, reason: str = "cancelled") -> list[Command]:
        """Abort by hand: no further update; roll back the updated devices (after the
        commands in flight finish). Returns the roll back commands to send now."""
        if self.state not in (R.RUNNING, R.PAUSED):
            return []
        self._s.resume_ms = None
        self._abort(now, f"cancelled: {reason}")
        return self._drained(now)

    def on_timer(self, now: datetime, reported: ReportedState) -> list[Command]:
        s = self._s
        if self.state is R.PAUSED and s.resume_ms is not None and to_ms(now) >= s.resume_ms:
            s.resume_ms = None
            self._move(R.RUNNING)
            self._wave_started(now)
            return self._fill(now, reported)
        if self.state is R.ROLLING_BACK:
            return self._fill_undo(now)
        return []

    def next_timer(self) -> datetime | None:
        s = self._s
        if self.state is R.PAUSED and s.resume_ms is not None:
            return from_ms(s.resume_ms)
        if self.state is R.ROLLING_BACK and s.undo_due_ms:
            return from_ms(min(s.undo_due_ms.values()))
        return None

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": self.snapshot_type,
            "definition": self.d,
            "state": msgspec.to_builtins(self._s),
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Self:
        if not isinstance(snap, Mapping) or snap.get("type") != cls.snapshot_type:
            got = snap.get("type") if isinstance(snap, Mapping) else type(snap).__name__
            raise ConfigError(f"snapshot of type {got!r} cannot restore a rollout")
        definition = snap.get("definition")
        needed = {"rollout_id", "devices", "bounds", "command", "params", "device_models", "models"}
        if not isinstance(definition, Mapping) or not needed <= set(definition):
            raise ConfigError(f"rollout snapshot definition must have {', '.join(sorted(needed))}")
        try:
            state = msgspec.convert(snap.get("state", {}), _State)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"rollout snapshot state is invalid: {exc}") from None
        unknown = set(state.status) - set(definition["devices"])
        if unknown:
            raise ConfigError(
                f"rollout snapshot state names devices outside its definition: {sorted(unknown)[:3]}"
            )
        return cls(definition, state)

    # -- waves ------------------------------------------------------------------------------------

    def _wave_started(self, now: datetime) -> None:
        s = self._s
        start = 0 if s.wave == 0 else self._bounds[s.wave - 1]
        end = self._bounds[s.wave]
        s.wave_done = s.wave_failed = 0
        self._emit(
            PlanEventKind.WAVE_STARTED,
            now,
            wave=s.wave,
            detail=f"devices {start + 1}..{end} of {len(self._devices)} ({end - start} devices)",
        )

    def _fill(self, now: datetime, reported: ReportedState) -> list[Command]:
        """Send within the current wave up to max_in_flight; close the wave when it is complete."""
        s = self._s
        commands: list[Command] = []
        while self.state is R.RUNNING:
            end = self._bounds[s.wave]
            while s.next_index < end and s.in_flight < self.d["max_in_flight"]:
                device = self._devices[s.next_index]
                s.next_index += 1
                commands.append(self._send(device, now, reported(device)))
            if s.next_index < end or s.in_flight > 0 or not self._close_wave(now):
                break
        if self.state is R.DRAINING:
            commands.extend(self._drained(now))
        return commands

    def _close_wave(self, now: datetime) -> bool:
        """The wave finished: judge it. True when the next wave starts now."""
        s = self._s
        start = 0 if s.wave == 0 else self._bounds[s.wave - 1]
        size = self._bounds[s.wave] - start
        self._emit(
            PlanEventKind.WAVE_DONE,
            now,
            wave=s.wave,
            detail=f"{s.wave_done} of {size} done, {s.wave_failed} failed "
            f"({s.done} done, {s.failed} failed so far)",
        )
        why = None
        if s.wave_done < self.d["success_threshold"] * size:
            why = (
                f"wave {s.wave}: {s.wave_done} of {size} devices succeeded, below the "
                f"success threshold of {self.d['success_threshold']:.0%}"
            )
        why = why or self._abort_reason()
        if why is not None:
            self._abort(now, why)
            return False
        if s.wave + 1 == len(self._bounds):
            self._move(R.DONE)
            self._emit(
                PlanEventKind.DONE,
                now,
                detail=f"{s.done} of {len(self._devices)} devices done, {s.failed} failed",
            )
            return False
        s.wave += 1
        pause_s = self.d.get("wave_pause_s", 0)
        if pause_s > 0:
            s.resume_ms = to_ms(now) + round(pause_s * 1000)
            self._move(R.PAUSED)
            return False
        self._wave_started(now)
        return True

    def _abort_reason(self) -> str | None:
        s = self._s
        abort = self.d["abort"]
        if abort.get("max_failures") is not None and s.failed >= abort["max_failures"]:
            return f"{s.failed} devices failed, the limit is {abort['max_failures']}"
        finished = s.done + s.failed
        rate = abort.get("failure_rate")
        if rate is not None and finished >= abort["min_finished"] and s.failed / finished > rate:
            return (
                f"failure rate {s.failed}/{finished} = {s.failed / finished:.1%} is over {rate:.0%}"
            )
        return None

    def _abort(self, now: datetime, why: str) -> None:
        self._s.reason = why
        self._move(R.DRAINING)
        self._emit(
            PlanEventKind.ABORTED,
            now,
            wave=self._s.wave,
            detail=f"{why}; no further waves; waiting for {self._s.in_flight} commands in flight",
        )

    def _send(self, device: str, now: datetime, state: Mapping[str, Any]) -> Command:
        s = self._s
        s.status[device] = _SENT
        s.in_flight += 1
        rollback = self.d.get("rollback")
        if rollback is not None:
            undo = self._undo_for(rollback, device, state)
            if undo:
                s.undo[device] = undo
        return Command(
            command_id=f"{self.coordinator_id}/{self.d['command']}/{device}",
            device_id=device,
            name=self.d["command"],
            params=dict(self.d["params"]),
            issued_at=now,
            expires_at=now + timedelta(seconds=self.d["timeout_s"]),
            priority=self.d.get("priority", 0),
            correlation_id=self.coordinator_id,
        )

    def _undo_for(
        self, rollback: Mapping[str, Any], device: str, state: Mapping[str, Any]
    ) -> list[list[Any]]:
        model = self._model(device)
        if "restore" in rollback:
            props = rollback["restore"] or list(model.commands[self.d["command"]].sets)
            key = (model.name, tuple(state.get(p) for p in props))
        else:
            key = (model.name, ())
        undo = self._undo_cache.get(key)
        if undo is None:
            _, undo, _notes = undo_commands(
                rollback, model, self.d["command"], self.d["params"], device, state
            )
            self._undo_cache[key] = undo
        return undo

    # -- roll back ------------------------------------------------------------------------------------

    def _drained(self, now: datetime) -> list[Command]:
        s = self._s
        if s.in_flight > 0:
            return []
        self._move(R.ROLLING_BACK)
        # newest update first
        targets = [
            d
            for d in sorted(s.status, key=self._index_of.__getitem__, reverse=True)
            if s.status[d] in (_DONE, _FAILED)
            and s.outcome.get(d) != Outcome.NOT_APPLIED
            and d in s.undo
        ]
        s.undo_queue = targets[::-1]  # popped from the end: newest first
        for d in targets:
            s.undo_attempts[d] = 0
        self._emit(
            PlanEventKind.COMPENSATING,
            now,
            detail=f"rolling back {len(targets)} updated devices",
        )
        return self._fill_undo(now)

    def _fill_undo(self, now: datetime) -> list[Command]:
        s = self._s
        commands: list[Command] = []
        now_ms = to_ms(now)
        for device in [d for d, t in s.undo_due_ms.items() if t <= now_ms]:
            del s.undo_due_ms[device]
            s.undo_queue.append(device)  # retries go next
        limit = self.d["max_in_flight"]
        while s.undo_queue and s.in_flight < limit:
            device = s.undo_queue.pop()
            s.undo_attempts[device] += 1
            attempt = s.undo_attempts[device]
            s.status[device] = _UNDO_SENT
            s.undo_live[device] = len(s.undo[device])
            s.in_flight += len(s.undo[device])
            suffix = f"#{attempt}" if attempt > 1 else ""
            commands.extend(
                Command(
                    command_id=f"{self.coordinator_id}/rollback/{device}/{i}{suffix}",
                    device_id=device,
                    name=name,
                    params=dict(params),
                    issued_at=now,
                    expires_at=now + timedelta(seconds=self.d["timeout_s"]),
                    priority=self.d.get("priority", 0),
                    correlation_id=self.coordinator_id,
                )
                for i, (name, params) in enumerate(s.undo[device])
            )
        self._maybe_finish(now)
        return commands

    def _on_undo_outcome(
        self, device: str, index: int, event: CommandEvent, now: datetime
    ) -> list[Command]:
        s = self._s
        attempt = s.undo_attempts.get(device, 0)
        current = f"{self.coordinator_id}/rollback/{device}/{index}" + (
            f"#{attempt}" if attempt > 1 else ""
        )
        if s.status.get(device) != _UNDO_SENT or event.command_id != current:
            return []  # unknown, repeated, or of an earlier attempt
        s.in_flight -= 1
        s.undo_live[device] -= 1
        if outcome_of(event) is not Outcome.APPLIED:
            s.undo_error[device] = f"{event.kind.value}: {event.detail or 'no detail'}"
        if s.undo_live[device] > 0:
            return []
        del s.undo_live[device]
        failure = s.undo_error.pop(device, None)
        if failure is None:
            s.status[device] = _UNDONE
            s.rolled_back += 1
        elif attempt >= self.d["rollback_attempts"]:
            s.status[device] = _UNDO_STUCK
            self._emit(
                PlanEventKind.STUCK,
                now,
                device_id=device,
                command_id=event.command_id,
                detail=f"rollback failed {attempt} times ({failure}); giving up",
            )
        else:
            # the device's whole rollback goes again (absolute values: harmless twice)
            s.status[device] = _UNDO_WAIT
            delay = self.d["rollback_backoff_s"] * 2 ** (attempt - 1)
            s.undo_due_ms[device] = to_ms(now) + round(delay * 1000)
            self._emit(
                PlanEventKind.COMPENSATION_RETRY,
                now,
                device_id=device,
                command_id=event.command_id,
                detail=f"{failure}; retry in {delay:g}s",
            )
        return self._fill_undo(now)

    def _maybe_finish(self, now: datetime) -> None:
        s = self._s
        if self.state is not R.ROLLING_BACK or s.undo_queue or s.undo_due_ms or s.in_flight:
            return
        stuck = sorted(d for d, code in s.status.items() if code == _UNDO_STUCK)
        self._emit(PlanEventKind.ROLLED_BACK, now, detail=f"{s.rolled_back} devices rolled back")
        if stuck:
            self._move(R.STUCK)
            self._emit(
                PlanEventKind.STUCK,
                now,
                detail=f"aborted: {s.reason}; rollback gave up on {len(stuck)} devices: "
                f"{', '.join(stuck[:20])}",
            )
        else:
            self._move(R.ROLLED_BACK)
            self._emit(
                PlanEventKind.FAILED,
                now,
                detail=f"aborted: {s.reason}; {s.rolled_back} updated devices rolled back",
            )

    # -- helpers ------------------------------------------------------------------------------------

    def _parse(self, command_id: str) -> tuple[str | None, int | None]:
        prefix = f"{self.coordinator_id}/"
        if not command_id.startswith(prefix):
            return None, None
        kind, _, rest = command_id[len(prefix) :].partition("/")
        if kind == self.d["command"] and rest in self._index_of:
            return rest, None
        if kind == "rollback":
            device, _, tail = rest.rpartition("/")
            index = tail.split("#", 1)[0]
            if device in self._index_of and index.isdigit():
                return device, int(index)
        return None, None

    def _wave_of(self, device: str) -> int:
        return bisect.bisect_right(self._bounds, self._index_of[device])

    def _model(self, device: str) -> TwinModel:
        if self._models is None:
            self._models = {n: define_model(n, m) for n, m in self.d["models"].items()}
        return self._models[self.d["device_models"][device]]

    def _move(self, new: RolloutState) -> None:
        have = self.state
        if new not in _MOVES[have]:
            raise InvalidTransition(
                self.coordinator_id, have.value, new.value, {m.value for m in _MOVES[have]}
            )
        self._s.state = new.value
        self._state = new

    def _emit(self, kind: PlanEventKind, now: datetime, **fields: Any) -> None:
        self._events.append(PlanEvent(self.coordinator_id, kind, now, **fields))
