"""The interface between the orchestrator and multi-step coordinators (plans, sagas, rollouts).

The orchestrator (``commands.orchestrator``) owns the life of a single
command: validation, per-device FIFO queues, sending, acks, retries, expiry,
de-duplication. A *coordinator* owns a multi-step operation on top of it. The
orchestrator hosts coordinators:

1. it calls ``start(now, reported)`` once and enqueues the commands returned;
2. for every terminal outcome (see ``OUTCOME_KINDS``) of a command whose
   ``correlation_id`` is the coordinator's ``coordinator_id`` it calls
   ``on_outcome(event, now, reported)`` exactly once and enqueues what comes back;
3. at ``next_timer()`` it calls ``on_timer(now, reported)`` (back-off of
   compensations, pauses between waves) and enqueues what comes back;
4. for a cancel request it calls ``cancel(now, reason)`` and enqueues what comes back;
5. after each call it drains ``progress()`` (``PlanEvent`` items for
   ``{prefix}.commands.events`` and the DuckDB ``command_audit`` table);
6. it drops the coordinator once ``finished`` is true and ``progress()`` is drained;
7. it stores ``snapshot()`` in its own snapshot and rebuilds the coordinator
   with ``restore_coordinator(snap)`` after a restart.

Coordinators are pure: no clock of their own (``now`` is handed in), no I/O,
plain-data snapshots. Command ids they issue are deterministic
(``{coordinator_id}/{step}/{device_id}`` and a suffix per re-issue), so a
replayed start or outcome never produces a second, different write.

Example::

    >>> from datetime import UTC, datetime
    >>> ev = PlanEvent("leave-1", PlanEventKind.STARTED, datetime(2026, 1, 1, tzinfo=UTC))
    >>> ev.kind.value
    'started'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, Self, runtime_checkable

import msgspec

from iotflow.errors import ConfigError
from iotflow.events import CommandEvent, CommandEventKind

__all__ = [
    "OUTCOME_KINDS",
    "Coordinator",
    "Outcome",
    "PlanEvent",
    "PlanEventKind",
    "ReportedState",
    "coordinator_builders",
    "outcome_of",
    "restore_coordinator",
]

# The orchestrator's latest known reported state of a device ({} when none is known).
ReportedState = Callable[[str], Mapping[str, Any]]

# The terminal kinds of a command; on_outcome sees each issued command once with one of them.
OUTCOME_KINDS: frozenset[CommandEventKind] = frozenset(
    {
        CommandEventKind.DONE,
        CommandEventKind.FAILED,
        CommandEventKind.EXPIRED,
        CommandEventKind.REJECTED,
    }
)


class PlanEventKind(StrEnum):
    """Coordinator-level transitions (command-level ones are ``CommandEventKind``)."""

    STARTED = "started"
    STEP_STARTED = "step_started"
    STEP_DONE = "step_done"
    STEP_FAILED = "step_failed"
    STEP_SKIPPED = "step_skipped"
    COMPENSATING = "compensating"  # a compensation command was issued (or re-issued)
    COMPENSATED = "compensated"  # one step's compensation finished for every device
    COMPENSATION_RETRY = "compensation_retry"  # a compensation failed and is tried again later
    STUCK = "stuck"  # compensation attempts exhausted: the devices named need a person
    WAVE_STARTED = "wave_started"
    WAVE_DONE = "wave_done"
    ABORTED = "aborted"  # a rollout's abort criteria tripped
    ROLLED_BACK = "rolled_back"
    DONE = "done"  # terminal: every step done
    FAILED = "failed"  # terminal: failed, every applied step compensated


class PlanEvent(msgspec.Struct, frozen=True):
    """One coordinator-level transition, for ``{prefix}.commands.events`` (key: ``plan_id``).

    ``step`` names the plan/saga step, ``wave`` the rollout wave (0 = canary),
    ``device_id``/``command_id`` are set when the transition concerns one
    command, and ``detail`` says why in words.
    """

    plan_id: str
    kind: PlanEventKind
    ts: datetime
    detail: str | None = None
    step: str | None = None
    wave: int | None = None
    device_id: str | None = None
    command_id: str | None = None


class Outcome(StrEnum):
    """Whether a command's effect happened, as far as anyone can know."""

    APPLIED = "applied"
    NOT_APPLIED = "not_applied"
    UNKNOWN = "unknown"  # sent but never confirmed: the device may have acted


