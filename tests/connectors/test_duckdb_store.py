"""connectors.duckdb_store: tables made by an older version gain the new columns."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from connectors.duckdb_store import AGGREGATES, Table, connect, stats_rows, upsert

T0 = 1_767_268_800_000


def results(metric: str, **columns: object) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "group_by": ["zone"],
            "key": ["zone=z1"],
            "metric": [metric],
            "window_start_ms": [T0],
            "window_end_ms": [T0 + 60_000],
            **{name: [value] for name, value in columns.items()},
        }
    )


def test_an_aggregates_table_without_kpi_values_gains_the_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.duckdb"
    old = Table(
        AGGREGATES.name,
        AGGREGATES.schema.remove(AGGREGATES.schema.get_field_index("value")),
        AGGREGATES.key,
    )
    con = duckdb.connect(str(path))
    con.execute(old.ddl())
    upsert(con, old, stats_rows([results("power", count=3, avg=150.0)]).drop_columns(["value"]))
    con.close()

    con = connect(path)
    upsert(con, AGGREGATES, stats_rows([results("power_per_device", value=125.0)]))
    rows = con.execute(
        "SELECT metric, count, avg, value FROM aggregates ORDER BY metric"
    ).fetchall()
    assert rows == [("power", 3, 150.0, None), ("power_per_device", None, None, 125.0)]
    con.close()
    connect(path).close()  # a second open finds nothing to add
