"""Simulation: run twins forward with behaviour models and a planned command sequence.

``simulate`` takes plain twin states (``{device_id: {property: value}}``), the
registry (for each device's model), the behaviours (``twins.behaviours``) and
a plan of commands, and predicts what the devices will report, before
anything is sent. It works on a copy: the states given are never changed.

Guarantees:

- **Deterministic.** No clock is read: time starts at the given ``start``
  and advances in steps of ``step`` up to ``start + horizon``; the same input
  gives the same ``Prediction``.
- **Commands as the devices would take them.** Each planned command is
  checked against the device's model (``Registry.check_command``: unknown
  device or command, missing, unknown, mistyped or out-of-range parameter),
  and must fall within ``[start, start + horizon]``. A command that fails is
  *rejected* in the result with the reason and not applied; the rest of the
  plan still runs. An accepted command takes effect at its time ``at`` (plan
  order for equal times): the state changes as its ``CommandSpec.sets``
  says (``expected_state``), and behaviours that react to it directly
  (``Linear.per_command``) apply their amounts.
- **Behaviours between commands.** Each device's behaviours (by model, or
  by device id) advance its properties between consecutive stops (every
  ``step`` and every command time); moved values are clamped into the
  property's ``min``..``max``. A behaviour that lacks a value it needs moves
  nothing and leaves a warning (once per device and behaviour).
- **Bounded.** At most ``max_steps`` steps (``ConfigError`` before any work
  when ``horizon / step`` is larger).

Example (the docstring example is run by the test suite)::

    >>> from datetime import UTC, datetime, timedelta
    >>> from twins.behaviours import SIMULATOR_BEHAVIOURS
    >>> from twins.registry import simulator_registry
    >>> twins = {"hvac-0001": {"temperature": 27.0, "mode": "off", "setpoint": 21.0, "fan_speed": 1}}
    >>> plan = [(timedelta(minutes=5), "hvac-0001", "set_temperature", {"setpoint": 22}),
    ...         (timedelta(minutes=5), "hvac-0001", "set_mode", {"mode": "cool"}),
    ...         (timedelta(minutes=6), "hvac-0001", "set_fan_speed", {"speed": 9})]
    >>> p = simulate(twins, SIMULATOR_BEHAVIOURS, plan, registry=simulator_registry(),
    ...              start=datetime(2026, 1, 1, tzinfo=UTC), horizon=timedelta(hours=1),
    ...              step=timedelta(minutes=1))
    >>> [(c.command, c.params) for c in p.applied]
    [('set_temperature', {'setpoint': 22.0}), ('set_mode', {'mode': 'cool'})]
    >>> print(p.rejected[0].reason)
    device 'hvac-0001': set_fan_speed.params.speed: 9 is out of range 0..3
    >>> final = p.final["hvac-0001"]
    >>> final["mode"], final["setpoint"], round(final["temperature"], 2)
    ('cool', 22.0, 22.3)
    >>> p.reaches("hvac-0001", "temperature", 24.0)
    datetime.datetime(2026, 1, 1, 0, 18, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from iotflow.durations import label, parse_duration
from iotflow.errors import ConfigError, TwinRejected
from iotflow.events import from_ms, to_ms
from twins.behaviours import Behaviours, Stalled
from twins.models import TwinModel
from twins.registry import Registry

__all__ = [
    "MAX_STEPS",
    "AppliedCommand",
    "PlannedCommand",
    "Prediction",
    "RejectedCommand",
    "Sample",
    "simulate",
]

MAX_STEPS = 100_000
"""The most steps one simulation takes by default (``horizon / step``)."""


@dataclass(frozen=True)
class PlannedCommand:
    """One command of a plan: at ``at`` (a ``timedelta`` after the start, or an aware
    ``datetime``), send ``command`` with ``params`` to ``device_id``."""

    at: timedelta | datetime
    device_id: str
    command: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AppliedCommand:
    """A planned command the simulation applied: its normalized params and the state it set."""

    index: int
    at: datetime
    device_id: str
    command: str
    params: dict[str, Any]
    sets: dict[str, Any]


@dataclass(frozen=True)
class RejectedCommand:
    """A planned command the simulation did not apply, and why (``kind`` as in ``TwinRejected``)."""

    index: int
    device_id: str | None
    command: str | None
    reason: str
    kind: str
    at: datetime | None = None


@dataclass(frozen=True)
class Sample:
    """A device's predicted state at one time."""

    at: datetime
    state: dict[str, Any]


