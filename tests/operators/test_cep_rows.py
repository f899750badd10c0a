"""The per-reading CEP path (edge gateways): same results as the columnar engine, no polars."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotflow.errors import ConfigError
from iotflow.events import Detection, Reading, from_ms
from operators.cep import CepEngine, CommandRequest
from operators.cep_lean import LeanPatternSet, load_patterns
from operators.cep_patterns import PatternSet
from operators.cep_rows import SUPPORTED_KINDS, RejectedEvent, RowEngine

T0 = 1_767_225_600_000


def clock(ms: int) -> Any:
    return lambda: from_ms(ms)


def test_edge_process_imports_neither_polars_nor_numpy() -> None:
    code = (
        "import sys, operators.cep_rows, operators.windows, connectors.decode;"
        "print(sorted(m for m in ('numpy', 'polars', 'duckdb') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_kinds_that_need_more_than_a_keys_past_are_refused_with_the_fix() -> None:
    ps = PatternSet.from_dict(
        [
            {"name": "ok", "kind": "threshold", "condition": "t > 1"},
            {"name": "seq", "kind": "sequence", "steps": [{"name": "a", "where": "t > 1"}]},
        ]
    )
    with pytest.raises(
        ConfigError, match=r"pattern 'seq' is a sequence pattern; .*place it in the cloud"
    ):
        RowEngine(ps)
    after = PatternSet.from_dict(
        [{"name": "ack", "kind": "absence", "within": "5s", "after": "cmd > 0"}]
    )
    with pytest.raises(ConfigError, match="absence pattern with 'after'"):
        RowEngine(after)
    assert {"threshold", "rate", "absence"} == SUPPORTED_KINDS


def test_late_future_and_incomplete_events_are_rejected_and_counted() -> None:
    ps = PatternSet.from_dict([{"name": "hot", "kind": "threshold", "condition": "t > 30"}])
    engine = RowEngine(ps, now=clock(T0))
    out = engine.on_batch(
        [
            {"device_id": "a", "ts_ms": T0, "t": 31.0},
            {"device_id": "a", "ts_ms": T0 - 1, "t": 40.0},  # older than a's previous
            {"device_id": "b", "ts_ms": T0 + 2 * 3600_000, "t": 40.0},  # beyond the 1 h skew
            {"device_id": None, "ts_ms": T0, "t": 40.0},
            {"device_id": "c", "ts_ms": "soon", "t": 40.0},
        ]
    )
    rejected = [o for o in out if isinstance(o, RejectedEvent)]
    assert [(r.reason, r.row.get("device_id")) for r in rejected] == [
        ("late", "a"),
        ("future", "b"),
        ("incomplete", None),
        ("incomplete", "c"),
    ]
    assert rejected[0].boundary_ms == T0
    assert [d.key for d in out if isinstance(d, Detection)] == ["a"]
    stats = engine.stats()
    assert (stats["rows"], stats["late"], stats["future"], stats["incomplete"]) == (5, 1, 1, 2)
    assert stats["patterns"]["hot"]["detections"] == 1


def test_missing_and_nan_values_are_null() -> None:
    ps = PatternSet.from_dict(
        [{"name": "hot", "kind": "threshold", "condition": "t > 30", "times": 2}]
    )
    engine = RowEngine(ps, now=clock(T0))
    out = engine.on_readings(
        [
            Reading("a", T0, {"t": 31.0}),
            Reading("a", T0 + 1, {"h": 1.0}),  # no t: invisible, the run goes on
            Reading("a", T0 + 2, {"t": math.nan}),  # NaN counts as missing
            Reading("a", T0 + 3, {"t": 35.0}),
        ]
    )
    assert [(d.key, d.details["events_ts_ms"]) for d in out] == [("a", [T0, T0 + 3])]


def test_heartbeat_fires_on_the_clock_and_snapshot_resumes() -> None:
    ps = PatternSet.from_dict([{"name": "quiet", "kind": "absence", "within": "10s"}])
    now = [T0]
    engine = RowEngine(ps, now=lambda: from_ms(now[0]))
    assert engine.on_readings([Reading("a", T0, {"t": 1.0})]) == []
    assert engine.next_timer() == from_ms(T0 + 10_000)
    state = engine.snapshot()
    resumed = RowEngine(ps, state, now=lambda: from_ms(now[0]))
    now[0] = T0 + 10_000
    fired = resumed.on_timer()
    assert [(d.rule, d.key, d.ts) for d in fired] == [("quiet", "a", from_ms(T0 + 10_000))]
    assert resumed.on_timer() == []  # once per silence
    other = PatternSet.from_dict([{"name": "quiet", "kind": "absence", "within": "20s"}])
    with pytest.raises(ConfigError, match="made by other pattern definitions"):
        RowEngine(other, state)


# -- agreement with the columnar engine --------------------------------------------------

_PATTERNS = st.sampled_from(
    [
        {"name": "p", "kind": "threshold", "condition": "a > 0", "times": 1},
        {"name": "p", "kind": "threshold", "condition": "a > 0 and b < 5", "times": 2},
        {"name": "p", "kind": "threshold", "condition": "a > 0", "times": 3, "value": "a * 2"},
        {
            "name": "p",
            "kind": "threshold",
            "condition": "a > 0",
            "times": 2,
            "after_match": "no_skip",
        },
        {"name": "p", "kind": "rate", "value": "a", "exceeds": 1.0, "per": "1s"},
        {
            "name": "p",
            "kind": "rate",
            "value": "a",
            "exceeds": 2.0,
            "per": "1s",
            "direction": "either",
        },
        {
            "name": "p",
            "kind": "rate",
            "value": "a + b",
            "exceeds": 0.5,
            "per": "1s",
            "direction": "falls",
        },
        {"name": "p", "kind": "absence", "within": "3s"},
        {"name": "p", "kind": "absence", "within": "2s", "expect": "a > 0"},
    ]
)
_VALUE = st.one_of(
    st.none(), st.just(math.nan), st.floats(min_value=-10, max_value=10, allow_nan=False)
)


@st.composite
def timeline(draw: st.DrawFn) -> list[tuple[str, int, float | None, float | None]]:
    """Readings in time order (ties allowed) from a few keys."""
    n = draw(st.integers(1, 40))
    ts, rows = T0, []
    for _ in range(n):
        ts += draw(st.sampled_from([0, 500, 1000, 2500, 4000]))
        rows.append((draw(st.sampled_from(["k1", "k2", "k3"])), ts, draw(_VALUE), draw(_VALUE)))
    return rows


def _frame(rows: list[tuple[str, int, float | None, float | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "device_id": [r[0] for r in rows],
            "ts_ms": [r[1] for r in rows],
            "a": [r[2] for r in rows],
            "b": [r[3] for r in rows],
        },
        schema={"device_id": pl.Utf8, "ts_ms": pl.Int64, "a": pl.Float64, "b": pl.Float64},
    )


def _readings(rows: list[tuple[str, int, float | None, float | None]]) -> list[Reading]:
    out = []
    for key, ts, a, b in rows:
        metrics = {n: v for n, v in (("a", a), ("b", b)) if v is not None}
        out.append(Reading(key, ts, metrics))
    return out


def _canon(items: list[Any]) -> list[str]:
    keep = [i for i in items if isinstance(i, Detection | CommandRequest)]
    return sorted(repr(i) for i in keep)


@settings(max_examples=250, deadline=None)
@given(_PATTERNS, timeline(), st.integers(1, 7))
def test_row_engine_and_columnar_engine_agree_on_time_ordered_input(
    pattern: dict[str, Any], rows: list[Any], chunk: int
) -> None:
    declared = {**pattern, "actions": [{"type": "detect"}, {"type": "command", "name": "act"}]}
    data = {"patterns": [declared], "max_future_skew": None}
    ps = PatternSet.from_dict(data)
    mirror = load_patterns(data)  # what an edge gateway runs: the msgspec mirror, no pydantic
    assert isinstance(mirror, LeanPatternSet)
    now = clock(rows[-1][1] + 60_000)
    columnar = CepEngine(ps, now=now, input="readings")
    per_row = RowEngine(ps, now=now)
    on_mirror = RowEngine(mirror, now=now)
    assert on_mirror.fingerprint == per_row.fingerprint
    got_columnar: list[Any] = []
    got_rows: list[Any] = []
    got_mirror: list[Any] = []
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        got_columnar += columnar.on_batch(_frame(part))
        got_rows += per_row.on_readings(_readings(part))
        got_mirror += on_mirror.on_readings(_readings(part))
    got_columnar += columnar.on_eof()
    got_rows += per_row.on_eof()
    got_mirror += on_mirror.on_eof()
    assert not [o for o in got_rows if isinstance(o, RejectedEvent)]
    assert _canon(got_rows) == _canon(got_columnar)
    assert got_mirror == got_rows


def test_lateness_holds_the_heartbeat_watermark_back_like_the_columnar_engine() -> None:
    ps = PatternSet.from_dict(
        {
            "patterns": [{"name": "quiet", "kind": "absence", "within": "5s"}],
            "allowed_lateness": "2s",
        }
    )
    engine = RowEngine(ps, now=clock(T0 + 7_000))
    engine.on_readings([Reading("a", T0, {"t": 1.0}), Reading("b", T0 + 6_000, {"t": 1.0})])
    assert engine.on_timer() == []  # watermark 4 s: a's silence (due at 5 s) not yet
    assert engine.next_timer() == from_ms(T0 + 7_000 + 1_000)
    assert engine.watermark_ms() == T0 + 4_000
