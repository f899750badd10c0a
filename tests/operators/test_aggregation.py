"""Windowed statistics: hand-computed expectations, boundaries and invariants."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotflow.errors import ConfigError
from operators.aggregation import Aggregation, LateFrame, to_wide
from operators.sketch import RELATIVE_ACCURACY

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z, a minute boundary


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def frame(rows: list[tuple[str, int, float | None]], metric: str = "t") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "device_id": [r[0] for r in rows],
            "ts_ms": [r[1] for r in rows],
            metric: [r[2] for r in rows],
        },
        schema={"device_id": pl.Utf8, "ts_ms": pl.Int64, metric: pl.Float64},
    )


def build(decl: dict[str, Any], dims: dict[str, dict[str, str]] | None = None, clock=None):
    return Aggregation.model_validate(decl).build(None, dimensions=dims, now=clock or Clock())


def results(emits: list) -> pl.DataFrame:
    frames = [e for e in emits if isinstance(e, pl.DataFrame)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def run(agg, batches: list[pl.DataFrame]) -> pl.DataFrame:
    emits: list = []
    for b in batches:
        emits.extend(agg.on_batch(b))
    emits.extend(agg.on_eof())
    return results(emits)


ALL = [
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
    "rate",
    "distinct",
]


def test_every_statistic_of_one_tumbling_window_by_hand() -> None:
    agg = build({"window": {"kind": "tumbling", "length": "1m"}, "stats": ALL})
    # out of order on purpose: first/last go by timestamp, not arrival
    rows = [
        ("d", T0 + 30_000, 4.0),
        ("d", T0, 2.0),
        ("d", T0 + 59_999, 8.0),
        ("d", T0 + 10_000, 2.0),
    ]
    row = run(agg, [frame(rows)]).row(0, named=True)
    assert row["window_start_ms"] == T0 and row["window_end_ms"] == T0 + 60_000
    assert (row["count"], row["sum"], row["avg"]) == (4, 16.0, 4.0)
    assert (row["min"], row["max"], row["first"], row["last"]) == (2.0, 8.0, 2.0, 8.0)
    # deviations -2, -2, 0, 4 -> squares 4+4+0+16 = 24; sample variance 24/3
    assert row["variance"] == pytest.approx(8.0)
    assert row["stddev"] == pytest.approx(math.sqrt(8.0))
    # sorted 2,2,4,8: lower quantile rank floor(q*(n-1)): median rank 1 -> 2, p90 rank 2 -> 4
    assert (row["median"], row["p90"]) == (2.0, 4.0)
    assert row["rate"] == pytest.approx((8.0 - 2.0) / 59.999)
    assert row["distinct"] == 3


def test_a_reading_exactly_at_the_window_end_opens_the_next_window() -> None:
    agg = build({"window": {"kind": "tumbling", "length": "1m"}, "stats": ["sum"]})
    out = run(agg, [frame([("d", T0 + 59_999, 1.0), ("d", T0 + 60_000, 2.0)])])
    assert out.select("window_start_ms", "sum").rows() == [(T0, 1.0), (T0 + 60_000, 2.0)]


def test_lateness_boundary_and_late_side_output() -> None:
    clock = Clock()
    agg = build(
        {
            "window": {"kind": "tumbling", "length": "10s"},
            "stats": ["sum"],
            "allowed_lateness": "5s",
        },
        clock=clock,
    )
    assert agg.on_batch(frame([("d", T0 + 1_000, 1.0)])) == []
    # watermark = 14_999 - 5_000 = 9_999: window [0, 10s) still open
    assert agg.on_batch(frame([("d", T0 + 14_999, 2.0)])) == []
    # out of order but within lateness: lands in the first window
    assert agg.on_batch(frame([("d", T0 + 9_000, 4.0)])) == []
    # watermark reaches 10_000 exactly: the first window closes
    closed = results(agg.on_batch(frame([("d", T0 + 15_000, 8.0)])))
    assert closed.select("window_start_ms", "count", "sum").rows() == [(T0, 2, 5.0)]
    emits = agg.on_batch(frame([("d", T0 + 9_999, 16.0)]))
    late = [e for e in emits if isinstance(e, LateFrame)]
    assert len(late) == 1 and late[0].readings.get_column("t").to_list() == [16.0]
    assert late[0].watermark_ms == T0 + 10_000
    assert agg.late_count == 1
    rest = run(agg, [])
    assert rest.select("window_start_ms", "count", "sum").rows() == [(T0 + 10_000, 2, 10.0)]


def test_quiet_stream_closes_windows_on_the_clock() -> None:
    clock = Clock()
    agg = build({"window": {"kind": "tumbling", "length": "10s"}, "stats": ["sum"]}, clock=clock)
    agg.on_batch(frame([("d", T0 + 2_000, 1.0)]))
    due = agg.next_timer()
    assert due == clock.now + timedelta(seconds=8)
    clock.now = due - timedelta(milliseconds=1)
    assert agg.on_timer() == []
    clock.now = due
    assert results(agg.on_timer()).get_column("sum").to_list() == [1.0]
    assert agg.next_timer() is None


def test_sliding_windows_by_hand() -> None:
    agg = build(
        {"window": {"kind": "sliding", "length": "30s", "step": "10s"}, "stats": ["sum", "max"]}
    )
    rows = [("d", T0 + 5_000, 1.0), ("d", T0 + 15_000, 2.0), ("d", T0 + 25_000, 4.0)]
    out = run(agg, [frame(rows)])
    # windows ending 10, 20, 30, 40, 50 s: each a sum of the 10 s panes it covers
    assert out.select("window_start_ms", "window_end_ms", "sum", "max").rows() == [
        (T0 - 20_000, T0 + 10_000, 1.0, 1.0),
        (T0 - 10_000, T0 + 20_000, 3.0, 2.0),
        (T0, T0 + 30_000, 7.0, 4.0),
        (T0 + 10_000, T0 + 40_000, 6.0, 4.0),
        (T0 + 20_000, T0 + 50_000, 4.0, 4.0),
    ]


def test_session_windows_split_on_gaps_and_merge_when_bridged() -> None:
    agg = build({"window": {"kind": "session", "gap": "10s"}, "stats": ["sum"]})
    out = run(
        agg,
        [
            frame(
                [("d", T0, 1.0), ("d", T0 + 5_000, 2.0), ("e", T0, 16.0), ("d", T0 + 30_000, 4.0)]
            ),
            frame([("d", T0 + 50_000, 8.0)]),
        ],
    )
    assert out.select("key", "window_start_ms", "window_end_ms", "sum").rows() == [
        ("e", T0, T0 + 10_000, 16.0),
        ("d", T0, T0 + 15_000, 3.0),
        ("d", T0 + 30_000, T0 + 40_000, 4.0),
        ("d", T0 + 50_000, T0 + 60_000, 8.0),
    ]
    bridged = build(
        {"window": {"kind": "session", "gap": "10s"}, "stats": ["sum"], "allowed_lateness": "10s"}
    )
    out = run(
        bridged, [frame([("d", T0, 1.0), ("d", T0 + 16_000, 2.0)]), frame([("d", T0 + 8_000, 4.0)])]
    )
    assert out.select("window_start_ms", "window_end_ms", "sum").rows() == [(T0, T0 + 26_000, 7.0)]


DIMS = {
    "a": {"zone": "z1", "floor": "1"},
    "b": {"zone": "z1", "floor": "1"},
    "c": {"zone": "z2", "floor": "1"},
    "x": {"floor": "2"},  # no zone
}


def test_group_sets_over_registry_dimensions() -> None:
    agg = build(
        {
            "window": {"kind": "tumbling", "length": "1m"},
            "stats": ["avg", "max", "device_count", "total"],
            "group_by": [["device"], ["zone"], ["floor", "zone"]],
        },
        DIMS,
    )
    rows = [
        ("a", T0, 100.0),
        ("a", T0 + 1_000, 300.0),
        ("b", T0, 50.0),
        ("c", T0, 10.0),
        ("x", T0, 7.0),
        ("ghost", T0, 1.0),
    ]
    out = run(agg, [frame(rows, "power")])
    zone = {r["key"]: r for r in out.filter(pl.col("group_by") == "zone").iter_rows(named=True)}
    assert set(zone) == {"zone=z1", "zone=z2"}
    # z1: readings 100, 300, 50 -> avg 150; devices a (avg 200) + b (avg 50): total 250
    assert (zone["zone=z1"]["avg"], zone["zone=z1"]["max"]) == (150.0, 300.0)
    assert (zone["zone=z1"]["device_count"], zone["zone=z1"]["total"]) == (2, 250.0)
    assert (zone["zone=z2"]["device_count"], zone["zone=z2"]["total"]) == (1, 10.0)
    both = out.filter(pl.col("group_by") == "floor+zone").get_column("key").to_list()
    assert sorted(both) == ["floor=1|zone=z1", "floor=1|zone=z2"]
    devices = out.filter(pl.col("group_by") == "device")
    assert sorted(devices.get_column("key").to_list()) == ["a", "b", "c", "ghost", "x"]
    # x has no zone, ghost is not in the registry: counted for both zone sets
    assert agg.unassigned == 4


def test_kpis_derive_from_the_statistics_of_each_group_and_window() -> None:
    """power_per_device = a zone's total power over its device count, per window; a KPI
    whose fields a group lacks, or whose value is not finite, gives no row."""
    agg = build(
        {
            "window": {"kind": "tumbling", "length": "1m"},
            "stats": ["avg", "max", "device_count", "total"],
            "group_by": [["zone"]],
            "kpis": {
                "power_per_device": "power_total / power_device_count",
                "headroom": "1000 / (power_max - 300)",  # z1's max is 300: no row
                "spread": "power_max - temp_avg",  # no temp metric: no rows
            },
        },
        DIMS,
    )
    rows = [("a", T0, 100.0), ("a", T0 + 1_000, 300.0), ("b", T0, 50.0), ("c", T0, 10.0)]
    rows += [("a", T0 + 60_000, 40.0)]  # the next minute: z1 alone
    out = run(agg, [frame(rows, "power")])
    kpis = out.filter(pl.col("metric") != "power")
    got = sorted(kpis.select("key", "metric", "window_start_ms", "value").rows())
    assert got == [
        ("zone=z1", "headroom", T0 + 60_000, 1000 / (40.0 - 300)),
        ("zone=z1", "power_per_device", T0, 125.0),  # (200 + 50) / 2
        ("zone=z1", "power_per_device", T0 + 60_000, 40.0),
        ("zone=z2", "headroom", T0, 1000 / (10.0 - 300)),
        ("zone=z2", "power_per_device", T0, 10.0),
    ]
    assert kpis.get_column("avg").null_count() == kpis.height  # KPI rows carry no statistics
    stats = out.filter(pl.col("metric") == "power")
    assert stats.get_column("value").null_count() == stats.height
    wide = to_wide(out).filter(pl.col("window_start_ms") == T0).sort("key")
    assert wide.get_column("power_per_device").to_list() == [125.0, 10.0]


def test_kpis_leave_the_state_fingerprint_alone() -> None:
    """Adding a KPI keeps a recovery store's window state usable (KPIs hold no state)."""
    plain = {"window": {"kind": "tumbling", "length": "1m"}, "stats": ["avg"]}
    with_kpi = {**plain, "kpis": {"double": "t_avg * 2"}}
    one, other = Aggregation.model_validate(plain), Aggregation.model_validate(with_kpi)
    assert one.fingerprint == other.fingerprint
    other.build(one.build(None).snapshot())