@dataclass(frozen=True)
class Prediction:
    """The predicted outcome of a plan: per device its trajectory and final state.

    ``ok`` is true when every planned command was accepted. ``trajectory``
    holds a ``Sample`` per device at the start, at every step and at every
    command time (after the commands). ``warnings`` say what could not be
    simulated (a device unknown to the registry, a behaviour missing a value).
    """

    start: datetime
    end: datetime
    step: timedelta
    initial: dict[str, dict[str, Any]]
    final: dict[str, dict[str, Any]]
    trajectory: dict[str, list[Sample]]
    applied: list[AppliedCommand]
    rejected: list[RejectedCommand]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        """Whether the whole plan was accepted."""
        return not self.rejected

    def changes(self, device_id: str) -> dict[str, tuple[Any, Any]]:
        """Property -> (initial, final) for the properties of a device that changed."""
        before, after = self.initial.get(device_id, {}), self.final.get(device_id, {})
        return {
            prop: (before.get(prop), value)
            for prop, value in after.items()
            if before.get(prop) != value
        }

    def reaches(self, device_id: str, prop: str, value: float) -> datetime | None:
        """The first sample time at which ``prop`` is at or past ``value`` (coming from
        the side where it started), or None within the horizon."""
        samples = self.trajectory.get(device_id, [])
        first = samples[0].state.get(prop) if samples else None
        if not isinstance(first, int | float) or isinstance(first, bool):
            return None
        rising = first <= value
        for sample in samples:
            now = sample.state.get(prop)
            if isinstance(now, int | float) and (now >= value if rising else now <= value):
                return sample.at
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (times ISO 8601, UTC)."""

        def iso(at: datetime | None) -> str | None:
            return None if at is None else at.isoformat().replace("+00:00", "Z")

        return {
            "ok": self.ok,
            "start": iso(self.start),
            "end": iso(self.end),
            "step": label(self.step),
            "initial": self.initial,
            "final": self.final,
            "applied": [{**vars(c), "at": iso(c.at)} for c in self.applied],
            "rejected": [{**vars(r), "at": iso(r.at)} for r in self.rejected],
            "warnings": list(self.warnings),
            "trajectory": {
                device: [{"at": iso(s.at), **s.state} for s in samples]
                for device, samples in self.trajectory.items()
            },
        }


def _planned(item: object) -> PlannedCommand:
    """A plan item (``PlannedCommand``, ``(at, device_id, command[, params])`` or a dict) or ValueError."""
    if isinstance(item, PlannedCommand):
        return item
    if isinstance(item, Mapping):
        unknown = set(item) - {"at", "device_id", "command", "params"}
        if unknown:
            raise ValueError(
                f"unknown field {sorted(unknown)[0]!r}; a plan item has at, device_id, command, params"
            )
        missing = [k for k in ("at", "device_id", "command") if k not in item]
        if missing:
            raise ValueError(
                f"missing {missing[0]!r}; a plan item has at, device_id, command, params"
            )
        return PlannedCommand(
            item["at"], item["device_id"], item["command"], item.get("params", {})
        )
    if isinstance(item, tuple | list) and len(item) in (3, 4):
        return PlannedCommand(*item)
    raise ValueError(
        "a plan item is (at, device_id, command, params), a dict with those keys or a "
        f"PlannedCommand; got {type(item).__name__}"
    )


def _duration(value: object, name: str) -> timedelta:
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _at_ms(at: object, start_ms: int) -> int:
    """A command's time in epoch ms: an aware datetime, or a duration after the start."""
    if isinstance(at, datetime):
        return to_ms(at)  # ValueError for a naive datetime
    try:
        return start_ms + round(parse_duration(at).total_seconds() * 1000)
    except ConfigError as exc:
        raise ValueError(f"at: {exc}; or give an aware datetime") from None


