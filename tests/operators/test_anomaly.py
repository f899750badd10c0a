"""Anomaly rules: hand-computed detections, boundaries, bad input, recovery, and
property tests (batching never changes a result; a restored snapshot continues
exactly; every number in a detection is finite)."""

from __future__ import annotations

import itertools
import json
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflows.monitoring import device_dimensions
from iotflow.errors import ConfigError
from iotflow.events import Detection, from_ms
from operators.aggregation import Aggregation
from operators.anomaly import (
    SCORE_LIMIT,
    AnomalyDetector,
    EwmaRule,
    MadRule,
    PeerRule,
    Skipped,
    ZScoreRule,
    detections,
    load_rules,
)
from twins.registry import Registry

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
NOW = datetime(2026, 1, 1, 13, 0, tzinfo=UTC)


def now() -> datetime:
    return NOW


def frame(rows: list[tuple[str, int, float | None]], metric: str = "t") -> pl.DataFrame:
    """(device, offset_ms from T0, value) rows -> a reading frame."""
    return pl.DataFrame(
        {
            "device_id": [r[0] for r in rows],
            "ts_ms": [T0 + r[1] for r in rows],
            metric: [r[2] for r in rows],
        },
        schema={"device_id": pl.Utf8, "ts_ms": pl.Int64, metric: pl.Float64},
    )


def series(values: list[float | None], device: str = "d", step_ms: int = 1000) -> pl.DataFrame:
    return frame([(device, i * step_ms, v) for i, v in enumerate(values)])


def run(rule: Any, *frames: pl.DataFrame) -> list[Detection]:
    logic = rule.build(None, now)
    out: list[Detection] = []
    for f in frames:
        out.extend(detections(logic.on_batch(f)))
    return out


# --------------------------------------------------------------------------- declarations


def test_defaults_and_names() -> None:
    z = ZScoreRule(metric="temperature", window=30)
    assert (z.name, z.k, z.min_samples) == ("zscore:temperature", 3.0, 30)
    assert ZScoreRule(metric="t", window_time=timedelta(minutes=5)).min_samples == 10
    assert EwmaRule(metric="t").name == "ewma:t"
    assert MadRule(metric="t", window=9, name="mine").name == "mine"
    assert PeerRule(column="t_avg", dimension="zone").min_peers == 3


def test_rules_load_from_yaml() -> None:
    rules = load_rules(
        """
        - {kind: zscore, metric: temperature, window: 30, k: 4}
        - {kind: zscore, metric: temperature, window_time: 5m, name: slow}
        - {kind: ewma, metric: humidity, alpha: 0.2, L: 2.5, warmup: 5}
        - {kind: mad, metric: temperature, window_time: 300, threshold: 4}
        - {kind: peer, column: temperature_avg, dimension: zone}
        """
    )
    assert [r.name for r in rules] == [
        "zscore:temperature",
        "slow",
        "ewma:humidity",
        "mad:temperature",
        "peer:zone:temperature_avg",
    ]
    assert rules[1].window_time == timedelta(minutes=5)
    assert rules[3].window_time == timedelta(seconds=300)
    assert rules[0] == ZScoreRule.model_validate(rules[0].model_dump())


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: ZScoreRule(metric="t", window=10, k=0), "k=0.0 must be > 0"),
        (lambda: ZScoreRule(metric="t", window=10, k=-1), "k=-1.0 must be > 0"),
        (lambda: ZScoreRule(metric="t", window=10, k=float("nan")), "ZScoreRule.k"),
        (lambda: ZScoreRule(metric="t", window=1), "window=1 must be at least 2"),
        (lambda: ZScoreRule(metric="t"), "give window"),
        (lambda: ZScoreRule(metric="t", window=timedelta(minutes=5)), "use window_time="),
        (lambda: ZScoreRule(metric="t", window="5m"), "use window_time='5m'"),
        (lambda: ZScoreRule(metric="t", window_time="5 minutes"), "write it like '250ms'"),
        (lambda: ZScoreRule(metric="t", window_time=timedelta(0)), "must be positive"),
        (lambda: ZScoreRule(metric="t", window=5, min_samples=6), "exceeds window=5"),
        (lambda: ZScoreRule(metric="t", window=5, min_samples=1), "min_samples=1"),
        (lambda: ZScoreRule(metric="t", window=5, min_std=-1), "min_std=-1.0"),
        (lambda: ZScoreRule(window=5), "ZScoreRule.metric is required"),
        (lambda: ZScoreRule(metric="t", window=5, kk=3), "ZScoreRule.kk=3"),
        (lambda: EwmaRule(metric="t", alpha=0), "alpha=0.0 must be in (0, 1]"),
        (lambda: EwmaRule(metric="t", alpha=1.01), "alpha=1.01 must be in (0, 1]"),
        (lambda: EwmaRule(metric="t", L=0), "L=0.0 must be > 0"),
        (lambda: EwmaRule(metric="t", warmup=0), "warmup=0"),
        (lambda: MadRule(metric="t", window=5, threshold=0), "threshold=0.0"),
        (lambda: PeerRule(column="c", dimension="zone", min_peers=1), "min_peers=1"),
        (lambda: PeerRule(column="c", dimension="zone", max_wait=0), "max_wait"),
    ],
)
def test_bad_declarations_fail_at_load_naming_the_value(make: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        make()
    assert words in str(info.value)


def test_load_rules_errors_name_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"rules\[1\]: EwmaRule: alpha=2.0"):
        load_rules(
            [
                {"kind": "zscore", "metric": "t", "window": 3},
                {"kind": "ewma", "metric": "t", "alpha": 2},
            ]
        )
    with pytest.raises(ConfigError, match="does not match any of the expected tags"):
        load_rules([{"kind": "zcore", "metric": "t"}])
    with pytest.raises(
        ConfigError, match="two rules are named 'zscore:t'; give each rule a distinct name="
    ):
        load_rules(
            [
                {"kind": "zscore", "metric": "t", "window": 3},
                {"kind": "zscore", "metric": "t", "window": 9},
            ]
        )


