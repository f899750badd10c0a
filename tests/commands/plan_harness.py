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

import heapq
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from commands.coordinator import OUTCOME_KINDS, PlanEvent
from commands.orchestrator import OrchestratorConfig, StartCoordinator, Write
from commands.saga import SagaRun, load_saga
from commands.validation import DeviceAck, DeviceState
from iotflow.events import Ack, AckStatus, Command, CommandEvent, CommandEventKind
from twins.registry import Registry, simulator_registry

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


# -- a home for the leaving-home saga ------------------------------------------------------


def home_registry(lights: int = 6, doors: int = 2) -> Registry:
    reg = simulator_registry()
    reg.add_group("doors", [f"lock-{i:04d}" for i in range(1, doors + 1)])
    reg.add_group("lights", [f"light-{i:04d}" for i in range(1, lights + 1)])
    return reg


LEAVING_HOME: dict[str, Any] = {
    "name": "leaving-home",
    "compensation_backoff": "1s",
    "steps": [
        {
            "name": "lock_doors",
            "target": {"group": "doors"},
            "command": "lock",
            "compensation": {"command": "unlock"},
        },
        {
            "name": "thermostat_away",
            "target": "hvac-0001",
            "command": "set_temperature",
            "params": {"setpoint": 16},
            "compensation": "restore",
        },
        {
            "name": "lights_off",
            "target": {"group": "lights"},
            "command": "turn_off",
            "compensation": {"restore": ["on", "brightness"]},
        },
        {
            "name": "arm_security",
            "target": "security-0001",
            "command": "arm",
            "compensation": {"command": "disarm"},
        },
        {
            "name": "notify",
            "target": "notifier-0001",
            "command": "notify",
            "params": {"message": "house secured"},
            "compensation": "none",
            "critical": False,
        },
    ],
}


def home_states(lights: int = 6, doors: int = 2) -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = {
        "hvac-0001": {"mode": "heat", "setpoint": 21.5, "fan_speed": 1},
        "security-0001": {"armed": 0},
        "notifier-0001": {"last_message": ""},
    }
    for i in range(1, doors + 1):
        states[f"lock-{i:04d}"] = {"locked": 0}
    for i in range(1, lights + 1):
        states[f"light-{i:04d}"] = {"on": i % 3 != 0, "brightness": 10 * i}
    for i in range(1, lights + 1):
        states[f"light-{i:04d}"]["on"] = int(states[f"light-{i:04d}"]["on"])
    return states


def build(
    spec: dict[str, Any] | None = None, lights: int = 6, plan_id: str = "leave-1"
) -> tuple[SagaRun, Registry]:
    reg = home_registry(lights)
    return load_saga(spec or LEAVING_HOME).build(reg, plan_id), reg


# -- coordinators hosted by the real orchestrator, with fake devices -------------------------

# What a device does with one delivery: ACK (act, ack done), NACK (refuse, ack failed),
# SILENT (nothing), MUTE (act, no answer), STATE (act, publish its state, no ack),
# SLOW (act, ack done after 3 s: maybe after the orchestrator gave up).
ACK, NACK, SILENT, MUTE, STATE, SLOW = "ack", "nack", "silent", "mute", "state", "slow"


@dataclass
class HostedLoop:
    """Runs coordinators inside ``commands.orchestrator.Orchestrator`` on a manual clock.

    Devices act on each command id at most once (a re-send is re-acked, as
    the simulator does) and answer after ``latency_s``. Every ``Write`` is
    checked against its command's expiry when it is emitted.
    """

    registry: Registry
    states: dict[str, dict[str, Any]]
    behaviour: Callable[[Command, int], str] = lambda command, attempt: ACK
    latency_s: float = 0.05
    config: dict[str, Any] = field(
        default_factory=lambda: {
            "ack_timeout": {"mqtt": "1s"},
            "max_attempts": 3,
            "backoff": "200ms",
        }
    )
    now: datetime = T0
    writes: list[Any] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    acted: dict[str, list[str]] = field(default_factory=dict)  # device -> command ids acted on
    _pending: list[tuple[datetime, int, Any]] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.orchestrator = OrchestratorConfig.model_validate(self.config).build(
            None, self.registry, lambda: self.now
        )
        for device_id, state in self.states.items():
            self._take(self.orchestrator.on_batch(DeviceState(device_id, dict(state))))

    def host(self, coordinator: Any) -> None:
        self._take(self.orchestrator.on_batch(StartCoordinator(coordinator)))

    def restart(self, coordinator_id: str) -> Any:
        """Rebuild the orchestrator from its snapshot (through JSON, as a recovery store
        keeps it); answers already on their way reach the new one. The coordinator as
        restored is returned."""
        snap = json.loads(json.dumps(self.orchestrator.snapshot()))
        self.orchestrator = OrchestratorConfig.model_validate(self.config).build(
            snap, self.registry, lambda: self.now
        )
        return self.orchestrator.coordinators[coordinator_id]

    def step(self, count: int) -> None:
        """Handle ``count`` device answers or timers."""
        for _ in range(count):
            self._advance()

    def run(self, coordinator: Any, *, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            if coordinator.finished and not self._pending:
                return
            if not self._advance():
                return
        raise AssertionError("the hosted coordinator did not finish")

    def _advance(self) -> bool:
        due = self.orchestrator.next_timer()
        device_due = self._pending[0][0] if self._pending else None
        if due is None and device_due is None:
            return False
        if device_due is not None and (due is None or device_due <= due):
            self.now = max(self.now, device_due)
            _, _, item = heapq.heappop(self._pending)
            self._take(self.orchestrator.on_batch(item))
        else:
            self.now = max(self.now, due)
            self._take(self.orchestrator.on_timer())
        return True

    def _take(self, out: list[Any]) -> None:
        for item in out:
            if not isinstance(item, Write):
                self.events.append(item)
                continue
            command = item.command
            assert self.now < command.expires_at, f"{command.command_id} written after expiry"
            self.writes.append(item)
            device = command.device_id
            acted = self.acted.setdefault(device, [])
            if command.command_id in acted:  # a re-send of what it already did: re-ack
                what = ACK
            else:
                what = self.behaviour(command, item.attempt)
                if what in (ACK, MUTE, STATE, SLOW):
                    acted.append(command.command_id)
                    model = self.registry.model_of(device)
                    state = self.states.setdefault(device, {})
                    state.update(model.commands[command.name].expected_state(command.params))
            reply: Any = None
            delay = self.latency_s
            state = dict(self.states.get(device, {}))
            if what in (ACK, SLOW):
                reply = DeviceAck(device, Ack(command.command_id, AckStatus.DONE, state))
                delay = 3.0 if what == SLOW else delay
            elif what == NACK:
                reply = DeviceAck(device, Ack(command.command_id, AckStatus.FAILED, state, "no"))
            elif what == STATE:
                reply = DeviceState(device, state)
            if reply is not None:
                self._seq += 1
                heapq.heappush(
                    self._pending, (self.now + timedelta(seconds=delay), self._seq, reply)
                )
