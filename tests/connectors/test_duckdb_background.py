"""connectors.duckdb_store.BackgroundWriter: upserts off the worker thread, bounded, flushed."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from connectors.duckdb_store import DETECTIONS, BackgroundWriter, DuckDBSink, detection_rows
from iotflow.errors import ConfigError
from iotflow.events import Detection

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)  # longer than any test: only flush() and close() write


def detection(n: int, value: float = 1.0) -> Detection:
    return Detection("hot", f"d{n}", T0 + timedelta(seconds=n), value)


def rows(path: Path) -> list[tuple[str, float]]:
    con = duckdb.connect(str(path))
    try:
        return con.sql('SELECT "key", "value" FROM detections ORDER BY "key"').fetchall()
    finally:
        con.close()


def test_flush_returns_once_everything_put_is_committed_upserted_on_the_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.duckdb"
    writer = BackgroundWriter(path, DETECTIONS, detection_rows, interval=HOUR)
    writer.put([detection(1), detection(2)])
    writer.put([detection(2, 5.0)])  # the same natural key again: one row, the last one
    writer.flush()
    assert rows(path) == [("d1", 1.0), ("d2", 5.0)]
    writer.put([detection(1)])  # a replay changes nothing
    writer.close()
    assert rows(path) == [("d1", 1.0), ("d2", 5.0)]


def test_close_writes_what_is_still_queued(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    writer = BackgroundWriter(path, DETECTIONS, detection_rows, interval=HOUR)
    writer.put([detection(n) for n in range(100)])
    writer.close()
    writer.close()  # idempotent
    assert len(rows(path)) == 100
    with pytest.raises(ConfigError, match="closed"):
        writer.put([detection(1)])


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path: Path) -> None:
    def broken(items: list[Detection]) -> pa.Table:
        raise ValueError("no such column 'scrore'")

    writer = BackgroundWriter(tmp_path / "w.duckdb", DETECTIONS, broken, interval=HOUR)
    writer.put([detection(1)])
    with pytest.raises(ConfigError, match="writing detections to DuckDB failed: no such column"):
        writer.flush()
    with pytest.raises(ConfigError, match="no such column"):
        writer.put([detection(2)])
    writer.close()  # already reported: closing does not raise it a third time


def test_close_raises_an_error_nobody_saw_yet(tmp_path: Path) -> None:
    def broken(items: list[Detection]) -> pa.Table:
        raise ValueError("disk full")

    writer = BackgroundWriter(tmp_path / "w.duckdb", DETECTIONS, broken, interval=HOUR)
    writer.put([detection(1)])
    with pytest.raises(ConfigError, match="disk full"):
        writer.close()


def test_a_full_queue_holds_put_back_instead_of_dropping(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    converting, release = threading.Event(), threading.Event()

    def slow(items: list[Detection]) -> pa.Table:
        converting.set()
        release.wait(30)
        return detection_rows(items)

    writer = BackgroundWriter(path, DETECTIONS, slow, interval=HOUR, max_pending=2)
    writer.put([detection(0), detection(1)])  # full: the thread takes them at once
    assert converting.wait(10)
    writer.put([detection(2), detection(3)])  # full again while the thread converts
    third = threading.Thread(target=writer.put, args=([detection(4)],))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # waiting for room, not dropped
    release.set()
    third.join(10)
    writer.close()
    assert len(rows(path)) == 5


def test_the_sink_commits_an_epochs_rows_at_its_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    sink = DuckDBSink(path, DETECTIONS, detection_rows, background=HOUR)
    part = sink.build_part("audit", DETECTIONS.name, None)
    part.write_batch([detection(1), detection(2)])
    part.snapshot()
    assert len(rows(path)) == 2
    part.write_batch([detection(3)])
    part.close()
    assert len(rows(path)) == 3


def test_without_recovery_a_snapshot_does_not_wait_and_close_still_commits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.duckdb"
    sink = DuckDBSink(path, DETECTIONS, detection_rows, background=HOUR, recovery=False)
    part = sink.build_part("audit", DETECTIONS.name, None)
    part.write_batch([detection(1), detection(2)])
    part.snapshot()  # no recovery store records it: the worker goes on at once
    assert rows(path) == []  # still queued (the interval is an hour)
    part.write_batch([detection(3)])
    part.close()
    assert len(rows(path)) == 3


def test_without_recovery_rows_still_commit_within_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    sink = DuckDBSink(
        path, DETECTIONS, detection_rows, background=timedelta(milliseconds=50), recovery=False
    )
    part = sink.build_part("audit", DETECTIONS.name, None)
    part.write_batch([detection(1)])
    part.snapshot()
    deadline = time.monotonic() + 30
    while not rows(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows(path) == [("d1", 1.0)]
    part.close()