def test_rollups_merge_minutes_into_hours() -> None:
    decl = {
        "window": {"kind": "tumbling", "length": "1m"},
        "rollups": ["1h"],
        "stats": ["count", "avg", "min", "max", "variance", "p50", "first", "last"],
    }
    agg = build(decl)
    values = [float(v) for v in range(1, 181)]  # 180 readings, 3 per minute for an hour
    rows = [("d", T0 + i * 20_000, v) for i, v in enumerate(values)]
    out = run(agg, [frame(rows[:100]), frame(rows[100:])])
    hour = out.filter(pl.col("window_end_ms") - pl.col("window_start_ms") == 3_600_000)
    minute = out.filter(pl.col("window_end_ms") - pl.col("window_start_ms") == 60_000)
    assert minute.height == 60
    (row,) = hour.iter_rows(named=True)
    assert (row["count"], row["min"], row["max"], row["first"], row["last"]) == (
        180,
        1.0,
        180.0,
        1.0,
        180.0,
    )
    assert row["avg"] == pytest.approx(np.mean(values))
    assert row["variance"] == pytest.approx(np.var(values, ddof=1))
    exact_median = sorted(values)[math.floor(0.5 * 179)]
    assert abs(row["p50"] - exact_median) <= RELATIVE_ACCURACY * exact_median