class _Run:
    """The mutable state of one simulation (a copy of the twins)."""

    def __init__(
        self,
        twins: Mapping[str, Mapping[str, Any]],
        behaviours: Behaviours,
        registry: Registry,
    ) -> None:
        self._registry = registry
        self._behaviours = behaviours
        self.states: dict[str, dict[str, Any]] = {}
        self.models: dict[str, TwinModel] = {}
        self.bound: dict[str, list[Any]] = {}
        self.warnings: list[str] = []
        self._warned: set[tuple[str, int]] = set()
        for device_id, state in twins.items():
            if not isinstance(state, Mapping):
                self.warnings.append(
                    f"{str(device_id)[:60]!r}: its twin state is a {type(state).__name__}, "
                    "not an object of properties; left out"
                )
                continue
            self.states[device_id] = dict(state)
            if not registry.knows(device_id):
                self.warnings.append(
                    f"{str(device_id)[:60]!r}: not in the registry; its state is carried unchanged"
                )
                continue
            self._bind(device_id)

    def _bind(self, device_id: str) -> None:
        model = self._registry.model_of(device_id)
        self.models[device_id] = model
        self.bound[device_id] = self._behaviours.for_device(device_id, model)

    def advance(self, seconds: float) -> None:
        if seconds <= 0:
            return
        for device_id, behaviours in self.bound.items():
            state = self.states[device_id]
            for index, behaviour in enumerate(behaviours):
                moved = behaviour.advance(state, seconds)
                if isinstance(moved, Stalled):
                    self._warn(device_id, index, moved.reason)
                    continue
                self._set(device_id, moved)

    def _warn(self, device_id: str, index: int, reason: str) -> None:
        if (device_id, index) not in self._warned:
            self._warned.add((device_id, index))
            self.warnings.append(f"{device_id}: {reason}; not moved")

    def _set(self, device_id: str, moved: Mapping[str, float]) -> None:
        spec = self.models[device_id].properties
        state = self.states[device_id]
        for prop, value in moved.items():
            low, high = spec[prop].min, spec[prop].max
            if low is not None:
                value = max(value, low)
            if high is not None:
                value = min(value, high)
            state[prop] = value

    def apply(self, device_id: str, command: str, params: dict[str, Any]) -> dict[str, Any]:
        if device_id not in self.states:  # commanded, but no twin state given: start empty
            self.states[device_id] = {}
            self._bind(device_id)
        sets = self.models[device_id].commands[command].expected_state(params)
        state = self.states[device_id]
        state.update(sets)
        for behaviour in self.bound.get(device_id, []):
            self._set(device_id, behaviour.on_command(command, state))
        return sets

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {device_id: dict(state) for device_id, state in self.states.items()}


def simulate(
    twins: Mapping[str, Mapping[str, Any]],
    behaviours: Behaviours,
    plan: Sequence[PlannedCommand | tuple[Any, ...] | Mapping[str, Any]],
    *,
    registry: Registry,
    start: datetime,
    horizon: timedelta | str | float = timedelta(hours=1),
    step: timedelta | str | float = timedelta(minutes=1),
    max_steps: int = MAX_STEPS,
    track: Iterable[str] | None = None,
) -> Prediction:
    """Predict the twins' states over ``horizon`` from ``start`` under ``plan`` (see the module docstring).

    ``ConfigError`` (before any work) for a naive ``start``, a step that is not
    positive, a negative horizon, more than ``max_steps`` steps, or behaviours
    that do not fit a device's model. Everything wrong with a plan item is a
    ``RejectedCommand`` in the result instead. ``track`` names the devices
    whose trajectory is kept (None: every device; a large fleet over many steps
    keeps only those it shows); every device still has its final state.
    """
    if not isinstance(start, datetime) or start.tzinfo is None:
        raise ConfigError(f"start={start!r} must be an aware datetime (datetime.now(UTC))")
    horizon_td, step_td = _duration(horizon, "horizon"), _duration(step, "step")
    if step_td <= timedelta(0):
        raise ConfigError(f"step={label(step_td)} must be positive, e.g. '1m'")
    if horizon_td < timedelta(0):
        raise ConfigError(f"horizon={label(horizon_td)} must not be negative, e.g. '1h'")
    steps = math.ceil(horizon_td / step_td)
    if steps > max_steps:
        raise ConfigError(
            f"horizon {label(horizon_td)} in steps of {label(step_td)} is {steps:,} steps, over "
            f"max_steps={max_steps:,}; use a larger step or a shorter horizon"
        )
    if not isinstance(twins, Mapping):
        raise ConfigError(f"twins must map device ids to states, got {type(twins).__name__}")
    start_ms = to_ms(start)
    end_ms = start_ms + round(horizon_td.total_seconds() * 1000)
    step_ms = round(step_td.total_seconds() * 1000)

    run = _Run(twins, behaviours, registry)
    accepted, rejected = _check_plan(plan, registry, start_ms, end_ms)

    initial = run.snapshot()
    tracked = None if track is None else set(track)
    trajectory: dict[str, list[Sample]] = {
        d: [] for d in initial if tracked is None or d in tracked
    }
    applied: list[AppliedCommand] = []

    def record(at_ms: int) -> None:
        at = from_ms(at_ms)
        for device_id, state in run.states.items():
            if tracked is None or device_id in tracked:
                trajectory.setdefault(device_id, []).append(Sample(at, dict(state)))

    now_ms, pending = start_ms, 0
    grid = [min(start_ms + k * step_ms, end_ms) for k in range(1, steps + 1)]
    stops = sorted({*grid, *(at for at, *_ in accepted)} - {start_ms})
    # commands at the start take effect before the first sample
    while pending < len(accepted) and accepted[pending][0] == start_ms:
        applied.append(_apply(run, accepted[pending]))
        pending += 1
    record(start_ms)
    for stop in stops:
        run.advance((stop - now_ms) / 1000)
        now_ms = stop
        while pending < len(accepted) and accepted[pending][0] == stop:
            applied.append(_apply(run, accepted[pending]))
            pending += 1
        record(stop)
    return Prediction(
        start=start,
        end=from_ms(end_ms),
        step=step_td,
        initial=initial,
        final=run.snapshot(),
        trajectory=trajectory,
        applied=applied,
        rejected=rejected,
        warnings=run.warnings,
    )


