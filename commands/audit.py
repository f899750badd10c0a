"""The audit trail: lifecycle events as Kafka records and as rows of the DuckDB ``command_audit`` table.

Every transition of a command (``CommandEvent``: requested, rejected, queued,
sent, acked, retried, expired, failed, done) and of a coordinator
(``PlanEvent``: started, step done, compensating, compensated, wave started,
aborted, done, ...) becomes one record on ``{prefix}.commands.events`` and
one row of ``command_audit``. Both carry a natural key (``event_key``), so a
replay after recovery upserts the same rows and readers de-duplicate the same
records: a lifecycle step is (command id, kind, attempt, time), a coordinator
step (plan id, kind, step, wave, device, command, time).

A row has the same columns for both kinds of event (``AUDIT_COLUMNS``); what
one kind lacks is null. "What happened to device X between T1 and T2" is
``connectors.duckdb_store.command_history(path, "X", t1, t2)``, one query on
``device_id`` and ``ts`` ordered by time, then lifecycle order.

Example::

    >>> from datetime import UTC, datetime
    >>> from iotflow.events import CommandEvent, CommandEventKind
    >>> ev = CommandEvent("c1", "lock-0001", CommandEventKind.SENT,
    ...                   datetime(2026, 1, 1, tzinfo=UTC), attempt=1)
    >>> event_key(ev)
    'command|c1|sent|1|2026-01-01T00:00:00+00:00'
    >>> row = audit_row(ev)
    >>> row["entity"], row["subject"], row["device_id"], row["kind_order"]
    ('command', 'c1', 'lock-0001', 4)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from commands.coordinator import PlanEvent, PlanEventKind
from iotflow.events import CommandEvent, CommandEventKind

__all__ = [
    "AUDIT_COLUMNS",
    "KIND_ORDER",
    "AuditEvent",
    "audit_columns",
    "audit_row",
    "encode_event",
    "event_key",
    "record_key",
]

AuditEvent = CommandEvent | PlanEvent

AUDIT_COLUMNS = (
    "event_key",
    "entity",  # "command" or "plan"
    "subject",  # the command id or the plan id
    "kind",
    "kind_order",  # lifecycle order of kind, to order events of one instant
    "ts",
    "device_id",
    "command_id",
    "correlation_id",  # the plan, saga or rollout (for plan events: the plan id)
    "name",
    "attempt",
    "applied",
    "reason",
    "detail",
    "step",
    "wave",
)

_LIFECYCLE = [
    CommandEventKind.REQUESTED,
    CommandEventKind.REJECTED,
    CommandEventKind.ISSUED,
    CommandEventKind.QUEUED,
    CommandEventKind.SENT,
    CommandEventKind.ACKED,
    CommandEventKind.RETRIED,
    CommandEventKind.EXPIRED,
    CommandEventKind.FAILED,
    CommandEventKind.COMPENSATING,
    CommandEventKind.COMPENSATED,
    CommandEventKind.DONE,
]
KIND_ORDER: dict[str, int] = {kind.value: i for i, kind in enumerate(_LIFECYCLE)}
"""Lifecycle order of command event kinds; plan event kinds follow in declaration order."""
KIND_ORDER.update(
    {kind.value: len(_LIFECYCLE) + i for i, kind in enumerate(PlanEventKind)
     if kind.value not in KIND_ORDER}
)  # fmt: skip

_encode = msgspec.json.encode


def event_key(event: AuditEvent) -> str:
    """The natural key of an event: the same step of the same command or plan, at the same time."""
    ts = event.ts.isoformat()
    if isinstance(event, CommandEvent):
        return f"command|{event.command_id}|{event.kind.value}|{event.attempt or 0}|{ts}"
    parts = (event.step, event.wave, event.device_id, event.command_id)
    detail = "|".join("" if p is None else str(p) for p in parts)
    return f"plan|{event.plan_id}|{event.kind.value}|{detail}|{ts}"


def record_key(event: AuditEvent) -> str:
    """The Kafka key: the command id of a command event, the plan id of a plan event."""
    return event.command_id if isinstance(event, CommandEvent) else event.plan_id


def encode_event(event: AuditEvent) -> bytes:
    """The event as JSON for ``{prefix}.commands.events`` (a plan event has ``plan_id``)."""
    return _encode(event)


def audit_row(event: AuditEvent) -> dict[str, Any]:
    """The ``command_audit`` row of an event (keys: ``AUDIT_COLUMNS``)."""
    return dict(zip(AUDIT_COLUMNS, _values(event), strict=True))


def audit_columns(events: Iterable[AuditEvent]) -> dict[str, list[Any]]:
    """The ``command_audit`` rows of events as one list per column (``AUDIT_COLUMNS``):
    what an Arrow table is built from, without a dict per row."""
    rows = [_values(e) for e in events]
    if not rows:
        return {name: [] for name in AUDIT_COLUMNS}
    return dict(zip(AUDIT_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))


def _values(event: AuditEvent) -> tuple[Any, ...]:
    """An event's row values in ``AUDIT_COLUMNS`` order."""
    kind = event.kind.value
    if isinstance(event, CommandEvent):
        return (
            event_key(event),
            "command",
            event.command_id,
            kind,
            KIND_ORDER[kind],
            event.ts,
            event.device_id or None,
            event.command_id,
            event.correlation_id,
            event.name,
            event.attempt,
            event.applied,
            event.reason,
            event.detail,
            None,
            None,
        )
    return (
        event_key(event),
        "plan",
        event.plan_id,
        kind,
        KIND_ORDER[kind],
        event.ts,
        event.device_id,
        event.command_id,
        event.plan_id,
        None,
        None,
        None,
        None,
        event.detail,
        event.step,
        event.wave,
    )
