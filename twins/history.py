"""Twin history in DuckDB: a device's twin at a past time, a property's values over a range.

The twins flow writes one ``twin_history`` row per twin version (device_id,
version, model, ts, recorded_at, cause, changed, reported, desired, delta,
reported_ts, online; the documents as JSON text). These queries take an open
DuckDB connection or a database path (opened read-only) and need no DuckDB
extension.

Two clocks: ``ts`` is a change's event time (the reading's or desired write's
stamp), ``recorded_at`` when the twin step made it. ``state_at`` answers "what
did the twin say at that time" by ``recorded_at`` by default (exact: versions
are made in that order), or by event time with ``clock="event"`` (the latest
version whose change was stamped at or before the time).

Example (``iot.duckdb`` written by the twins flow)::

    state_at("iot.duckdb", "hvac-0001", datetime(2026, 1, 1, 12, tzinfo=UTC)).reported
    property_history("iot.duckdb", "hvac-0001", "setpoint", start, end)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb

from iotflow.errors import ConfigError

__all__ = [
    "TABLE",
    "PropertyValue",
    "TwinSnapshot",
    "property_history",
    "state_at",
]

TABLE = "twin_history"
"""The table the twins flow writes (``connectors.duckdb_store.TWIN_HISTORY``)."""

_ABSENT = object()
Database = duckdb.DuckDBPyConnection | str | Path


@dataclass(frozen=True)
class TwinSnapshot:
    """One version of a twin as recorded."""

    device_id: str
    version: int
    model: str
    ts: datetime
    recorded_at: datetime
    cause: str
    changed: list[str]
    reported: dict[str, Any]
    desired: dict[str, Any]
    delta: dict[str, Any]
    reported_ts_ms: dict[str, int]
    online: bool


@dataclass(frozen=True)
class PropertyValue:
    """A property's value from one twin version on, stamped with the change's event time."""

    ts: datetime
    version: int
    value: Any


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigError(f"{name} must be an aware datetime (datetime.now(UTC)), got {value!r}")
    return value.astimezone(UTC)


@contextmanager
def _connection(db: Database) -> Iterator[duckdb.DuckDBPyConnection]:
    if isinstance(db, duckdb.DuckDBPyConnection):
        yield db
        return
    try:
        con = duckdb.connect(str(db), read_only=True)
    except (duckdb.IOException, duckdb.InvalidInputException) as exc:
        raise ConfigError(
            f"cannot open twin history {db}: {exc} (is a flow still writing it?)"
        ) from exc
    try:
        yield con
    finally:
        con.close()


def _query(db: Database, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    with _connection(db) as con:
        try:
            return con.execute(sql, params).fetchall()
        except duckdb.CatalogException as exc:
            raise ConfigError(
                f"no {TABLE} table in {db}: run the twins flow first ({exc})"
            ) from exc


_COLUMNS = "device_id, version, model, ts, recorded_at, cause, changed, reported, desired, delta, reported_ts, online"


def _snapshot(row: tuple[Any, ...]) -> TwinSnapshot:
    device_id, version, model, ts, recorded_at, cause, changed, rep, des, delta, rts, online = row
    return TwinSnapshot(
        device_id,
        version,
        model,
        ts.astimezone(UTC),
        recorded_at.astimezone(UTC),
        cause,
        json.loads(changed),
        json.loads(rep),
        json.loads(des),
        json.loads(delta),
        json.loads(rts),
        online,
    )


def state_at(
    db: Database,
    device_id: str,
    at: datetime,
    clock: Literal["recorded", "event"] = "recorded",
) -> TwinSnapshot | None:
    """The twin of ``device_id`` as it stood at ``at`` (None before its first version)."""
    at = _aware("at", at)
    if clock not in ("recorded", "event"):
        raise ConfigError(f"clock must be 'recorded' or 'event', got {clock!r}")
    column = "recorded_at" if clock == "recorded" else "ts"
    rows = _query(
        db,
        f"SELECT {_COLUMNS} FROM {TABLE} WHERE device_id = ? AND {column} <= ? "
        "ORDER BY version DESC LIMIT 1",
        [device_id, at],
    )
    return _snapshot(rows[0]) if rows else None


def property_history(
    db: Database,
    device_id: str,
    prop: str,
    start: datetime,
    end: datetime,
    side: Literal["reported", "desired"] = "reported",
) -> list[PropertyValue]:
    """Each change of ``prop`` (reported, or desired) with event time in ``[start, end)``, in time order.

    A version counts when that side's value differs from the one before it;
    a cleared desired value shows as ``None``.
    """
    start, end = _aware("start", start), _aware("end", end)
    if end < start:
        raise ConfigError(f"end {end.isoformat()} is before start {start.isoformat()}")
    if side not in ("reported", "desired"):
        raise ConfigError(f"side must be 'reported' or 'desired', got {side!r}")
    # the value just before the range, so a version where only the other side moved is skipped
    before = _query(
        db,
        f"SELECT {side} FROM {TABLE} WHERE device_id = ? AND ts < ? ORDER BY ts DESC, version DESC LIMIT 1",
        [device_id, start],
    )
    previous = json.loads(before[0][0]).get(prop, _ABSENT) if before else _ABSENT
    # a cheap textual pre-filter on the JSON list of changed names; checked exactly below
    needle = (
        "%" + json.dumps(prop).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    )
    rows = _query(
        db,
        f"SELECT ts, version, changed, {side} FROM {TABLE} WHERE device_id = ? AND ts >= ? "
        "AND ts < ? AND changed LIKE ? ESCAPE '\\' ORDER BY ts, version",
        [device_id, start, end, needle],
    )
    out: list[PropertyValue] = []
    for ts, version, changed, document in rows:
        value = json.loads(document).get(prop, _ABSENT)
        if prop in json.loads(changed) and value != previous:
            out.append(
                PropertyValue(ts.astimezone(UTC), version, None if value is _ABSENT else value)
            )
        previous = value
    return out