def outcome_of(event: CommandEvent) -> Outcome:
    """Classify a terminal ``CommandEvent``.

    DONE is applied, REJECTED never reached a device. FAILED and EXPIRED
    follow the event's ``applied`` (set by the orchestrator when it knows:
    ``False`` when the device answered failed or the command expired before
    it was sent) and are unknown without it. Coordinators compensate applied
    and unknown outcomes: a "restore previous" sent to a device that never
    changed is harmless, a missed one is not.
    """
    if event.kind is CommandEventKind.DONE:
        return Outcome.APPLIED
    if event.kind is CommandEventKind.REJECTED or event.applied is False:
        return Outcome.NOT_APPLIED
    return Outcome.APPLIED if event.applied else Outcome.UNKNOWN


@runtime_checkable
class Coordinator(Protocol):
    """A multi-step operation hosted by the orchestrator (a plan, a saga, a rollout).

    Every command it returns carries ``correlation_id == coordinator_id``.
    ``finished`` becomes true exactly once, after the terminal ``PlanEvent``
    (DONE, FAILED or STUCK) was queued in ``progress()``; afterwards every
    method returns no commands.
    """

    coordinator_id: str

    def start(self, now: datetime, reported: ReportedState) -> list[Any]:
        """The first commands (``iotflow.events.Command``); call once."""
        ...

    def on_outcome(self, event: CommandEvent, now: datetime, reported: ReportedState) -> list[Any]:
        """React to the terminal outcome of a command it issued; unknown or repeated ids return []."""
        ...

    def on_timer(self, now: datetime, reported: ReportedState) -> list[Any]:
        """Commands due at ``now`` (delayed retries, the next wave after a pause); [] when none is due."""
        ...

    def next_timer(self) -> datetime | None:
        """When ``on_timer`` next has work, or None."""
        ...

    def cancel(self, now: datetime, reason: str) -> list[Any]:
        """Stop by hand: a plan starts no further step, a saga compensates what ran, a
        rollout rolls back its updated devices (each after its commands in flight
        finish). The commands to send now; [] once finished."""
        ...

    @property
    def finished(self) -> bool:
        """True once the operation reached a terminal state."""
        ...

    def progress(self) -> list[PlanEvent]:
        """Drain the transitions since the last call, oldest first."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-able) with a ``"type"`` key for ``restore_coordinator``."""
        ...

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Self:
        """Rebuild from ``snapshot()``; refuses a snapshot of another definition."""
        ...


# snapshot "type" -> (module, class, request builder); imported lazily so this module stays a leaf.
_KINDS = {
    "plan": ("commands.plans", "PlanRun", "plan_from_request"),
    "saga": ("commands.saga", "SagaRun", "saga_from_request"),
    "rollout": ("commands.rollout", "RolloutRun", "rollout_from_request"),
}


def coordinator_builders() -> dict[str, Callable[..., Coordinator]]:
    """``type`` -> ``builder(spec, registry, now)`` for every coordinator kind.

    ``spec`` is a request ``{"type": "saga", "id": "<new run id>", **declaration}``;
    a builder raises ``ConfigError`` naming the field when it is wrong.
    """
    return {
        kind: getattr(importlib.import_module(module), builder)
        for kind, (module, _, builder) in _KINDS.items()
    }


def restore_coordinator(snap: dict[str, Any]) -> Coordinator:
    """Rebuild any coordinator from its ``snapshot()``."""
    kind = snap.get("type") if isinstance(snap, dict) else None
    if kind not in _KINDS:
        msg = f"coordinator snapshot type {kind!r} is unknown; expected one of {sorted(_KINDS)}"
        raise ConfigError(msg)
    module, name, _ = _KINDS[kind]
    cls = getattr(importlib.import_module(module), name)
    return cls.restore(snap)
