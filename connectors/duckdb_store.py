"""DuckDB tables and a Bytewax sink that upserts into them through Arrow.

Writes are idempotent on each table's natural key (``INSERT OR REPLACE`` on
the primary key), so a replay after recovery leaves the table as it was.
One worker owns the file (a single sink partition): DuckDB allows one
writing process per database file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from iotflow.errors import ConfigError
from iotflow.events import WindowResult

__all__ = ["AGGREGATES", "DuckDBSink", "Table", "aggregate_rows", "connect"]


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
        }
        cols = ", ".join(f'"{f.name}" {types[f.type]}' for f in self.schema)
        key = ", ".join(f'"{k}"' for k in self.key)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({cols}, PRIMARY KEY ({key}))'


AGGREGATES = Table(
    "aggregates",
    pa.schema(
        [
            ("key", pa.string()),
            ("metric", pa.string()),
            ("window_start", pa.timestamp("us", tz="UTC")),
            ("window_end", pa.timestamp("us", tz="UTC")),
            ("count", pa.int64()),
            ("sum", pa.float64()),
            ("avg", pa.float64()),
            ("min", pa.float64()),
            ("max", pa.float64()),
        ]
    ),
    ("key", "metric", "window_start"),
)


def aggregate_rows(results: Sequence[WindowResult]) -> pa.Table:
    """Window results as an Arrow table in the ``aggregates`` layout."""
    columns = {f.name: [getattr(r, f.name) for r in results] for f in AGGREGATES.schema}
    return pa.table(columns, schema=AGGREGATES.schema)


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
    """Upsert items into one DuckDB table; items arrive as ``(any_key, item)``.

    Example::

        sink = DuckDBSink(Path("iot.duckdb"), AGGREGATES, aggregate_rows)
    """

    def __init__(self, path: Path, table: Table, to_arrow: Callable[[list[Any]], pa.Table]) -> None:
        self._path = Path(path)
        self._table = table
        self._to_arrow = to_arrow

    def list_parts(self) -> list[str]:
        return [self._table.name]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Partition:
        return _Partition(self._path, self._table, self._to_arrow)
