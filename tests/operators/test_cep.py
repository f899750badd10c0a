"""CEP patterns: declarations, hand-computed detections for every kind, boundaries, bad input,
recovery, and property tests (batch splits and restarts do not change the output)."""

from __future__ import annotations

import json
import math
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotflow.durations import parse_duration
from iotflow.errors import ConfigError
from iotflow.events import Detection, to_ms
from operators.cep import (
    CepEngine,
    CommandRequest,
    RejectedRows,
    TimedOutMatch,
    TwinUpdate,
)
from operators.cep_patterns import PatternSet

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
METRICS = ("t", "door", "motion")


class ManualClock:
    def __init__(self, start_ms: int = T0) -> None:
        self.now = datetime.fromtimestamp(start_ms / 1000, tz=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def at(seconds: float) -> int:
    return T0 + round(seconds * 1000)


def secs(dt: datetime) -> float:
    return (to_ms(dt) - T0) / 1000


def frame(rows: list[tuple[str, float, dict[str, float | None]]], metrics=METRICS) -> pl.DataFrame:
    """Readings: (device, seconds after T0, metrics)."""
    return pl.DataFrame(
        {
            "device_id": [r[0] for r in rows],
            "ts_ms": [at(r[1]) for r in rows],
            **{m: [r[2].get(m) for r in rows] for m in metrics},
        },
        schema={"device_id": pl.Utf8, "ts_ms": pl.Int64, **{m: pl.Float64 for m in metrics}},
    )


def windows(rows: list[tuple[str, float, float, float]]) -> pl.DataFrame:
    """Window results: (key, start s, end s, temperature_avg)."""
    return pl.DataFrame(
        {
            "key": [r[0] for r in rows],
            "window_start_ms": [at(r[1]) for r in rows],
            "window_end_ms": [at(r[2]) for r in rows],
            "temperature_avg": [r[3] for r in rows],
        },
        schema={
            "key": pl.Utf8,
            "window_start_ms": pl.Int64,
            "window_end_ms": pl.Int64,
            "temperature_avg": pl.Float64,
        },
    )


def commands(rows: list[tuple[str, float, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "key": [r[0] for r in rows],
            "ts_ms": [at(r[1]) for r in rows],
            "kind": [r[2] for r in rows],
        },
        schema={"key": pl.Utf8, "ts_ms": pl.Int64, "kind": pl.Utf8},
    )


def build(
    patterns: list[dict[str, Any]] | dict[str, Any], clock: ManualClock | None = None, **kw: Any
) -> CepEngine:
    data = patterns if isinstance(patterns, dict) else {"patterns": patterns}
    return PatternSet.from_dict(data).build(None, now=clock or ManualClock(), **kw)


def run(engine: CepEngine, *frames: pl.DataFrame, eof: bool = True) -> list[Any]:
    out: list[Any] = []
    for f in frames:
        out.extend(engine.on_batch(f))
    if eof:
        out.extend(engine.on_eof())
    return out


def dets(out: list[Any]) -> list[tuple[str, str, float]]:
    return [(d.rule, d.key, secs(d.ts)) for d in out if isinstance(d, Detection)]


def timeouts(out: list[Any]) -> list[tuple[str, str, float, str]]:
    return [
        (t.pattern, t.key, secs(t.timed_out_at), t.reason)
        for t in out
        if isinstance(t, TimedOutMatch)
    ]


HOT = {
    "name": "hot",
    "kind": "threshold",
    "input": "windows",
    "condition": "temperature_avg > 30",
    "times": 3,
}


# -- declarations ---------------------------------------------------------------------------


YAML = """
allowed_lateness: 5s
patterns:
  - name: hot
    kind: threshold
    input: windows
    condition: temperature_avg > 30
    times: 3
  - name: swing
    kind: range
    value: temperature
    exceeds: 5
    within: 5m
  - name: door_then_motion
    kind: sequence
    within: 30s
    steps:
      - {name: opened, where: door == 1}
      - {name: motion, where: motion > 0, contiguity: followed_by}
  - name: offline
    kind: absence
    within: 90
    actions:
      - {type: detect}
      - {type: twin_update, properties: {status: offline}}
  - name: heating_fast
    kind: rate
    value: temperature
    exceeds: 2
    per: 1m
  - name: surge
    kind: correlation
    condition: temperature > 40
    group_by: zone
    min_keys: 3
    within: 1h30m
"""


def test_yaml_json_dict_and_files_load_the_same_set(tmp_path: Path) -> None:
    ps = PatternSet.from_yaml(YAML)
    assert [p.kind for p in ps.patterns] == [
        "threshold",
        "range",
        "sequence",
        "absence",
        "rate",
        "correlation",
    ]
    assert ps.allowed_lateness == timedelta(seconds=5)
    assert ps.patterns[3].within == timedelta(seconds=90)
    assert ps.patterns[5].within == timedelta(hours=1, minutes=30)
    dumped = ps.model_dump(mode="json")
    assert PatternSet.from_dict(dumped) == ps
    assert PatternSet.from_json(json.dumps(dumped)) == ps
    (tmp_path / "p.yaml").write_text(YAML)
    (tmp_path / "p.json").write_text(json.dumps(dumped))
    assert PatternSet.load(tmp_path / "p.yaml") == PatternSet.load(tmp_path / "p.json") == ps
    assert ps.fingerprint("readings") == PatternSet.from_dict(dumped).fingerprint("readings")
    with pytest.raises(ConfigError, match=r"must end in \.yaml, \.yml or \.json"):
        PatternSet.load(tmp_path / "p.txt")
    with pytest.raises(ConfigError, match="cannot read pattern file"):
        PatternSet.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        PatternSet.from_yaml("patterns: [")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (90, 90),
        (2.5, 2.5),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ({"name": "x", "kind": "spike"}, "patterns[0]: Input tag 'spike' found using 'kind'"),
        (
            {
                "name": "x",
                "kind": "sequence",
                "steps": [
                    {"name": "a", "where": "a > 1"},
                    {"name": "c", "where": "c > 1", "contiguity": "not_followed_by"},
                ],
            },
            "needs a time limit; add e.g. within: 30s",
        ),
        (
            {**HOT, "times": 0},
            "patterns[0].threshold.times: Input should be greater than or equal to 1",
        ),
        (
            {"name": "x", "kind": "absence", "within": "-30s"},
            "patterns[0].absence.within: duration -30s must be positive",
        ),
        ({"name": "x", "kind": "absence", "within": 0}, "must be positive"),
        (
            {"name": "x", "kind": "absence", "within": "soon"},
            "duration 'soon' is not understood",
        ),
        (
            {**HOT, "condition": "temperature_avg >> 30"},
            "patterns[0].threshold.condition: expression 'temperature_avg >> 30': operator '>>' is not allowed (column 17)",
        ),
        ({**HOT, "condition": "temperature_avg"}, "condition 'temperature_avg' is not a condition"),
        (
            {"name": "x", "kind": "range", "value": "t > 1", "exceeds": 1, "within": 1},
            "value 't > 1' is a condition",
        ),
        ({**HOT, "surprise": 1}, "patterns[0].threshold.surprise: Extra inputs are not permitted"),
        ({**HOT, "name": "has space"}, "patterns[0].threshold.name: String should match pattern"),
        ({**HOT, "input": "nowhere"}, "input 'nowhere' is unknown"),
        (
            {
                **HOT,
                "actions": [{"type": "command", "name": "fan_on", "device": "{device}"}],
            },
            "device uses placeholder {device}; valid placeholders are {key}, {pattern}",
        ),
        (
            {
                "name": "x",
                "kind": "sequence",
                "steps": [{"name": "a", "where": "a > 1", "contiguity": "not_next"}],
            },
            "steps[0] ('a') cannot be negated or optional",
        ),
        (
            {
                "name": "x",
                "kind": "sequence",
                "within": 5,
                "steps": [
                    {"name": "a", "where": "a > 1"},
                    {"name": "c", "where": "c > 1", "contiguity": "not_followed_by", "times": 2},
                ],
            },
            "step 'c' is negated (not_followed_by); it takes no times/one_or_more/optional",
        ),
        (
            {
                "name": "x",
                "kind": "sequence",
                "within": 5,
                "steps": [
                    {"name": "a", "where": "a > 1"},
                    {"name": "c", "where": "c > 1", "contiguity": "not_next"},
                ],
            },
            "cannot end with not_next",
        ),
        (
            {
                "name": "x",
                "kind": "sequence",
                "steps": [{"name": "a", "where": "a > 1"}, {"name": "a", "where": "b > 1"}],
            },
            "step names must be unique; repeated: a",
        ),
        (
            {
                "name": "x",
                "kind": "correlation",
                "condition": "t > 1",
                "group_by": "zone",
                "min_keys": 0,
                "within": 60,
            },
            "min_keys: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_declarations_fail_at_load_naming_the_field(pattern: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        PatternSet.from_dict({"patterns": [pattern]})
    assert fragment in str(info.value)


def test_duplicate_pattern_names_and_empty_sets_are_refused() -> None:
    with pytest.raises(ConfigError, match="pattern names must be unique; repeated: hot"):
        PatternSet.from_dict([HOT, HOT])
    with pytest.raises(ConfigError, match="patterns: List should have at least 1 item"):
        PatternSet.from_dict({"patterns": []})


def test_build_errors_name_the_fix() -> None:
    ps = PatternSet.from_yaml(YAML)
    with pytest.raises(ConfigError, match=r"several inputs .* input=\.\.\."):
        ps.build(None)
    with pytest.raises(
        ConfigError, match="groups keys by 'zone'; build the engine with dimensions"
    ):
        ps.build(None, input="readings")
    with pytest.raises(ConfigError, match="no pattern listens to input 'commands'"):
        ps.build(None, input="commands")
    with pytest.raises(
        ConfigError,
        match=r"pattern 'hot' cond 'temperature_avg > 30' reads unknown column\(s\) temperature_avg; "
        r"the windows input has key, window_end_ms",
    ):
        ps.build(None, input="windows", columns=["key", "window_end_ms"])


# -- threshold --------------------------------------------------------------------------------


def test_threshold_three_consecutive_windows() -> None:
    engine = build([HOT])
    out = run(
        engine,
        windows([("d", 0, 60, 31.0), ("d", 60, 120, 32.0)]),  # two windows: nothing yet
        windows([("d", 120, 180, 30.5), ("e", 120, 180, 40.0)]),
    )
    assert dets(out) == [("hot", "d", 180.0)]
    assert out[0].details == {"times": 3, "events_ts_ms": [at(60), at(120), at(180)]}


def test_threshold_boundaries_value_at_threshold_gap_and_false_reset() -> None:
    engine = build([HOT])
    out = run(
        engine,
        windows(
            [
                ("a", 0, 60, 31.0),
                ("a", 60, 120, 30.0),  # not above 30: resets
                ("a", 120, 180, 31.0),
                ("a", 180, 240, 31.0),
                ("b", 0, 60, 31.0),
                ("b", 60, 120, 31.0),
                ("b", 180, 240, 31.0),  # window [120, 180) missing: a gap resets
                ("b", 240, 300, 31.0),
                ("b", 300, 360, 31.0),  # the third adjacent one after the gap
            ]
        ),
    )
    assert dets(out) == [("hot", "b", 360.0)]


def test_threshold_skip_strategies() -> None:
    rows = [("d", 60 * i, 60 * (i + 1), 35.0) for i in range(6)]
    skip = run(build([HOT]), windows(rows))
    assert [s for _, _, s in dets(skip)] == [180.0, 360.0]
    no_skip = run(build([{**HOT, "after_match": "no_skip"}]), windows(rows))
    assert [s for _, _, s in dets(no_skip)] == [180.0, 240.0, 300.0, 360.0]
    assert no_skip[-1].details["events_ts_ms"] == [at(240), at(300), at(360)]


def test_threshold_on_readings_ignores_rows_without_the_metric_and_reports_value() -> None:
    engine = build(
        [{"name": "hot", "kind": "threshold", "condition": "t > 30", "times": 2, "value": "t"}]
    )
    out = run(
        engine,
        frame([("d", 0, {"t": 31.0}), ("d", 1, {"door": 1.0}), ("d", 2, {"t": math.nan})]),
        frame([("d", 3, {"t": 33.0})]),
    )
    # the door-only reading and the NaN reading are invisible: 31 then 33 are consecutive
    assert dets(out) == [("hot", "d", 3.0)]
    assert out[0].value == 33.0


# -- range ------------------------------------------------------------------------------------

SWING = {"name": "swing", "kind": "range", "value": "t", "exceeds": 5, "within": "5m"}


def test_range_within_span_with_extremes() -> None:
    out = run(
        build([SWING]),
        frame([("d", 0, {"t": 20.0}), ("d", 100, {"t": 23.0}), ("d", 200, {"t": 25.5})]),
    )
    assert dets(out) == [("swing", "d", 200.0)]
    d = out[0]
    assert d.value == 5.5 and d.score == pytest.approx(1.1)
    assert d.details == {
        "max": 25.5,
        "min": 20.0,
        "max_ts_ms": at(200),
        "min_ts_ms": at(0),
        "within_s": 300.0,
    }


def test_range_boundaries_exactly_within_apart_and_exactly_exceeds() -> None:
    # 300 s apart is outside a 5 m span (a match needs last - first < within)
    assert dets(run(build([SWING]), frame([("d", 0, {"t": 20.0}), ("d", 300, {"t": 30.0})]))) == []
    near = frame([("d", 0, {"t": 20.0}), ("d", 299.999, {"t": 30.0})])
    assert dets(run(build([SWING]), near)) == [("swing", "d", 299.999)]
    # a range of exactly 5 does not exceed 5
    assert dets(run(build([SWING]), frame([("d", 0, {"t": 20.0}), ("d", 1, {"t": 25.0})]))) == []


def test_range_is_edge_triggered_and_re_arms() -> None:
    rows = [
        ("d", 0, {"t": 20.0}),
        ("d", 60, {"t": 26.0}),  # range 6: detect
        ("d", 120, {"t": 27.0}),  # still above: no repeat
        ("d", 400, {"t": 27.5}),  # span (100, 400]: 27, 27.5: back to normal
        ("d", 450, {"t": 21.0}),  # range 6.5 again: detect
    ]
    assert [s for _, _, s in dets(run(build([SWING]), frame(rows)))] == [60.0, 450.0]


def test_range_same_result_when_fed_row_by_row() -> None:
    rows = [
        ("d", 0, {"t": 20.0}),
        ("d", 60, {"t": 26.0}),
        ("d", 120, {"t": 27.0}),
        ("d", 400, {"t": 27.5}),
        ("d", 450, {"t": 21.0}),
    ]
    whole = dets(run(build([SWING]), frame(rows)))
    split = dets(run(build([SWING]), *[frame([r]) for r in rows]))
    assert whole == split


# -- rate -------------------------------------------------------------------------------------

RISE = {"name": "rise", "kind": "rate", "value": "t", "exceeds": 2, "per": "1m"}


def test_rate_of_change_per_minute() -> None:
    out = run(
        build([RISE]),
        frame(
            [
                ("d", 0, {"t": 20.0}),
                ("d", 30, {"t": 21.0}),  # 2 C/min: not more than 2
                ("d", 60, {"t": 22.5}),  # 3 C/min: detect
            ]
        ),
    )
    assert dets(out) == [("rise", "d", 60.0)]
    d = out[0]
    assert (d.value, d.baseline, d.score) == (3.0, 21.0, 1.5)
    assert d.details == {
        "from_ts_ms": at(30),
        "to_ts_ms": at(60),
        "from": 21.0,
        "to": 22.5,
        "per_s": 60.0,
    }


def test_rate_directions_duplicates_and_re_arming() -> None:
    rows = [
        ("d", 0, {"t": 20.0}),
        ("d", 10, {"t": 19.0}),  # -6/min
        ("d", 10, {"t": 25.0}),  # same time: no slope, state unchanged
        ("d", 20, {"t": 24.0}),  # -6/min from 25: still falling fast
        ("d", 80, {"t": 24.0}),  # 0: re-arms
        ("d", 90, {"t": 30.0}),  # +36/min
    ]
    falls = run(build([{**RISE, "direction": "falls"}]), frame(rows))
    assert [s for _, _, s in dets(falls)] == [10.0]
    either = run(build([{**RISE, "direction": "either"}]), frame(rows))
    assert [s for _, _, s in dets(either)] == [10.0, 90.0]
    rises = run(build([RISE]), frame(rows))
    assert [s for _, _, s in dets(rises)] == [90.0]


# -- absence ----------------------------------------------------------------------------------

OFFLINE = {"name": "offline", "kind": "absence", "within": "60s"}


def test_heartbeat_lost_fires_once_when_the_watermark_passes() -> None:
    engine = build([OFFLINE])
    out = engine.on_batch(
        frame([("a", 0, {"t": 1.0}), ("a", 30, {"t": 1.0}), ("b", 30, {"t": 1.0})])
    )
    assert dets(out) == []
    out = engine.on_batch(frame([("b", 90, {"t": 1.0}), ("b", 100, {"t": 1.0})]))
    # watermark 100 s: a silent since 30 s -> offline at 90 s; b's gap 30 -> 90 is exactly
    # 60 s, which counts as a silence (Flink's rule: a deadline at t fires before an event at t)
    assert sorted(dets(out)) == [("offline", "a", 90.0), ("offline", "b", 90.0)]
    assert next(d for d in out if d.key == "b").details == {"last_ts_ms": at(30), "silence_s": 60.0}
    assert dets(engine.on_batch(frame([("b", 140, {"t": 1.0})]))) == []  # once per silence
    out = engine.on_batch(frame([("a", 150, {"t": 1.0}), ("b", 149.999, {"t": 1.0})]))
    assert dets(out) == []  # a resumed (re-armed); b's gap 100 -> 149.999 < 60 s


def test_heartbeat_driven_by_the_clock_when_the_stream_goes_quiet() -> None:
    clock = ManualClock(at(10))
    engine = build([OFFLINE], clock)
    assert engine.on_batch(frame([("a", 10, {"t": 1.0})])) == []
    # the watermark reaches 70 s after 60 s of quiet; a pending row first releases at +1 ms
    assert engine.next_timer() == clock.now + timedelta(milliseconds=1)
    clock.advance(1)
    assert engine.on_timer() == []
    assert engine.next_timer() == clock.now - timedelta(seconds=1) + timedelta(seconds=60)
    clock.advance(58.999)
    assert engine.on_timer() == []
    clock.advance(0.001)
    assert dets(engine.on_timer()) == [("offline", "a", 70.0)]
    assert engine.next_timer() is None


def test_heartbeat_at_end_of_input_reports_every_silent_key() -> None:
    engine = build([OFFLINE])
    out = run(engine, frame([("a", 0, {"t": 1.0}), ("b", 50, {"t": 1.0})]))
    assert dets(out) == [("offline", "a", 60.0), ("offline", "b", 110.0)]


def test_heartbeat_counts_only_expected_events() -> None:
    engine = build([{**OFFLINE, "expect": "not is_null(t)"}])
    out = run(
        engine, frame([("a", 0, {"t": 1.0}), ("a", 30, {"door": 1.0}), ("a", 61, {"t": 2.0})])
    )
    assert dets(out)[0] == ("offline", "a", 60.0)


NO_ACK = {
    "name": "no_ack",
    "kind": "absence",
    "input": "commands",
    "after": "kind == 'sent'",
    "expect": "kind == 'acked'",
    "within": "30s",
    "actions": [
        {"type": "detect"},
        {
            "type": "command",
            "device": "{key}",
            "name": "retry",
            "params": {"why": "{pattern} on {key}"},
        },
    ],
}


def test_no_ack_after_command_within_limit_with_actions() -> None:
    engine = build([NO_ACK])
    out = run(
        engine,
        commands(
            [
                ("c1", 0, "sent"),
                ("c1", 10, "acked"),  # in time
                ("c2", 5, "sent"),  # never acked
                ("c3", 20, "sent"),
                ("c3", 50, "acked"),  # exactly 30 s later: too late
            ]
        ),
    )
    assert dets(out) == [("no_ack", "c2", 35.0), ("no_ack", "c3", 50.0)]
    requests = [o for o in out if isinstance(o, CommandRequest)]
    assert [(r.device_id, r.name, r.params, r.request_id) for r in requests] == [
        ("c2", "retry", {"why": "no_ack on c2"}, f"no_ack|c2|{at(35)}|1"),
        ("c3", "retry", {"why": "no_ack on c3"}, f"no_ack|c3|{at(50)}|1"),
    ]
    assert isinstance(out[0], Detection) and isinstance(out[1], CommandRequest)
    assert out[0].details["events"] == [{"step": "after", "ts_ms": at(5)}]


# -- sequence ---------------------------------------------------------------------------------


def seq(steps: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"name": "seq", "kind": "sequence", "steps": steps, **kw}


OPEN = {"name": "opened", "where": "door == 1"}
MOTION = {"name": "motion", "where": "motion > 0"}
CLOSED = {"name": "closed", "where": "door == 0"}


def test_door_then_motion_within_30s() -> None:
    out = run(
        build([seq([OPEN, MOTION], within="30s")]),
        frame(
            [
                ("a", 0, {"door": 1.0}),
                ("a", 5, {"t": 20.0}),  # unrelated: relaxed contiguity skips it
                ("a", 12, {"motion": 1.0}),
                ("b", 0, {"door": 1.0}),
                ("b", 30, {"motion": 1.0}),  # exactly 30 s: too late
                ("c", 0, {"door": 1.0}),
                ("c", 29.999, {"motion": 1.0}),
            ]
        ),
    )
    assert dets(out) == [("seq", "c", 29.999), ("seq", "a", 12.0)] or sorted(dets(out)) == [
        ("seq", "a", 12.0),
        ("seq", "c", 29.999),
    ]
    match = next(d for d in out if isinstance(d, Detection) and d.key == "a")
    assert match.details == {
        "events": [{"step": "opened", "ts_ms": at(0)}, {"step": "motion", "ts_ms": at(12)}],
        "started_ts_ms": at(0),
    }
    assert match.value == 12.0
    assert timeouts(out) == [("seq", "b", 30.0, "within")]
    timed = next(t for t in out if isinstance(t, TimedOutMatch))
    assert timed.events == [{"step": "opened", "ts_ms": at(0)}]


def test_not_followed_by_at_the_end_completes_when_time_runs_out() -> None:
    pattern = seq([OPEN, MOTION, {**CLOSED, "contiguity": "not_followed_by"}], within="60s")
    out = run(
        build([pattern]),
        frame(
            [
                ("a", 0, {"door": 1.0}),
                ("a", 10, {"motion": 1.0}),
                ("b", 0, {"door": 1.0}),
                ("b", 10, {"motion": 1.0}),
                ("b", 40, {"door": 0.0}),  # closed in time: no detection
                ("z", 61, {"t": 1.0}),  # moves the watermark past 60 s
            ]
        ),
        eof=False,
    )
    assert dets(out) == [("seq", "a", 60.0)]
    assert timeouts(out) == []


def test_not_followed_by_in_the_middle() -> None:
    pattern = seq([OPEN, {**CLOSED, "contiguity": "not_followed_by"}, MOTION], within="60s")
    out = run(
        build([pattern]),
        frame(
            [
                ("a", 0, {"door": 1.0}),
                ("a", 10, {"door": 0.0}),  # closed before motion: discarded
                ("a", 20, {"motion": 1.0}),
                ("b", 0, {"door": 1.0}),
                ("b", 20, {"motion": 1.0}),
            ]
        ),
    )
    assert dets(out) == [("seq", "b", 20.0)]


def test_strict_contiguity_next_and_invisible_events() -> None:
    pattern = seq([OPEN, {**MOTION, "contiguity": "next"}], within="60s")
    out = run(
        build([pattern]),
        frame(
            [
                ("a", 0, {"door": 1.0, "motion": 0.0}),
                ("a", 5, {"door": 0.0, "motion": 0.0}),  # visible, matches nothing: breaks 'next'
                ("a", 6, {"motion": 1.0}),
                ("b", 0, {"door": 1.0}),
                ("b", 5, {"t": 3.0}),  # carries none of door/motion: invisible
                ("b", 6, {"motion": 1.0}),
            ]
        ),
    )
    assert dets(out) == [("seq", "b", 6.0)]
    assert timeouts(out) == []  # a's partial match was discarded by contiguity, not timed out


def test_times_one_or_more_and_optional() -> None:
    hot = {"name": "hot", "where": "t > 30"}
    rows = frame(
        [
            ("a", 0, {"door": 1.0}),
            ("a", 1, {"t": 31.0}),
            ("a", 2, {"t": 20.0}),
            ("a", 3, {"t": 32.0}),
            ("a", 4, {"t": 33.0}),
            ("a", 5, {"motion": 1.0}),
        ]
    )
    three = run(build([seq([OPEN, {**hot, "times": 3}, MOTION])]), rows)
    assert [e["ts_ms"] for e in three[0].details["events"]] == [at(s) for s in (0, 1, 3, 4, 5)]
    consecutive = run(build([seq([OPEN, {**hot, "times": 3, "consecutive": True}, MOTION])]), rows)
    assert dets(consecutive) == []  # the 20 C reading breaks the run of three
    more = run(build([seq([OPEN, {**hot, "one_or_more": True}, MOTION])]), rows)
    assert [e["step"] for e in more[0].details["events"]] == [
        "opened",
        "hot",
        "hot",
        "hot",
        "motion",
    ]
    optional = run(build([seq([OPEN, {**hot, "optional": True, "times": 5}, MOTION])]), rows)
    assert [e["step"] for e in optional[0].details["events"]] == ["opened", "motion"]
    without = frame([("a", 0, {"door": 1.0}), ("a", 5, {"motion": 1.0})])
    assert dets(run(build([seq([OPEN, {**hot, "optional": True}, MOTION])]), without)) == [
        ("seq", "a", 5.0)
    ]


def test_skip_strategies_on_overlapping_starts() -> None:
    rows = frame([("a", 0, {"door": 1.0}), ("a", 1, {"door": 1.0}), ("a", 2, {"motion": 1.0})])
    skip = run(build([seq([OPEN, MOTION])]), rows)
    assert [d.details["started_ts_ms"] for d in skip if isinstance(d, Detection)] == [at(0)]
    assert timeouts(skip) == []  # the second partial match was discarded by the skip
    no_skip = run(build([seq([OPEN, MOTION], after_match="no_skip")]), rows)
    assert [d.details["started_ts_ms"] for d in no_skip if isinstance(d, Detection)] == [
        at(0),
        at(1),
    ]


def test_partial_matches_without_within_time_out_at_end_of_input_and_capacity() -> None:
    out = run(
        build([seq([OPEN, MOTION], max_partial_matches=2)]),
        frame([("a", 0, {"door": 1.0}), ("a", 1, {"door": 1.0}), ("a", 2, {"door": 1.0})]),
    )
    assert timeouts(out) == [
        ("seq", "a", 2.0, "capacity"),
        ("seq", "a", 1.0, "end_of_input"),
        ("seq", "a", 2.0, "end_of_input"),
    ]


def test_single_step_sequence_matches_each_event() -> None:
    out = run(build([seq([OPEN])]), frame([("a", 0, {"door": 1.0}), ("a", 1, {"door": 1.0})]))
    assert dets(out) == [("seq", "a", 0.0), ("seq", "a", 1.0)]


# -- correlation -------------------------------------------------------------------------------

SURGE = {
    "name": "surge",
    "kind": "correlation",
    "condition": "t > 35",
    "group_by": "zone",
    "min_keys": 3,
    "within": "1m",
}
ZONES = {"a": {"zone": "z1"}, "b": {"zone": "z1"}, "c": {"zone": "z1"}, "x": {"zone": "z2"}}


def test_correlation_n_devices_in_a_zone_within_t() -> None:
    out = run(
        build([SURGE], dimensions=ZONES),
        frame(
            [
                ("a", 0, {"t": 36.0}),
                ("a", 10, {"t": 37.0}),  # the same device twice counts once
                ("x", 15, {"t": 50.0}),  # another zone
                ("u", 16, {"t": 50.0}),  # no zone: counted, ignored
                ("b", 20, {"t": 36.0}),
                ("c", 30, {"t": 35.0}),  # not above 35
                ("c", 69.999, {"t": 36.0}),  # a's latest (10 s) is still within 60 s
            ]
        ),
    )
    assert dets(out) == [("surge", "z1", 69.999)]
    d = out[0]
    assert d.value == 3.0 and d.score == 1.0
    assert d.details == {
        "group_by": "zone",
        "keys": [
            {"key": "a", "ts_ms": at(10)},
            {"key": "b", "ts_ms": at(20)},
            {"key": "c", "ts_ms": at(69.999)},
        ],
    }
    assert build([SURGE], dimensions=ZONES).stats()["patterns"]["surge"]["ungrouped"] == 0


def test_correlation_boundary_and_fresh_start_after_a_match() -> None:
    engine = build([SURGE], dimensions=ZONES)
    out = run(
        engine,
        frame(
            [
                ("a", 0, {"t": 36.0}),
                ("b", 10, {"t": 36.0}),
                ("c", 60, {"t": 36.0}),  # a's match is exactly 60 s old: out
                ("a", 61, {"t": 36.0}),  # b, c, a within 60 s: detect
                ("b", 62, {"t": 36.0}),
                ("c", 63, {"t": 36.0}),  # after a match the zone starts afresh: b, c only
                ("u", 64, {"t": 36.0}),
            ]
        ),
    )
    assert dets(out) == [("surge", "z1", 61.0)]
    assert engine.stats()["patterns"]["surge"]["ungrouped"] == 1


def test_correlation_over_a_grouping_set_groups_as_the_group_statistics() -> None:
    """group_by [building, floor]: keys of one floor of one building correlate; the
    detection's key is the group key of operators.groups; a key without a floor is
    ungrouped."""
    floors = {
        "a": {"building": "A", "floor": "1"},
        "b": {"building": "A", "floor": "1"},
        "c": {"building": "A", "floor": "2"},  # another floor of the same building
        "d": {"building": "B", "floor": "1"},  # the same floor number elsewhere
        "u": {"building": "A"},
    }
    engine = build([{**SURGE, "group_by": ["building", "floor"], "min_keys": 2}], dimensions=floors)
    out = run(
        engine,
        frame(
            [
                ("a", 0, {"t": 36.0}),
                ("c", 1, {"t": 36.0}),
                ("d", 2, {"t": 36.0}),
                ("u", 3, {"t": 36.0}),
                ("b", 4, {"t": 36.0}),
            ]
        ),
    )
    assert dets(out) == [("surge", "building=A|floor=1", 4.0)]
    assert out[0].details["group_by"] == ["building", "floor"]
    assert engine.stats()["patterns"]["surge"]["ungrouped"] == 1


@pytest.mark.parametrize("group_by", ["", [], ["zone", "zone"]])
def test_correlation_group_by_must_name_distinct_dimensions(group_by: Any) -> None:
    with pytest.raises(ValueError, match="group_by"):
        build([{**SURGE, "group_by": group_by}], dimensions=ZONES)


# -- engine: time, bad input, recovery --------------------------------------------------------


def test_late_future_and_incomplete_rows_are_rejected_and_counted() -> None:
    engine = build([OFFLINE], ManualClock(at(0)))
    engine.on_batch(frame([("a", 100, {"t": 1.0}), ("a", 200, {"t": 1.0})]))
    bad = pl.DataFrame(
        {
            "device_id": ["a", None, "a", "a"],
            "ts_ms": [at(150), at(300), None, at(10_000)],
            "t": [1.0, 1.0, 1.0, 1.0],
        }
    )
    out = engine.on_batch(bad)
    rejected = {r.reason: r.rows.height for r in out if isinstance(r, RejectedRows)}
    assert rejected == {"late": 1, "incomplete": 2, "future": 1}
    stats = engine.stats()
    assert (stats["rows"], stats["late"], stats["incomplete"], stats["future"]) == (6, 1, 2, 1)
    late = next(r for r in out if isinstance(r, RejectedRows) and r.reason == "late")
    assert late.boundary_ms == at(200) and late.rows["ts_ms"].to_list() == [at(150)]


def test_a_one_event_threshold_detects_on_arrival_even_when_late_for_the_others() -> None:
    now = {"name": "now", "kind": "threshold", "input": "readings", "condition": "t > 90"}
    twice = {**now, "name": "twice", "times": 2}
    engine = build({"allowed_lateness": "1m", "patterns": [twice, now]}, ManualClock(at(0)))
    # no waiting for the 1 minute lateness: the hot reading is a detection at once
    out = engine.on_batch(frame([("a", 10, {"t": 95.0}), ("b", 11, {"t": 20.0})]))
    assert dets(out) == [("now", "a", 10.0)]
    assert out[0].details == {"times": 1, "events_ts_ms": [at(10)]}
    engine.on_batch(frame([("a", 200, {"t": 20.0})]))  # the others processed up to 140 s
    out = engine.on_batch(frame([("a", 100, {"t": 96.0}), ("a", 101, {"t": 97.0})]))
    # late for "twice" (rejected for it), still two detections of "now"
    assert dets(out) == [("now", "a", 100.0), ("now", "a", 101.0)]
    assert [(r.reason, r.rows.height) for r in out if isinstance(r, RejectedRows)] == [("late", 2)]
    assert dets(engine.on_eof()) == []
    # alone, a one-event threshold has nothing to wait for: nothing is ever late
    alone = build({"allowed_lateness": "0s", "patterns": [now]}, ManualClock(at(0)))
    run(alone, frame([("a", 50, {"t": 95.0})]), eof=False)
    assert dets(alone.on_batch(frame([("b", 5, {"t": 95.0})]))) == [("now", "b", 5.0)]
    assert alone.stats()["late"] == 0 and alone.next_timer() is None


def test_out_of_order_rows_within_lateness_are_processed_in_time_order() -> None:
    engine = build({"allowed_lateness": "10s", "patterns": [seq([OPEN, MOTION])]})
    out = run(
        engine,
        frame([("a", 5, {"motion": 1.0}), ("a", 8, {"t": 1.0})]),
        frame([("a", 0, {"door": 1.0}), ("a", 20, {"motion": 1.0})]),  # door at 0 s is in time
    )
    assert dets(out) == [("seq", "a", 5.0)]
    assert engine.stats()["late"] == 0


def test_missing_columns_read_as_null_and_are_counted() -> None:
    engine = build([{**HOT, "input": "readings", "condition": "temperature_avg > 30"}])
    out = run(engine, frame([("a", 0, {"t": 1.0})]))
    assert out == []
    assert engine.stats()["missing_column_rows"] == 1


def test_frame_without_key_column_is_a_config_error() -> None:
    engine = build([HOT])
    with pytest.raises(ConfigError, match="lacks column\\(s\\) key"):
        engine.on_batch(frame([("a", 0, {"t": 1.0})]))


def test_string_conditions_on_a_custom_input() -> None:
    engine = build(
        {
            "inputs": {"acks": {"key": "command_id", "time": "at_ms"}},
            "patterns": [
                {
                    "name": "failed",
                    "kind": "threshold",
                    "input": "acks",
                    "condition": "status == 'failed'",
                    "times": 2,
                }
            ],
        }
    )
    acks = pl.DataFrame(
        {
            "command_id": ["c", "c", "c"],
            "at_ms": [at(0), at(1), at(2)],
            "status": ["failed", "failed", "done"],
        }
    )
    assert dets(run(engine, acks)) == [("failed", "c", 1.0)]


def test_twin_update_action_and_detection_only_when_declared() -> None:
    pattern = {
        **OFFLINE,
        "actions": [
            {"type": "twin_update", "properties": {"status": "offline", "by": "{pattern}"}}
        ],
    }
    out = run(build([pattern]), frame([("a", 0, {"t": 1.0})]))
    assert out == [
        TwinUpdate(
            request_id=f"offline|a|{at(60)}|0",
            pattern="offline",
            key="a",
            device_id="a",
            properties={"status": "offline", "by": "offline"},
            ts=out[0].ts,
        )
    ]
    assert secs(out[0].ts) == 60.0


def test_changed_definition_refuses_old_state() -> None:
    engine = build([HOT])
    engine.on_batch(windows([("d", 0, 60, 31.0)]))
    state = engine.snapshot()
    PatternSet.from_dict([HOT]).build(state)  # the same definition resumes
    with pytest.raises(ConfigError, match=r"other pattern definitions .* fresh recovery store"):
        PatternSet.from_dict([{**HOT, "times": 4}]).build(state)


def test_far_future_timestamp_without_the_skew_check_moves_the_watermark() -> None:
    # documented: with max_future_skew off, one bad timestamp makes the rest late
    engine = build({"max_future_skew": None, "patterns": [OFFLINE]})
    engine.on_batch(frame([("a", 0, {"t": 1.0}), ("b", 10_000_000, {"t": 1.0})]))
    out = engine.on_batch(frame([("a", 30, {"t": 1.0})]))
    assert [r.reason for r in out if isinstance(r, RejectedRows)] == ["late"]


def test_output_order_is_deterministic() -> None:
    ps = PatternSet.from_yaml(YAML)
    rows = frame(
        [
            (
                d,
                s,
                {"t": 20.0 + (s % 7) * 3, "door": float(s % 5 == 0), "motion": float(s % 3 == 0)},
            )
            for s in range(0, 400, 10)
            for d in ("a", "b", "c")
        ]
    )
    first = run(ps.build(None, now=ManualClock(), input="readings", dimensions=ZONES), rows)
    second = run(ps.build(None, now=ManualClock(), input="readings", dimensions=ZONES), rows)
    assert first == second and len(dets(first)) > 5


# -- properties -------------------------------------------------------------------------------

ALL_KINDS = {
    "patterns": [
        {"name": "hot", "kind": "threshold", "condition": "t > 30", "times": 2},
        {"name": "swing", "kind": "range", "value": "t", "exceeds": 8, "within": "20s"},
        {"name": "rise", "kind": "rate", "value": "t", "exceeds": 30, "per": "1m"},
        {"name": "offline", "kind": "absence", "within": "15s"},
        seq(
            [OPEN, {**MOTION, "one_or_more": True}, {**CLOSED, "contiguity": "not_followed_by"}],
            within="12s",
        ),
        {**SURGE, "min_keys": 2, "within": "10s", "condition": "t > 32"},
    ]
}


@st.composite
def reading_streams(draw: st.DrawFn) -> list[tuple[str, float, dict[str, float | None]]]:
    n = draw(st.integers(min_value=1, max_value=25))
    rows = []
    clock = 0.0
    for _ in range(n):
        clock += draw(st.sampled_from([0, 0, 1, 2, 5, 9]))  # repeated times on purpose
        device = draw(st.sampled_from(["a", "b", "c", "x"]))
        metrics = {
            "t": draw(st.one_of(st.none(), st.just(math.nan), st.integers(20, 40).map(float))),
            "door": draw(st.one_of(st.none(), st.sampled_from([0.0, 1.0]))),
            "motion": draw(st.one_of(st.none(), st.sampled_from([0.0, 1.0]))),
        }
        rows.append((device, clock, metrics))
    return rows


def canonical(out: list[Any]) -> list[str]:
    items = []
    for o in out:
        if isinstance(o, RejectedRows):
            items.append(f"rejected|{o.reason}|{o.rows.height}")
        else:
            items.append(repr(o))
    return sorted(items)


def fresh() -> CepEngine:
    return PatternSet.from_dict(ALL_KINDS).build(None, now=ManualClock(), dimensions=ZONES)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reading_streams(), st.lists(st.integers(min_value=1, max_value=25), max_size=6))
def test_output_does_not_depend_on_batch_boundaries(rows: list, cuts: list[int]) -> None:
    whole = run(fresh(), frame(rows))
    bounds = sorted({c for c in cuts if c < len(rows)})
    parts = [rows[a:b] for a, b in zip([0, *bounds], [*bounds, len(rows)], strict=True)]
    split = run(fresh(), *[frame(p) for p in parts if p])
    assert canonical(split) == canonical(whole)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reading_streams(), st.integers(min_value=0, max_value=25), st.integers(1, 4))
def test_snapshot_and_restore_mid_stream_changes_nothing(rows: list, cut: int, size: int) -> None:
    cut = min(cut, len(rows))

    def batches(part: list) -> list[pl.DataFrame]:
        return [frame(part[i : i + size]) for i in range(0, len(part), size)]

    uninterrupted = run(fresh(), *batches(rows[:cut]), *batches(rows[cut:]))
    engine = fresh()
    before = [o for f in batches(rows[:cut]) for o in engine.on_batch(f)]
    state = pickle.loads(
        pickle.dumps(engine.snapshot())
    )  # plain data, as a recovery store keeps it
    resumed = PatternSet.from_dict(ALL_KINDS).build(state, now=ManualClock(), dimensions=ZONES)
    after = run(resumed, *batches(rows[cut:]))
    assert canonical(before + after) == canonical(uninterrupted)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=30), st.integers(min_value=1, max_value=4))
