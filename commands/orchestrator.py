"""The orchestrator: every command's life from request to a terminal state, as pure logic.

``Orchestrator`` speaks the project's stateful vocabulary (``on_batch``,
``on_timer``, ``next_timer``, ``snapshot``, an injected ``now``) and is wrapped
for Bytewax by ``operators.steps.LogicStep``. It takes one item at a time:

- a ``Command`` (a request), an ``Instruction`` (expanded against the registry),
  a ``StartCoordinator`` or ``CoordinatorRequest`` (a plan, saga or rollout to host),
  a ``CancelRequest`` (stop a hosted one: it compensates or rolls back what ran),
  an ``InvalidRequest`` (audited as REJECTED when it has a usable command id);
- a ``DeviceAck`` or ``DeviceState`` from a device,

and returns what it decided: ``Write`` items for the device writers (or, with
a ``deliver`` hook, what the writers made of them),
``CommandEvent`` and coordinators' ``PlanEvent`` items for the audit trail,
``Dropped`` items for the dead-letter topic.

Guarantees:

- **Validation first.** A command is checked against the twins registry
  (``commands.validation.CommandValidator``); a rejected one is audited
  (REQUESTED, REJECTED with the reason) and never written. A command id that
  cannot be an audit key (empty, too long, control characters) is dropped to
  the dead letters instead.
- **Per-device FIFO, one at a time.** A device has at most one command in
  flight; the next is sent only once it is DONE, FAILED or EXPIRED. Queued
  commands go by priority (higher first), then arrival order.
- **Conflicts.** A new command that writes a property which a live command of
  another origin (``correlation_id``; commands without one are one origin)
  also writes is compared with it by priority, then ``issued_at`` (recency),
  then command id: the loser is REJECTED with reason ``conflict`` naming the
  winner, never silently lost. A command already in flight cannot be
  recalled: a newer winner waits behind it and lands last.
- **Acknowledgment** by an ack message (``accepted`` -> ACKED, ``done`` ->
  DONE, ``failed`` -> FAILED, no retry: the device said no), or by a reported
  state showing every property the command sets (DONE). Acks from another
  device than the command's are dropped.
- **Timeouts and retries.** No answer within the protocol's ack timeout: the
  command is re-sent (same command id: devices run an id once) after an
  exponential back-off with jitter, up to ``max_attempts`` sends, then FAILED
  (``applied`` unknown).
- **Expiry.** Nothing is written at or after ``expires_at``: a queued command
  that reaches it is EXPIRED without being sent, a command waiting to be
  re-sent is EXPIRED instead, and one that expires in flight is EXPIRED at its
  ack deadline unless the device answers first. With ``deliver`` (the device
  writers, which check ``expires_at`` again on a fresh clock read), a command
  that expires between the decision and the writer is EXPIRED, ``applied``
  False (never sent; unknown if an earlier attempt was), and not recorded SENT. A ``failed`` answer at or
  after ``expires_at`` (a device refusing a command that reached it late:
  the MQTT 5 expiry counts whole seconds) is EXPIRED too, not applied.
- **Duplicates.** A request whose command id is known (live or finished within
  ``remember`` after its expiry; later, a replay is expired on arrival and never
  sent) does nothing; the same id with other content
  is dropped to the dead letters. An ack or state for a finished command
  changes nothing. A replayed coordinator start does nothing. A finished
  command keeps only its id, device, terminal state and request digest
  (``commands.remembered``): ~40 snapshot bytes each.
- **Coordinators** (``commands.coordinator``): started once, given each
  terminal outcome of the commands they issued exactly once, their timers and
  progress handled, their snapshots kept in this one's.
- **Sent is state.** SENT is recorded in the state in the same step that
  emits the write, so a restart from a snapshot taken after the write never
  writes again; a crash before that snapshot re-sends under the same command
  id, which devices run at most once.

Example::

    >>> from datetime import UTC, datetime, timedelta
    >>> from iotflow.events import Ack, AckStatus
    >>> from twins.registry import simulator_registry
    >>> t = [datetime(2026, 1, 1, tzinfo=UTC)]
    >>> orch = OrchestratorConfig().build(None, simulator_registry(), lambda: t[0])
    >>> cmd = Command("c1", "lock-0001", "unlock", {}, t[0], t[0] + timedelta(minutes=1))
    >>> [type(o).__name__ for o in orch.on_batch(cmd)]
    ['CommandEvent', 'CommandEvent', 'Write', 'CommandEvent']
    >>> done = orch.on_batch(DeviceAck("lock-0001", Ack("c1", AckStatus.DONE, {"locked": 0})))
    >>> [(e.kind.value, e.applied) for e in done]
    [('done', True)]
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

from commands.coordinator import Coordinator, restore_coordinator
from commands.instructions import Instruction
from commands.model import EVENT_OF, CommandRecord, CommandState
from commands.remembered import Remembered
from commands.validation import (
    CancelRequest,
    CommandValidator,
    CoordinatorRequest,
    DeviceAck,
    DeviceState,
    InvalidRequest,
    check_command_id,
    state_matches,
)
from iotflow.durations import Duration, label
from iotflow.errors import ConfigError, IotflowError, TwinRejected
from iotflow.events import AckStatus, Command, CommandEvent
from twins.registry import Registry

__all__ = [
    "STATE_VERSION",
    "CoordinatorBuilder",
    "Deliver",
    "Dropped",
    "Orchestrator",
    "OrchestratorConfig",
    "StartCoordinator",
    "Write",
]

STATE_VERSION = 2
"""The layout of ``Orchestrator.snapshot``; layout 1 (finished commands as full records)
is still read, any other is refused."""

S = CommandState
_LIVE = (S.SENT, S.ACKED, S.RETRYING)
_PURGE_EVERY = timedelta(seconds=1)

CoordinatorBuilder = Callable[[Mapping[str, Any], Registry, datetime], Coordinator]
"""Builds a coordinator from its declaration (``CoordinatorRequest.spec``)."""

Deliver = Callable[["Write"], Any]
"""Hands a ``Write`` to its device writer right before it leaves the step and returns
the writer's message (``commands.writers``), or a ``Dropped`` when the command expired
meanwhile: it is then not sent."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Write:
    """A command to deliver now, for the writer of ``protocol``.

    ``attempt`` counts sends of this command id (1 first); ``metadata`` is the
    device's registry metadata (addresses for HTTP writers and the like).
    """

    command: Command
    protocol: str
    attempt: int
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class Dropped:
    """Input the orchestrator could not use, for the dead-letter topic."""

    source: str
    reason: str
    payload: bytes
    ts: datetime