def test_units_are_converted_before_aggregation() -> None:
    agg = build(
        {
            "window": {"kind": "tumbling", "length": "1m"},
            "stats": ["avg"],
            "units": {"t": {"from": "degF", "to": "degC"}},
        }
    )
    out = run(agg, [frame([("d", T0, 212.0), ("d", T0 + 1, 32.0)])])
    assert out.get_column("avg").to_list() == [pytest.approx(50.0)]


def test_nulls_are_absent_values_and_other_metrics_are_kept() -> None:
    agg = build({"window": {"kind": "tumbling", "length": "1m"}, "stats": ["sum"]})
    batch = pl.DataFrame(
        {"device_id": ["d", "d"], "ts_ms": [T0, T0 + 1], "t": [1.0, None], "h": [None, 5.0]}
    )
    out = run(agg, [batch])
    assert sorted(out.select("metric", "count", "sum").rows()) == [("h", 1, 5.0), ("t", 1, 1.0)]


@pytest.mark.parametrize(
    ("decl", "words"),
    [
        (
            {"window": {"kind": "sliding", "length": "60s", "step": "90s"}},
            "step 0:01:30 exceeds length",
        ),
        ({"window": {"kind": "sliding", "length": "60s", "step": "25s"}}, "not a multiple"),
        ({"window": {"kind": "tumbling", "length": "0s"}}, "at least 1ms"),
        ({"window": {"kind": "hopping", "length": "1m"}}, "hopping"),
        ({"window": {"kind": "tumbling", "length": "5 minutes"}}, "not understood"),
        (
            {"window": {"kind": "tumbling", "length": "1m"}, "stats": ["p100x"]},
            "unknown statistic 'p100x'",
        ),
        ({"window": {"kind": "tumbling", "length": "1m"}, "rollups": ["90s"]}, "multiple of"),
        ({"window": {"kind": "session", "gap": "1m"}, "rollups": ["1h"]}, "tumbling"),
        (
            {"window": {"kind": "tumbling", "length": "1m"}, "group_by": [["device", "zone"]]},
            "stands alone",
        ),
        (
            {
                "window": {"kind": "tumbling", "length": "1m"},
                "units": {"t": {"from": "W", "to": "degC"}},
            },
            "cannot convert W",
        ),
        (
            {"window": {"kind": "tumbling", "length": "1m"}, "allowed_lateness": "-5s"},
            "zero or positive",
        ),
        (
            {"window": {"kind": "tumbling", "length": "1m"}, "kpis": {"hot": "t_avg > 30"}},
            "KPI 'hot' is a condition",
        ),
        (
            {"window": {"kind": "tumbling", "length": "1m"}, "kpis": {"k": "t_p95 * 2"}},
            "KPI 'k' reads 't_p95'",
        ),
        (
            {
                "window": {"kind": "tumbling", "length": "1m"},
                "metrics": ["t"],
                "kpis": {"t": "t_avg * 2"},
            },
            "KPI name 't' must be a plain name",
        ),
        (
            {"window": {"kind": "tumbling", "length": "1m"}, "kpis": {"k": "t_avg.real"}},
            "attribute access",
        ),
    ],
)
def test_bad_declarations_fail_at_load_naming_the_problem(decl: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        Aggregation.model_validate(decl)


def test_state_from_another_definition_is_refused() -> None:
    one = Aggregation.model_validate({"window": {"kind": "tumbling", "length": "1m"}})
    other = Aggregation.model_validate({"window": {"kind": "tumbling", "length": "2m"}})
    state = one.build(None).snapshot()
    with pytest.raises(ConfigError, match="another aggregation definition"):
        other.build(state)


def test_yaml_and_dict_declarations_are_the_same_model(tmp_path) -> None:
    import yaml

    text = """
window: {kind: sliding, length: 5m, step: 1m}
stats: [avg, p95]
group_by: [[device], [zone]]
"""
    decl = Aggregation.model_validate(yaml.safe_load(text))
    assert decl.window.length == timedelta(minutes=5)
    assert decl.model_dump(mode="json")["window"] == {
        "kind": "sliding",
        "length": "5m",
        "step": "1m",
    }


# -- invariants ----------------------------------------------------------------

readings = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 300_000),
        st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: round(v, 3)),
    ),
    min_size=1,
    max_size=60,
)
WINDOWS = [
    {"kind": "tumbling", "length": "1m"},
    {"kind": "sliding", "length": "1m", "step": "20s"},
    {"kind": "session", "gap": "45s"},
]
STATS = ["sum", "min", "max", "first", "last", "variance", "p50", "distinct", "device_count"]