def test_alpha_one_is_allowed() -> None:
    assert EwmaRule(metric="t", alpha=1).alpha == 1.0


def test_fingerprint_follows_definition_not_name() -> None:
    a = ZScoreRule(metric="t", window=10)
    assert a.fingerprint == ZScoreRule(metric="t", window=10, name="other").fingerprint
    assert a.fingerprint != ZScoreRule(metric="t", window=10, k=4).fingerprint
    assert a.fingerprint != ZScoreRule(metric="t", window=11).fingerprint


# --------------------------------------------------------------------------- z-score


def test_zscore_flat_baseline_detects_any_change_without_a_score() -> None:
    # window 4 over 10,10,10,10: mean 10, std 0 -> the documented flat rule.
    rule = ZScoreRule(metric="t", window=4, k=3)
    (d,) = run(rule, series([10, 10, 10, 10, 50]))
    assert (d.rule, d.key, d.value, d.baseline, d.score) == ("zscore:t", "d", 50.0, 10.0, None)
    assert d.details == {
        "metric": "t",
        "std": 0.0,
        "n": 4,
        "lower": 10.0,
        "upper": 10.0,
        "flat": True,
    }
    assert d.ts == from_ms(T0 + 4000)
    assert run(rule, series([10, 10, 10, 10, 10])) == []


def test_zscore_value_at_exactly_k_sigma_is_not_detected() -> None:
    # Baseline 8, 10, 12: mean 10, sample std 2. 16 and 4 are exactly 3 sigma away.
    rule = ZScoreRule(metric="t", window=3, k=3)
    base = [8.0, 10.0, 12.0]
    rows = [
        (dev, i * 1000, v)
        for dev, x in (("a", 16.0), ("b", 4.0), ("c", 16.5), ("e", 3.5))
        for i, v in enumerate([*base, x])
    ]
    found = {d.key: d for d in run(rule, frame(rows))}
    assert sorted(found) == ["c", "e"]
    assert (found["c"].baseline, found["c"].score) == (10.0, 3.25)
    assert (found["e"].baseline, found["e"].score) == (10.0, -3.25)
    assert found["c"].details == {"metric": "t", "std": 2.0, "n": 3, "lower": 4.0, "upper": 16.0}


def test_zscore_reading_is_scored_before_it_joins_the_baseline() -> None:
    # Were 100 part of its own baseline (10, 11, 10, 11, 100), its z would be ~1.8.
    (d,) = run(ZScoreRule(metric="t", window=4, k=3), series([10, 11, 10, 11, 100]))
    assert d.value == 100.0 and d.baseline == 10.5
    assert d.score == pytest.approx(89.5 / math.sqrt(1 / 3))


def test_zscore_no_detection_while_warming_up() -> None:
    rule = ZScoreRule(metric="t", window=10, min_samples=3)
    logic = rule.build(None, now)
    # 1000 arrives with a baseline of 2 readings: not scored.
    assert detections(logic.on_batch(series([1, 2, 1000]))) == []
    assert logic.counts["warming"] == 3 and logic.counts["scored"] == 0


