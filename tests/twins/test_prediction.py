"""Prediction for maintenance: the fit and its ETA, episodes (one detection each), bad
input counted, declarations, snapshots, and the Bytewax wiring through LogicStep."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import polars as pl
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from iotflow.declarations import validate
from iotflow.errors import ConfigError
from iotflow.events import Detection, Reading, from_ms
from operators.steps import LogicStep
from twins.prediction import PredictionRule, Predictor, load_prediction_rules

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
NOW = datetime(2026, 1, 10, tzinfo=UTC)


def now() -> datetime:
    return NOW


def battery(**over: Any) -> PredictionRule:
    fields: dict[str, Any] = {
        "property": "battery",
        "threshold": 10,
        "direction": "below",
        "horizon": "24h",
        "window": "6h",
        "min_points": 4,
    }
    return PredictionRule(**{**fields, **over})


def readings(values: list[Any], device: str = "lock-1", step_ms: int = HOUR, start: int = T0):
    return [Reading(device, start + k * step_ms, {"battery": v}) for k, v in enumerate(values)]


def run(rule: PredictionRule, *batches: Any) -> tuple[list[Detection], Any]:
    logic = rule.build(None, now)
    found: list[Detection] = []
    for batch in batches:
        found.extend(logic.on_batch(batch))
    return found, logic


def test_linear_drain_detected_with_the_fit_and_eta() -> None:
    # 2 %/h from 60 %: crosses 10 % 25 h after the start; within 24 h from the 2nd hour on
    found, logic = run(battery(), readings([60 - 2 * k for k in range(6)]))
    assert len(found) == 1
    d = found[0]
    assert (d.rule, d.key, d.value, d.baseline) == ("predict:battery:below:10", "lock-1", 54.0, 10)
    assert d.ts == from_ms(T0 + 3 * HOUR)  # the 4th point: min_points reached
    assert d.details["fit"] == "linear"
    assert d.details["slope_per_h"] == pytest.approx(-2.0)
    assert d.details["intercept"] == pytest.approx(54.0)
    assert d.details["r2"] == pytest.approx(1.0)
    assert d.details["n"] == 4
    assert d.details["span_s"] == 3 * 3600
    assert d.details["eta_s"] == pytest.approx(22 * 3600)
    assert d.details["crossing_at"] == "2026-01-02T01:00:00Z"
    assert d.score == pytest.approx(1 - 22 / 24)
    assert logic.alerting() == ["lock-1"]
    json.dumps(d.details)  # goes to Kafka and DuckDB as JSON


def test_above_direction_for_a_bearing_temperature() -> None:
    rule = PredictionRule(
        property="bearing_temp", threshold=90, direction="above", horizon="2h", window="1h",
        min_points=5,
    )  # fmt: skip
    minute = 60_000
    points = [
        Reading("pump-7", T0 + k * minute, {"bearing_temp": 60 + 0.25 * k}) for k in range(10)
    ]
    found, _ = run(rule, points)
    assert len(found) == 1
    # at k=4: 61 C rising 15 C/h -> 90 C in 29/15 h
    assert found[0].details["eta_s"] == pytest.approx(29 / 15 * 3600)


def test_no_detection_for_flat_wrong_direction_or_too_few_points() -> None:
    flat, logic = run(battery(), readings([12.0] * 10))
    assert flat == []
    assert logic.counts["warming"] == 3
    rising, _ = run(battery(), readings([11 + k for k in range(10)]))
    assert rising == []
    few, logic = run(battery(min_points=20), readings([60 - 10 * k for k in range(6)]))
    assert few == []
    assert logic.counts["warming"] == 6


def test_far_crossing_beyond_the_horizon_is_not_detected() -> None:
    found, _ = run(battery(), readings([90 - 0.1 * k for k in range(10)]))
    assert found == []


def test_a_crossing_beyond_year_9999_has_no_date() -> None:
    rule = battery(horizon="3650000d", window="100d")
    found, _ = run(rule, readings([100 - 1.125e-6 * k for k in range(6)]))  # ~9,100 years
    assert len(found) == 1
    assert found[0].details["crossing_at"] is None
    assert found[0].details["eta_s"] > 0


def test_already_past_the_threshold_and_falling_is_eta_zero() -> None:
    found, _ = run(battery(), readings([8, 7, 6, 5]))
    assert len(found) == 1
    assert found[0].details["eta_s"] == 0
    assert found[0].score == 1.0


def test_one_detection_per_episode_and_a_new_one_after_recovery() -> None:
    rule = battery(window="4h")
    draining = [40 - 2 * k for k in range(8)]  # ETA within 24 h from the 4th point on
    replaced = [100.0] * 6  # battery swapped: flat fit, the episode ends
    again = [100 - 5 * k for k in range(8)]
    logic = rule.build(None, now)
    first = logic.on_batch(readings(draining))
    assert len(first) == 1
    assert logic.on_batch(readings([24.0, 22.0], start=T0 + 8 * HOUR)) == []
    assert logic.on_batch(readings(replaced, start=T0 + 10 * HOUR)) == []
    assert logic.counts["recovered"] == 1
    assert logic.alerting() == []
    second = logic.on_batch(readings(again, start=T0 + 16 * HOUR))
    assert len(second) == 1
    assert second[0].ts > first[0].ts
    assert logic.counts["detections"] == 2


def test_untrusted_fits_neither_start_nor_end_an_episode() -> None:
    noisy = [50, 10, 50, 10, 50, 10, 50, 10]
    found, logic = run(battery(min_r2=0.9), readings(noisy))
    assert found == []
    assert logic.counts["untrusted"] == 5


def test_window_is_bounded_by_time_and_by_max_points() -> None:
    logic = battery(window="2h", max_points=50).build(None, now)
    logic.on_batch(readings([90 - 0.01 * k for k in range(100)], step_ms=60_000))
    ts, _, _ = logic.snapshot()["devices"]["lock-1"]
    assert len(ts) == 50  # max_points, the newest
    assert ts[-1] == T0 + 99 * 60_000
    logic = battery(window="10m").build(None, now)
    logic.on_batch(readings([90 - 0.01 * k for k in range(100)], step_ms=60_000))
    ts, _, _ = logic.snapshot()["devices"]["lock-1"]
    assert ts[0] > T0 + 99 * 60_000 - 600_000


def test_devices_are_independent_and_detections_come_by_device() -> None:
    batch = readings([60 - 3 * k for k in range(6)], "b") + readings(
        [60 - 3 * k for k in range(6)], "a"
    )
    found, _ = run(battery(), batch)
    assert [d.key for d in found] == ["a", "b"]


def test_bad_input_is_counted_and_valid_points_kept() -> None:
    good = readings([60 - 2 * k for k in range(6)])
    bad = [
        Reading("lock-1", T0 + HOUR // 2, {"battery": float("nan")}),
        Reading("lock-1", T0 + HOUR // 3, {"battery": float("inf")}),
        Reading("lock-1", T0 + HOUR // 4, {"battery": "low"}),  # type: ignore[dict-item]
        Reading("lock-1", T0 + HOUR // 5, {"battery": True}),  # type: ignore[dict-item]
        Reading("lock-1", T0 + HOUR // 6, {"temperature": 3.0}),
        Reading(None, T0, {"battery": 50.0}),  # type: ignore[arg-type]
        Reading("", T0, {"battery": 50.0}),
        Reading("lock-1", 10**18, {"battery": 50.0}),  # beyond year 9999
        Reading("lock-1", T0 + 30 * 24 * HOUR, {"battery": 50.0}),  # a wrong device clock
        "not a reading",
    ]
    found, logic = run(battery(), good[:3] + bad + good[3:])
    clean, _ = run(battery(), good)
    assert found == clean
    c = logic.counts
    assert (c["nonfinite"], c["non_numeric"], c["null"]) == (2, 2, 1)
    assert (c["bad_key"], c["future"]) == (4, 1)
    assert c["accepted"] == 6
    late, logic = run(battery(), good, readings([1.0], start=T0))
    assert late == clean
    assert logic.counts["late"] == 1


def test_hostile_device_ids_are_just_keys() -> None:
    device = "../../etc/passwd\x00#+/" + "x" * 10_000
    found, logic = run(battery(), readings([60 - 3 * k for k in range(6)], device))
    assert [d.key for d in found] == [device]
    assert device in logic.snapshot()["devices"]


def test_frames_and_readings_give_the_same_detections() -> None:
    points = readings([60 - 2 * k for k in range(6)])
    frame = pl.DataFrame(
        {
            "device_id": [r.device_id for r in points],
            "ts_ms": [r.ts_ms for r in points],
            "battery": [r.metrics["battery"] for r in points],
        }
    )
    assert run(battery(), frame)[0] == run(battery(), points)[0]
    _, logic = run(battery(), frame.drop("battery"))
    assert logic.counts["missing_column"] == 1
    text = frame.with_columns(pl.col("battery").cast(pl.Utf8))
    text = text.with_columns(
        pl.when(pl.col("ts_ms") == T0)
        .then(pl.lit("empty"))
        .otherwise(pl.col("battery"))
        .alias("battery")
    )
    found, logic = run(battery(), text)
    assert logic.counts["non_numeric"] == 1
    assert logic.counts["accepted"] == 5
    assert len(found) == 1


@dataclass(frozen=True)
class ReportedUpdate:
    """The shape of a twin's reported update: values instead of metrics."""

    device_id: str
    ts_ms: int
    values: dict[str, Any]