def same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """The same rows in any order; floats equal up to summation-order rounding."""
    assert got.height == want.height
    if got.height == 0:
        return
    keys = ["group_by", "key", "metric", "window_start_ms", "window_end_ms"]
    got, want = got.sort(keys), want.sort(keys)
    for a, b in zip(got.iter_rows(named=True), want.iter_rows(named=True), strict=True):
        for name, value in a.items():
            if isinstance(value, float):
                assert math.isclose(value, b[name], rel_tol=1e-9, abs_tol=1e-9), (name, a, b)
            else:
                assert value == b[name], (name, a, b)


@settings(max_examples=30, deadline=None)
@given(readings, st.integers(1, 5), st.sampled_from(WINDOWS), st.randoms())
def test_results_do_not_depend_on_batching_or_order_within_lateness(
    rows: list, parts: int, window: dict, rnd
) -> None:
    decl = {
        "window": window,
        "stats": STATS,
        "group_by": [["device"], ["zone"]],
        "allowed_lateness": "10m",
    }
    dims = {"a": {"zone": "z"}, "b": {"zone": "z"}, "c": {"zone": "y"}}
    rows = [(d, T0 + ts, v) for d, ts, v in rows]
    whole = run(build(decl, dims), [frame(rows)])
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    cuts = sorted(rnd.sample(range(1, len(rows)), min(parts, len(rows) - 1)))
    bounds = [0, *cuts, len(rows)]
    batches = [frame(shuffled[i:j]) for i, j in itertools.pairwise(bounds)]
    same(run(build(decl, dims), batches), whole)
    # every reading counted exactly once in per-device tumbling windows
    if window["kind"] == "tumbling":
        devices = whole.filter(pl.col("group_by") == "device")
        assert devices.get_column("count").sum() == len(rows)