def test_zscore_time_window_keeps_readings_within_the_span() -> None:
    # window_time 10 s: the reading at 23 s sees (13 s, 23 s]; 1000 at 0 s and 5 at
    # exactly 13 s are outside, 8, 10, 12 inside.
    rule = ZScoreRule(metric="t", window_time=timedelta(seconds=10), min_samples=3, k=3)
    rows = [
        ("d", 0, 1000.0),
        ("d", 13_000, 5.0),
        ("d", 20_000, 8.0),
        ("d", 21_000, 10.0),
        ("d", 22_000, 12.0),
        ("d", 23_000, 16.5),
    ]
    (d,) = run(rule, frame(rows))
    assert (d.value, d.baseline, d.score, d.details["n"]) == (16.5, 10.0, 3.25, 3)


def test_zscore_count_and_time_window_together() -> None:
    # Both limits apply: the last 3 readings, and only those within 60 s.
    rule = ZScoreRule(metric="t", window=3, window_time=timedelta(seconds=60), min_samples=2)
    rows = [
        ("d", 0, 50.0),
        ("d", 100_000, 8.0),
        ("d", 101_000, 12.0),
        ("d", 102_000, 10.0),
        ("d", 103_000, 40.0),
    ]
    (d,) = run(rule, frame(rows))
    assert (d.value, d.baseline, d.details["n"]) == (40.0, 10.0, 3)


def test_zscore_min_std_floor_gives_finite_scores_on_a_flat_baseline() -> None:
    rule = ZScoreRule(metric="t", window=3, k=3, min_std=0.5)
    found = run(
        rule,
        frame(
            [
                (dev, i, v)
                for dev, x in (("a", 12.0), ("b", 11.0))
                for i, v in enumerate([10, 10, 10, x])
            ]
        ),
    )
    assert [(d.key, d.score, d.details["std"]) for d in found] == [("a", 4.0, 0.0)]


def test_zscore_devices_are_independent_and_order_within_batch_does_not_matter() -> None:
    rule = ZScoreRule(metric="t", window=3)
    rows = [
        (dev, i * 10, v)
        for dev in ("a", "b")
        for i, v in enumerate([8, 10, 12, 30 if dev == "a" else 11])
    ]
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert run(rule, frame(rows)) == run(rule, frame(shuffled))
    assert [d.key for d in run(rule, frame(shuffled))] == ["a"]


def test_nan_null_and_inf_are_skipped_counted_and_never_enter_the_baseline() -> None:
    rule = ZScoreRule(metric="t", window=3, k=3)
    logic = rule.build(None, now)
    out = detections(
        logic.on_batch(series([8, float("nan"), 10, None, float("inf"), 12, float("-inf"), 16.5]))
    )
    assert [(d.value, d.baseline, d.score) for d in out] == [(16.5, 10.0, 3.25)]
    assert (logic.counts["null"], logic.counts["nonfinite"], logic.counts["rows"]) == (1, 3, 8)


def test_missing_metric_column_and_empty_frames_are_counted_no_ops() -> None:
    logic = ZScoreRule(metric="humidity", window=3).build(None, now)
    assert logic.on_batch(series([1, 2, 3, 4])) == []
    assert logic.on_batch(frame([], metric="humidity")) == []
    assert logic.on_batch(pl.DataFrame()) == []
    assert logic.counts["missing_column"] == 2


def test_rows_without_device_or_with_unrepresentable_time_are_counted() -> None:
    logic = ZScoreRule(metric="t", window=2).build(None, now)
    f = pl.DataFrame(
        {"device_id": [None, "d", "d"], "ts_ms": [T0, None, 2**62], "t": [1.0, 2.0, 3.0]}
    )
    assert logic.on_batch(f) == []
    assert logic.counts["bad_key"] == 3


def test_huge_values_neither_overflow_nor_poison_the_baseline() -> None:
    rule = ZScoreRule(metric="t", window=4, k=3)
    big = 1.7e308
    values = [big, big, big, -big, big, 1.0, 2.0, 1.0, 2.0, 1e308, 1.5, 1.6]
    logic = rule.build(None, now)
    out = detections(logic.on_batch(series(values)))
    for d in out:
        assert all(math.isfinite(x) for x in (d.value, d.baseline, d.score or 0.0))
        assert all(math.isfinite(v) for v in d.details.values() if isinstance(v, float))
    hit = {d.value: d for d in out}
    # 1e308 against 1, 2, 1, 2: an astronomically large z, clipped to stay finite.
    assert hit[1e308].score == SCORE_LIMIT
    # The baseline recovered: 1.5 and 1.6 were scored against finite statistics.
    assert logic.counts["scored"] == len(values) - 4