def test_reported_twin_updates_are_points_too() -> None:
    points = readings([60 - 2 * k for k in range(6)])
    updates = [
        ReportedUpdate(r.device_id, r.ts_ms, {"battery": r.metrics["battery"]}) for r in points
    ]
    assert run(battery(), updates)[0] == run(battery(), points)[0]


def test_single_points_and_garbage_items_are_taken_one_by_one() -> None:
    points = readings([60 - 2 * k for k in range(6)])
    logic = battery().build(None, now)
    found = [
        d
        for p in points
        for d in logic.on_batch(ReportedUpdate(p.device_id, p.ts_ms, dict(p.metrics)))
    ]
    assert found == run(battery(), points)[0]
    for junk in (5, None, "battery", b"x", {"device_id": "d"}):
        assert logic.on_batch(junk) == []  # type: ignore[arg-type]
    assert logic.counts["bad_key"] == 5


def test_exponential_fit_for_an_exponential_decay() -> None:
    rule = battery(fit="exponential", horizon="100h")
    k = -0.05  # per hour
    found, _ = run(rule, readings([80 * math.exp(k * h) for h in range(6)] + [0.0]))
    assert len(found) == 1
    d = found[0]
    assert d.details["slope_per_h"] == pytest.approx(k)
    assert d.details["intercept"] == pytest.approx(80 * math.exp(3 * k))
    assert d.details["eta_s"] / 3600 == pytest.approx(math.log(10 / 80) / k - 3)
    _, logic = run(rule, readings([5.0, 0.0, -1.0]))
    assert logic.counts["nonpositive"] == 2


