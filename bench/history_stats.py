"""history_stats: every statistic per device over 1 hour of 1 Hz data from 1,000 devices.

The history (3.6M readings) is written to a DuckDB table and to Parquet; the
measured work is reading it back through Arrow and ``Aggregation.analyze``
(one 1-hour tumbling window, all statistics, exact). The same readings are
then streamed through the streaming aggregator in one-minute batches with
hourly rollups, and the counts and averages must agree.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from bench.harness import BenchError, Figure, Measured
from bench.workload import T0_MS
from connectors.duckdb_store import read_readings
from iotflow.events import from_ms
from operators.aggregation import Aggregation

__all__ = ["DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = "seconds to compute every statistic per device over 1 h of 1 Hz data, 1,000 devices, from DuckDB and Parquet"
DEFAULTS: dict[str, Any] = {"devices": 1000, "seconds": 3600}
QUICK: dict[str, Any] = {"devices": 20, "seconds": 600}
FIGURES = {"seconds", "parquet_seconds"}
COMPLETE_COUNTS = ["duckdb_counted", "parquet_counted", "streamed_counted"]

STATS = [
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "variance",
    "stddev",
    "median",
    "p90",
    "p95",
    "p99",
    "rate",
    "distinct",
]


def history(devices: int, seconds: int) -> pl.DataFrame:
    rng = np.random.default_rng(7)
    n = devices * seconds
    device = np.tile(np.arange(devices), seconds)
    ts = T0_MS + np.repeat(np.arange(seconds, dtype=np.int64), devices) * 1000
    base = 15.0 + (device % 10)
    temperature = np.round(base + 3 * np.sin(ts / 600_000) + rng.normal(0, 0.5, n), 2)
    return pl.DataFrame(
        {
            "device_id": pl.Series([f"dev-{d:05d}" for d in range(devices)])[device],
            "ts_ms": ts,
            "temperature": temperature,
        }
    )


def run(params: dict[str, Any]) -> Measured:
    devices, seconds = int(params["devices"]), int(params["seconds"])
    if devices < 1 or seconds < 1:
        raise BenchError(f"devices and seconds must be at least 1: {params}")
    frame = history(devices, seconds)
    hour = Aggregation.model_validate(
        {
            "window": {"kind": "tumbling", "length": f"{seconds}s"},
            "stats": STATS,
            "align_to": from_ms(T0_MS).isoformat(),
        }
    )
    with tempfile.TemporaryDirectory(prefix="iotflow-history-") as tmp:
        db, parquet = Path(tmp) / "history.duckdb", Path(tmp) / "history.parquet"
        con = duckdb.connect(str(db))
        con.register("frame", frame.to_arrow())
        con.execute("CREATE TABLE readings AS SELECT * FROM frame")
        con.close()
        frame.write_parquet(parquet)

        started = time.perf_counter()
        from_duckdb = hour.analyze(read_readings(db))
        duckdb_s = time.perf_counter() - started
        started = time.perf_counter()
        from_parquet = hour.analyze(read_readings(parquet))
        parquet_s = time.perf_counter() - started

    # the streaming path over the same readings: one-minute batches, per device
    streaming = hour.build(None)
    emitted: list[Any] = []
    for _, part in frame.with_columns((pl.col("ts_ms") // 60_000).alias("_m")).group_by(
        "_m", maintain_order=True
    ):
        emitted.extend(streaming.on_batch(part.drop("_m")))
    emitted.extend(streaming.on_eof())
    streamed = pl.concat([e for e in emitted if isinstance(e, pl.DataFrame)])
    keys = ["key", "metric"]
    joined = from_duckdb.join(streamed, on=keys, suffix="_s")
    for stat in STATS:
        diff = joined.select((pl.col(stat) - pl.col(f"{stat}_s")).abs().max()).item()
        if diff is not None and diff > 1e-6 * max(
            1.0, abs(joined.get_column(stat).abs().max() or 0)
        ):
            raise BenchError(f"batch and streaming disagree on {stat}: max difference {diff}")
    return Measured(
        figures={
            "seconds": Figure(round(duckdb_s, 3), "s"),
            "parquet_seconds": Figure(round(parquet_s, 3), "s"),
        },
        counts={
            "sent": frame.height,
            "duckdb_counted": int(from_duckdb.get_column("count").sum()),
            "parquet_counted": int(from_parquet.get_column("count").sum()),
            "streamed_counted": int(streamed.get_column("count").sum()),
            "devices": from_duckdb.height,
        },
    )
