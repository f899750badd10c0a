"""Twin history queries on a real DuckDB file written the way the twins flow writes it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connectors.duckdb_store import TWIN_HISTORY, DuckDBSink
from dataflows.twins import history_rows
from iotflow.errors import ConfigError
from iotflow.events import from_ms
from tests.twins.kit import T0, T0_MS, Clock, desired, make_registry, reported
from twins.history import property_history, state_at
from twins.sync import TwinSync


@pytest.fixture
def db(tmp_path):
    """Three minutes of one thermostat: readings each minute, a desired change, a report of it."""
    clock = Clock()
    sync = TwinSync(make_registry(), now=clock)
    batches = []
    script = [
        (0, reported("t1", T0_MS, setpoint=20.0, temperature=19.0)),
        (60, reported("t1", T0_MS + 60_000, setpoint=20.0, temperature=19.5)),
        (90, desired("t1", T0_MS + 90_000, setpoint=23)),
        (120, reported("t1", T0_MS + 120_000, setpoint=23.0, temperature=20.0)),
        (121, desired("t1", T0_MS + 121_000, setpoint=None)),
    ]
    for seconds, update in script:
        clock.now = T0 + timedelta(seconds=seconds)
        for out in sync.on_batch([update]):
            batches.append(out.changes)
    path = tmp_path / "h.duckdb"
    sink = DuckDBSink(path, TWIN_HISTORY, history_rows).build_part("s", TWIN_HISTORY.name, None)
    sink.write_batch(batches)
    sink.write_batch(batches)  # a replay changes nothing
    sink.close()
    return path


def test_state_at(db):
    assert state_at(db, "t1", T0 - timedelta(seconds=1)) is None
    first = state_at(db, "t1", T0 + timedelta(seconds=30))
    assert first.version == 1 and first.reported == {"setpoint": 20.0, "temperature": 19.0}
    assert first.online and first.cause == "online" and first.model == "thermo"
    assert first.reported_ts_ms == {"setpoint": T0_MS, "temperature": T0_MS}
    during = state_at(db, "t1", T0 + timedelta(seconds=100))
    assert (
        during.version == 3
        and during.delta == {"setpoint": 23.0}
        and during.desired == {"setpoint": 23.0}
    )
    after = state_at(db, "t1", T0 + timedelta(hours=1))
    assert after.version == 5 and after.desired == {} and after.reported["setpoint"] == 23.0
    assert state_at(db, "t1", T0 + timedelta(seconds=100), clock="event").version == 3
    assert state_at(db, "ghost", T0 + timedelta(hours=1)) is None


def test_property_history(db):
    start, end = T0, T0 + timedelta(hours=1)
    assert [
        (p.ts, p.version, p.value) for p in property_history(db, "t1", "setpoint", start, end)
    ] == [
        (T0, 1, 20.0),
        (T0 + timedelta(seconds=120), 4, 23.0),
    ]
    temps = property_history(db, "t1", "temperature", start, end)
    assert [p.value for p in temps] == [19.0, 19.5, 20.0]
    # end exclusive
    assert [
        p.value
        for p in property_history(db, "t1", "temperature", start, T0 + timedelta(seconds=120))
    ] == [19.0, 19.5]
    wanted = property_history(db, "t1", "setpoint", start, end, side="desired")
    assert [(p.version, p.value) for p in wanted] == [(3, 23.0), (5, None)]
    assert property_history(db, "t1", "set%", start, end) == []  # LIKE wildcards are literal


def test_bad_queries(db, tmp_path):
    with pytest.raises(ConfigError, match="aware datetime"):
        state_at(db, "t1", datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="before start"):
        property_history(db, "t1", "setpoint", T0, T0 - timedelta(seconds=1))
    with pytest.raises(ConfigError, match="clock must be"):
        state_at(db, "t1", T0, clock="wall")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no twin_history table"):
        import duckdb

        duckdb.connect(str(tmp_path / "empty.duckdb")).close()
        state_at(tmp_path / "empty.duckdb", "t1", T0)
    assert from_ms(T0_MS) == T0 and T0.tzinfo is UTC