def test_snapshot_restores_exactly_and_refuses_another_definition() -> None:
    rule = battery(window="4h")
    values = [40 - 2 * k for k in range(8)] + [100.0] * 5 + [100 - 5 * k for k in range(8)]
    points = readings(values)
    whole, _ = run(rule, points)
    first = rule.build(None, now)
    found = first.on_batch(points[:9])
    state = json.loads(json.dumps(first.snapshot()))  # plain data
    found += rule.build(state, now).on_batch(points[9:])
    assert found == whole
    with pytest.raises(ConfigError, match="another definition"):
        battery(window="5h").build(state, now)


@settings(max_examples=200, deadline=None)
@given(
    slope=st.floats(0.01, 50).map(lambda s: round(s, 3)),
    start=st.floats(-1000, 1000).map(lambda s: round(s, 2)),
    threshold=st.floats(-1000, 1000).map(lambda s: round(s, 2)),
    step_s=st.integers(1, 3600),
    n=st.integers(3, 40),
    above=st.booleans(),
)
def test_exactly_linear_data_gives_the_analytic_crossing_time(
    slope: float, start: float, threshold: float, step_s: int, n: int, above: bool
) -> None:
    direction = "above" if above else "below"
    signed = slope if above else -slope
    rule = PredictionRule(
        property="x", threshold=threshold, direction=direction, horizon="10000d",
        window="100000d", min_points=n,
    )  # fmt: skip
    step_ms = step_s * 1000
    points = [
        Reading("d", T0 + k * step_ms, {"x": start + signed * k * step_s / 3600}) for k in range(n)
    ]
    found, _ = run(rule, points)
    last_h = (n - 1) * step_s / 3600
    crossing_h = (threshold - start) / signed  # hours after the first point
    expected_eta_h = max(crossing_h - last_h, 0.0)
    if expected_eta_h > 10000 * 24:
        assert found == []
        return
    assert len(found) == 1
    details = found[0].details
    tolerance = 1e-6 * (abs(crossing_h) + last_h + 1)
    assert details["eta_s"] / 3600 == pytest.approx(expected_eta_h, abs=tolerance)
    assert details["slope_per_h"] == pytest.approx(signed, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0, 100), min_size=5, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=5),
)
def test_batching_never_changes_the_detections(values: list[float], cuts: list[int]) -> None:
    rule = battery(horizon="5h", window="4h", min_points=3)
    points = readings(values, step_ms=HOUR // 2)
    whole, _ = run(rule, points)
    bounds = sorted({0, len(points), *(c for c in cuts if c < len(points))})
    parts = [points[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(rule, *parts)[0] == whole


@settings(max_examples=60, deadline=None)
@given(
    series=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 100), st.integers(0, 2)),
        min_size=5,
        max_size=60,
    ),
    cut=st.integers(0, 60),
)
def test_devices_never_see_each_others_points(
    series: list[tuple[str, float, int]], cut: int
) -> None:
    rule = battery(horizon="5h", window="3h", min_points=3)
    points, clock = [], T0
    for device, value, gap in series:  # interleaved devices, times rising (equal ones too)
        clock += gap * HOUR // 2
        points.append(Reading(device, clock, {"battery": value}))
    mixed, _ = run(rule, points[:cut], points[cut:])
    alone = [d for name in "abc" for d in run(rule, [p for p in points if p.device_id == name])[0]]
    assert sorted(mixed, key=lambda d: (d.key, d.ts)) == alone


