"""The window_stats Bytewax step: same results with one worker or two, and late output."""

from __future__ import annotations

import bytewax.operators as op
import polars as pl
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from operators.aggregation import Aggregation, LateFrame
from operators.steps import LogicStep, window_stats

T0 = 1_767_268_800_000
DIMS = {f"d{i}": {"zone": f"z{i % 2}"} for i in range(6)}


def batches() -> list[pl.DataFrame]:
    out = []
    for k in range(4):
        rows = [(f"d{i}", T0 + k * 30_000 + i, float(i + k)) for i in range(6)]
        out.append(
            pl.DataFrame(
                rows,
                schema={"device_id": pl.Utf8, "ts_ms": pl.Int64, "t": pl.Float64},
                orient="row",
            )
        )
    # one reading for a window that closed long ago
    out.append(pl.DataFrame({"device_id": ["d0"], "ts_ms": [T0 - 600_000], "t": [99.0]}))
    return out


def flow(results: list, late: list, recovery: bool = True) -> Dataflow:
    aggregation = Aggregation.model_validate(
        {
            "window": {"kind": "tumbling", "length": "1m"},
            "stats": ["sum", "max"],
            "group_by": [["device"], ["zone"]],
        }
    )
    df = Dataflow("stats")
    up = op.input("in", df, TestingSource(batches()))
    out = window_stats("stats", up, aggregation, DIMS, shards=4, recovery=recovery)
    op.output("down", out.down, TestingSink(results))
    op.output("late", out.late, TestingSink(late))
    return df


@pytest.mark.parametrize("workers", [1, 2])
def test_results_are_complete_and_exact_with_one_or_two_workers(workers: int) -> None:
    results: list[pl.DataFrame] = []
    late: list[LateFrame] = []
    if workers == 1:
        run_main(flow(results, late))
    else:
        cluster_main(flow(results, late), [], 0, worker_count_per_proc=2)
    out = pl.concat(results)
    devices = out.filter(pl.col("group_by") == "device")
    # 6 devices x 2 one-minute windows, each window two readings
    assert devices.height == 12
    first = devices.filter(pl.col("window_start_ms") == T0).sort("key")
    assert first.get_column("sum").to_list() == [float(2 * i + 1) for i in range(6)]
    zones = out.filter(pl.col("group_by") == "zone").sort("window_start_ms", "key")
    # zone z0 = d0, d2, d4; window 0: readings i and i+1 for each -> (0+1)+(2+3)+(4+5)
    assert zones.select("key", "sum").rows()[0] == ("zone=z0", 15.0)
    assert sum(f.readings.height for f in late) == 1


def test_without_recovery_the_results_are_the_same() -> None:
    """recovery=False only skips the state copies Bytewax drops without a store."""
    with_copies: list[pl.DataFrame] = []
    without: list[pl.DataFrame] = []
    run_main(flow(with_copies, []))
    run_main(flow(without, [], recovery=False))
    key = ["group_by", "key", "metric", "window_start_ms"]
    assert pl.concat(without).sort(key).equals(pl.concat(with_copies).sort(key))


def test_logic_step_without_recovery_answers_a_snapshot_without_copying_the_state() -> None:
    class Logic:
        copies = 0

        def on_batch(self, item: int) -> list[int]:
            return [item]

        def snapshot(self) -> dict[str, int]:
            Logic.copies += 1
            return {"n": 1}

    assert LogicStep(Logic()).snapshot() == {"n": 1}
    assert LogicStep(Logic(), recovery=False).snapshot() is None
    assert Logic.copies == 1
