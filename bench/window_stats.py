"""window_stats: per-device and per-zone 1-minute statistics from raw JSON batches, one worker.

The input is what a broker hands over: batches of raw JSON payloads with their
topics (decoding is part of the measured work). The flow is the library's
columnar path: ``TelemetryDecoder.decode_frame`` -> ``window_stats`` (avg, min,
max, p95 per device and per zone). The baseline, measured in the same run on
a prefix of the same input, is the per-event Bytewax way: decode each message,
key by device, ``fold_window`` with an event clock. It computes less (per device
only) and still runs far slower, because every live key is notified on each
activation when replaying faster than real time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import bytewax.operators.windowing as win
import msgspec
import polars as pl
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from bench.flow_throughput import build_batches
from bench.harness import BenchError, Figure, Measured
from bench.workload import T0_MS
from connectors.decode import TelemetryDecoder
from iotflow.events import DeviceMessage, from_ms
from operators.aggregation import Aggregation
from operators.steps import window_stats

__all__ = ["DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "events/s of 1-minute avg/min/max/p95 per device and per zone from raw JSON batches "
    "(decoding included), one worker, vs per-event Bytewax fold_window"
)
DEFAULTS: dict[str, Any] = {
    "devices": 10_000,
    "zones": 100,
    "events": 3_000_000,
    "batch_size": 50_000,
    "interval_ms": 1000,
    "naive_events": 100_000,
    "shards": 1,
}
QUICK: dict[str, Any] = {
    "devices": 100,
    "zones": 5,
    "events": 24_000,
    "batch_size": 2000,
    "naive_events": 3000,
}
FIGURES = {"events_per_s", "naive_events_per_s", "speedup"}
COMPLETE_COUNTS = ["device_readings", "zone_readings"]

STATS = ["avg", "min", "max", "p95"]
# Both paths advance their watermark with the wall clock; replaying faster than real
# time, a short lateness would turn in-order readings late. Ten minutes drops nothing.
LATENESS = timedelta(minutes=10)


def _columnar(
    batches: list[list[DeviceMessage]], dims: dict[str, dict[str, str]], shards: int
) -> tuple[float, float, pl.DataFrame]:
    """Wall seconds, process CPU seconds (every thread) and the result rows."""
    aggregation = Aggregation.model_validate(
        {
            "window": {"kind": "tumbling", "length": "1m"},
            "stats": STATS,
            "group_by": [["device"], ["zone"]],
            "allowed_lateness": LATENESS,
            "align_to": from_ms(T0_MS).isoformat(),
        }
    )
    decoder = TelemetryDecoder(max_future_skew_ms=10**13)
    out: list[pl.DataFrame] = []
    flow = Dataflow("window_stats")
    raw = op.input("in", flow, TestingSource(batches))
    frames = op.map("decode", raw, lambda batch: decoder.decode_frame(batch).ok)
    stats = window_stats("stats", frames, aggregation, dims, shards=shards)
    op.output("out", stats.down, TestingSink(out))
    started, cpu = time.perf_counter(), time.process_time()
    run_main(flow)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return elapsed, cpu, pl.concat(out) if out else pl.DataFrame()


class _Fold(msgspec.Struct):
    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")
    values: list[float] = []


def _naive(messages: list[DeviceMessage]) -> tuple[float, int]:
    """Per-event Bytewax: one item per reading, fold_window per device with an event clock."""
    decoder = msgspec.json.Decoder()

    def reading(msg: DeviceMessage) -> tuple[str, tuple[int, float]]:
        doc = decoder.decode(msg.payload)
        return msg.topic.split("/")[2], (doc["ts"], doc["temperature"])

    def fold(acc: _Fold, item: tuple[int, float]) -> _Fold:
        value = item[1]
        acc.count += 1
        acc.total += value
        acc.low = min(acc.low, value)
        acc.high = max(acc.high, value)
        acc.values.append(value)
        return acc

    def merge(a: _Fold, b: _Fold) -> _Fold:
        return _Fold(
            a.count + b.count,
            a.total + b.total,
            min(a.low, b.low),
            max(a.high, b.high),
            a.values + b.values,
        )

    def finish(acc: _Fold) -> tuple[int, float, float, float, float]:
        ordered = sorted(acc.values)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        return acc.count, acc.total / acc.count, acc.low, acc.high, p95

    out: list[Any] = []
    flow = Dataflow("naive")
    items = op.input("in", flow, TestingSource(messages, batch_size=1000))
    keyed = op.map("decode", items, reading)
    clock = win.EventClock(lambda item: from_ms(item[0]), wait_for_system_duration=LATENESS)
    windower = win.TumblingWindower(length=timedelta(minutes=1), align_to=from_ms(T0_MS))
    folded = win.fold_window("fold", keyed, clock, windower, _Fold, fold, merge)
    op.output(
        "out", op.map("finish", folded.down, lambda kv: (kv[0], finish(kv[1][1]))), TestingSink(out)
    )
    started = time.perf_counter()
    run_main(flow)
    elapsed = time.perf_counter() - started
    return elapsed, sum(r[1][0] for r in out)


def _readings(rows: pl.DataFrame) -> int:
    """Readings counted in result rows (one metric, so each reading once)."""
    return int(rows.filter(pl.col("metric") == "temperature").get_column("count").sum())


def run(params: dict[str, Any]) -> Measured:
    devices, zones = int(params["devices"]), int(params["zones"])
    events, naive_events = int(params["events"]), int(params["naive_events"])
    if min(devices, zones, events, naive_events, int(params["batch_size"])) < 1:
        raise BenchError(f"every size must be at least 1: {params}")
    batches, _ = build_batches(
        devices, events, int(params["batch_size"]), int(params["interval_ms"]), 60_000
    )
    dims = {f"dev-{d:05d}": {"zone": f"zone-{d % zones:03d}"} for d in range(devices)}
    elapsed, cpu, results = _columnar(batches, dims, int(params["shards"]))
    device_rows = results.filter(pl.col("group_by") == "device")
    zone_rows = results.filter(pl.col("group_by") == "zone")
    flat = [m for batch in batches for m in batch][:naive_events]
    naive_elapsed, naive_counted = _naive(flat)
    if naive_counted != len(flat):
        raise BenchError(f"the baseline counted {naive_counted} of {len(flat)} readings")
    rate, naive_rate = events / elapsed, len(flat) / naive_elapsed
    return Measured(
        figures={
            "events_per_s": Figure(round(rate), "events/s"),
            # events per CPU-second of this process (polars' threads included): less swayed
            # than events_per_s by other processes on a shared machine
            "events_per_cpu_s": Figure(round(events / cpu), "events/cpu-s"),
            "naive_events_per_s": Figure(round(naive_rate), "events/s"),
            "speedup": Figure(round(rate / naive_rate, 1), "x"),
        },
        counts={
            "sent": events,
            "device_readings": _readings(device_rows),
            "zone_readings": _readings(zone_rows),
            "device_windows": device_rows.filter(pl.col("metric") == "temperature").height,
            "zone_windows": zone_rows.filter(pl.col("metric") == "temperature").height,
            "naive_readings": naive_counted,
        },
        resolved={"measured_at": datetime.now(UTC).isoformat(timespec="seconds")},
    )