def test_late_readings_are_routed_not_scored() -> None:
    logic = ZScoreRule(metric="t", window=2).build(None, now)
    logic.on_batch(frame([("d", 5000, 1.0), ("d", 6000, 2.0)]))
    emits = logic.on_batch(frame([("d", 3000, 100.0), ("d", 6000, 1.5)]))
    (late,) = [e for e in emits if isinstance(e, Skipped)]
    assert late.reason == "late" and late.frame["t"].to_list() == [100.0]
    assert logic.counts["late"] == 1
    assert logic.snapshot()["devices"]["d"] == [[2.0, 1.5], [T0 + 6000, T0 + 6000]]


def test_far_future_readings_are_routed_and_do_not_block_the_device() -> None:
    logic = ZScoreRule(metric="t", window=2).build(None, now)
    year_2100 = 4_102_444_800_000 - T0
    emits = logic.on_batch(frame([("d", 0, 1.0), ("d", year_2100, 5.0), ("d", 1000, 2.0)]))
    (skipped,) = [e for e in emits if isinstance(e, Skipped)]
    assert skipped.reason == "future" and skipped.frame["t"].to_list() == [5.0]
    logic.on_batch(frame([("d", 2000, 1.0)]))
    assert logic.counts["late"] == 0 and logic.counts["scored"] == 1


def test_snapshot_is_plain_data_and_restores_exactly() -> None:
    rule = ZScoreRule(metric="t", window=3)
    logic = rule.build(None, now)
    logic.on_batch(series([8, 10, 12]))
    snap = json.loads(json.dumps(logic.snapshot()))
    restored = rule.build(snap, now)
    nxt = frame([("d", 3000, 16.5)])
    assert detections(restored.on_batch(nxt)) == detections(logic.on_batch(nxt))
    assert restored.snapshot() == logic.snapshot()


def test_changed_definition_refuses_old_state() -> None:
    snap = ZScoreRule(metric="t", window=3).build(None, now).snapshot()
    with pytest.raises(
        ConfigError, match="rename the changed rule or start with a fresh recovery store"
    ):
        ZScoreRule(metric="t", window=4).build(snap, now)


# --------------------------------------------------------------------------- MAD


def test_mad_threshold_boundary() -> None:
    # Baseline 10..14: median 12, MAD 1. 17 scores 0.6745*5 exactly.
    base = [10.0, 11.0, 12.0, 13.0, 14.0]
    rule = MadRule(metric="t", window=5, threshold=0.6745 * 5.0)
    rows = [(dev, i, v) for dev, x in (("a", 17.0), ("b", 17.25)) for i, v in enumerate([*base, x])]
    (d,) = run(rule, frame(rows))
    assert (d.key, d.baseline, d.score) == ("b", 12.0, 0.6745 * 5.25)
    assert d.details == {"metric": "t", "sigma": 1 / 0.6745, "dispersion": "mad", "n": 5}


def test_mad_one_spike_does_not_hide_the_next() -> None:
    # 100 in the baseline: z-score's std blows up, the median and MAD barely move.
    values = [10, 11, 12, 13, 100, 17.5]
    assert [d.value for d in run(MadRule(metric="t", window=5, min_samples=4), series(values))] == [
        100.0,
        17.5,
    ]
    assert [
        d.value for d in run(ZScoreRule(metric="t", window=5, min_samples=4), series(values))
    ] == [100.0]


def test_mad_falls_back_to_mean_absolute_deviation_when_mad_is_zero() -> None:
    # 10,10,10,11,12: median 10, MAD 0; mean absolute deviation 0.6.
    (d,) = run(MadRule(metric="t", window=5), series([10, 10, 10, 11, 12, 13]))
    assert d.details["dispersion"] == "meanad"
    assert d.score == pytest.approx(3 / (1.253314 * 0.6))
    assert d.baseline == 10.0


def test_mad_flat_baseline() -> None:
    (d,) = run(MadRule(metric="t", window=4), series([5, 5, 5, 5, 6]))
    assert (d.score, d.baseline, d.details["flat"]) == (None, 5.0, True)
    assert run(MadRule(metric="t", window=4), series([5, 5, 5, 5, 5])) == []


# --------------------------------------------------------------------------- EWMA


def test_ewma_hand_computed() -> None:
    # alpha 0.5: 10 -> m 10, v 0; 12 -> m 11, v 0.5*(0 + 0.5*4) = 1;
    # 10 -> m 10.5, v 0.5*(1 + 0.5*1) = 0.75; 30 scored: z = 19.5/sqrt(0.75).
    rule = EwmaRule(metric="t", alpha=0.5, L=2, warmup=3)
    (d,) = run(rule, series([10, 12, 10, 30]))
    assert (d.rule, d.value, d.baseline, d.score) == ("ewma:t", 30.0, 10.5, 19.5 / math.sqrt(0.75))
    assert d.details["n"] == 3
    assert d.details["lower"] == 10.5 - 2 * math.sqrt(0.75)


