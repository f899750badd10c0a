"""DuckDB tables and a Bytewax sink that upserts into them through Arrow.

Writes are idempotent on each table's natural key (``INSERT OR REPLACE`` on
the primary key), so a replay after recovery leaves the table as it was.
One worker owns the file (a single sink partition): DuckDB allows one
writing process per database file. ``BackgroundWriter`` moves the upserts
(and the conversion to Arrow) off the flow's worker thread.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import polars as pl
import pyarrow as pa
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from iotflow.errors import ConfigError
from iotflow.events import Detection, WindowResult

__all__ = [
    "AGGREGATES",
    "COMMAND_AUDIT",
    "DETECTIONS",
    "EXTRA_STATS",
    "TWIN_HISTORY",
    "BackgroundWriter",
    "DuckDBSink",
    "Table",
    "aggregate_rows",
    "command_history",
    "connect",
    "detection_rows",
    "read_readings",
    "stats_rows",
]


@dataclass(frozen=True)
class Table:
    """A table: its name, Arrow schema and natural key."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]

    def ddl(self) -> str:
        cols = ", ".join(f'"{f.name}" {_SQL_TYPES[f.type]}' for f in self.schema)
        key = ", ".join(f'"{k}"' for k in self.key)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({cols}, PRIMARY KEY ({key}))'

    def added_columns(self, existing: Sequence[str]) -> list[str]:
        """``ALTER TABLE`` statements for the columns a table made by an older version
        lacks (new columns come last in the schema, so rows still insert by position)."""
        return [
            f'ALTER TABLE "{self.name}" ADD COLUMN "{f.name}" {_SQL_TYPES[f.type]}'
            for f in self.schema
            if f.name not in existing
        ]


_SQL_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int64(): "BIGINT",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.bool_(): "BOOLEAN",
}


# Statistic columns beyond count/sum/avg/min/max that a window result may carry.
EXTRA_STATS = (
    "first",
    "last",
    "variance",
    "stddev",
    "median",
    "p50",
    "p90",
    "p95",
    "p99",
    "rate",
    "distinct",
    "device_count",
    "total",
)
_INT_STATS = {"count", "distinct", "device_count"}

AGGREGATES = Table(
    "aggregates",
    pa.schema(
        [
            ("group_by", pa.string()),
            ("key", pa.string()),
            ("metric", pa.string()),
            ("window_start", pa.timestamp("us", tz="UTC")),
            ("window_end", pa.timestamp("us", tz="UTC")),
            ("count", pa.int64()),
            ("sum", pa.float64()),
            ("avg", pa.float64()),
            ("min", pa.float64()),
            ("max", pa.float64()),
            *((name, pa.int64() if name in _INT_STATS else pa.float64()) for name in EXTRA_STATS),
            ("value", pa.float64()),  # a KPI's value (``Aggregation.kpis``)
        ]
    ),
    ("group_by", "key", "metric", "window_start", "window_end"),
)

