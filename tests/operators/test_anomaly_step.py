"""The anomaly steps in real Bytewax flows: the same detections as the pure logic,
whatever the shard count; skipped rows on their own stream; recovery resumes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import polars as pl
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from iotflow.errors import ConfigError
from iotflow.events import Detection
from operators.anomaly import (
    AnomalyDetector,
    EwmaRule,
    MadRule,
    PeerRule,
    Skipped,
    ZScoreRule,
    detections,
)
from operators.anomaly_step import detect_anomalies, detect_peer_anomalies

T0 = 1_767_268_800_000
NOW = datetime(2026, 1, 1, 13, 0, tzinfo=UTC)
RULES = [
    ZScoreRule(metric="t", window=4, k=2.5),
    EwmaRule(metric="t", alpha=0.3, L=2.5, warmup=4),
    MadRule(metric="h", window=5),
]


def now() -> datetime:
    return NOW


def reading_frames(devices: int = 12, steps: int = 8) -> list[pl.DataFrame]:
    """Each step one frame with every device; some devices spike now and then."""
    frames = []
    for step in range(steps):
        dev = [f"dev-{i}" for i in range(devices)]
        t = [
            20.0
            + (i % 3) * 0.5
            + (step % 2) * 0.2
            + (30.0 if (i + step) % 7 == 0 and step > 4 else 0.0)
            for i in range(devices)
        ]
        h = [50.0 + (step % 3) + (40.0 if i == 3 and step == 6 else 0.0) for i in range(devices)]
        frames.append(
            pl.DataFrame({"device_id": dev, "ts_ms": [T0 + step * 1000] * devices, "t": t, "h": h})
        )
    return frames


def key(d: Detection) -> tuple[Any, ...]:
    return (d.rule, d.key, d.ts)


def run_readings(
    items: list[Any], shards: int, recovery: RecoveryConfig | None = None
) -> tuple[list[Detection], list[Skipped]]:
    flow = Dataflow("anomaly_test")
    out = detect_anomalies(
        "anomaly", op.input("in", flow, TestingSource(items)), RULES, shards=shards, now=now
    )
    found: list[Detection] = []
    skipped: list[Skipped] = []
    op.output("det", out.detections, TestingSink(found))
    op.output("skip", out.skipped, TestingSink(skipped))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    return found, skipped


@pytest.mark.parametrize("shards", [1, 4])
def test_flow_detections_equal_the_pure_logic(shards: int) -> None:
    frames = reading_frames()
    detector = AnomalyDetector(RULES, None, now)
    expected = [d for f in frames for d in detections(detector.on_batch(f))]
    assert {d.rule for d in expected} == {"zscore:t", "ewma:t", "mad:h"}
    found, skipped = run_readings(frames, shards)
    assert sorted(found, key=key) == sorted(expected, key=key)
    assert skipped == []


def test_late_and_future_rows_go_to_the_skipped_stream() -> None:
    frames = reading_frames(devices=2, steps=2)
    late = pl.DataFrame({"device_id": ["dev-0"], "ts_ms": [T0 - 5000], "t": [1.0], "h": [1.0]})
    future = pl.DataFrame(
        {"device_id": ["dev-1"], "ts_ms": [T0 + 10 * 86_400_000], "t": [1.0], "h": [1.0]}
    )
    _, skipped = run_readings([*frames, late, future], shards=2)
    assert sorted((s.reason, s.frame["device_id"].to_list()[0]) for s in skipped) == [
        ("future", "dev-1"),
        ("late", "dev-0"),
    ]


def test_unknown_or_duplicate_rules_fail_when_the_flow_is_built() -> None:
    flow = Dataflow("bad")
    stream = op.input("in", flow, TestingSource([]))
    with pytest.raises(ConfigError, match="distinct name"):
        detect_anomalies(
            "a", stream, [ZScoreRule(metric="t", window=3), ZScoreRule(metric="t", window=4)]
        )


def test_recovery_resumes_with_the_same_detections(tmp_path: Path) -> None:
    frames = reading_frames()
    expected, _ = run_readings(frames, shards=3)
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    # One list for both runs: an ABORT item triggers once, the resumed run reads past it.
    items = [*frames[:6], TestingSource.ABORT(), *frames[6:]]
    first, _ = run_readings(items, 3, recovery)
    # The resumed run rebuilds every shard's logic from its snapshot.
    second, _ = run_readings(items, 3, recovery)
    # At least once: a replayed epoch may repeat a detection; the natural key de-duplicates.
    assert {key(d): d for d in first + second} == {key(d): d for d in expected}
    assert first and second


ZONES = {f"d{i}": {"zone": "north" if i < 6 else "south"} for i in range(12)}


def window_frame(start_ms: int, values: dict[str, float]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "key": list(values),
            "window_start_ms": [T0 + start_ms] * len(values),
            "window_end_ms": [T0 + start_ms + 60_000] * len(values),
            "t_avg": list(values.values()),
        }
    )


@pytest.mark.parametrize("shards", [1, 4])
def test_peer_flow_groups_by_zone_across_shards(shards: int) -> None:
    w0 = {f"d{i}": 20.0 + (i % 3) * 0.5 for i in range(12)} | {"d2": 35.0, "d9": 5.0}
    w1 = {f"d{i}": 21.0 + (i % 2) * 0.5 for i in range(12)} | {"d7": 40.0}
    # Split each window's results over two batches, as two upstream shards would send them.
    items = [
        window_frame(0, dict(list(w0.items())[:5])),
        window_frame(0, dict(list(w0.items())[5:])),
    ]
    items += [
        window_frame(60_000, dict(list(w1.items())[:7])),
        window_frame(60_000, dict(list(w1.items())[7:])),
    ]
    flow = Dataflow("peer_test")
    rule = PeerRule(column="t_avg", dimension="zone")
    out = detect_peer_anomalies(
        "peers", op.input("in", flow, TestingSource(items)), rule, ZONES, shards=shards, now=now
    )
    found: list[Detection] = []
    op.output("det", out.detections, TestingSink(found))
    run_main(flow)
    got = sorted((d.key, d.details["group"], d.details["window_start"][11:16]) for d in found)
    assert got == [
        ("d2", "zone=north", "12:00"),
        ("d7", "zone=south", "12:01"),
        ("d9", "zone=south", "12:00"),
    ]
