"""The CEP engine: pattern detection over columnar batches, as pure logic (no Bytewax import).

``PatternSet.build(resume_state, now, input=..., dimensions=...)`` (or
``CepEngine(...)``) gives a ``CepEngine`` for the patterns of one input. It
takes polars frames a batch at a time and returns detections, action
requests, timed-out partial matches and rejected rows, in this vocabulary:
``on_batch(frame)``, ``on_timer()``, ``on_eof()``, ``next_timer()``, ``snapshot()``.

Time
----
Event time. The watermark is the largest event time seen minus
``allowed_lateness``, advanced by the injected clock while the stream is
quiet (as in ``operators.windows``); it never goes backwards. Events wait in a
buffer until the watermark passes them and are then processed in event-time
order (ties: arrival order), so out-of-order input within the lateness is
handled as if it had arrived in order. An event older than what was already
processed is *late*; one stamped more than ``max_future_skew`` ahead of the
clock is *future*; one with no key or time is *incomplete*: each goes to the
rejected output (``RejectedRows``), counted, never silently dropped. Timers
(``within`` limits, silences) fire when the watermark reaches them; an event
exactly at a deadline is too late for it (Flink's rule: a match needs
``last - first < within``).

End of input: the watermark jumps to +infinity (Flink's final watermark):
every buffered event is processed, every deadline fires (sequences waiting
for a step time out, ``not_followed_by`` sequences complete, silent keys are
reported), and partial matches with no ``within`` go to the timed-out output
with reason ``end_of_input``. The stored watermark itself stays where the
data put it.

Semantics per kind (``key`` is the input's key column)
--------------------------------------------------------
An event for which all of a pattern's conditions are null (it carries none
of the columns the pattern reads, or they are NaN) is invisible to that
pattern: it neither matches nor breaks a run.

* ``threshold``: counts consecutive events of a key whose ``condition``
  holds; a false one resets the count. On the ``windows`` input a gap
  (``window_start`` != the previous ``window_end``) also resets it. Detects
  when the count reaches ``times``; then ``skip_past_last_event`` restarts the
  count (detections at N, 2N, ...), ``no_skip`` detects every further event.
  With ``times: 1`` the order of events cannot matter, so such a pattern is
  *instant*: each event whose condition holds is a detection as soon as it
  arrives, without waiting for the watermark, and an event late for the
  other patterns still counts for it (it is still rejected for them). Instant
  detections of a batch come before the ones the watermark released.
* ``range``: for each event, the values of the key's events less than
  ``within`` before it (and it); detects when ``max - min > exceeds``.
  Edge-triggered: one detection per excursion; it re-arms once an event sees
  the range back at or below ``exceeds``.
* ``rate``: the slope between consecutive events of a key, scaled to ``per``;
  detects when it exceeds ``exceeds`` in ``direction``. Edge-triggered like
  ``range``; an event with the same time as the previous one has no slope.
* ``sequence``: Flink CEP's NFA, see below.
* ``absence`` without ``after``: once a key's last (``expect``-matching) event is
  ``within`` old, one detection at that time; the next event re-arms it.
  Keys never seen are never reported. With ``after``: the sequence
  ``after`` then ``not_followed_by expect`` ``within`` (each ``after`` event gets
  its own deadline).
* ``correlation``: keys are mapped to a group by the ``group_by`` dimension
  or grouping set (``operators.groups``); detects when ``min_keys`` distinct
  keys of a group have a matching event less than ``within`` apart (the
  detection's key is the group). After a detection the group starts afresh
  (skip past last event). Events of keys without every dimension are counted
  (``ungrouped``) and ignored.

Sequences
---------
Each event of a key matching the first step starts a partial match; a
partial match takes events in order. ``next`` (strict contiguity) requires
the key's very next visible event to match, ``followed_by`` (relaxed) skips
events that do not match. Quantifiers are greedy and deterministic: a
looping step (``times`` > 1, ``one_or_more``) keeps taking matching events
before the next step is tried; an ``optional`` step is skipped when the event
matches the step after it, and one that took events but is short of its
``times`` is dropped from the match (as if skipped) when the next step matches. A match is emitted as soon as every required step
has its count (a trailing ``one_or_more`` or ``optional`` step is not waited
for). ``not_next``/``not_followed_by`` between steps discard the partial match
when such an event comes next / before the following step; a final
``not_followed_by`` completes the match when ``within`` runs out without one.
Partial matches that run out of time (``within``) go to the timed-out output
(``TimedOutMatch``); discarded ones are counted.

After-match skip strategy (``after_match``): ``skip_past_last_event`` (the
default) discards every partial match of the key that started at or before
the match's last event, so matches never overlap; when several complete on
the same event, the one that started first is emitted. ``no_skip`` emits every
completed partial match.

Example::

    >>> from operators.cep_patterns import PatternSet
    >>> ps = PatternSet.from_dict([{"name": "hot", "kind": "threshold",
    ...                             "condition": "t > 30", "times": 2}])
    >>> engine = ps.build(None, now=lambda: from_ms(0), input="readings")
    >>> frame = pl.DataFrame({"device_id": ["d", "d", "d"], "ts_ms": [1000, 2000, 3000],
    ...                       "t": [31.0, 32.0, 20.0]})
    >>> [(d.rule, d.key, d.details["events_ts_ms"]) for d in engine.on_batch(frame)]
    [('hot', 'd', [1000, 2000])]
"""

from __future__ import annotations

import copy
import heapq
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import polars.selectors as cs

from iotflow.errors import ConfigError
from iotflow.events import Detection, from_ms, to_ms
from operators.cep_actions import CommandRequest, TimedOutMatch, TwinUpdate, expand_actions
from operators.cep_patterns import (
    AbsencePattern,
    CorrelationPattern,
    InputSpec,
    Pattern,
    PatternSet,
    RangePattern,
    RatePattern,
    SequencePattern,
    Step,
    ThresholdPattern,
)
from operators.expr import Expr

__all__ = [
    "CepEmit",
    "CepEngine",
    "CommandRequest",
    "RejectedRows",
    "TimedOutMatch",
    "TwinUpdate",
]

log = logging.getLogger(__name__)

KEY, KID, TS, SEQ, START = "__key", "__kid", "__ts", "__seq", "__start"
_INF = 2**62  # "+infinity" in epoch ms: the final watermark at end of input


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- outputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectedRows:
    """Input rows the engine did not process, with why: ``late``, ``future`` or ``incomplete``.

    ``boundary_ms`` is the processed-up-to time then (late rows are older).
    """

    reason: str
    rows: pl.DataFrame
    boundary_ms: int | None


CepEmit = Detection | CommandRequest | TwinUpdate | TimedOutMatch | RejectedRows


def _frame_state(df: pl.DataFrame) -> dict[str, list[Any]]:
    return df.to_dict(as_series=False)