def test_ewma_limit_boundary_and_warmup() -> None:
    # After 10, 12: mean 11, std 1. 13 is exactly L=2 away; 13.5 beyond.
    rule = EwmaRule(metric="t", alpha=0.5, L=2, warmup=2)
    rows = [
        (dev, i, v)
        for dev, x in (("a", 13.0), ("b", 13.5), ("c", 9.0))
        for i, v in enumerate([10, 12, x])
    ]
    assert [(d.key, d.score) for d in run(rule, frame(rows))] == [("b", 2.5)]
    # The second reading (12, far from 10 with std 0) is inside the warm-up.
    assert run(EwmaRule(metric="t", warmup=2), series([10, 1000])) == []


def test_ewma_flat_baseline_and_alpha_one() -> None:
    (d,) = run(EwmaRule(metric="t", alpha=0.5, warmup=2), series([10, 10, 11]))
    assert (d.baseline, d.score, d.details["flat"]) == (10.0, None, True)
    # alpha 1: the baseline is the previous reading with no spread: any change is flagged.
    found = run(EwmaRule(metric="t", alpha=1, warmup=1), series([1, 1, 2, 2, 3]))
    assert [(d.value, d.baseline) for d in found] == [(2.0, 1.0), (3.0, 2.0)]


def test_ewma_huge_values_keep_state_finite() -> None:
    logic = EwmaRule(metric="t", alpha=0.5, warmup=1).build(None, now)
    out = detections(logic.on_batch(series([1.7e308, -1.7e308, 1.7e308, 1.0, 2.0])))
    n, mean, var, _ = logic.snapshot()["devices"]["d"]
    assert n == 5 and math.isfinite(mean) and math.isfinite(var)
    assert all(d.score is None or abs(d.score) <= SCORE_LIMIT for d in out)


# --------------------------------------------------------------------------- several rules


def test_detector_routes_late_rows_once_and_keeps_state_per_rule() -> None:
    rules = [ZScoreRule(metric="t", window=3), EwmaRule(metric="t", warmup=3, alpha=0.5)]
    det = AnomalyDetector(rules, None, now)
    det.on_batch(series([8, 10, 12]))
    emits = det.on_batch(frame([("d", 500, 99.0), ("d", 3000, 16.5)]))
    late = [e for e in emits if isinstance(e, Skipped)]
    assert len(late) == 1 and late[0].frame.columns == ["device_id", "ts_ms", "t"]
    assert sorted(d.rule for d in detections(emits)) == ["ewma:t", "zscore:t"]
    snap = json.loads(json.dumps(det.snapshot()))
    # A rule added later starts fresh; the others continue.
    more = AnomalyDetector([*rules, MadRule(metric="t", window=3)], snap, now)
    assert more.logics["zscore:t"].snapshot() == det.logics["zscore:t"].snapshot()
    with pytest.raises(ConfigError, match="'zscore:t'"):
        AnomalyDetector([ZScoreRule(metric="t", window=5)], snap, now)
    with pytest.raises(ConfigError, match="distinct name"):
        AnomalyDetector(
            [ZScoreRule(metric="t", window=5), ZScoreRule(metric="t", window=6)], None, now
        )


def test_detector_tolerates_frames_without_keys() -> None:
    det = AnomalyDetector([ZScoreRule(metric="t", window=3)], None, now)
    assert det.on_batch(pl.DataFrame({"x": [1.0]})) == []
    f = pl.DataFrame({"device_id": [None, "d"], "ts_ms": [T0, None], "t": [1.0, 2.0]})
    assert det.on_batch(f) == []
    # Keys resolve once for all rules, so the detector counts them.
    assert (det.counts["missing_column"], det.counts["bad_key"]) == (1, 2)


# --------------------------------------------------------------------------- peers


def window_frame(
    values: dict[str, float | None], start_ms: int = 0, column: str = "t_avg"
) -> pl.DataFrame:
    keys = list(values)
    return pl.DataFrame(
        {
            "key": keys,
            "window_start_ms": [T0 + start_ms] * len(keys),
            "window_end_ms": [T0 + start_ms + 60_000] * len(keys),
            column: [values[k] for k in keys],
        },
        schema={
            "key": pl.Utf8,
            "window_start_ms": pl.Int64,
            "window_end_ms": pl.Int64,
            column: pl.Float64,
        },
    )