@dataclass(frozen=True)
class StartCoordinator:
    """Host ``coordinator``: start it and route its commands' outcomes to it."""

    coordinator: Coordinator


class OrchestratorConfig(BaseModel):
    """How the orchestrator times, retries and remembers; builds an ``Orchestrator``.

    ``ack_timeout`` is per protocol (the writer's name); its keys are also the
    writers available: a device on another protocol is rejected. The n-th
    re-send waits ``backoff * 2**(n-1)`` capped at ``backoff_max``, minus up
    to ``jitter`` of it, drawn from a generator seeded by ``seed``, the
    command id and the attempt (so a replay draws the same delays).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ack_timeout: dict[str, Duration] = Field(
        default_factory=lambda: {
            "mqtt": timedelta(seconds=5),
            "kafka": timedelta(seconds=10),
            "http": timedelta(seconds=10),
        },
        min_length=1,
    )
    default_protocol: str = "mqtt"
    max_attempts: int = Field(3, ge=1, le=100)
    backoff: Duration = timedelta(milliseconds=500)
    backoff_max: Duration = timedelta(seconds=30)
    jitter: float = Field(0.2, ge=0.0, le=1.0)
    seed: int = 0
    max_ttl: Duration = timedelta(days=1)
    max_future_skew: Duration = timedelta(minutes=5)
    # Finished commands are kept (memory, snapshot) until `remember` after their expiry: a
    # replay arriving later finds its command expired, so it is audited again but never sent.
    remember: Duration = timedelta(minutes=10)

    @field_validator("ack_timeout")
    @classmethod
    def _positive_timeouts(cls, value: dict[str, timedelta]) -> dict[str, timedelta]:
        for protocol, timeout in value.items():
            if timeout <= timedelta(0):
                raise ValueError(f"ack_timeout of {protocol!r} must be positive, got {timeout}")
        return value

    @field_validator("backoff", "backoff_max", "max_ttl", "remember")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be positive, got {value}")
        return value

    def build(
        self,
        resume_state: dict[str, Any] | None,
        registry: Registry,
        now: Callable[[], datetime] = _utcnow,
        *,
        builders: Mapping[str, CoordinatorBuilder] | None = None,
        jitter_draw: Callable[[str, int], float] | None = None,
        deliver: Deliver | None = None,
    ) -> Orchestrator:
        """An orchestrator, fresh or resumed from ``resume_state`` (its ``snapshot()``)."""
        return Orchestrator(
            self,
            registry,
            now,
            resume_state,
            builders=builders,
            jitter_draw=jitter_draw,
            deliver=deliver,
        )


class Orchestrator:
    """Command lifecycles, device queues and hosted coordinators (see the module docstring)."""

    def __init__(
        self,
        config: OrchestratorConfig,
        registry: Registry,
        now: Callable[[], datetime] = _utcnow,
        resume_state: dict[str, Any] | None = None,
        *,
        builders: Mapping[str, CoordinatorBuilder] | None = None,
        jitter_draw: Callable[[str, int], float] | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        if config.default_protocol not in config.ack_timeout:
            msg = (
                f"default_protocol {config.default_protocol!r} has no ack_timeout; "
                f"protocols: {', '.join(config.ack_timeout)}"
            )
            raise ConfigError(msg)
        self.config = config
        self.registry = registry
        self._now = now
        self._builders = dict(builders or {})
        self._draw = jitter_draw or self._seeded_draw
        self._deliver = deliver
        self.validator = CommandValidator(
            registry,
            protocols=config.ack_timeout,
            default_protocol=config.default_protocol,
            max_ttl=config.max_ttl,
            max_future_skew=config.max_future_skew,
        )
        self.records: dict[str, CommandRecord] = {}  # live commands; finished ones: _remembered
        self._remembered = Remembered()
        self._purge_due = datetime.min.replace(tzinfo=UTC)
        self._queues: dict[str, list[str]] = {}
        self._in_flight: dict[str, str] = {}
        self.reported: dict[str, dict[str, Any]] = {}
        self._timers: list[tuple[datetime, int, str]] = []
        self.coordinators: dict[str, Coordinator] = {}
        self._finished: dict[str, datetime] = {}
        self._seq = 0
        self.stats: dict[str, int] = {}
        # per call: devices whose queue may move, and outcomes owed to coordinators
        self._dirty: dict[
            str, None
        ] = {}  # an ordered set: devices are pumped in the order they moved
        self._outcomes: list[tuple[str, CommandEvent]] = []
        if resume_state is not None:
            self._restore(resume_state)

    # -- the stateful vocabulary -------------------------------------------------------

    def on_batch(self, item: Any) -> list[Any]:
        """Take one input item; return the writes, events and dead letters it led to."""
        now = self._now()
        out: list[Any] = []
        self._purge(now)
        if isinstance(item, Command):
            self._request(item, now, out)
        elif isinstance(item, DeviceAck):
            self._ack(item, now, out)
        elif isinstance(item, DeviceState):
            self._state(item, now, out)
        elif isinstance(item, Instruction):
            self._instruction(item, now, out)
        elif isinstance(item, InvalidRequest):
            self._invalid(item, now, out)
        elif isinstance(item, StartCoordinator):
            self._start(item.coordinator, now, out)
        elif isinstance(item, CoordinatorRequest):
            self._build_coordinator(item, now, out)
        elif isinstance(item, CancelRequest):
            self._cancel(item, now, out)
        else:
            msg = f"the orchestrator cannot take a {type(item).__name__}; see its module docstring"
            raise TypeError(msg)
        self._settle(now, out)
        return out

    def on_timer(self) -> list[Any]:
        """Act on every deadline that has passed: expiries, ack timeouts, re-sends, coordinator timers."""
        now = self._now()
        out: list[Any] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, command_id = heapq.heappop(self._timers)
            rec = self.records.get(command_id)
            if rec is None or rec.deadline != when or rec.terminal:
                continue  # superseded timer
            self._deadline(rec, now, out)
        for coordinator in list(self.coordinators.values()):
            due = coordinator.next_timer()
            if due is not None and due <= now:
                commands = coordinator.on_timer(now, self.reported_of)
                self._from_coordinator(coordinator, commands, now, out)
        self._settle(now, out)
        return out

    def on_eof(self) -> list[Any]:
        """Nothing to flush: live commands stay in the state (and in the snapshot)."""
        return []

    def next_timer(self) -> datetime | None:
        """The earliest pending deadline of a command or a coordinator, or None."""
        while self._timers:
            when, _, command_id = self._timers[0]
            rec = self.records.get(command_id)
            if rec is not None and rec.deadline == when and not rec.terminal:
                break
            heapq.heappop(self._timers)
        if self._dirty:
            return self._now()  # restored queues wait to be pumped
        times = [self._timers[0][0]] if self._timers else []
        times.extend(t for c in self.coordinators.values() if (t := c.next_timer()) is not None)
        return min(times) if times else None

    def snapshot(self) -> dict[str, Any]:
        """Plain data: live records, finished commands, reported states, coordinators, counters."""
        return {
            "version": STATE_VERSION,
            "seq": self._seq,
            "records": [rec.to_data() for rec in self.records.values()],
            "remembered": self._remembered.to_data(),
            "reported": {d: dict(r) for d, r in self.reported.items()},
            "coordinators": [c.snapshot() for c in self.coordinators.values()],
            "finished": {cid: t.isoformat() for cid, t in self._finished.items()},
            "stats": dict(self.stats),
        }

    # -- reading --------------------------------------------------------------------------

    def reported_of(self, device_id: str) -> Mapping[str, Any]:
        """The latest reported state known for a device (from acks and state messages); {} if none."""
        return dict(self.reported.get(device_id, {}))

    def queued(self, device_id: str) -> list[str]:
        """The ids of a device's queued commands, in the order they will be sent."""
        return list(self._queues.get(device_id, []))

    def in_flight(self, device_id: str) -> str | None:
        """The id of the device's command that was sent and has not finished, if any."""
        return self._in_flight.get(device_id)

    def state_of(self, command_id: str) -> CommandState | None:
        """Where a command stands: live or finished (while remembered); None if unknown."""
        rec = self.records.get(command_id)
        if rec is not None:
            return rec.state
        finished = self._remembered.get(command_id)
        return None if finished is None else finished.state

    # -- requests -------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _emit(
        self, rec: CommandRecord, now: datetime, out: list[Any], **extra: Any
    ) -> CommandEvent:
        cmd = rec.command
        event = CommandEvent(
            command_id=cmd.command_id,
            device_id=cmd.device_id,
            kind=EVENT_OF[rec.state],
            ts=now,
            name=cmd.name,
            correlation_id=cmd.correlation_id,
            attempt=rec.attempts or None,
            **extra,
        )
        out.append(event)
        return event

    def _request(self, command: Command, now: datetime, out: list[Any]) -> None:
        self._count("requests")
        problem = check_command_id(command.command_id)
        if problem is not None:
            # an id that cannot name a record in the audit: only a dead letter can keep it
            self._count("invalid_requests")
            out.append(Dropped("commands", problem, msgspec.json.encode(command), now))
            return
        digest = _digest(command)
        known = self.records.get(command.command_id) or self._remembered.get(command.command_id)
        if known is not None:
            if known.digest == digest:
                self._count("duplicate_requests")
            else:
                self._count("reused_ids")
                device = known.device_id
                reason = (
                    f"command_id {command.command_id!r} is already used by another command "
                    f"(for {device}); a command id names exactly one write"
                )
                out.append(Dropped("commands", reason, msgspec.json.encode(command), now))
            return
        self._seq += 1
        rec = CommandRecord(command, self._seq, self.config.default_protocol, digest=digest)
        self.records[command.command_id] = rec
        self._emit(rec, now, out)
        try:
            valid = self.validator.check(command, now)
        except TwinRejected as exc:
            self._finish(
                rec, S.REJECTED, now, out, applied=False, reason=exc.kind, detail=exc.reason
            )
            return
        rec.command = valid.command
        rec.protocol = valid.protocol
        rec.expected = valid.expected
        rec.properties = valid.properties
        rec.metadata = valid.metadata
        if now >= command.expires_at:
            detail = f"expired at {command.expires_at.isoformat()}, before it could be sent"
            self._finish(rec, S.EXPIRED, now, out, applied=False, reason="expired", detail=detail)
            return
        if not self._resolve_conflicts(rec, now, out):
            return
        rec.move(S.QUEUED, now)
        self._enqueue(rec)
        self._emit(rec, now, out)

    def _enqueue(self, rec: CommandRecord) -> None:
        queue = self._queues.setdefault(rec.command.device_id, [])
        rank = (-rec.command.priority, rec.seq)
        position = len(queue)
        # higher priority first, then arrival; queues are short, a scan from the back is enough
        while position > 0:
            other = self.records[queue[position - 1]]
            if (-other.command.priority, other.seq) <= rank:
                break
            position -= 1
        queue.insert(position, rec.command_id)
        rec.deadline = rec.command.expires_at
        self._push_timer(rec)
        self._dirty[rec.command.device_id] = None

    def _resolve_conflicts(self, rec: CommandRecord, now: datetime, out: list[Any]) -> bool:
        """Reject the losers of ``rec``'s conflicts; False when ``rec`` itself lost."""
        if not rec.properties:
            return True
        device_id = rec.command.device_id
        live = list(self._queues.get(device_id, []))
        if device_id in self._in_flight:
            live.append(self._in_flight[device_id])
        losers = []
        for other_id in live:
            other = self.records[other_id]
            if other.command.correlation_id == rec.command.correlation_id:
                continue
            overlap = set(rec.properties).intersection(other.properties)
            if not overlap:
                continue
            if _rank(other.command) > _rank(rec.command):
                self._count("conflicts")
                detail = (
                    f"conflict on {', '.join(sorted(overlap))}: lost to {other.command_id} "
                    f"({_describe(other.command)}) over this one ({_describe(rec.command)})"
                )
                self._finish(
                    rec, S.REJECTED, now, out, applied=False, reason="conflict", detail=detail
                )
                return False
            if other.state is S.QUEUED:
                losers.append((other, overlap))
        for other, overlap in losers:
            self._count("conflicts")
            self._queues[device_id].remove(other.command_id)
            detail = (
                f"conflict on {', '.join(sorted(overlap))}: superseded by {rec.command_id} "
                f"({_describe(rec.command)}) over this one ({_describe(other.command)})"
            )
            self._finish(
                other, S.REJECTED, now, out, applied=False, reason="conflict", detail=detail
            )
        return True

    def _instruction(self, instruction: Instruction, now: datetime, out: list[Any]) -> None:
        try:
            commands = instruction.expand(self.registry, now)
        except (ConfigError, TwinRejected) as exc:
            self._count("invalid_requests")
            reason = f"instruction {instruction.instruction_id!r} cannot be expanded: {exc}"
            out.append(Dropped("commands", reason, instruction.model_dump_json().encode(), now))
            return
        for command in commands:
            self._request(command, now, out)

    def _invalid(self, item: InvalidRequest, now: datetime, out: list[Any]) -> None:
        self._count("invalid_requests")
        if item.command_id is None:
            out.append(Dropped("commands", item.reason, item.payload, now))
            return
        if item.command_id in self.records or item.command_id in self._remembered:
            self._count("duplicate_requests")
            return
        # audited under its id, so the sender can look up why; the device is never involved
        placeholder = Command(
            item.command_id, item.device_id or "", "?", {}, now, now + timedelta(seconds=1)
        )
        self._seq += 1
        rec = CommandRecord(placeholder, self._seq, self.config.default_protocol)
        self.records[item.command_id] = rec
        self._emit(rec, now, out)
        self._finish(rec, S.REJECTED, now, out, applied=False, reason=item.kind, detail=item.reason)

    # -- device side ----------------------------------------------------------------------

    def _ack(self, item: DeviceAck, now: datetime, out: list[Any]) -> None:
        ack = item.ack
        rec = self.records.get(ack.command_id) or self._remembered.get(ack.command_id)
        if rec is None:
            self._count("acks_unknown")
            return
        if rec.device_id != item.device_id:
            self._count("acks_wrong_device")
            reason = (
                f"device {item.device_id!r} acked command {ack.command_id!r}, which was sent "
                f"to {rec.device_id!r}; ignored"
            )
            out.append(Dropped("acks", reason, msgspec.json.encode(ack), now))
            return
        if not isinstance(rec, CommandRecord):
            self._count("acks_duplicate")
            return
        if rec.state not in _LIVE:
            self._count("acks_before_send")
            return
        self._count("acks")
        if ack.reported:
            self.reported.setdefault(item.device_id, {}).update(ack.reported)
        if ack.status is AckStatus.ACCEPTED:
            if rec.state is S.ACKED:
                return
            rec.move(S.ACKED, now)
            self._set_deadline(rec, now + self._ack_timeout(rec))
            self._emit(rec, now, out)
        elif ack.status is AckStatus.DONE:
            self._finish(rec, S.DONE, now, out, applied=True, detail="acked done")
        elif now >= rec.command.expires_at:
            detail = (
                f"expired at {rec.command.expires_at.isoformat()}; the device answered failed: "
                f"{ack.reason or 'no reason given'}"
            )
            self._finish(rec, S.EXPIRED, now, out, applied=False, reason="expired", detail=detail)
        else:
            detail = f"device answered failed: {ack.reason or 'no reason given'}"
            self._finish(
                rec, S.FAILED, now, out, applied=False, reason="device_failed", detail=detail
            )

    def _state(self, item: DeviceState, now: datetime, out: list[Any]) -> None:
        self._count("states")
        reported = self.reported.setdefault(item.device_id, {})
        reported.update(item.reported)
        command_id = self._in_flight.get(item.device_id)
        if command_id is None:
            return
        rec = self.records[command_id]
        if rec.expected and state_matches(rec.expected, reported):
            detail = f"reported state shows {_short(rec.expected)}"
            self._finish(rec, S.DONE, now, out, applied=True, detail=detail)

    # -- sending, timing out, finishing ------------------------------------------------------

    def _ack_timeout(self, rec: CommandRecord) -> timedelta:
        return self.config.ack_timeout[rec.protocol]

    def _push_timer(self, rec: CommandRecord) -> None:
        if rec.deadline is None:
            return
        heapq.heappush(self._timers, (rec.deadline, rec.seq, rec.command_id))
        if len(self._timers) > 2 * len(self.records) + 1024:
            # a superseded deadline (sent before its queue expiry, acked before its ack
            # timeout) stays in the heap until its time: drop them all at once
            self._timers = [
                (r.deadline, r.seq, cid)
                for cid, r in self.records.items()
                if r.deadline is not None
            ]
            heapq.heapify(self._timers)

    def _set_deadline(self, rec: CommandRecord, when: datetime) -> None:
        rec.deadline = when
        self._push_timer(rec)

    def _pump(self, device_id: str, now: datetime, out: list[Any]) -> None:
        if device_id in self._in_flight:
            return
        queue = self._queues.get(device_id)
        while queue:
            rec = self.records[queue.pop(0)]
            if now >= rec.command.expires_at:
                detail = f"expired at {rec.command.expires_at.isoformat()} in the device's queue; never sent"
                self._finish(
                    rec, S.EXPIRED, now, out, applied=False, reason="expired", detail=detail
                )
                continue
            self._in_flight[device_id] = rec.command_id
            self._send(rec, now, out)
            break
        if not queue:
            self._queues.pop(device_id, None)

    def _send(self, rec: CommandRecord, now: datetime, out: list[Any]) -> None:
        write = Write(rec.command, rec.protocol, rec.attempts + 1, rec.metadata)
        message = write if self._deliver is None else self._deliver(write)
        if isinstance(message, Dropped):  # expired on its way to the writer
            sent_before = rec.attempts > 0
            detail = message.reason + (
                f"; sent {rec.attempts} times before, never confirmed" if sent_before else ""
            )
            applied = None if sent_before else False
            self._finish(rec, S.EXPIRED, now, out, applied=applied, reason="expired", detail=detail)
            return
        rec.move(S.SENT, now)
        rec.attempts += 1
        self._set_deadline(rec, now + self._ack_timeout(rec))
        self._count("sends")
        out.append(message)
        self._emit(rec, now, out)

    def _deadline(self, rec: CommandRecord, now: datetime, out: list[Any]) -> None:
        expires = rec.command.expires_at
        if rec.state is S.QUEUED:
            self._queues[rec.command.device_id].remove(rec.command_id)
            detail = f"expired at {expires.isoformat()} in the device's queue; never sent"
            self._finish(rec, S.EXPIRED, now, out, applied=False, reason="expired", detail=detail)
        elif rec.state is S.RETRYING:
            if now >= expires:
                detail = (
                    f"expired at {expires.isoformat()} before re-send {rec.attempts + 1}; "
                    f"sent {rec.attempts} times, never confirmed"
                )
                self._finish(
                    rec, S.EXPIRED, now, out, applied=None, reason="expired", detail=detail
                )
            else:
                self._send(rec, now, out)
        else:  # SENT or ACKED: no final answer within the ack timeout
            self._count("timeouts")
            timeout = label(self._ack_timeout(rec))
            if rec.attempts >= self.config.max_attempts:
                detail = f"no answer to {rec.attempts} sends within {timeout} each"
                self._finish(rec, S.FAILED, now, out, applied=None, reason="timeout", detail=detail)
            elif now >= expires:
                detail = (
                    f"expired at {expires.isoformat()} while waiting for an answer; "
                    f"sent {rec.attempts} times, never confirmed"
                )
                self._finish(
                    rec, S.EXPIRED, now, out, applied=None, reason="expired", detail=detail
                )
            else:
                delay = self._backoff(rec)
                rec.move(S.RETRYING, now)
                self._set_deadline(rec, min(now + delay, expires))
                detail = f"no answer within {timeout}; send {rec.attempts + 1} in {label(delay)}"
                self._emit(rec, now, out, reason="timeout", detail=detail)

    def _backoff(self, rec: CommandRecord) -> timedelta:
        cfg = self.config
        full = min(cfg.backoff * 2 ** (rec.attempts - 1), cfg.backoff_max)
        return full * (1.0 - cfg.jitter * self._draw(rec.command_id, rec.attempts))

    def _seeded_draw(self, command_id: str, attempt: int) -> float:
        return random.Random(f"{self.config.seed}/{command_id}/{attempt}").random()

    def _finish(
        self,
        rec: CommandRecord,
        state: CommandState,
        now: datetime,
        out: list[Any],
        *,
        applied: bool | None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        rec.move(state, now)
        rec.applied = applied
        rec.deadline = None
        self._count(state.value)
        event = self._emit(rec, now, out, applied=applied, reason=reason, detail=detail)
        device_id = rec.command.device_id
        if self._in_flight.get(device_id) == rec.command_id:
            del self._in_flight[device_id]
            self._dirty[device_id] = None
        self._remember(rec, now)
        correlation = rec.command.correlation_id
        if correlation is not None and correlation in self.coordinators:
            self._outcomes.append((correlation, event))

    def _settle(self, now: datetime, out: list[Any]) -> None:
        """Hand outcomes to coordinators and move device queues until nothing changes."""
        while self._outcomes or self._dirty:
            while self._outcomes:
                coordinator_id, event = self._outcomes.pop(0)
                coordinator = self.coordinators.get(coordinator_id)
                if coordinator is not None:
                    commands = coordinator.on_outcome(event, now, self.reported_of)
                    self._from_coordinator(coordinator, commands, now, out)
            while self._dirty:
                device_id = next(iter(self._dirty))
                del self._dirty[device_id]
                self._pump(device_id, now, out)

    def _remember(self, rec: CommandRecord, now: datetime) -> None:
        """Keep of a finished command only what de-duplication needs."""
        del self.records[rec.command_id]
        forget_at = max(now, rec.command.expires_at) + self.config.remember
        self._remembered.add(
            rec.command_id, rec.command.device_id, rec.state, rec.digest, forget_at
        )

    def _purge(self, now: datetime) -> None:
        """Forget finished commands and coordinators once ``remember`` has passed
        (looked at once a second at most: it runs before every input)."""
        if now < self._purge_due:
            return
        self._purge_due = now + _PURGE_EVERY
        self._remembered.purge(now)
        for coordinator_id, finished_at in list(self._finished.items()):
            if finished_at + self.config.remember <= now:
                del self._finished[coordinator_id]

    # -- coordinators -----------------------------------------------------------------------

    def _start(self, coordinator: Coordinator, now: datetime, out: list[Any]) -> None:
        cid = coordinator.coordinator_id
        if cid in self.coordinators or cid in self._finished:
            self._count("duplicate_coordinators")
            return
        self._count("coordinators")
        self.coordinators[cid] = coordinator
        commands = coordinator.start(now, self.reported_of)
        self._from_coordinator(coordinator, commands, now, out)

    def _build_coordinator(self, item: CoordinatorRequest, now: datetime, out: list[Any]) -> None:
        builder = self._builders.get(item.type)
        if builder is None:
            known = ", ".join(sorted(self._builders)) or "none"
            reason = f"coordinator type {item.type!r} is unknown; types: {known}"
            out.append(Dropped("commands", reason, item.payload, now))
            return
        try:
            coordinator = builder(item.spec, self.registry, now)
        except (IotflowError, ValueError) as exc:
            reason = f"{item.type} declaration is invalid: {exc}"
            out.append(Dropped("commands", reason, item.payload, now))
            return
        self._start(coordinator, now, out)

    def _cancel(self, item: CancelRequest, now: datetime, out: list[Any]) -> None:
        coordinator = self.coordinators.get(item.coordinator_id)
        if coordinator is None:
            state = "has finished" if item.coordinator_id in self._finished else "is not running"
            reason = f"cannot cancel {item.coordinator_id!r}: it {state}"
            out.append(Dropped("commands", reason, item.payload, now))
            return
        self._count("cancelled_coordinators")
        self._from_coordinator(coordinator, coordinator.cancel(now, item.reason), now, out)

    def _from_coordinator(
        self, coordinator: Coordinator, commands: Iterable[Command], now: datetime, out: list[Any]
    ) -> None:
        for command in commands:
            self._request(command, now, out)
        out.extend(coordinator.progress())
        if coordinator.finished and coordinator.coordinator_id in self.coordinators:
            del self.coordinators[coordinator.coordinator_id]
            self._finished[coordinator.coordinator_id] = now

    # -- restore ----------------------------------------------------------------------------

    def _restore(self, state: dict[str, Any]) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, STATE_VERSION):
            msg = (
                f"the recovery store holds orchestrator state of layout {version!r}, this "
                f"version reads layouts 1 and {STATE_VERSION}; finish the old commands with "
                "the old version, or start with a new recovery directory"
            )
            raise ConfigError(msg)
        self._seq = state["seq"]
        self.stats = dict(state["stats"])
        self.reported = {d: dict(r) for d, r in state["reported"].items()}
        self._finished = {c: datetime.fromisoformat(t) for c, t in state["finished"].items()}
        self._remembered = Remembered.from_data(state.get("remembered", {}))
        records = [CommandRecord.from_data(data) for data in state["records"]]
        for rec in sorted(records, key=lambda r: r.seq):
            rec.digest = rec.digest[:16]  # layout 1 kept all 64 hex digits
            self.records[rec.command_id] = rec
            if rec.terminal:  # layout 1 kept finished commands whole
                self._remember(rec, rec.updated_at or rec.command.expires_at)
            elif rec.state is S.QUEUED:
                self._enqueue(rec)  # marks the device dirty: the next call sends its head
            elif rec.state in _LIVE:
                self._in_flight[rec.command.device_id] = rec.command_id
                self._push_timer(rec)
        for snap in state["coordinators"]:
            coordinator = restore_coordinator(snap)
            self.coordinators[coordinator.coordinator_id] = coordinator


def _rank(command: Command) -> tuple[int, datetime, str]:
    return (command.priority, command.issued_at, command.command_id)


def _describe(command: Command) -> str:
    return f"priority {command.priority}, issued {command.issued_at.isoformat()}"


def _short(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _digest(command: Command) -> str:
    """What the sender asked for (not the normalized params), key order aside: 64 bits, hex."""
    body = (command.device_id, command.name, command.expires_at.isoformat(), command.correlation_id)
    text = msgspec.json.encode([body, command.params], order="sorted")
    return hashlib.sha256(text).hexdigest()[:16]