_Accepted = tuple[int, int, str, str, dict[str, Any]]  # at_ms, index, device, command, params


def _check_plan(
    plan: object, registry: Registry, start_ms: int, end_ms: int
) -> tuple[list[_Accepted], list[RejectedCommand]]:
    """Split a plan into accepted commands (sorted by time, then plan order) and rejections."""
    if isinstance(plan, str | bytes | Mapping) or not isinstance(plan, Sequence):
        raise ConfigError(f"plan must be a list of planned commands, got {type(plan).__name__}")
    accepted: list[_Accepted] = []
    rejected: list[RejectedCommand] = []
    for index, item in enumerate(plan):
        try:
            planned = _planned(item)
            at_ms = _at_ms(planned.at, start_ms)
        except (TypeError, ValueError) as exc:
            rejected.append(
                RejectedCommand(index, None, None, f"plan[{index}]: {exc}", "malformed")
            )
            continue
        device, command = planned.device_id, planned.command
        at = _time(at_ms)
        shown_device = device if isinstance(device, str) else None
        shown_command = command if isinstance(command, str) else None
        if not start_ms <= at_ms <= end_ms:
            reason = (
                f"plan[{index}]: at {at.isoformat() if at else at_ms} is outside the simulated "
                f"span {from_ms(start_ms).isoformat()} .. {from_ms(end_ms).isoformat()}; "
                "move it or lengthen the horizon"
            )
            rejected.append(
                RejectedCommand(index, shown_device, shown_command, reason, "outside_horizon", at)
            )
            continue
        try:
            if not isinstance(device, str):
                raise TwinRejected(
                    f"device_id must be a string, got {type(device).__name__}",
                    kind="unknown_device",
                )
            if not isinstance(command, str):
                raise TwinRejected(
                    f"command must be a string, got {type(command).__name__}",
                    kind="unknown_command",
                )
            params = registry.check_command(device, command, planned.params)
        except TwinRejected as exc:
            rejected.append(
                RejectedCommand(index, shown_device, shown_command, exc.reason, exc.kind, at)
            )
            continue
        accepted.append((at_ms, index, device, command, params))
    accepted.sort(key=lambda c: (c[0], c[1]))
    return accepted, rejected


def _time(at_ms: int) -> datetime | None:
    """The datetime of epoch ms, or None when datetime cannot hold it."""
    try:
        return from_ms(at_ms)
    except (OverflowError, OSError, ValueError):
        return None


def _apply(run: _Run, command: _Accepted) -> AppliedCommand:
    at_ms, index, device_id, name, params = command
    sets = run.apply(device_id, name, params)
    return AppliedCommand(index, from_ms(at_ms), device_id, name, params, sets)
