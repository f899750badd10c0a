"""edge_memory: the edge gateway process's peak resident memory under a fleet's load.

The load of ``edge_bandwidth`` (``devices`` devices at ``rate_hz``, 10 s windows, a
local rule, store-and-forward uplink to Kafka, definitions off): the real edge
flow (``python -m bytewax.run dataflows.edge:flow``) in its own process, whose
``VmHWM`` (peak RSS, all threads: Bytewax, paho-mqtt, librdkafka, SQLite) is read
from ``/proc`` every 0.2 s until it exits. ``idle_rss_mb`` is its RSS when it
came online, before the load. The process imports neither polars, numpy,
DuckDB (``tests/operators/test_cep_rows.py`` checks the imports) nor pydantic
(``tests/dataflows/test_edge_logic.py``).

The run fails unless the aggregates count every reading sent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench._edge import fleet_run
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = "edge gateway: peak RSS of the edge process, 1,000 devices at 1 Hz, 10 s windows"
DEFAULTS: dict[str, Any] = {"devices": 1000, "rate_hz": 1.0, "duration_s": 60.0, "publishers": 2}
QUICK: dict[str, Any] = {"devices": 100, "duration_s": 12.0, "publishers": 1}
FIGURES = {"peak_rss_mb"}
COMPLETE_COUNTS = ("aggregated",)


def run(params: dict[str, Any]) -> Measured:
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp, private_stack() as info:
        r = fleet_run(
            info,
            Path(tmp),
            devices=params["devices"],
            rate_hz=params["rate_hz"],
            duration_s=params["duration_s"],
            publishers=params["publishers"],
        )
    if r.aggregated != r.sent:
        raise BenchError(f"incomplete: {r.aggregated} of {r.sent} readings aggregated")
    return Measured(
        figures={
            "peak_rss_mb": Figure(r.peak_rss_mb, "MiB"),
            "idle_rss_mb": Figure(r.idle_rss_mb, "MiB"),
        },
        counts={"sent": r.sent, "aggregated": r.aggregated},
    )
