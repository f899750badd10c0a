"""A tiny stand-in for the orchestrator and the devices, to drive coordinators in unit tests.

``DeviceLoop`` delivers a coordinator's commands FIFO, lets a ``behaviour``
function decide what each delivery does, applies the effect of applied
commands to per-device state (the twin model's ``expected_state``), and hands
every terminal ``CommandEvent`` back to the coordinator. The manual clock moves
by ``step_s`` per delivery and jumps to ``next_timer()`` when nothing is queued.
It records every command issued and every effect applied, so tests can check
ordering, idempotency and the final state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from commands.coordinator import OUTCOME_KINDS, PlanEvent
from iotflow.events import Command, CommandEvent, CommandEventKind
from twins.registry import Registry

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# What one delivery does: DONE (applied, acked), FAILED (device refused, not applied),
# LOST (applied, ack lost: FAILED with unknown outcome), DROPPED (not applied, FAILED unknown),
# EXPIRED (not applied, expired before sending), LATE (held up until it expired).
DONE, FAILED, LOST, DROPPED, EXPIRED, LATE = "done", "failed", "lost", "dropped", "expired", "late"

Behaviour = Callable[[Command], str]


def always_done(command: Command) -> str:
    return DONE


@dataclass
class DeviceLoop:
    registry: Registry
    states: dict[str, dict[str, Any]]
    behaviour: Behaviour = always_done
    now: datetime = T0
    step_s: float = 0.01
    issued: list[Command] = field(default_factory=list)
    applied: list[Command] = field(default_factory=list)
    events: list[PlanEvent] = field(default_factory=list)
    outcomes: dict[str, CommandEventKind] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)  # ("issue" | "outcome", command id)
    _queue: deque[Command] = field(default_factory=deque)

    def reported(self, device_id: str) -> dict[str, Any]:
        return dict(self.states.get(device_id, {}))

    def start(self, coordinator: Any) -> None:
        self._take(coordinator.start(self.now, self.reported), coordinator)

    def run(self, coordinator: Any, *, max_rounds: int = 100_000) -> None:
        """Deliver until the coordinator finished (or nothing is left to do)."""
        for _ in range(max_rounds):
            if self._queue:
                self.deliver_one(coordinator)
                continue
            due = coordinator.next_timer()
            if coordinator.finished or due is None:
                return
            self.now = max(self.now, due)
            self._take(coordinator.on_timer(self.now, self.reported), coordinator)
        raise AssertionError("the coordinator did not finish")

    def deliver_one(self, coordinator: Any) -> CommandEvent:
        command = self._queue.popleft()
        self.now += timedelta(seconds=self.step_s)
        what = self.behaviour(command)
        if what == LATE:  # the delivery was held up past the command's expiry
            self.now = max(self.now, command.expires_at)
        if self.now >= command.expires_at:
            what = EXPIRED  # an expired command is never delivered
        if what in (DONE, LOST):
            self._apply(command)
        kind = {
            DONE: CommandEventKind.DONE,
            FAILED: CommandEventKind.FAILED,
            LOST: CommandEventKind.FAILED,
            DROPPED: CommandEventKind.FAILED,
            EXPIRED: CommandEventKind.EXPIRED,
        }[what]
        # applied: what the orchestrator knows (a lost ack or a silent device: unknown)
        applied = {DONE: True, FAILED: False, EXPIRED: False}.get(what)
        event = CommandEvent(
            command.command_id, command.device_id, kind, self.now, what, applied=applied
        )
        assert kind in OUTCOME_KINDS
        self.outcomes[command.command_id] = kind
        self.log.append(("outcome", command.command_id))
        self._take(coordinator.on_outcome(event, self.now, self.reported), coordinator)
        return event

    def _take(self, commands: list[Command], coordinator: Any) -> None:
        for command in commands:
            assert command.correlation_id == coordinator.coordinator_id
            assert command.expires_at > self.now, f"{command.command_id} issued already expired"
            self.issued.append(command)
            self.log.append(("issue", command.command_id))
            self._queue.append(command)
        self.events.extend(coordinator.progress())

    def _apply(self, command: Command) -> None:
        model = self.registry.model_of(command.device_id)
        state = self.states.setdefault(command.device_id, {})
        state.update(model.commands[command.name].expected_state(command.params))
        self.applied.append(command)

    @property
    def pending(self) -> int:
        return len(self._queue)