def test_threshold_matches_a_brute_force_count(values: list[bool], n: int) -> None:
    rows = [("d", float(i), {"t": 35.0 if v else 20.0}) for i, v in enumerate(values)]
    pattern = {"name": "hot", "kind": "threshold", "condition": "t > 30", "times": n}
    got = [s for _, _, s in dets(run(build([pattern]), frame(rows)))] if rows else []
    expected, count = [], 0
    for i, v in enumerate(values):
        count = count + 1 if v else 0
        if count == n:
            expected.append(float(i))
            count = 0
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.floats(min_value=0, max_value=30, allow_nan=False)),
        min_size=1,
        max_size=30,
    )
)
def test_range_matches_a_brute_force_window(steps: list[tuple[int, float]]) -> None:
    rows, clock = [], 0.0
    for gap, value in steps:
        clock += gap
        rows.append(("d", clock, {"t": value}))
    pattern = {"name": "swing", "kind": "range", "value": "t", "exceeds": 10, "within": "6s"}
    got = [s for _, _, s in dets(run(build([pattern]), frame(rows)))]
    expected, prev = [], False
    for _, ts, _ in rows:
        span = [r[2]["t"] for r in rows if ts - 6 < r[1] <= ts]
        flag = max(span) - min(span) > 10
        if flag and not prev:
            expected.append(ts)
        prev = flag
    assert got == expected


def test_range_edge_state_survives_when_old_events_leave_the_span() -> None:
    # the key's previous event (0 s) had a wide range; the next one (30 s) has a wide range
    # of its own: the excursion goes on, however the batches fall
    rows = [
        ("a", 0, {"t": 20.0}),
        ("a", 0, {"t": 29.0}),
        ("z", 25, {"t": 1.0}),
        ("a", 30, {"t": 20.0}),
        ("a", 30, {"t": 29.0}),
    ]
    pattern = {**SWING, "exceeds": 8, "within": "20s"}
    whole = dets(run(build([pattern]), frame(rows)))
    split = dets(run(build([pattern]), frame(rows[:2]), frame(rows[2:3]), frame(rows[3:])))
    assert whole == split == [("swing", "a", 0.0)]