@settings(max_examples=20, deadline=None)
@given(readings, st.integers(1, 59), st.sampled_from(WINDOWS))
def test_snapshot_and_resume_mid_stream_equals_an_uninterrupted_run(
    rows: list, cut: int, window: dict
) -> None:
    decl = {
        "window": window,
        "stats": STATS,
        "rollups": ["5m"] if window["kind"] == "tumbling" else [],
    }
    rows = sorted((d, T0 + ts, v) for d, ts, v in rows)
    rows.sort(key=lambda r: r[1])
    cut = min(cut, len(rows))
    whole = run(
        build(decl), [frame(rows[:cut]), frame(rows[cut:])] if rows[cut:] else [frame(rows)]
    )
    spec = Aggregation.model_validate(decl)
    first = spec.build(None, now=Clock())
    emits = first.on_batch(frame(rows[:cut]))
    resumed = spec.build(first.snapshot(), now=Clock())
    if rows[cut:]:
        emits.extend(resumed.on_batch(frame(rows[cut:])))
    emits.extend(resumed.on_eof())
    same(results(emits), whole)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300), st.integers(1, 6))
def test_sketch_percentiles_stay_within_the_documented_bound_after_merges(
    values: list, parts: int
) -> None:
    decl = {
        "window": {"kind": "tumbling", "length": "1m"},
        "rollups": ["1h"],
        "stats": ["p50", "p95", "p99"],
    }
    rows = [("d", T0 + (i * 3_599_000) // len(values), v) for i, v in enumerate(values)]
    size = max(1, len(rows) // parts)
    out = run(build(decl), [frame(rows[i : i + size]) for i in range(0, len(rows), size)])
    hour = out.filter(pl.col("window_end_ms") - pl.col("window_start_ms") == 3_600_000).row(
        0, named=True
    )
    ordered = sorted(values)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = ordered[math.floor(q * (len(ordered) - 1))]
        assert abs(hour[name] - exact) <= RELATIVE_ACCURACY * abs(exact) + 1e-9, (name, exact)