def test_declarations_load_from_files_and_name_the_wrong_field(tmp_path: Any) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - {property: battery, threshold: 10, direction: below, horizon: 24h, window: 6h}\n"
        "  - {property: bearing_temp, threshold: 90, direction: above, horizon: 2h,"
        " window: 30m, fit: linear, min_r2: 0.8, name: bearing}\n"
    )
    rules = load_prediction_rules(path)
    assert [r.name for r in rules] == ["predict:battery:below:10", "bearing"]
    assert rules[0].horizon == timedelta(hours=24)
    json_path = tmp_path / "rules.json"
    json_path.write_text(json.dumps([r.model_dump(mode="json") for r in rules]))
    assert load_prediction_rules(json_path) == rules
    base = {
        "property": "battery",
        "threshold": 10,
        "direction": "below",
        "horizon": "1d",
        "window": "6h",
    }
    missing = {k: v for k, v in base.items() if k != "property"}
    cases = [
        (missing, "rules[0].property: Field required"),
        ({**base, "window": "soon"}, "rules[0].window: duration 'soon' is not understood"),
        ({**base, "min_points": 1}, "rules[0].min_points: must be at least 2"),
        ({**base, "min_r2": 2}, "rules[0].min_r2: must be in 0..1"),
        ({**base, "threshold": float("nan")}, "rules[0].threshold"),
        ({**base, "fit": "exponential", "threshold": 0}, "threshold=0 must be > 0"),
        ({**base, "max_points": 3, "min_points": 5}, "max_points=3 is below min_points=5"),
        ({**base, "horizn": "1h"}, "rules[0].horizn: Extra inputs are not permitted"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as caught:
            load_prediction_rules([data])
        assert message in str(caught.value)
    with pytest.raises(ConfigError, match="two rules are named"):
        load_prediction_rules([base, base])
    with pytest.raises(ConfigError, match="prediction rule declaration is invalid: direction"):
        validate(PredictionRule, {**base, "direction": "sideways"}, "prediction rule")
    with pytest.raises(ValidationError, match="direction"):
        PredictionRule(**{**base, "direction": "sideways"})
    with pytest.raises(ConfigError, match="not valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("rules: [")
        load_prediction_rules(bad)


def test_predictor_runs_several_rules_with_state_per_rule() -> None:
    rules = [battery(), battery(threshold=30, name="battery-low")]
    predictor = Predictor(rules, None, now)
    found = predictor.on_batch(readings([60 - 2 * k for k in range(6)]))
    assert [d.rule for d in found] == ["predict:battery:below:10", "battery-low"]
    state = predictor.snapshot()
    assert set(state) == {"predict:battery:below:10", "battery-low"}
    assert Predictor(rules, state, now).on_batch(readings([48.0], start=T0 + 6 * HOUR)) == []
    with pytest.raises(ConfigError, match="two prediction rules are named"):
        Predictor([battery(), battery()])


def test_wired_into_bytewax_through_logic_step() -> None:
    rules = [battery()]
    batches = [
        readings([60 - 2 * k for k in range(3)]),
        readings([54.0, 52.0], start=T0 + 3 * HOUR),
    ]
    flow = Dataflow("predict")
    up = op.input("in", flow, TestingSource(batches))
    keyed = op.key_on("key", up, lambda batch: "0")
    emitted = op.stateful_batch("predict", keyed, lambda s: LogicStep(Predictor(rules, s, now)))
    found: list[Any] = []
    op.output("out", op.key_rm("unkey", emitted), TestingSink(found))
    run_main(flow)
    assert [(d.key, d.ts) for d in found] == [("lock-1", from_ms(T0 + 3 * HOUR))]
