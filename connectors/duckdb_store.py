"""DuckDB tables and a Bytewax sink that upserts into them through Arrow.

Writes are idempotent on each table's natural key (``INSERT OR REPLACE`` on
the primary key), so a replay after recovery leaves the table as it was.
One worker owns the file (a single sink partition): DuckDB allows one
writing process per database file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
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
        types = {
            pa.string(): "VARCHAR",
            pa.float64(): "DOUBLE",
            pa.int64(): "BIGINT",
            pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
            pa.bool_(): "BOOLEAN",
        }
        cols = ", ".join(f'"{f.name}" {types[f.type]}' for f in self.schema)
        key = ", ".join(f'"{k}"' for k in self.key)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({cols}, PRIMARY KEY ({key}))'


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
    return con


class _Partition(StatefulSinkPartition[Any, None]):
    def __init__(self, path: Path, table: Table, to_arrow: Callable[[list[Any]], pa.Table]) -> None:
        self._con = connect(path, [table])
        self._table = table
        self._to_arrow = to_arrow

    def write_batch(self, items: list[Any]) -> None:
        batch = self._to_arrow(items)
        # DuckDB refuses a key twice in one INSERT OR REPLACE; replays repeat identical rows, keep one.
        self._con.register("_batch", batch)
        try:
            keys = ", ".join(f'"{k}"' for k in self._table.key)
            self._con.execute(
                f'INSERT OR REPLACE INTO "{self._table.name}" '
                f"SELECT * FROM _batch QUALIFY row_number() OVER (PARTITION BY {keys}) = 1"
            )
        finally:
            self._con.unregister("_batch")

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._con.close()


class DuckDBSink(FixedPartitionedSink[Any, None]):
    """Upsert items into DuckDB tables; an item arrives as ``(table_name, item)``.

    One sink partition per table, each with its own connection to the file (DuckDB
    shares one database between the connections of a process; run a flow that
    writes DuckDB in one process, ``-w`` threads are fine).

    Example::

        sink = DuckDBSink(Path("iot.duckdb"), AGGREGATES, aggregate_rows)
        both = DuckDBSink(Path("iot.duckdb"), AGGREGATES, stats_rows, also={DETECTIONS: detection_rows})
    """

    def __init__(
        self,
        path: Path,
        table: Table,
        to_arrow: Callable[[list[Any]], pa.Table],
        *,
        also: Mapping[Table, Callable[[list[Any]], pa.Table]] | None = None,
    ) -> None:
        self._path = Path(path)
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

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Partition:
        table, to_arrow = self._routes[for_part]
        return _Partition(self._path, table, to_arrow)


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