ZONE = {f"d{i}": {"zone": "z1"} for i in range(7)} | {"x": {"floor": "2"}}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def test_peer_one_outlier_does_not_hide_another() -> None:
    rule = PeerRule(column="t_avg", dimension="zone")
    logic = rule.build(None, ZONE, now)
    vals = {"d0": 20.0, "d1": 20.5, "d2": 21.0, "d3": 20.0, "d4": 20.5, "d5": 40.0, "d6": 41.0}
    found = detections(logic.on_batch(window_frame(vals)))
    # d5's peers: 20, 20.5, 21, 20, 20.5, 41 -> median 20.5, MAD 0.5.
    assert [(d.key, d.baseline, d.score) for d in found] == [
        ("d5", 20.5, 0.6745 * 19.5 / 0.5),
        ("d6", 20.5, 0.6745 * 20.5 / 0.5),
    ]
    d = found[0]
    assert d.rule == "peer:zone:t_avg" and d.ts == from_ms(T0)
    assert d.details["group"] == "zone=z1" and d.details["peers"] == 6
    assert d.details["window_end"] == "2026-01-01T12:01:00+00:00"


def test_peer_groups_are_registry_dimension_sets_keyed_like_group_statistics() -> None:
    # building A floor 1 and floor 2 are separate peer groups; building B floor 1 too
    registry = Registry()
    registry.define_model("temp", {"properties": {"temperature": {"type": "float"}}})
    for i in range(5):
        registry.add_device(f"a1-{i}", "temp", building="A", floor=1, zone="east")
        registry.add_device(f"a2-{i}", "temp", building="A", floor=2, zone="east")
        registry.add_device(f"b1-{i}", "temp", building="B", floor=1, zone="east")
    registry.add_device("roof", "temp", building="A")  # no floor: ungrouped
    dims = device_dimensions(registry)
    rule = PeerRule.model_validate(
        {"kind": "peer", "column": "t_avg", "dimension": ["building", "floor"]}
    )
    assert rule.name == "peer:building+floor:t_avg"
    # A's first floor runs at 20 degrees, the other floors at 25: only a1-0 (25) deviates
    # from its floor; in one zone-wide peer group it would hide among the warm floors
    values = {f"a1-{i}": 20.0 + i * 0.1 for i in range(5)} | {"a1-0": 25.0}
    values |= {f"a2-{i}": 25.0 + i * 0.1 for i in range(5)}
    values |= {f"b1-{i}": 25.0 + i * 0.1 for i in range(5)} | {"roof": 99.0}
    logic = rule.build(None, dims, now)
    found = detections(logic.on_batch(window_frame(values)))
    assert [(d.key, d.details["group"], d.details["dimension"]) for d in found] == [
        ("a1-0", "building=A|floor=1", "building+floor")
    ]
    assert found[0].details["peers"] == 4 and logic.counts["ungrouped"] == 1
    by_zone = PeerRule(column="t_avg", dimension="zone").build(None, dims, now)
    assert "a1-0" not in [d.key for d in detections(by_zone.on_batch(window_frame(values)))]
    # the same key as the group statistics' row for that floor
    agg = Aggregation.model_validate(
        {"window": {"kind": "tumbling", "length": "1m"}, "group_by": [["building", "floor"]]}
    )
    readings = pl.DataFrame({"device_id": ["a1-0", "a2-0"], "ts_ms": [T0, T0], "t": [25.0, 25.0]})
    keys = agg.analyze(readings, dims).get_column("key").to_list()
    assert keys == ["building=A|floor=1", "building=A|floor=2"]
    with pytest.raises(ConfigError, match="distinct"):
        PeerRule(column="t_avg", dimension=["zone", "zone"])


def test_peer_needs_min_peers() -> None:
    dims = {k: {"zone": "z"} for k in ("a", "b", "c")}
    logic = PeerRule(column="t_avg", dimension="zone", min_peers=3).build(None, dims, now)
    assert detections(logic.on_batch(window_frame({"a": 1.0, "b": 1.0, "c": 100.0}))) == []
    assert logic.counts["too_few_peers"] == 3


def test_peer_waits_for_missing_devices_then_scores_on_timer() -> None:
    clock = Clock()
    logic = PeerRule(column="t_avg", dimension="zone", max_wait=timedelta(seconds=2)).build(
        None, ZONE, clock
    )
    vals = {"d0": 20.0, "d1": 20.5, "d2": 21.0, "d3": 20.0, "d4": 35.0}
    assert logic.on_batch(window_frame(vals)) == []
    assert logic.next_timer() == NOW + timedelta(seconds=2)
    clock.now += timedelta(seconds=1)
    assert logic.on_timer() == []
    clock.now += timedelta(seconds=1)
    assert [d.key for d in detections(logic.on_timer())] == ["d4"]
    assert logic.next_timer() is None
    # A result for the scored window is late now.
    (late,) = logic.on_batch(window_frame({"d5": 20.0}))
    assert isinstance(late, Skipped) and late.reason == "late"