DETECTIONS = Table(
    "detections",
    pa.schema(
        [
            ("rule", pa.string()),
            ("key", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("value", pa.float64()),
            ("baseline", pa.float64()),
            ("score", pa.float64()),
            ("details", pa.string()),
        ]
    ),
    ("rule", "key", "ts"),
)


# One row per twin version (dataflows.twins); JSON columns hold the twin's documents.
TWIN_HISTORY = Table(
    "twin_history",
    pa.schema(
        [
            ("device_id", pa.string()),
            ("version", pa.int64()),
            ("model", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("recorded_at", pa.timestamp("us", tz="UTC")),
            ("cause", pa.string()),
            ("changed", pa.string()),
            ("reported", pa.string()),
            ("desired", pa.string()),
            ("delta", pa.string()),
            ("reported_ts", pa.string()),
            ("online", pa.bool_()),
        ]
    ),
    ("device_id", "version"),
)

# One row per command or coordinator transition (dataflows.orchestrator; commands.audit.audit_row).
COMMAND_AUDIT = Table(
    "command_audit",
    pa.schema(
        [
            ("event_key", pa.string()),
            ("entity", pa.string()),
            ("subject", pa.string()),
            ("kind", pa.string()),
            ("kind_order", pa.int64()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("device_id", pa.string()),
            ("command_id", pa.string()),
            ("correlation_id", pa.string()),
            ("name", pa.string()),
            ("attempt", pa.int64()),
            ("applied", pa.bool_()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("step", pa.string()),
            ("wave", pa.int64()),
        ]
    ),
    ("event_key",),
)


def aggregate_rows(results: Sequence[WindowResult]) -> pa.Table:
    """Window results as an Arrow table in the ``aggregates`` layout (group_by ``device``)."""
    n = len(results)
    columns: dict[str, list[Any]] = {f.name: [None] * n for f in AGGREGATES.schema}
    columns["group_by"] = ["device"] * n
    for name in (
        "key",
        "metric",
        "window_start",
        "window_end",
        "count",
        "sum",
        "avg",
        "min",
        "max",
    ):
        columns[name] = [getattr(r, name) for r in results]
    return pa.table(columns, schema=AGGREGATES.schema)


def _utc(column: str) -> pl.Expr:
    return pl.from_epoch(pl.col(column), time_unit="ms").dt.replace_time_zone("UTC")


def stats_rows(frames: Sequence[pl.DataFrame]) -> pa.Table:
    """Result frames of ``operators.aggregation`` as an Arrow table in the ``aggregates``
    layout; statistics a frame does not carry are null."""
    frame = pl.concat(list(frames), how="diagonal_relaxed")
    frame = frame.with_columns(
        _utc("window_start_ms").alias("window_start"), _utc("window_end_ms").alias("window_end")
    )
    missing = [f.name for f in AGGREGATES.schema if f.name not in frame.columns]
    frame = frame.with_columns(pl.lit(None).alias(name) for name in missing)
    return frame.select([f.name for f in AGGREGATES.schema]).to_arrow().cast(AGGREGATES.schema)


def detection_rows(detections: Sequence[Detection]) -> pa.Table:
    """Detections as an Arrow table in the ``detections`` layout (details as JSON text)."""
    columns: dict[str, list[Any]] = {
        "rule": [d.rule for d in detections],
        "key": [d.key for d in detections],
        "ts": [d.ts for d in detections],
        "value": [d.value for d in detections],
        "baseline": [d.baseline for d in detections],
        "score": [d.score for d in detections],
        "details": [msgspec.json.encode(d.details).decode() for d in detections],
    }
    return pa.table(columns, schema=DETECTIONS.schema)


def read_readings(
    source: Path | str, table: str = "readings", where: str | None = None
) -> pl.DataFrame:
    """A reading frame from a DuckDB file's table or from Parquet files (a path or glob
    ending in ``.parquet``), through Arrow. ``where`` is a SQL condition on the columns
    (``device_id``, ``ts_ms``, metrics); the columns must already be in the frame layout."""
    text = str(source)
    try:
        if text.endswith(".parquet"):
            con = duckdb.connect()
            relation = f"read_parquet('{text.replace(chr(39), chr(39) * 2)}')"
        else:
            con = duckdb.connect(text, read_only=True)
            relation = f'"{table}"'
        query = f"SELECT * FROM {relation}" + (f" WHERE {where}" if where else "")
        try:
            return pl.from_arrow(con.execute(query).to_arrow_table())
        finally:
            con.close()
    except (
        duckdb.IOException,
        duckdb.CatalogException,
        duckdb.BinderException,
        duckdb.ParserException,
    ) as exc:
        msg = f"cannot read readings from {text} (table {table!r}, where {where!r}): {exc}"
        raise ConfigError(msg) from exc


def connect(path: Path | str, tables: Sequence[Table] = (AGGREGATES,)) -> duckdb.DuckDBPyConnection:
    """Open (creating) the database file and its tables."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path))
    except duckdb.IOException as exc:
        msg = f"cannot open DuckDB file {path}: {exc} (is another process writing to it?)"
        raise ConfigError(msg) from exc
    for table in tables:
        con.execute(table.ddl())
        existing = con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
            [table.name],
        ).fetchall()
        for statement in table.added_columns([name for (name,) in existing]):
            con.execute(statement)
    return con


def upsert(con: duckdb.DuckDBPyConnection, table: Table, batch: pa.Table) -> None:
    """``INSERT OR REPLACE`` an Arrow batch into ``table``; of the batch's rows with one
    natural key, the last wins."""
    # DuckDB refuses a key twice in one INSERT OR REPLACE: keep the last row of each key
    # (batches coalesced by BackgroundWriter may update a key).
    ordered = batch.append_column("_row", pa.array(range(batch.num_rows), pa.int64()))
    con.register("_batch", ordered)
    try:
        keys = ", ".join(f'"{k}"' for k in table.key)
        con.execute(
            f'INSERT OR REPLACE INTO "{table.name}" SELECT * EXCLUDE (_row) FROM _batch '
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY _row DESC) = 1"
        )
    finally:
        con.unregister("_batch")


class BackgroundWriter:
    """Upserts items into one DuckDB table from a thread of its own.

    A DuckDB commit costs ~10 ms however small the batch; on a flow's worker
    thread it stalls everything queued behind it. Here ``put`` only queues:
    the thread converts (``to_arrow``) and upserts what is queued at once, at
    the latest ``interval`` after the oldest queued item was put, or as soon
    as ``max_pending`` items wait.

    Guarantees:

    - **Bounded, never lossy.** At most ``max_pending`` items wait; ``put``
      blocks while that many do (backpressure), it never drops.
    - **Flush.** ``flush()`` returns once every item put before it is
      committed; a sink calls it at each epoch's snapshot, so a recovery
      snapshot never runs ahead of the rows. ``close()`` flushes and stops the
      thread; an interpreter exit (a flow stopped with SIGINT) closes too.
      Rows are upserted on their natural key, so a replay is harmless.
    - **Errors are not swallowed.** A failed upsert stops the writer; the
      error is raised from every later ``put`` and ``flush``, and from
      ``close`` unless it was raised already.

    Example::

        >>> import tempfile
        >>> from datetime import UTC
        >>> path = Path(tempfile.mkdtemp()) / "audit.duckdb"
        >>> writer = BackgroundWriter(path, DETECTIONS, detection_rows)
        >>> writer.put([Detection("hot", "d1", datetime(2026, 1, 1, tzinfo=UTC), 31.0)])
        >>> writer.close()
        >>> duckdb.connect(str(path)).sql("SELECT rule, key FROM detections").fetchall()
        [('hot', 'd1')]
    """

    def __init__(
        self,
        path: Path | str,
        table: Table,
        to_arrow: Callable[[list[Any]], pa.Table],
        *,
        interval: timedelta = timedelta(seconds=1),
        max_pending: int = 100_000,
    ) -> None:
        if interval <= timedelta(0) or max_pending < 1:
            msg = f"BackgroundWriter needs interval > 0 and max_pending >= 1, got {interval}, {max_pending}"
            raise ConfigError(msg)
        self._con = connect(path, [table])  # in the caller: a bad path fails here, named
        self._table = table
        self._to_arrow = to_arrow
        self._interval_s = interval.total_seconds()
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: list[Any] = []
        self._oldest = 0.0  # time.monotonic() of the oldest pending item's put
        self._put = 0  # items put so far
        self._written = 0  # items committed so far
        self._flushes = 0  # flush() calls waiting
        self._closing = False
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, name=f"duckdb-{table.name}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def put(self, items: list[Any]) -> None:
        """Queue ``items`` for the table; blocks while ``max_pending`` items wait."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._error is not None
                    or self._closing
                    or len(self._pending) < self._max_pending
                )
            )
            self._raise()
            if self._closing:
                raise ConfigError(f"the {self._table.name} writer is closed; nothing more is taken")
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending.extend(items)
            self._put += len(items)
            self._cond.notify_all()

    def flush(self) -> None:
        """Return once every item put so far is committed (or raise the writer's error)."""
        with self._cond:
            target = self._put
            self._flushes += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._written >= target or self._error is not None)
            finally:
                self._flushes -= 1
            self._raise()

    def close(self) -> None:
        """Flush, stop the thread and close the connection; idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        atexit.unregister(self.close)
        self._thread.join()
        self._con.close()
        if not self._reported:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            self._reported = True
            msg = f"writing {self._table.name} to DuckDB failed: {self._error}"
            raise ConfigError(msg) from self._error

    def _due(self) -> bool:
        if self._closing or self._flushes or len(self._pending) >= self._max_pending:
            return True
        return time.monotonic() - self._oldest >= self._interval_s

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending or not self._due():
                    if self._closing and not self._pending:
                        return
                    timeout = (
                        None
                        if not self._pending
                        else max(0.0, self._oldest + self._interval_s - time.monotonic())
                    )
                    self._cond.wait(timeout)
                batch, self._pending = self._pending, []
                self._cond.notify_all()  # room for blocked puts
            try:
                upsert(self._con, self._table, self._to_arrow(batch))
            except BaseException as exc:  # raised again in the caller's thread
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._written += len(batch)
                self._cond.notify_all()


class _Partition(StatefulSinkPartition[Any, None]):
    def __init__(self, path: Path, table: Table, to_arrow: Callable[[list[Any]], pa.Table]) -> None:
        self._con = connect(path, [table])
        self._table = table
        self._to_arrow = to_arrow

    def write_batch(self, items: list[Any]) -> None:
        upsert(self._con, self._table, self._to_arrow(items))

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._con.close()


class _BackgroundPartition(StatefulSinkPartition[Any, None]):
    def __init__(self, writer: BackgroundWriter, recovery: bool) -> None:
        self._writer = writer
        self._recovery = recovery

    def write_batch(self, items: list[Any]) -> None:
        self._writer.put(items)

    def snapshot(self) -> None:
        # the epoch ends: with a recovery store, its rows are committed before Bytewax
        # records the snapshot; without one nothing is recorded, so nothing to wait for
        # (Bytewax calls snapshot at every epoch's end either way)
        if self._recovery:
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class DuckDBSink(FixedPartitionedSink[Any, None]):
    """Upsert items into DuckDB tables; an item arrives as ``(table_name, item)``.

    One sink partition per table, each with its own connection to the file (DuckDB
    shares one database between the connections of a process; run a flow that
    writes DuckDB in one process, ``-w`` threads are fine).

    ``background`` (a flush interval) writes through a ``BackgroundWriter``
    per table: the worker only queues. With ``recovery`` (the default; pass
    ``connectors.recovery.recovery_on(...)``) each epoch's snapshot waits until
    its rows are committed, so a recovery snapshot never runs ahead of the
    table. With ``recovery=False`` (no recovery store records the snapshots)
    the worker never waits for DuckDB: rows commit within ``background`` of
    being queued, and closing the sink (end of input, SIGINT) commits the rest.
    Without ``background``, each batch is upserted on the worker.

    Example::

        sink = DuckDBSink(Path("iot.duckdb"), AGGREGATES, aggregate_rows)
        both = DuckDBSink(Path("iot.duckdb"), AGGREGATES, stats_rows, also={DETECTIONS: detection_rows})
        audit = DuckDBSink(Path("iot.duckdb"), COMMAND_AUDIT, rows, background=timedelta(seconds=1),
                           recovery=recovery_on(settings.recovery_dir))
    """

    def __init__(
        self,
        path: Path,
        table: Table,
        to_arrow: Callable[[list[Any]], pa.Table],
        *,
        also: Mapping[Table, Callable[[list[Any]], pa.Table]] | None = None,
        background: timedelta | None = None,
        recovery: bool = True,
    ) -> None:
        self._path = Path(path)
        self._background = background
        self._recovery = recovery
        self._routes = {table.name: (table, to_arrow)}
        self._routes.update({t.name: (t, f) for t, f in (also or {}).items()})

    def list_parts(self) -> list[str]:
        return list(self._routes)

    def part_fn(self, item_key: str) -> int:
        try:
            # Bytewax indexes into the sorted set of partition names, not list_parts' order.
            return sorted(self._routes).index(item_key)
        except ValueError:
            msg = f"no DuckDB table {item_key!r} in this sink; tables: {', '.join(self._routes)}"
            raise ConfigError(msg) from None

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _Partition | _BackgroundPartition:
        table, to_arrow = self._routes[for_part]
        if self._background is None:
            return _Partition(self._path, table, to_arrow)
        writer = BackgroundWriter(self._path, table, to_arrow, interval=self._background)
        return _BackgroundPartition(writer, self._recovery)


def command_history(
    path: Path | str, device_id: str, since: datetime, until: datetime
) -> pl.DataFrame:
    """What happened to ``device_id`` from ``since`` (inclusive) to ``until`` (exclusive):
    its rows of ``command_audit`` (command transitions and coordinator steps that name
    the device), in time order, then lifecycle order. ConfigError for a file without
    the table or naive times."""
    for name, value in (("since", since), ("until", until)):
        if value.tzinfo is None:
            raise ConfigError(f"{name} {value.isoformat()} is naive; give an aware UTC datetime")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        raise ConfigError(f"cannot open DuckDB file {path}: {exc}") from exc
    try:
        query = (
            f'SELECT * FROM "{COMMAND_AUDIT.name}" WHERE device_id = ? AND ts >= ? AND ts < ? '
            "ORDER BY ts, kind_order, event_key"
        )
        return pl.from_arrow(con.sql(query, params=[device_id, since, until]).to_arrow_table())
    except duckdb.CatalogException as exc:
        msg = f"{path} has no {COMMAND_AUDIT.name} table; is it the orchestrator flow's IOTFLOW_DUCKDB?"
        raise ConfigError(msg) from exc
    finally:
        con.close()
