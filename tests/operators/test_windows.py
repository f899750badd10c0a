"""Tumbling windows: hand-computed results, boundaries, watermark, lateness, recovery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotflow.errors import ConfigError
from iotflow.events import Reading, WindowResult
from operators.windows import LateReading, TumblingWindow

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z


class ManualClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def r(device: str, offset_ms: int, **metrics: float) -> Reading:
    return Reading(device, T0 + offset_ms, metrics)


def results(emits: list) -> list[WindowResult]:
    return [e for e in emits if isinstance(e, WindowResult)]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))


def test_window_closes_when_watermark_passes_end(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10)).build(None, clock)
    assert agg.on_batch([r("d", 1_000, t=20.0), r("d", 5_000, t=22.0), r("d", 9_999, t=27.0)]) == []
    out = results(agg.on_batch([r("d", 10_000, t=1.0)]))
    assert len(out) == 1
    w = out[0]
    assert (w.key, w.metric, w.count, w.sum, w.min, w.max) == ("d", "t", 3, 69.0, 20.0, 27.0)
    assert w.avg == pytest.approx(23.0)
    assert w.window_start == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert w.window_end == datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)


def test_event_exactly_at_window_end_belongs_to_next_window(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10), timedelta(seconds=5)).build(None, clock)
    agg.on_batch([r("d", 0, t=1.0), r("d", 10_000, t=2.0)])
    out = results(agg.on_eof())
    assert sorted((w.window_start, w.count) for w in out) == [
        (datetime(2026, 1, 1, 12, 0, tzinfo=UTC), 1),
        (datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC), 1),
    ]


def test_out_of_order_within_lateness_lands_in_its_window(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10), timedelta(seconds=5)).build(None, clock)
    agg.on_batch([r("d", 1_000, t=1.0), r("d", 12_000, t=5.0)])
    # watermark = 12s - 5s = 7s: the first window is still open
    assert agg.on_batch([r("d", 9_000, t=3.0)]) == []
    first = results(agg.on_batch([r("d", 15_000, t=6.0)]))  # watermark 10s closes [0, 10)
    assert [(w.count, w.sum) for w in first] == [(2, 4.0)]


def test_reading_exactly_at_lateness_limit_is_late(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10), timedelta(seconds=5)).build(None, clock)
    agg.on_batch([r("d", 15_000, t=1.0)])  # watermark 10s: [0, 10) closed
    emits = agg.on_batch([r("d", 9_999, t=2.0)])
    assert emits == [LateReading(r("d", 9_999, t=2.0), T0 + 10_000)]
    assert agg.late_count == 1
    # one millisecond inside the next window is on time
    assert agg.on_batch([r("d", 10_000, t=3.0)]) == []


def test_quiet_stream_closes_windows_by_wall_clock(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10), timedelta(seconds=2)).build(None, clock)
    agg.on_batch([r("d", 3_000, t=1.0)])
    # watermark is 1s; the window ends at 10s: 9 s of quiet are needed
    assert agg.next_timer() == clock.now + timedelta(seconds=9)
    clock.advance(8.9)
    assert agg.on_timer() == []
    clock.advance(0.1)
    assert [w.count for w in results(agg.on_timer())] == [1]
    assert agg.next_timer() is None


def test_watermark_never_goes_backwards(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10)).build(None, clock)
    agg.on_batch([r("d", 20_000, t=1.0)])
    before = agg.watermark_ms()
    agg.on_batch([r("d", 1_000, t=1.0)])
    assert agg.watermark_ms() == before


def test_separate_devices_and_metrics(clock: ManualClock) -> None:
    agg = TumblingWindow(timedelta(seconds=10)).build(None, clock)
    agg.on_batch([r("a", 0, t=1.0, h=50.0), r("b", 1, t=3.0)])
    out = {(w.key, w.metric): w.count for w in agg.on_eof()}
    assert out == {("a", "t"): 1, ("a", "h"): 1, ("b", "t"): 1}


def test_align_to_shifts_boundaries(clock: ManualClock) -> None:
    align = datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)
    agg = TumblingWindow(timedelta(seconds=10), align_to=align).build(None, clock)
    emits = agg.on_batch([r("d", 2_000, t=1.0), r("d", 3_000, t=2.0)]) + agg.on_eof()
    starts = sorted(w.window_start.second for w in results(emits))
    assert starts == [3, 53]


def test_snapshot_restores_and_refuses_other_definition(clock: ManualClock) -> None:
    window = TumblingWindow(timedelta(seconds=10))
    agg = window.build(None, clock)
    agg.on_batch([r("d", 1_000, t=1.0)])
    state = agg.snapshot()
    agg.on_batch([r("d", 2_000, t=100.0)])  # the snapshot must not see this
    resumed = window.build(state, clock)
    resumed.on_batch([r("d", 2_000, t=3.0)])
    assert [(w.count, w.sum) for w in resumed.on_eof()] == [(2, 4.0)]
    with pytest.raises(ConfigError, match="another window definition"):
        TumblingWindow(timedelta(seconds=60)).build(state, clock)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": timedelta(0)}, "must be positive"),
        (
            {"length": timedelta(seconds=1), "allowed_lateness": timedelta(seconds=-1)},
            "zero or positive",
        ),
        ({"length": timedelta(seconds=1), "align_to": datetime(2026, 1, 1)}, "aware UTC"),
    ],
)
def test_bad_definitions_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TumblingWindow(**kwargs)


readings_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=120_000),
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    ),
    min_size=1,
    max_size=200,
)


@given(readings_strategy, st.integers(min_value=1, max_value=50))
@settings(max_examples=150, deadline=None)
def test_each_reading_counted_in_exactly_one_window_or_late(rows: list, batch_size: int) -> None:
    clock = ManualClock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    agg = TumblingWindow(timedelta(seconds=10), timedelta(seconds=3)).build(None, clock)
    emits = []
    readings = [r(d, ts, v=v) for d, ts, v in rows]
    for i in range(0, len(readings), batch_size):
        emits += agg.on_batch(readings[i : i + batch_size])
    emits += agg.on_eof()
    late = [e for e in emits if isinstance(e, LateReading)]
    counted = sum(w.count for w in results(emits))
    assert counted + len(late) == len(readings)
    # a window is emitted once per (key, metric, start)
    keys = [(w.key, w.metric, w.window_start) for w in results(emits)]
    assert len(keys) == len(set(keys))


@given(readings_strategy, st.randoms(use_true_random=False))
@settings(max_examples=100, deadline=None)
def test_result_does_not_depend_on_order_within_lateness(rows: list, rnd) -> None:
    clock = ManualClock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    # lateness covering the whole span: no reading can be late, whatever the order
    window = TumblingWindow(timedelta(seconds=10), timedelta(seconds=200))
    readings = [r(d, ts, v=v) for d, ts, v in rows]
    shuffled = readings[:]
    rnd.shuffle(shuffled)

    def run(items: list[Reading]) -> dict:
        agg = window.build(None, clock)
        emits = agg.on_batch(items) + agg.on_eof()
        return {(w.key, w.window_start): (w.count, w.min, w.max) for w in results(emits)}

    assert run(readings) == run(shuffled)