def test_peer_later_window_scores_earlier_ones_and_eof_flushes() -> None:
    logic = PeerRule(column="t_avg", dimension="zone").build(None, ZONE, now)
    first = {"d0": 20.0, "d1": 20.5, "d2": 21.0, "d3": 50.0}
    assert logic.on_batch(window_frame(first)) == []
    full = {f"d{i}": 20.0 + i % 2 for i in range(7)}
    found = detections(logic.on_batch(window_frame(full, start_ms=60_000)))
    assert [(d.key, d.ts) for d in found] == [("d3", from_ms(T0))]
    logic.on_batch(window_frame({"d0": 1.0, "d1": 1.0, "d2": 1.0, "d3": 9.0}, start_ms=120_000))
    assert [d.key for d in detections(logic.on_eof())] == ["d3"]


def test_peer_bad_rows_are_counted() -> None:
    logic = PeerRule(column="t_avg", dimension="zone").build(None, ZONE, now)
    logic.on_batch(window_frame({"d0": None, "d1": float("nan"), "x": 1.0, "nobody": 2.0}))
    logic.on_batch(window_frame({"d0": 1.0}, column="h_avg"))
    c = logic.counts
    assert (c["null"], c["nonfinite"], c["ungrouped"], c["missing_column"]) == (1, 1, 2, 1)


def test_peer_replayed_result_replaces_and_snapshot_restores() -> None:
    rule = PeerRule(column="t_avg", dimension="zone")
    logic = rule.build(None, ZONE, now)
    logic.on_batch(window_frame({"d0": 20.0, "d1": 20.5, "d2": 99.0}))
    logic.on_batch(window_frame({"d2": 21.0}))  # replay with a corrected value
    snap = json.loads(json.dumps(logic.snapshot()))
    restored = rule.build(snap, ZONE, now)
    rest = window_frame({"d3": 20.0, "d4": 20.5, "d5": 21.0, "d6": 40.0})
    assert detections(restored.on_batch(rest)) == detections(logic.on_batch(rest))
    assert [d.key for d in detections(restored.on_eof())] == []
    with pytest.raises(ConfigError):
        PeerRule(column="t_avg", dimension="zone", threshold=5).build(snap, ZONE, now)


def test_peer_huge_values_stay_finite() -> None:
    logic = PeerRule(column="t_avg", dimension="zone").build(None, ZONE, now)
    vals = {
        "d0": 1.7e308,
        "d1": -1.7e308,
        "d2": 1.7e308,
        "d3": -1.7e308,
        "d4": 0.0,
        "d5": 1e-300,
        "d6": 1.0,
    }
    for d in detections(logic.on_batch(window_frame(vals))):
        assert math.isfinite(d.baseline) and (d.score is None or math.isfinite(d.score))


# --------------------------------------------------------------------------- properties

values_st = st.one_of(
    st.sampled_from([10.0, 10.0, 10.0, 12.0, None, float("nan")]),
    st.floats(-50, 50, allow_nan=False),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: v * 1000),
)
# (device, ts increment, value): per-device timestamps never go backwards
# (ties allowed); devices interleave arbitrarily.
stream_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4000), values_st), max_size=80)
cuts_st = st.lists(st.integers(0, 80), max_size=6)

RULES = [
    ZScoreRule(metric="t", window=4, k=2),
    ZScoreRule(metric="t", window_time=timedelta(seconds=5), min_samples=2, k=2, name="zt"),
    ZScoreRule(
        metric="t", window=5, window_time=timedelta(seconds=8), min_samples=2, k=1.5, name="zb"
    ),
    MadRule(metric="t", window=5, threshold=2),
    MadRule(metric="t", window_time=timedelta(seconds=6), min_samples=3, name="mt"),
    EwmaRule(metric="t", alpha=0.3, L=2, warmup=3),
]


def to_rows(stream: list[tuple[int, int, float | None]]) -> list[tuple[str, int, float | None]]:
    clocks = [0, 0, 0, 0]
    rows = []
    for dev, inc, value in stream:
        clocks[dev] += inc
        rows.append((f"d{dev}", clocks[dev], value))
    return rows


def split(rows: list, cuts: list[int]) -> list[list]:
    edges = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    return [rows[a:b] for a, b in itertools.pairwise(edges)]


