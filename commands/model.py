"""The life of one command: its states, the legal moves between them, and its record.

``CommandState`` is the lifecycle::

    REQUESTED -> QUEUED -> SENT -> ACKED -> DONE
        |           |        |  \\     |  \\-> FAILED | EXPIRED | RETRYING
        |           |        |   \\-> DONE | FAILED | EXPIRED | RETRYING
        |           |        RETRYING -> SENT | ACKED | DONE | FAILED | EXPIRED
        |           \\-> EXPIRED (never sent) | REJECTED (lost a conflict)
        \\-> REJECTED (invalid) | EXPIRED (stale on arrival)

DONE, FAILED, EXPIRED and REJECTED are terminal: nothing leaves them, so a
redelivered ack or a replayed request can never move a finished command.
``CommandRecord.move`` is the only way to change a state; an illegal move
raises ``iotflow.errors.InvalidTransition`` naming the command, both states and the allowed ones.

Example::

    >>> from datetime import UTC, datetime, timedelta
    >>> from iotflow.events import Command
    >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
    >>> cmd = Command("c1", "lock-0001", "lock", {}, t0, t0 + timedelta(minutes=1))
    >>> rec = CommandRecord(cmd, seq=0, protocol="mqtt")
    >>> rec.move(CommandState.QUEUED, t0)
    >>> rec.move(CommandState.DONE, t0)
    Traceback (most recent call last):
    ...
    iotflow.errors.InvalidTransition: command 'c1': cannot go from queued to done; allowed from queued: expired, rejected, sent
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any

import msgspec

from iotflow.errors import InvalidTransition
from iotflow.events import Command, CommandEventKind

__all__ = [
    "EVENT_OF",
    "TERMINAL",
    "TRANSITIONS",
    "CommandRecord",
    "CommandState",
    "InvalidTransition",
    "Priority",
]


class Priority(IntEnum):
    """Named priorities; ``Command.priority`` is any int, higher goes first."""

    LOW = -10
    NORMAL = 0
    HIGH = 10
    CRITICAL = 100


class CommandState(StrEnum):
    """Where a command is in its life (see the module docstring for the moves)."""

    REQUESTED = "requested"
    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"  # the device accepted it and has not finished yet
    RETRYING = "retrying"  # no answer in time; waiting out the back-off before the next send
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"


S = CommandState
TRANSITIONS: dict[CommandState, frozenset[CommandState]] = {
    S.REQUESTED: frozenset({S.QUEUED, S.REJECTED, S.EXPIRED}),
    S.QUEUED: frozenset({S.SENT, S.EXPIRED, S.REJECTED}),
    S.SENT: frozenset({S.ACKED, S.DONE, S.FAILED, S.EXPIRED, S.RETRYING}),
    S.ACKED: frozenset({S.DONE, S.FAILED, S.EXPIRED, S.RETRYING}),
    S.RETRYING: frozenset({S.SENT, S.ACKED, S.DONE, S.FAILED, S.EXPIRED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.REJECTED: frozenset(),
}
"""Every legal move; a state missing from a set cannot be reached from the key."""

TERMINAL: frozenset[CommandState] = frozenset({S.DONE, S.FAILED, S.EXPIRED, S.REJECTED})

# The lifecycle event each state's entry is reported as (RETRYING is reported as RETRIED).
EVENT_OF: dict[CommandState, CommandEventKind] = {
    S.REQUESTED: CommandEventKind.REQUESTED,
    S.QUEUED: CommandEventKind.QUEUED,
    S.SENT: CommandEventKind.SENT,
    S.ACKED: CommandEventKind.ACKED,
    S.RETRYING: CommandEventKind.RETRIED,
    S.DONE: CommandEventKind.DONE,
    S.FAILED: CommandEventKind.FAILED,
    S.EXPIRED: CommandEventKind.EXPIRED,
    S.REJECTED: CommandEventKind.REJECTED,
}


@dataclass
class CommandRecord:
    """One command as the orchestrator tracks it: the request and where it stands.

    ``attempts`` counts sends; ``deadline`` is when the current state times
    out (the ack deadline while SENT/ACKED, the next send while RETRYING);
    ``expected`` is the reported state that confirms the command (from the
    twin model's ``sets``) and ``properties`` the properties it writes, which
    is what conflicts are about. ``applied`` is only meaningful once terminal.
    """

    command: Command
    seq: int
    protocol: str
    state: CommandState = CommandState.REQUESTED
    attempts: int = 0
    deadline: datetime | None = None
    expected: dict[str, Any] = field(default_factory=dict)
    properties: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    applied: bool | None = None
    updated_at: datetime | None = None
    digest: str = ""  # of the request as sent, to tell a replay from a reused id

    @property
    def command_id(self) -> str:
        return self.command.command_id

    @property
    def device_id(self) -> str:
        return self.command.device_id

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def move(self, to: CommandState, now: datetime) -> None:
        """Enter ``to`` or raise ``InvalidTransition``; the record stays as it was on error."""
        allowed = TRANSITIONS[self.state]
        if to not in allowed:
            raise InvalidTransition(f"command {self.command_id!r}", self.state, to, allowed)
        self.state = to
        self.updated_at = now

    def to_data(self) -> dict[str, Any]:
        """Plain data (JSON-able builtins) for a snapshot."""
        return {
            "command": msgspec.to_builtins(self.command),
            "seq": self.seq,
            "protocol": self.protocol,
            "state": self.state.value,
            "attempts": self.attempts,
            "deadline": None if self.deadline is None else self.deadline.isoformat(),
            "expected": self.expected,
            "properties": list(self.properties),
            "metadata": self.metadata,
            "applied": self.applied,
            "updated_at": None if self.updated_at is None else self.updated_at.isoformat(),
            "digest": self.digest,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> CommandRecord:
        """The record ``to_data`` described."""
        return cls(
            command=msgspec.convert(data["command"], Command),
            seq=data["seq"],
            protocol=data["protocol"],
            state=CommandState(data["state"]),
            attempts=data["attempts"],
            deadline=None if data["deadline"] is None else datetime.fromisoformat(data["deadline"]),
            expected=dict(data["expected"]),
            properties=tuple(data["properties"]),
            metadata=dict(data["metadata"]),
            applied=data["applied"],
            updated_at=None
            if data["updated_at"] is None
            else datetime.fromisoformat(data["updated_at"]),
            digest=data["digest"],
        )
