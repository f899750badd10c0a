"""The wire vocabulary: readings, device messages, window results, detections,
commands, acks, command events and dead letters.

These are ``msgspec.Struct`` types: JSON on the wire, decoded and encoded by
msgspec on the hot path. Times on the wire are either epoch milliseconds in a
field whose name ends in ``_ms`` or ISO 8601 UTC strings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec

__all__ = [
    "Ack",
    "AckStatus",
    "Command",
    "CommandEvent",
    "CommandEventKind",
    "DeadLetter",
    "Detection",
    "DeviceMessage",
    "Reading",
    "WindowResult",
    "from_ms",
    "to_ms",
]


def to_ms(dt: datetime) -> int:
    """Aware datetime -> epoch milliseconds."""
    if dt.tzinfo is None:
        msg = f"{dt!r} is naive; iotflow takes aware UTC datetimes (datetime.now(UTC))"
        raise ValueError(msg)
    return round(dt.timestamp() * 1000)


def from_ms(ts_ms: int) -> datetime:
    """Epoch milliseconds -> aware UTC datetime."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


class DeviceMessage(msgspec.Struct, frozen=True):
    """One raw message as a source received it, before decoding."""

    topic: str
    payload: bytes
    received_ms: int


class Reading(msgspec.Struct, frozen=True):
    """One normalized reading: a device, its timestamp, its numeric metrics."""

    device_id: str
    ts_ms: int
    metrics: dict[str, float]


class WindowResult(msgspec.Struct, frozen=True):
    """The statistics of one metric of one key over one window (end exclusive)."""

    key: str
    metric: str
    window_start: datetime
    window_end: datetime
    count: int
    sum: float
    avg: float
    min: float
    max: float

    @property
    def natural_key(self) -> str:
        """Idempotency key: the same window of the same key and metric."""
        return f"{self.key}|{self.metric}|{self.window_start.isoformat()}"


class Detection(msgspec.Struct, frozen=True):
    """A CEP match or an anomaly: which rule, for which key, when, and why."""

    rule: str
    key: str
    ts: datetime
    value: float | None = None
    baseline: float | None = None
    score: float | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class Command(msgspec.Struct, frozen=True):
    """A write to a device. ``command_id`` is its idempotency key."""

    command_id: str
    device_id: str
    name: str
    params: dict[str, Any]
    issued_at: datetime
    expires_at: datetime
    priority: int = 0
    correlation_id: str | None = None


class AckStatus(StrEnum):
    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"


class Ack(msgspec.Struct, frozen=True):
    """A device's answer to a command, with its reported state."""

    command_id: str
    status: AckStatus
    reported: dict[str, Any] = msgspec.field(default_factory=dict)
    reason: str | None = None


class CommandEventKind(StrEnum):
    REQUESTED = "requested"
    REJECTED = "rejected"
    ISSUED = "issued"
    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"
    RETRIED = "retried"
    EXPIRED = "expired"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    DONE = "done"


# A command ends once: after a crash the resumed flow may reach the same end again
# from replayed input, at a later ts (connectors.dedupe keeps the first).
TERMINAL_EVENT_KINDS: frozenset[CommandEventKind] = frozenset(
    {
        CommandEventKind.DONE,
        CommandEventKind.FAILED,
        CommandEventKind.EXPIRED,
        CommandEventKind.REJECTED,
    }
)


class CommandEvent(msgspec.Struct, frozen=True):
    """One step in a command's life, for ``{prefix}.commands.events``.

    Optional fields, set by the orchestrator when known: ``name`` (the
    command), ``correlation_id`` (the plan, saga or rollout that issued it),
    ``attempt`` (1 for the first send), ``applied`` on a terminal event (True:
    the device acted; False: it certainly did not; None: unknown, e.g. sent but
    never confirmed) and ``reason``, a short category to count by
    (``unknown_device``, ``out_of_range``, ``conflict``, ``timeout``, ...).
    """

    command_id: str
    device_id: str
    kind: CommandEventKind
    ts: datetime
    detail: str | None = None
    name: str | None = None
    correlation_id: str | None = None
    attempt: int | None = None
    applied: bool | None = None
    reason: str | None = None


class DeadLetter(msgspec.Struct, frozen=True):
    """Input that was rejected, with the reason and the original bytes.

    ``payload`` holds the original bytes as UTF-8 text when they are valid
    UTF-8, else base64 (``payload_encoding`` says which). Payloads over the
    size limit keep only their first ``DEADLETTER_KEEP_BYTES`` bytes
    (``truncated``) and their full size in ``payload_bytes``.
    """

    source: str
    reason: str
    payload: str
    payload_encoding: str
    payload_bytes: int
    truncated: bool
    received_ms: int
    topic: str | None = None