def by_device(found: list[Detection]) -> list[Detection]:
    # Across batches devices interleave differently; per device the order is fixed.
    return sorted(found, key=lambda d: d.key)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=stream_st, cuts=cuts_st)
def test_batching_never_changes_detections(rule: Any, stream: list, cuts: list[int]) -> None:
    rows = to_rows(stream)
    whole = run(rule, frame(rows))
    parts = run(rule, *(frame(p) for p in split(rows, cuts)))
    assert by_device(parts) == by_device(whole)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
@settings(max_examples=60, deadline=None)
@given(stream=stream_st, cut=st.integers(0, 80))
def test_restored_snapshot_continues_like_an_uninterrupted_run(
    rule: Any, stream: list, cut: int
) -> None:
    rows = to_rows(stream)
    head, tail = frame(rows[:cut]), frame(rows[cut:])
    straight = rule.build(None, now)
    expected = detections(straight.on_batch(head)) + detections(straight.on_batch(tail))
    first = rule.build(None, now)
    got = detections(first.on_batch(head))
    snap = json.loads(json.dumps(first.snapshot()))  # plain data survives a JSON round trip
    second = rule.build(snap, now)
    got += detections(second.on_batch(tail))
    assert got == expected
    assert second.snapshot() == straight.snapshot()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=40))
def test_every_number_in_a_detection_is_finite(rule: Any, values: list[float]) -> None:
    logic = rule.build(None, now)
    for d in detections(logic.on_batch(series(values))):
        assert math.isfinite(d.value) and math.isfinite(d.baseline)
        assert d.score is None or abs(d.score) <= SCORE_LIMIT
        assert all(math.isfinite(v) for v in d.details.values() if isinstance(v, float))
    c = logic.counts
    assert c["scored"] + c["warming"] + c["null"] + c["nonfinite"] == len(values)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(-100, 100), st.sampled_from([20.0, 20.0])), min_size=4, max_size=12
    ),
    seed=st.integers(0, 1000),
    cut=st.integers(0, 12),
)
def test_peer_detections_do_not_depend_on_row_order_or_batching(
    values: list[float], seed: int, cut: int
) -> None:
    dims = {f"p{i}": {"zone": "z"} for i in range(len(values))}
    rule = PeerRule(column="t_avg", dimension="zone")
    vals = {f"p{i}": v for i, v in enumerate(values)}
    whole = detections(rule.build(None, dims, now).on_batch(window_frame(vals)))
    keys = list(vals)
    random.Random(seed).shuffle(keys)
    logic = rule.build(None, dims, now)
    got = detections(logic.on_batch(window_frame({k: vals[k] for k in keys[:cut]})))
    got += detections(logic.on_batch(window_frame({k: vals[k] for k in keys[cut:]})))
    assert got == whole
    # Leave-one-out: a device's own value never moves its baseline.
    for d in whole:
        peers = sorted(v for k, v in vals.items() if k != d.key)
        mid = len(peers) // 2
        median = peers[mid] if len(peers) % 2 else (peers[mid - 1] + peers[mid]) / 2
        assert d.baseline == pytest.approx(median)


@settings(max_examples=60, deadline=None)
@given(
    stream=stream_st,
    cuts=cuts_st,
    late=st.lists(st.tuples(st.integers(0, 79), st.integers(1, 5000)), max_size=3),
)
def test_detector_equals_its_rules_run_alone_and_ignores_batching(
    stream: list, cuts: list[int], late: list[tuple[int, int]]
) -> None:
    rows = to_rows(stream)
    # A few readings moved back in time: late whenever the device already moved past them.
    for at, back in late:
        if at < len(rows):
            dev, ts, value = rows[at]
            rows[at] = (dev, ts - back, value)
    # A row id travels with each row, so routed rows are known exactly.
    numbered = [
        frame(p).with_columns(seq=pl.Series(ids, dtype=pl.Int64))
        for p, ids in zip(split(rows, cuts), split(list(range(len(rows))), cuts), strict=True)
    ]
    det = AnomalyDetector(RULES, None, now)
    together = [e for f in numbered for e in det.on_batch(f)]
    routed = [s for s in together if isinstance(s, Skipped)]
    assert all(s.reason == "late" for s in routed)
    late_ids = {i for s in routed for i in s.frame["seq"].to_list()}
    assert len(late_ids) == det.counts["late"]
    for rule in RULES:
        mine = [d for d in detections(together) if d.rule == rule.name]
        # The same rule alone, fed the rows the detector did not route as late.
        alone = rule.build(None, now)
        expected = [
            d
            for f in numbered
            for d in detections(alone.on_batch(f.filter(~pl.col("seq").is_in(late_ids))))
        ]
        assert by_device(mine) == by_device(expected)