def _frame_restore(data: dict[str, list[Any]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=schema)


# -- the pattern kinds ------------------------------------------------------------------


class _Kind:
    """Logic of one pattern over released frames (sorted by time, then arrival)."""

    def __init__(self, pattern: Any, slot: str, stats: dict[str, int]) -> None:
        self.p = pattern
        self.slot = slot
        self.stats = stats
        self.keys: list[str] = []  # key id -> key, shared with the engine

    def col(self, local: str) -> str:
        return f"{self.slot}.{local}"

    def columns(self) -> dict[str, pl.Expr]:
        """The derived columns evaluated at intake (name -> polars expression)."""
        out: dict[str, pl.Expr] = {}
        for local, expr in self.p.conditions().items():
            kind = pl.Boolean if expr.is_condition else pl.Float64
            compiled = expr.to_polars(nan_as_null=False).cast(kind)
            if kind == pl.Float64:  # a NaN computed from valid inputs counts as missing too
                compiled = compiled.fill_nan(None)
            out[self.col(local)] = compiled
        return out

    def schema(self) -> dict[str, pl.DataType]:
        return {
            self.col(local): (pl.Boolean if e.is_condition else pl.Float64)
            for local, e in self.p.conditions().items()
        }

    def detection(self, key: str, ts_ms: int, **kw: Any) -> Detection:
        self.stats["detections"] += 1
        return Detection(rule=self.p.name, key=key, ts=from_ms(ts_ms), **kw)

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        raise NotImplementedError

    def advance(self, boundary: int) -> list[Any]:
        return []

    def end_of_input(self) -> list[Any]:
        return []

    def next_deadline(self) -> int | None:
        return None

    def snapshot(self) -> Any:
        raise NotImplementedError

    def restore(self, state: Any) -> None:
        raise NotImplementedError


class _Instant(_Kind):
    """A threshold of one event (``times: 1``): a detection per event whose condition
    holds, whatever the order; no state."""

    p: ThresholdPattern

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        value_col = self.col("value") if self.p.value is not None else None
        value = pl.col(value_col) if value_col else pl.lit(None, pl.Float64)
        hits = (
            frame.lazy()
            .filter(pl.col(self.col("cond")))
            .sort(TS, SEQ)
            .select(KEY, TS, value.alias("_value"))
            .collect()
        )
        return [
            self.detection(key, ts, value=v, details={"times": 1, "events_ts_ms": [ts]})
            for key, ts, v in hits.iter_rows()
        ]

    def snapshot(self) -> Any:
        return {}

    def restore(self, state: Any) -> None:
        pass  # stateless (a state of the ordered threshold from before is moot)


class _Threshold(_Kind):
    p: ThresholdPattern

    def __init__(self, pattern: ThresholdPattern, slot: str, stats: dict[str, int]) -> None:
        super().__init__(pattern, slot, stats)
        # key -> [count, last end (or time) ms, times of the counted events]
        self.runs: dict[str, list[Any]] = {}

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        c = pl.col(self.col("cond"))
        # a false event matters only to a key with a run to break: one that had a
        # run before this batch or has a true event in it
        keys = frame.filter(c)[KEY]
        if self.runs:
            keys = pl.concat([keys, pl.Series(KEY, list(self.runs), dtype=pl.Utf8)])
        mask = c.is_not_null() & pl.col(KEY).is_in(keys.unique().implode())
        has_start = START in frame.columns
        value_col = self.col("value") if self.p.value is not None else None
        cols = [
            pl.col(KEY),
            pl.col(TS),
            pl.col(self.col("cond")),
            pl.col(START) if has_start else pl.lit(None, pl.Int64).alias("_start"),
            pl.col(value_col) if value_col else pl.lit(None, pl.Float64).alias("_value"),
        ]
        n, strategy_no_skip = self.p.times, self.p.after_match == "no_skip"
        out: list[Any] = []
        for key, ts, cond, start, value in frame.filter(mask).select(cols).iter_rows():
            if not cond:
                self.runs.pop(key, None)
                continue
            run = self.runs.get(key)
            if run is None or (has_start and start != run[1]):
                run = self.runs[key] = [0, ts, []]
            run[0] += 1
            run[1] = ts
            run[2].append(ts)
            if len(run[2]) > n:
                del run[2][0]
            if run[0] >= n:
                out.append(
                    self.detection(
                        key,
                        ts,
                        value=value if value_col else None,
                        details={"times": n, "events_ts_ms": list(run[2])},
                    )
                )
                if not strategy_no_skip:
                    run[0], run[2] = 0, []
        return out

    def snapshot(self) -> Any:
        return copy.deepcopy(self.runs)

    def restore(self, state: Any) -> None:
        self.runs = copy.deepcopy(state)


def _composite(kid: np.ndarray, ts: np.ndarray, gap_ms: int) -> np.ndarray | None:
    """One int64 per row ordered like (key id, time), keys at least ``gap_ms`` apart.

    None when the numbers would overflow (absurd time spans); callers fall back.
    """
    if len(ts) == 0:
        return np.zeros(0, dtype=np.int64)
    base, top = int(ts.min()), int(ts.max())
    width = top - base + gap_ms + 1
    if (int(kid.max()) + 1) * width >= 2**62:
        return None
    return kid.astype(np.int64) * width + (ts - base)


def _sparse_tables(values: np.ndarray, op: Any, longest: int) -> np.ndarray:
    """Row k holds op over each run of 2**k values, NaN-padded (O(1) range queries).

    Only the levels a query of ``longest`` values needs are built.
    """
    levels = max(1, int(longest).bit_length())
    n = len(values)
    table = np.full((levels, n), np.nan)
    table[0] = values
    for k in range(1, levels):
        half, width = 1 << (k - 1), n - (1 << k) + 1
        if width <= 0:
            break
        prev = table[k - 1]
        table[k, :width] = op(prev[:width], prev[half : half + width])
    return table


def _range_query(table: np.ndarray, lo: np.ndarray, hi: np.ndarray, op: Any) -> np.ndarray:
    """op over values[lo[i]..hi[i]] (inclusive) for every i; NaN where lo > hi."""
    length = hi - lo + 1
    valid = length > 0
    safe = np.where(valid, length, 1)
    k = np.frexp(safe.astype(np.float64))[1] - 1  # floor(log2(length)), exactly
    lo_c = np.where(valid, lo, 0)
    hi_c = np.where(valid, hi - (1 << k) + 1, 0)
    out = op(table[k, lo_c], table[k, hi_c])
    out[~valid] = np.nan
    return out


def _run_ends(values: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, the last position holding the same value."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    step = values[1:] != values[:-1]
    ends = np.append(np.flatnonzero(step), len(values) - 1)
    run = np.zeros(len(values), dtype=np.int64)
    run[1:] = np.cumsum(step)
    return ends[run]


class _Range(_Kind):
    p: RangePattern
    _FIELDS = ("kid", "ts", "v", "flag")

    def __init__(self, pattern: RangePattern, slot: str, stats: dict[str, int]) -> None:
        super().__init__(pattern, slot, stats)
        self.within_ms = round(pattern.within.total_seconds() * 1000)
        # the events that can still be the max or min of a later event's span, and
        # each key's latest event (its flag); a key's rows together, in time order.
        # numpy arrays: this runs over every tail row of every batch's keys
        self.kid = np.zeros(0, dtype=np.int64)
        self.ts = np.zeros(0, dtype=np.int64)
        self.v = np.zeros(0, dtype=np.float64)
        self.flag = np.zeros(0, dtype=bool)

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        col = self.col("value")
        batch = by_key().select(KID, TS, col).filter(pl.col(col).is_not_null())
        if batch.is_empty():
            return []
        b_kid, b_ts = batch[KID].to_numpy(), batch[TS].to_numpy()
        b_v = batch[col].to_numpy()
        # only the tail of keys in this batch takes part; the rest stays as it is
        touched = np.isin(self.kid, np.unique(b_kid))
        rest = ~touched
        n_old = int(touched.sum())
        kid = np.concatenate([self.kid[touched], b_kid])
        ts = np.concatenate([self.ts[touched], b_ts])
        vals = np.concatenate([self.v[touched], b_v])
        stored = np.concatenate([self.flag[touched], np.zeros(len(b_kid), dtype=bool)])
        t = _composite(kid, ts, self.within_ms)
        if t is None:  # pragma: no cover - needs a span of ~10^12 years
            raise ConfigError(f"pattern {self.p.name!r}: event times span too far to compare")
        # no batch event is older than a tail event of its key, and the batch is in
        # (key, time, arrival) order: a stable sort keeps arrival order among ties
        order = np.argsort(t, kind="stable")
        t, kid, ts, vals, stored = t[order], kid[order], ts[order], vals[order], stored[order]
        old = order < n_old
        # the span of event j: its key's events in (ts_j - within, ts_j], same-time ones included
        lo_idx = np.searchsorted(t, t - self.within_ms, side="right")
        hi_idx = _run_ends(t)
        key_end = _run_ends(kid)
        index = np.arange(len(t))
        longest = int(max((hi_idx - lo_idx).max(), (key_end - index).max())) + 1
        maxes = _sparse_tables(vals, np.maximum, longest)
        mins = _sparse_tables(vals, np.minimum, longest)
        top = _range_query(maxes, lo_idx, hi_idx, np.maximum)
        bottom = _range_query(mins, lo_idx, hi_idx, np.minimum)
        flag = np.where(old, stored, (top - bottom) > self.p.exceeds)
        prev = np.zeros(len(t), dtype=bool)
        prev[1:] = flag[:-1] & (kid[1:] == kid[:-1])
        out: list[Any] = []
        x = self.p.exceeds
        for j in np.flatnonzero(~old & flag & ~prev).tolist():
            hi, lo = float(top[j]), float(bottom[j])
            window = slice(int(lo_idx[j]), int(hi_idx[j]) + 1)
            span_ts, span_v = ts[window], vals[window]
            out.append(
                self.detection(
                    self.keys[int(kid[j])],
                    int(ts[j]),
                    value=hi - lo,
                    score=(hi - lo) / x if x else None,
                    details={
                        "max": hi,
                        "min": lo,
                        "max_ts_ms": int(span_ts[np.flatnonzero(span_v == hi)[-1]]),
                        "min_ts_ms": int(span_ts[np.flatnonzero(span_v == lo)[-1]]),
                        "within_s": self.within_ms / 1000,
                    },
                )
            )
        out.sort(key=lambda d: (d.ts, d.key))
        # an event stays if no later event of its key is both >= and <= it
        later_hi = _range_query(maxes, index + 1, key_end, np.maximum)
        later_lo = _range_query(mins, index + 1, key_end, np.minimum)
        keep = np.isnan(later_hi) | (vals > later_hi) | (vals < later_lo)
        self.kid = np.concatenate([self.kid[rest], kid[keep]])
        self.ts = np.concatenate([self.ts[rest], ts[keep]])
        self.v = np.concatenate([self.v[rest], vals[keep]])
        self.flag = np.concatenate([self.flag[rest], flag[keep]])
        return out

    def advance(self, boundary: int) -> list[Any]:
        # every later event is at or after the boundary: older spans are over, but
        # each key's latest event stays, its flag decides whether the next one is an edge
        if len(self.kid):
            last = np.ones(len(self.kid), dtype=bool)
            last[:-1] = self.kid[:-1] != self.kid[1:]
            keep = (self.ts > boundary - self.within_ms) | last
            self.kid, self.ts = self.kid[keep], self.ts[keep]
            self.v, self.flag = self.v[keep], self.flag[keep]
        return []

    def snapshot(self) -> Any:
        return {name: getattr(self, name).tolist() for name in self._FIELDS}

    def restore(self, state: Any) -> None:
        self.kid = np.array(state["kid"], dtype=np.int64)
        self.ts = np.array(state["ts"], dtype=np.int64)
        self.v = np.array(state["v"], dtype=np.float64)
        self.flag = np.array(state["flag"], dtype=bool)


class _PerKey:
    """Dense per-key arrays indexed by key id (ids are small consecutive ints)."""

    def __init__(self, **dtypes: Any) -> None:
        self.arrays = {name: np.zeros(0, dtype=dtype) for name, dtype in dtypes.items()}

    def ensure(self, size: int) -> None:
        have = len(next(iter(self.arrays.values())))
        if size > have:
            grow = max(size, 2 * have) - have
            for name, arr in self.arrays.items():
                self.arrays[name] = np.concatenate([arr, np.zeros(grow, dtype=arr.dtype)])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def snapshot(self) -> dict[str, list[Any]]:
        return {name: arr.tolist() for name, arr in self.arrays.items()}

    def restore(self, state: dict[str, list[Any]]) -> None:
        self.arrays = {
            name: np.array(state[name], dtype=arr.dtype) for name, arr in self.arrays.items()
        }


def _first_rows(kid: np.ndarray) -> np.ndarray:
    first = np.ones(len(kid), dtype=bool)
    first[1:] = kid[1:] != kid[:-1]
    return first


def _last_rows(kid: np.ndarray) -> np.ndarray:
    last = np.ones(len(kid), dtype=bool)
    last[:-1] = kid[:-1] != kid[1:]
    return last


class _Rate(_Kind):
    p: RatePattern

    def __init__(self, pattern: RatePattern, slot: str, stats: dict[str, int]) -> None:
        super().__init__(pattern, slot, stats)
        self.per_ms = pattern.per.total_seconds() * 1000
        # each key's previous event and whether the rate was over the limit there
        self.last = _PerKey(seen=bool, ts=np.int64, v=np.float64, flag=bool)

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        col = self.col("value")
        batch = by_key().select(KID, TS, col).filter(pl.col(col).is_not_null())
        if batch.is_empty():
            return []
        kid, ts, v = batch[KID].to_numpy(), batch[TS].to_numpy(), batch[col].to_numpy()
        self.last.ensure(int(kid.max()) + 1)
        seen, s_ts, s_v, s_flag = (self.last[n] for n in ("seen", "ts", "v", "flag"))
        first = _first_rows(kid)
        head = kid[first]
        prev_ts, prev_v = np.empty_like(ts), np.empty_like(v)
        prev_ts[1:], prev_v[1:] = ts[:-1], v[:-1]
        prev_ts[first], prev_v[first] = s_ts[head], s_v[head]
        has_prev = np.ones(len(kid), dtype=bool)
        has_prev[first] = seen[head]
        dt = ts - prev_ts
        with np.errstate(all="ignore"):
            rate = np.where(
                has_prev & (dt > 0), (v - prev_v) / np.maximum(dt, 1) * self.per_ms, np.nan
            )
        defined = ~np.isnan(rate)  # an event at the previous one's time has no slope
        x = self.p.exceeds
        with np.errstate(invalid="ignore"):
            if self.p.direction == "rises":
                over = rate > x
            elif self.p.direction == "falls":
                over = rate < -x
            else:
                over = np.abs(rate) > x
        # without a slope an event keeps its key's state: forward-fill the flag, each
        # key's first row seeded with the stored flag
        seed = np.where(defined, over, False)
        seed[first & ~defined] = s_flag[kid[first & ~defined]]
        anchor = np.where(defined | first, np.arange(len(kid)), 0)
        filled = seed[np.maximum.accumulate(anchor)]
        prev_flag = np.empty_like(filled)
        prev_flag[1:] = filled[:-1]
        prev_flag[first] = s_flag[head]
        out = [
            self.detection(
                self.keys[int(kid[j])],
                int(ts[j]),
                value=float(rate[j]),
                baseline=float(prev_v[j]),
                score=abs(float(rate[j])) / x if x else None,
                details={
                    "from_ts_ms": int(prev_ts[j]),
                    "to_ts_ms": int(ts[j]),
                    "from": float(prev_v[j]),
                    "to": float(v[j]),
                    "per_s": self.per_ms / 1000,
                },
            )
            for j in np.flatnonzero(defined & over & ~prev_flag).tolist()
        ]
        out.sort(key=lambda d: (d.ts, d.key))
        last = _last_rows(kid)
        tail = kid[last]
        seen[tail], s_ts[tail], s_v[tail], s_flag[tail] = True, ts[last], v[last], filled[last]
        return out

    def snapshot(self) -> Any:
        return self.last.snapshot()

    def restore(self, state: Any) -> None:
        self.last.restore(state)


class _Heartbeat(_Kind):
    """``absence`` without ``after``: a key's silence."""

    p: AbsencePattern

    def __init__(self, pattern: AbsencePattern, slot: str, stats: dict[str, int]) -> None:
        super().__init__(pattern, slot, stats)
        self.within_ms = round(pattern.within.total_seconds() * 1000)
        # each key's last (expected) event, and whether its silence was reported
        self.last = _PerKey(seen=bool, ts=np.int64, fired=bool)
        self._deadline: int | None = None  # cached; -1: none

    def _silence(self, kid: int, last_ts: int) -> Detection:
        # the same whether the watermark or the key's next event revealed the silence
        details: dict[str, Any] = {"last_ts_ms": last_ts, "silence_s": self.within_ms / 1000}
        return self.detection(
            self.keys[kid], last_ts + self.within_ms, value=self.within_ms / 1000, details=details
        )

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        b = by_key()
        if self.p.expect is not None:
            b = b.filter(pl.col(self.col("expect")).fill_null(False))
        if b.is_empty():
            return []
        kid, ts = b[KID].to_numpy(), b[TS].to_numpy()
        self.last.ensure(int(kid.max()) + 1)
        seen, s_ts, fired = self.last["seen"], self.last["ts"], self.last["fired"]
        first = _first_rows(kid)
        head = kid[first]
        prev = np.empty_like(ts)
        prev[1:] = ts[:-1]
        prev[first] = s_ts[head]
        counts = np.ones(len(kid), dtype=bool)  # a gap that is not yet reported
        counts[first] = seen[head] & ~fired[head]
        gap = np.flatnonzero(counts & (ts - prev >= self.within_ms))
        gap = gap[np.lexsort((kid[gap], prev[gap]))]
        out = [self._silence(int(kid[j]), int(prev[j])) for j in gap.tolist()]
        last = _last_rows(kid)
        tail = kid[last]
        seen[tail], s_ts[tail], fired[tail] = True, ts[last], False
        self._deadline = None
        return out

    def advance(self, boundary: int) -> list[Any]:
        deadline = self.next_deadline()
        if deadline is None or deadline > boundary:
            return []
        seen, s_ts, fired = self.last["seen"], self.last["ts"], self.last["fired"]
        due = np.flatnonzero(seen & ~fired & (s_ts + self.within_ms <= boundary))
        due = due[np.lexsort((due, s_ts[due]))]
        fired[due] = True
        self._deadline = None
        return [self._silence(int(k), int(s_ts[k])) for k in due.tolist()]

    def next_deadline(self) -> int | None:
        if self._deadline is None:
            waiting = self.last["seen"] & ~self.last["fired"]
            oldest = self.last["ts"][waiting]
            self._deadline = int(oldest.min()) + self.within_ms if len(oldest) else -1
        return None if self._deadline == -1 else self._deadline

    def snapshot(self) -> Any:
        return self.last.snapshot()

    def restore(self, state: Any) -> None:
        self.last.restore(state)
        self._deadline = None


class _Correlation(_Kind):
    p: CorrelationPattern

    def __init__(
        self,
        pattern: CorrelationPattern,
        slot: str,
        stats: dict[str, int],
        groups: Mapping[str, str],
    ) -> None:
        super().__init__(pattern, slot, stats)
        self.within_ms = round(pattern.within.total_seconds() * 1000)
        self.groups = dict(groups)
        # group -> {key: time of its latest matching event}, oldest first
        self.recent: dict[str, dict[str, int]] = {}

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        matching = frame.filter(pl.col(self.col("cond")).fill_null(False))
        out: list[Any] = []
        need, within, groups = self.p.min_keys, self.within_ms, self.groups
        for key, ts in matching.select(KEY, TS).iter_rows():
            g = groups.get(key)
            if g is None:
                self.stats["ungrouped"] += 1
                continue
            recent = self.recent.setdefault(g, {})
            while recent:
                oldest_key = next(iter(recent))
                if ts - recent[oldest_key] < within:
                    break
                del recent[oldest_key]
            recent.pop(key, None)
            recent[key] = ts
            if len(recent) >= need:
                members = [{"key": k, "ts_ms": t} for k, t in recent.items()]
                out.append(
                    self.detection(
                        g,
                        ts,
                        value=float(len(recent)),
                        score=len(recent) / need,
                        details={"group_by": self.p.group_by, "keys": members},
                    )
                )
                recent.clear()
        return out

    def advance(self, boundary: int) -> list[Any]:
        for g in list(self.recent):  # forget what no later event can use (memory only)
            recent = self.recent[g]
            for k in [k for k, t in recent.items() if boundary - t >= self.within_ms]:
                del recent[k]
            if not recent:
                del self.recent[g]
        return []

    def snapshot(self) -> Any:
        return {g: list(r.items()) for g, r in self.recent.items()}

    def restore(self, state: Any) -> None:
        self.recent = {g: {k: t for k, t in items} for g, items in state.items()}


# -- sequences: a small deterministic NFA ---------------------------------------------


@dataclass(frozen=True)
class _Pos:
    """A positive step, compiled."""

    name: str
    cond: str  # column
    times: int
    max: int | None  # None: unbounded (one_or_more)
    optional: bool
    enter_strict: bool  # 'next' from the previous step
    inner_strict: bool  # 'consecutive' repetitions
    guard: str | None  # negated condition column that must not occur before this step
    guard_strict: bool  # not_next (only the very next event) vs not_followed_by

    def satisfied(self, count: int) -> bool:
        return count >= self.times or (self.optional and count == 0)

    def open(self, count: int) -> bool:
        return self.max is None or count < self.max


class _Sequence(_Kind):
    p: SequencePattern

    def __init__(
        self,
        pattern: SequencePattern,
        slot: str,
        stats: dict[str, int],
        steps: list[Step] | None = None,
    ) -> None:
        super().__init__(pattern, slot, stats)
        self.steps = steps if steps is not None else pattern.steps
        self.within_ms = (
            None if pattern.within is None else round(pattern.within.total_seconds() * 1000)
        )
        self.skip_past = pattern.after_match == "skip_past_last_event"
        self.capacity = getattr(pattern, "max_partial_matches", 1000)
        pos: list[_Pos] = []
        guard: tuple[str, bool] | None = None
        for step in self.steps:
            column = self.col(f"step.{step.name}")
            if step.negated:
                guard = (column, step.contiguity == "not_next")
                continue
            pos.append(
                _Pos(
                    name=step.name,
                    cond=column,
                    times=step.times,
                    max=None if step.one_or_more else step.times,
                    optional=step.optional,
                    enter_strict=step.contiguity == "next",
                    inner_strict=step.consecutive,
                    guard=guard[0] if guard else None,
                    guard_strict=bool(guard and guard[1]),
                )
            )
            guard = None
        self.pos = pos
        self.final_guard = guard[0] if guard else None
        self.cond_cols = [self.col(f"step.{s.name}") for s in self.steps]
        self.strict = any(p.enter_strict or p.inner_strict or p.guard_strict for p in pos)
        # key -> partial matches, oldest first; a run is
        # [j, count, start_ts, start_seq, events [[step index, ts]], fresh, last_seq]
        # j == len(pos) means complete, waiting out the final not_followed_by
        self.runs: dict[str, list[list[Any]]] = {}
        self.heap: list[tuple[int, int, str]] = []  # (deadline, start_seq, key), lazy

    def columns(self) -> dict[str, pl.Expr]:
        return {
            self.col(f"step.{s.name}"): s.where.to_polars(nan_as_null=False).cast(pl.Boolean)
            for s in self.steps
        }

    def schema(self) -> dict[str, pl.DataType]:
        return {c: pl.Boolean for c in self.cond_cols}

    # --- event processing

    def process(self, frame: pl.DataFrame, by_key: Callable[[], pl.DataFrame]) -> list[Any]:
        conds = [pl.col(c) for c in self.cond_cols]
        start = conds[self.cond_cols.index(self.pos[0].cond)].fill_null(False)
        visible = pl.any_horizontal([c.is_not_null() for c in conds])
        relevant = pl.any_horizontal([c.fill_null(False) for c in conds])
        if self.strict:
            # strict contiguity: every visible event of a key with a partial match
            # matters (one that had it before this batch or starts one in it)
            keys = frame.filter(start)[KEY]
            if self.runs:
                keys = pl.concat([keys, pl.Series(KEY, list(self.runs), dtype=pl.Utf8)])
            mask = relevant | (visible & pl.col(KEY).is_in(keys.unique().implode()))
        else:
            mask = relevant
        out: list[Any] = []
        rows = frame.filter(mask).select(KEY, TS, SEQ, *self.cond_cols).iter_rows()
        index = {c: i for i, c in enumerate(self.cond_cols)}
        for key, ts, seq, *values in rows:
            if self.heap and self.heap[0][0] <= ts:
                out.extend(self.advance(ts))
            matched = {c for c in self.cond_cols if values[index[c]]}
            out.extend(self._event(key, ts, seq, matched))
        return out

    def _event(self, key: str, ts: int, seq: int, matched: set[str]) -> list[Any]:
        out: list[Any] = []
        runs = self.runs.get(key, [])
        survivors: list[list[Any]] = []
        completed: list[list[Any]] = []
        for run in runs:
            fate = self._step(run, ts, seq, matched)
            if fate == "dead":
                self.stats["discarded"] += 1
            elif fate == "complete":
                completed.append(run)
            else:
                survivors.append(run)
        starts = self.pos[0].cond in matched
        if completed and self.skip_past:
            # the earliest-started completes; all partial matches started up to now go
            out.append(self._complete(key, completed[0], ts))
            self.stats["discarded"] += len(completed) - 1 + len(survivors)
            survivors, starts = [], False
        else:
            out.extend(self._complete(key, run, ts) for run in completed)
        if starts:
            run = [0, 1, ts, seq, [[0, ts]], True, seq]
            if self._done(run):
                if self.final_guard is None:
                    out.append(self._complete(key, run, ts))
                    if self.skip_past:
                        self.stats["discarded"] += len(survivors)
                        survivors = []
                else:
                    run[0] = len(self.pos)
                    survivors.append(run)
                    self._schedule(key, run)
            else:
                survivors.append(run)
                self._schedule(key, run)
            if len(survivors) > self.capacity:
                oldest = survivors.pop(0)
                out.append(self._timed_out(key, oldest, ts, "capacity"))
        if survivors:
            self.runs[key] = survivors
        else:
            self.runs.pop(key, None)
        return out

    def _done(self, run: list[Any]) -> bool:
        j, count = run[0], run[1]
        if not self.pos[j].satisfied(count):
            return False
        return all(p.optional for p in self.pos[j + 1 :])

    def _step(self, run: list[Any], ts: int, seq: int, matched: set[str]) -> str:
        """Offer one event to a partial match: 'took', 'ignored', 'dead' or 'complete'."""
        j, count, fresh = run[0], run[1], run[5]
        if j == len(self.pos):  # matched; waiting out the final not_followed_by
            return "dead" if self.final_guard in matched else "ignored"
        step = self.pos[j]
        # greedy: the current step keeps taking matching events while it may
        if step.open(count) and (fresh or not step.inner_strict) and step.cond in matched:
            self._take(run, j, count + 1, ts, seq)
            return self._after_take(run)
        can_wait = step.open(count) and not step.inner_strict
        # an optional step short of its count may still be dropped (as if skipped)
        dropping = step.optional and not step.satisfied(count)
        if step.satisfied(count) or dropping:
            for k in range(j + 1, len(self.pos)):
                nxt = self.pos[k]
                if nxt.guard and nxt.guard in matched and (fresh or not nxt.guard_strict):
                    return "dead"  # the negated step happened
                adjacent = fresh and not dropping
                if nxt.cond in matched and (adjacent or not nxt.enter_strict):
                    if dropping:
                        run[4] = [e for e in run[4] if e[0] != j]
                    self._take(run, k, 1, ts, seq)
                    return self._after_take(run)
                can_wait = can_wait or not nxt.enter_strict
                if not nxt.optional:
                    break
        run[5] = False
        # strict contiguity: an event nobody could take ends the partial match
        return "ignored" if can_wait else "dead"

    def _take(self, run: list[Any], j: int, count: int, ts: int, seq: int) -> None:
        run[0], run[1], run[5], run[6] = j, count, True, seq
        run[4].append([j, ts])

    def _after_take(self, run: list[Any]) -> str:
        if not self._done(run):
            return "took"
        if self.final_guard is None:
            return "complete"
        run[0] = len(self.pos)  # matched; now no final-guard event may come until the deadline
        return "took"

    def _schedule(self, key: str, run: list[Any]) -> None:
        if self.within_ms is not None:
            heapq.heappush(self.heap, (run[2] + self.within_ms, run[3], key))

    def _events(self, run: list[Any]) -> list[dict[str, Any]]:
        return [{"step": self.pos[j].name, "ts_ms": t} for j, t in run[4]]

    def _complete(self, key: str, run: list[Any], ts: int) -> Detection:
        events = self._events(run)
        return self.detection(
            key,
            ts,
            value=(run[4][-1][1] - run[2]) / 1000,
            details={"events": events, "started_ts_ms": run[2]},
        )

    def _timed_out(self, key: str, run: list[Any], at: int, reason: str) -> TimedOutMatch:
        self.stats["timed_out"] += 1
        return TimedOutMatch(
            pattern=self.p.name,
            key=key,
            started=from_ms(run[2]),
            timed_out_at=from_ms(at),
            reason=reason,
            events=self._events(run),
        )

    # --- time

    def advance(self, boundary: int) -> list[Any]:
        out: list[Any] = []
        while self.heap and self.heap[0][0] <= boundary:
            deadline, start_seq, key = heapq.heappop(self.heap)
            runs = self.runs.get(key)
            if not runs:
                continue
            found = [i for i, r in enumerate(runs) if r[3] == start_seq]
            if not found:
                continue  # already completed or discarded
            run = runs.pop(found[0])
            if run[0] == len(self.pos):  # nothing forbidden came: the match completes
                out.append(self._complete(key, run, deadline))
                if self.skip_past:
                    last_seq = run[6]
                    dropped = [r for r in runs if r[3] <= last_seq]
                    self.stats["discarded"] += len(dropped)
                    runs[:] = [r for r in runs if r[3] > last_seq]
            else:
                out.append(self._timed_out(key, run, deadline, "within"))
            if not runs:
                del self.runs[key]
        return out

    def end_of_input(self) -> list[Any]:
        out: list[Any] = []
        for key in sorted(self.runs):
            for run in self.runs[key]:
                out.append(self._timed_out(key, run, run[4][-1][1], "end_of_input"))
        self.runs.clear()
        return out

    def next_deadline(self) -> int | None:
        return self.heap[0][0] if self.heap else None

    def snapshot(self) -> Any:
        return copy.deepcopy(self.runs)

    def restore(self, state: Any) -> None:
        self.runs = copy.deepcopy(state)
        self.heap = []
        for key, runs in self.runs.items():
            for run in runs:
                self._schedule(key, run)


def _after_absence_steps(p: AbsencePattern) -> list[Step]:
    expect = p.expect if p.expect is not None else Expr.parse("True")
    return [
        Step(name="after", where=p.after),
        Step(name="expect", where=expect, contiguity="not_followed_by"),
    ]


# -- the engine --------------------------------------------------------------------------


class CepEngine:
    """Runs the patterns of one input over frames; see the module docstring for semantics.

    ``dimensions`` maps keys to their dimensions (``{"dev-1": {"zone": "z1"}}``),
    needed by ``correlation`` patterns. ``columns``, when given, are the frame's
    columns: a condition naming another column is a ``ConfigError`` at build.
    Otherwise a column missing from a batch reads as null (counted in
    ``stats()["missing_column_rows"]``). ``resume_state`` is a ``snapshot()``;
    state made by other pattern definitions is refused with a ``ConfigError``.
    Outputs of one batch come pattern by pattern in declaration order, each
    in event-time order, every detection followed by its action requests.
    """

    def __init__(
        self,
        patterns: PatternSet,
        resume_state: dict[str, Any] | None = None,
        now: Callable[[], datetime] | None = None,
        *,
        input: str | None = None,
        dimensions: Mapping[str, Mapping[str, str]] | None = None,
        columns: list[str] | None = None,
    ) -> None:
        inputs = sorted({p.input for p in patterns.patterns})
        if input is None:
            if len(inputs) > 1:
                msg = f"patterns listen to several inputs ({', '.join(inputs)}); build one engine per input with input=..."
                raise ConfigError(msg)
            input = inputs[0]
        specs = patterns.all_inputs()
        if input not in specs:
            raise ConfigError(f"input {input!r} is unknown; valid: {', '.join(sorted(specs))}")
        chosen: list[Pattern] = [p for p in patterns.patterns if p.input == input]
        if not chosen:
            raise ConfigError(
                f"no pattern listens to input {input!r}; patterns listen to {', '.join(inputs)}"
            )
        self.patterns = patterns
        self.input = input
        self.spec: InputSpec = specs[input]
        self.fingerprint = patterns.fingerprint(input)
        self._now = now or _utcnow
        self._lateness_ms = round(patterns.allowed_lateness.total_seconds() * 1000)
        skew = patterns.max_future_skew
        self._skew_ms = None if skew is None else round(skew.total_seconds() * 1000)
        self._stats: dict[str, int] = {
            "rows": 0,
            "late": 0,
            "future": 0,
            "incomplete": 0,
            "missing_column_rows": 0,
        }
        self._pattern_stats: dict[str, dict[str, int]] = {}
        self.kinds: list[tuple[Pattern, _Kind]] = []
        for i, p in enumerate(chosen):
            stats = {"detections": 0, "timed_out": 0, "discarded": 0, "ungrouped": 0}
            self._pattern_stats[p.name] = stats
            self.kinds.append((p, self._kind(p, f"p{i}", stats, dimensions)))
        self._instant = [(p, k) for p, k in self.kinds if isinstance(k, _Instant)]
        self._ordered = [(p, k) for p, k in self.kinds if not isinstance(k, _Instant)]
        exprs = [e for p in chosen for e in self._exprs(p)]
        self.names = sorted(set().union(*(e.names for e in exprs)))
        self._string_names = set().union(*(e.string_names for e in exprs))
        if columns is not None:
            self._check_columns(chosen, set(columns))
        self._derived: dict[str, pl.Expr] = {}
        self._schema: dict[str, pl.DataType] = {
            KEY: pl.Utf8,
            KID: pl.Int64,
            TS: pl.Int64,
            SEQ: pl.Int64,
        }
        if self.spec.start:
            self._schema[START] = pl.Int64
        for _, kind in self.kinds:
            self._derived.update(kind.columns())
            self._schema.update(kind.schema())
        self._warned: set[str] = set()
        # event-time state
        self._seq = 0
        self._max_ts: int | None = None
        self._max_seen_at = 0
        self._watermark: int | None = None
        self._boundary: int | None = None  # everything before it was processed
        self._pending = pl.DataFrame(schema=self._schema)
        self._keytab = pl.DataFrame(schema={KEY: pl.Utf8, KID: pl.Int64})
        self._keys: list[str] = []  # key id -> key
        for _, kind in self.kinds:
            kind.keys = self._keys
        if resume_state is not None:
            self._restore(resume_state)

    # -- construction helpers

    @staticmethod
    def _exprs(p: Pattern) -> list[Expr]:
        return list(p.conditions().values())

    def _kind(
        self,
        p: Pattern,
        slot: str,
        stats: dict[str, int],
        dims: Mapping[str, Mapping[str, str]] | None,
    ) -> _Kind:
        if isinstance(p, ThresholdPattern):
            return _Instant(p, slot, stats) if p.times == 1 else _Threshold(p, slot, stats)
        if isinstance(p, RangePattern):
            return _Range(p, slot, stats)
        if isinstance(p, RatePattern):
            return _Rate(p, slot, stats)
        if isinstance(p, SequencePattern):
            return _Sequence(p, slot, stats)
        if isinstance(p, AbsencePattern):
            if p.after is None:
                return _Heartbeat(p, slot, stats)
            seq = SequencePattern(
                name=p.name, input=p.input, steps=_after_absence_steps(p), within=p.within
            )
            kind = _Sequence(seq, slot, stats)
            kind.p = p  # type: ignore[assignment]  # detections carry the absence pattern's name
            return kind
        if isinstance(p, CorrelationPattern):
            if dims is None:
                msg = (
                    f"pattern {p.name!r} groups keys by {p.group_by!r}; build the engine with "
                    f"dimensions={{'dev-1': {{'{p.grouping_set[0]}': 'z1'}}, ...}}"
                )
                raise ConfigError(msg)
            return _Correlation(p, slot, stats, p.groups(dims))
        raise ConfigError(f"pattern kind {type(p).__name__} is not supported")  # unreachable

    def _check_columns(self, chosen: list[Pattern], columns: set[str]) -> None:
        for p in chosen:
            for local, expr in p.conditions().items():
                unknown = sorted(expr.names - columns)
                if unknown:
                    msg = (
                        f"pattern {p.name!r} {local} {expr.text!r} reads unknown column(s) "
                        f"{', '.join(unknown)}; the {self.input} input has {', '.join(sorted(columns))}"
                    )
                    raise ConfigError(msg)

    # -- the logic vocabulary

    def on_batch(self, frame: pl.DataFrame) -> list[CepEmit]:
        """Take one batch; return what it completed (detections, actions, timeouts, rejects)."""
        out: list[CepEmit] = []
        accepted = self._intake(frame, out)
        if accepted is not None and not accepted.is_empty():
            self._pending = pl.concat([self._pending, accepted], how="vertical")
            batch_max = accepted[TS].max()
            if self._max_ts is None or batch_max > self._max_ts:  # type: ignore[operator]
                self._max_ts = batch_max  # type: ignore[assignment]
                self._max_seen_at = to_ms(self._now())
        out.extend(self._release(self._current_watermark()))
        return out

    def on_timer(self) -> list[CepEmit]:
        """The clock moved: release what the watermark passed and fire due deadlines."""
        return self._release(self._current_watermark())

    def on_eof(self) -> list[CepEmit]:
        """End of input: process everything and fire every deadline (see the module docstring)."""
        keep = self._boundary
        out = self._release(_INF)
        self._boundary = keep
        for pattern, kind in self.kinds:
            out.extend(self._with_actions(pattern, kind.end_of_input()))
        return out

    def next_timer(self) -> datetime | None:
        """When the clock-advanced watermark next releases an event or reaches a deadline."""
        if self._max_ts is None:
            return None
        targets = [d for _, k in self.kinds if (d := k.next_deadline()) is not None]
        if not self._pending.is_empty():
            targets.append(self._pending[TS].min() + 1)  # type: ignore[operator]
        if not targets:
            return None
        wait_ms = min(targets) - (self._max_ts - self._lateness_ms)
        return from_ms(self._max_seen_at + max(0, wait_ms))

    def snapshot(self) -> dict[str, Any]:
        """Plain data: the pattern state, buffered events and the watermark."""
        return {
            "fingerprint": self.fingerprint,
            "seq": self._seq,
            "max_ts_ms": self._max_ts,
            "max_seen_at_ms": self._max_seen_at,
            "watermark_ms": self._watermark,
            "boundary_ms": self._boundary,
            "pending": _frame_state(self._pending),
            "keys": self._keytab[KEY].to_list(),
            "patterns": {p.name: kind.snapshot() for p, kind in self.kinds},
            "stats": copy.deepcopy(self._stats),
            "pattern_stats": copy.deepcopy(self._pattern_stats),
        }

    def stats(self) -> dict[str, Any]:
        """Counters: rows taken, rejected (late, future, incomplete), per-pattern outcomes."""
        return {**copy.deepcopy(self._stats), "patterns": copy.deepcopy(self._pattern_stats)}

    def watermark_ms(self) -> int | None:
        """The watermark now (epoch ms; None before the first event); it never goes back."""
        return self._current_watermark()

    # -- internals

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            msg = (
                f"recovered CEP state was made by other pattern definitions "
                f"({state.get('fingerprint')} != {self.fingerprint} for input {self.input!r}); "
                "start with a fresh recovery store for the changed patterns"
            )
            raise ConfigError(msg)
        self._seq = state["seq"]
        self._max_ts = state["max_ts_ms"]
        self._max_seen_at = state["max_seen_at_ms"]
        self._watermark = state["watermark_ms"]
        self._boundary = state["boundary_ms"]
        self._pending = _frame_restore(state["pending"], self._schema)
        keys = state["keys"]
        self._keys[:] = keys
        self._keytab = pl.DataFrame(
            {KEY: keys, KID: list(range(len(keys)))}, schema={KEY: pl.Utf8, KID: pl.Int64}
        )
        self._stats.update(state["stats"])
        for name, counters in state["pattern_stats"].items():
            self._pattern_stats[name].update(counters)
        for p, kind in self.kinds:
            kind.restore(state["patterns"][p.name])

    def _current_watermark(self) -> int | None:
        if self._max_ts is None:
            return None
        idle_ms = max(0, to_ms(self._now()) - self._max_seen_at)
        candidate = self._max_ts - self._lateness_ms + idle_ms
        if self._watermark is None or candidate > self._watermark:
            self._watermark = candidate
        return self._watermark

    def _reject(self, out: list[CepEmit], reason: str, rows: pl.DataFrame) -> None:
        if not rows.is_empty():
            self._stats[reason] += rows.height
            out.append(RejectedRows(reason, rows, self._boundary))

    def _intake(self, frame: pl.DataFrame, out: list[CepEmit]) -> pl.DataFrame | None:
        key, time = self.spec.key, self.spec.time
        missing_ids = [c for c in (key, time) if c not in frame.columns]
        if missing_ids:
            msg = (
                f"a frame on input {self.input!r} lacks column(s) {', '.join(missing_ids)}; "
                f"it has {', '.join(frame.columns)} (declare the input's key/time columns under inputs)"
            )
            raise ConfigError(msg)
        if frame.is_empty():
            return None
        self._stats["rows"] += frame.height
        absent = [c for c in self.names if c not in frame.columns]
        if absent:
            self._stats["missing_column_rows"] += frame.height * len(absent)
            for c in absent:
                if c not in self._warned:
                    self._warned.add(c)
                    log.warning("CEP input %r has no column %r; reading it as null", self.input, c)
        # cheap column checks first; the filters run only when something is to be rejected
        keys, times = frame.get_column(key), frame.get_column(time)
        bad: dict[str, pl.Expr] = {}
        if keys.null_count() or times.null_count():
            bad["incomplete"] = pl.col(key).is_null() | pl.col(time).is_null()
        if self._skew_ms is not None:
            limit = to_ms(self._now()) + self._skew_ms
            if times.max() > limit:  # type: ignore[operator]
                bad["future"] = pl.col(time) > limit
        if bad:
            ok = pl.lit(True)
            for reason, mask in bad.items():
                self._reject(out, reason, frame.filter(ok & mask))
                ok = ok & ~mask.fill_null(False)
            frame = frame.filter(ok)
            if frame.is_empty():
                return None
        n = frame.height
        ids = [pl.col(key).cast(pl.Utf8).alias(KEY), pl.col(time).cast(pl.Int64).alias(TS)]
        ids.append(pl.int_range(self._seq, self._seq + n, dtype=pl.Int64).alias(SEQ))
        self._seq += n
        if self.spec.start:
            start = pl.col(self.spec.start) if self.spec.start in frame.columns else pl.lit(None)
            ids.append(start.cast(pl.Int64).alias(START))
        # typed nulls for absent columns, so comparisons and arithmetic stay valid; NaN
        # counts as missing everywhere, once, before the conditions run
        nulls = [
            pl.lit(None, pl.Utf8 if c in self._string_names else pl.Float64).alias(c)
            for c in absent
        ]
        rows = frame.lazy().with_columns(nulls).with_columns(cs.float().fill_nan(None))
        rows = rows.with_columns(ids)
        derived = (e.alias(name) for name, e in self._derived.items())
        if self._ordered:
            prepared = self._with_key_ids(rows).select(*self._schema_ids(), *derived)
        else:  # instant patterns need no key ids: spare the join
            no_ids = rows.with_columns(pl.lit(None, pl.Int64).alias(KID))
            prepared = no_ids.select(*self._schema_ids(), *derived).collect()
        for pattern, kind in self._instant:
            out.extend(self._with_actions(pattern, kind.process(prepared, lambda: prepared)))
        if not self._ordered:
            return None  # nothing waits for the watermark, so nothing is late
        if self._boundary is not None:
            late = frame.get_column(time) < self._boundary
            if late.any():
                self._reject(out, "late", frame.filter(late))
                prepared = prepared.filter(~late)
        return prepared

    def _with_key_ids(self, rows: pl.LazyFrame) -> pl.DataFrame:
        # integer ids per key (first-seen order): per-key sorts and joins on ints
        # are several times faster than on strings; new keys are rare once warm
        frame = rows.join(self._keytab.lazy(), on=KEY, how="left", maintain_order="left").collect()
        if frame[KID].null_count() == 0:
            return frame
        keys = frame.filter(pl.col(KID).is_null()).select(pl.col(KEY).unique(maintain_order=True))
        start = self._keytab.height
        new = keys.with_columns(pl.int_range(start, start + keys.height, dtype=pl.Int64).alias(KID))
        self._keytab = pl.concat([self._keytab, new])
        self._keys.extend(new[KEY].to_list())
        return frame.drop(KID).join(self._keytab, on=KEY, how="left", maintain_order="left")

    def _schema_ids(self) -> list[str]:
        return [KEY, KID, TS, SEQ] + ([START] if self.spec.start else [])

    def _release(self, watermark: int | None) -> list[CepEmit]:
        if watermark is None:
            return []
        boundary = watermark if self._boundary is None else max(self._boundary, watermark)
        out: list[CepEmit] = []
        ready = self._pending.filter(pl.col(TS) < boundary)
        if not ready.is_empty():
            self._pending = self._pending.filter(pl.col(TS) >= boundary)
            ready = ready.sort(TS, SEQ)
            cache: list[pl.DataFrame] = []

            def by_key() -> pl.DataFrame:
                # (key, time, arrival) order; ready is in (time, arrival) order, so a
                # stable sort on one (key, time) number gives it cheaply
                if not cache:
                    t = _composite(ready[KID].to_numpy(), ready[TS].to_numpy(), 0)
                    if t is None:
                        cache.append(ready.sort(KID, TS, SEQ))
                    else:
                        cache.append(ready[np.argsort(t, kind="stable")])
                return cache[0]

            for pattern, kind in self._ordered:
                out.extend(self._with_actions(pattern, kind.process(ready, by_key)))
        for pattern, kind in self.kinds:
            out.extend(self._with_actions(pattern, kind.advance(boundary)))
        self._boundary = boundary
        return out

    def _with_actions(self, pattern: Pattern, items: list[Any]) -> list[CepEmit]:
        return expand_actions(pattern, items)
