"""The per-reading path of the CEP engine: patterns decided the moment a reading arrives.

Edge gateways must act within milliseconds (smoke detected -> close the gas
valve) in a process too small for polars and numpy. ``RowEngine`` runs the
same ``PatternSet`` declarations as ``operators.cep.CepEngine``, one event at
a time, in plain Python (conditions through ``operators.expr``'s Python
backend, actions through ``operators.cep_actions``), for the kinds whose
decision needs only the key's own past:

* ``threshold``, ``rate`` and ``absence`` without ``after`` (a heartbeat).

Other kinds (``range``, ``sequence``, ``absence`` with ``after``,
``correlation``) are refused at build with a ``ConfigError`` that says to run
them in the cloud. ``SUPPORTED_KINDS`` lists what runs here.

Semantics are those documented in ``operators.cep`` for each kind, with one
difference in time handling: an event is processed when it arrives, not when
the watermark passes it, so there is no out-of-order buffer. An event older
than its key's previous one is *late* (rejected, counted); one stamped more
than ``max_future_skew`` ahead of the clock is *future*; one without key or
time is *incomplete*. Each rejected event comes out as a ``RejectedEvent``.
On input in time order both engines produce the same detections and action
requests (a property test checks it); heartbeat silences fire when the
clock-advanced watermark (largest time seen minus ``allowed_lateness``, plus
the time since it arrived) reaches them, as in ``CepEngine``.

Example::

    >>> from operators.cep_patterns import PatternSet
    >>> from iotflow.events import Reading, from_ms
    >>> ps = PatternSet.from_dict([{"name": "smoke", "kind": "threshold", "condition": "smoke > 0",
    ...     "actions": [{"type": "command", "device": "valve-{key}", "name": "close"}]}])
    >>> engine = RowEngine(ps, now=lambda: from_ms(1_767_225_600_000))
    >>> out = engine.on_readings([Reading("kitchen", 1_767_225_600_000, {"smoke": 1.0})])
    >>> [(type(o).__name__, o.device_id) for o in out]
    [('CommandRequest', 'valve-kitchen')]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from iotflow.errors import ConfigError
from iotflow.events import Detection, Reading, from_ms, to_ms
from operators.cep_actions import expand_actions
from operators.expr import Expr

if TYPE_CHECKING:  # or their msgspec mirrors (operators.cep_lean): patterns go by kind
    from operators.cep_patterns import (
        AbsencePattern,
        InputSpec,
        Pattern,
        PatternSet,
        RatePattern,
        ThresholdPattern,
    )

__all__ = ["SUPPORTED_KINDS", "RejectedEvent", "RowEngine", "unsupported"]

SUPPORTED_KINDS = frozenset({"threshold", "rate", "absence"})
_INF = 2**62  # the final watermark at end of input, as in operators.cep


def _utcnow() -> datetime:
    return datetime.now(UTC)


def unsupported(pattern: Pattern) -> str | None:
    """Why ``pattern`` cannot run per reading (None when it can)."""
    if pattern.kind not in SUPPORTED_KINDS:
        return f"pattern {pattern.name!r} is a {pattern.kind} pattern"
    if pattern.kind == "absence" and pattern.after is not None:
        return f"pattern {pattern.name!r} is an absence pattern with 'after' (a sequence)"
    return None


@dataclass(frozen=True)
class RejectedEvent:
    """An event the engine did not process: ``late``, ``future`` or ``incomplete``.

    ``boundary_ms`` is the key's previous event time (late) or the clock limit (future).
    """

    reason: str
    row: Mapping[str, Any]
    boundary_ms: int | None


def _value(fn: Callable[[Mapping[str, Any]], Any], row: Mapping[str, Any]) -> Any:
    result = fn(row)
    if isinstance(result, float) and math.isnan(result):
        return None  # a NaN computed from valid inputs counts as missing, as in CepEngine
    return result


class _Kind:
    """One pattern over one event at a time; state is plain data keyed by the event key."""

    def __init__(self, pattern: Any, stats: dict[str, int]) -> None:
        self.p = pattern
        self.stats = stats
        self.state: dict[str, list[Any]] = {}

    def detection(self, key: str, ts_ms: int, **kw: Any) -> Detection:
        self.stats["detections"] += 1
        return Detection(rule=self.p.name, key=key, ts=from_ms(ts_ms), **kw)

    def process(self, key: str, ts: int, start: int | None, env: Mapping[str, Any]) -> list[Any]:
        raise NotImplementedError

    def advance(self, boundary: int) -> list[Any]:
        return []

    def next_deadline(self) -> int | None:
        return None

    def copy_state(self) -> dict[str, list[Any]]:
        """The state as new plain data (a structural copy: snapshots are frequent at the edge)."""
        return {key: list(value) for key, value in self.state.items()}


def _function(expr: Expr) -> Callable[[Mapping[str, Any]], Any]:
    return expr.function(nan_as_null=True)


class _Threshold(_Kind):
    p: ThresholdPattern

    def __init__(self, pattern: ThresholdPattern, stats: dict[str, int]) -> None:
        super().__init__(pattern, stats)
        self.cond = _function(pattern.condition)
        self.value = None if pattern.value is None else _function(pattern.value)
        self.no_skip = pattern.after_match == "no_skip"
        # key -> [count, last end (or time) ms, times of the counted events]

    def copy_state(self) -> dict[str, list[Any]]:
        return {key: [run[0], run[1], list(run[2])] for key, run in self.state.items()}

    def process(self, key: str, ts: int, start: int | None, env: Mapping[str, Any]) -> list[Any]:
        cond = self.cond(env)
        if cond is None:
            return []  # invisible to this pattern
        if not cond:
            self.state.pop(key, None)
            return []
        run = self.state.get(key)
        if run is None or (start is not None and start != run[1]):
            run = self.state[key] = [0, ts, []]
        run[0] += 1
        run[1] = ts
        run[2].append(ts)
        n = self.p.times
        if len(run[2]) > n:
            del run[2][0]
        if run[0] < n:
            return []
        found = self.detection(
            key,
            ts,
            value=None if self.value is None else _value(self.value, env),
            details={"times": n, "events_ts_ms": list(run[2])},
        )
        if not self.no_skip:
            run[0], run[2] = 0, []
        return [found]


class _Rate(_Kind):
    p: RatePattern

    def __init__(self, pattern: RatePattern, stats: dict[str, int]) -> None:
        super().__init__(pattern, stats)
        self.value = _function(pattern.value)
        self.per_ms = pattern.per.total_seconds() * 1000
        # key -> [previous time, previous value, over the limit there]

    def process(self, key: str, ts: int, start: int | None, env: Mapping[str, Any]) -> list[Any]:
        v = _value(self.value, env)
        if v is None:
            return []
        last = self.state.get(key)
        if last is None:
            self.state[key] = [ts, v, False]
            return []
        prev_ts, prev_v, prev_flag = last
        last[0], last[1] = ts, v
        dt = ts - prev_ts
        if dt <= 0:
            return []  # no slope: the key keeps its state
        rate = (v - prev_v) / dt * self.per_ms
        if math.isnan(rate):
            return []
        x = self.p.exceeds
        if self.p.direction == "rises":
            over = rate > x
        elif self.p.direction == "falls":
            over = rate < -x
        else:
            over = abs(rate) > x
        last[2] = over
        if not over or prev_flag:
            return []
        return [
            self.detection(
                key,
                ts,
                value=rate,
                baseline=prev_v,
                score=abs(rate) / x if x else None,
                details={
                    "from_ts_ms": prev_ts,
                    "to_ts_ms": ts,
                    "from": prev_v,
                    "to": v,
                    "per_s": self.per_ms / 1000,
                },
            )
        ]


class _Heartbeat(_Kind):
    """``absence`` without ``after``: a key's silence."""

    p: AbsencePattern

    def __init__(self, pattern: AbsencePattern, stats: dict[str, int]) -> None:
        super().__init__(pattern, stats)
        self.expect = None if pattern.expect is None else _function(pattern.expect)
        self.within_ms = round(pattern.within.total_seconds() * 1000)
        # key -> [time of its last (expected) event, silence reported]

    def _silence(self, key: str, last_ts: int) -> Detection:
        details: dict[str, Any] = {"last_ts_ms": last_ts, "silence_s": self.within_ms / 1000}
        return self.detection(
            key, last_ts + self.within_ms, value=self.within_ms / 1000, details=details
        )

    def process(self, key: str, ts: int, start: int | None, env: Mapping[str, Any]) -> list[Any]:
        if self.expect is not None and not self.expect(env):
            return []
        last = self.state.get(key)
        self.state[key] = [ts, False]
        if last is not None and not last[1] and ts - last[0] >= self.within_ms:
            return [self._silence(key, last[0])]
        return []

    def advance(self, boundary: int) -> list[Any]:
        due = [
            (last[0], key)
            for key, last in self.state.items()
            if not last[1] and last[0] + self.within_ms <= boundary
        ]
        due.sort()
        for _, key in due:
            self.state[key][1] = True
        return [self._silence(key, ts) for ts, key in due]

    def next_deadline(self) -> int | None:
        waiting = [last[0] for last in self.state.values() if not last[1]]
        return min(waiting) + self.within_ms if waiting else None


_KINDS: dict[str, type[_Kind]] = {
    "threshold": _Threshold,
    "rate": _Rate,
    "absence": _Heartbeat,
}


class RowEngine:
    """Runs the patterns of one input one event at a time (see the module docstring).

    ``on_batch(rows)`` takes mappings holding the input's key and time columns
    (``device_id``/``ts_ms`` for readings) and the columns the conditions read
    (a missing one reads as null); ``on_readings`` takes ``Reading`` objects.
    Outputs come in event order, each detection followed by its action
    requests. ``resume_state`` is a ``snapshot()``; state made by other pattern
    definitions is refused with a ``ConfigError``. ``patterns`` is a ``PatternSet``
    or its mirror (``operators.cep_lean.load_patterns``).
    """

    def __init__(
        self,
        patterns: PatternSet,
        resume_state: dict[str, Any] | None = None,
        now: Callable[[], datetime] | None = None,
        *,
        input: str = "readings",
    ) -> None:
        chosen = [p for p in patterns.patterns if p.input == input]
        if not chosen:
            inputs = ", ".join(sorted({p.input for p in patterns.patterns}))
            msg = f"no pattern listens to input {input!r}; patterns listen to {inputs}"
            raise ConfigError(msg)
        for p in chosen:
            why = unsupported(p)
            if why is not None:
                msg = (
                    f"{why}; the per-reading engine of edge gateways runs "
                    f"{', '.join(sorted(SUPPORTED_KINDS))} (absence without 'after'): "
                    "place it in the cloud"
                )
                raise ConfigError(msg)
        self.input = input
        self.spec: InputSpec = patterns.all_inputs()[input]
        self.fingerprint = "rows:" + patterns.fingerprint(input)
        self._now = now or _utcnow
        self._lateness_ms = round(patterns.allowed_lateness.total_seconds() * 1000)
        skew = patterns.max_future_skew
        self._skew_ms = None if skew is None else round(skew.total_seconds() * 1000)
        self._stats = {"rows": 0, "late": 0, "future": 0, "incomplete": 0}
        self._pattern_stats: dict[str, dict[str, int]] = {}
        self.kinds: list[tuple[Pattern, _Kind]] = []
        for p in chosen:
            stats = {"detections": 0}
            self._pattern_stats[p.name] = stats
            self.kinds.append((p, _KINDS[p.kind](p, stats)))
        self.names = sorted(
            set().union(*(e.names for p in chosen for e in p.conditions().values()))
        )
        self._last: dict[str, int] = {}  # key -> time of its latest processed event
        self._max_ts: int | None = None
        self._max_seen_at = 0
        self._watermark: int | None = None
        if resume_state is not None:
            self._restore(resume_state)

    # -- the logic vocabulary

    def on_batch(self, rows: Iterable[Mapping[str, Any]]) -> list[Any]:
        """Process each row at once; return detections, action requests and rejected events."""
        key_col, time_col, start_col = self.spec.key, self.spec.time, self.spec.start
        out: list[Any] = []
        now_ms = to_ms(self._now())
        for row in rows:
            key, ts = row.get(key_col), row.get(time_col)
            start = row.get(start_col) if start_col else None
            self._event(None if key is None else str(key), ts, start, row, out, now_ms)
        out.extend(self._advance())
        return out

    def on_readings(self, readings: Iterable[Reading]) -> list[Any]:
        """``on_batch`` for ``Reading`` objects (input ``readings``: key device_id, time ts_ms)."""
        out: list[Any] = []
        now_ms = to_ms(self._now())
        for r in readings:
            self._event(r.device_id, r.ts_ms, None, r.metrics, out, now_ms, reading=r)
        out.extend(self._advance())
        return out

    def on_timer(self) -> list[Any]:
        """The clock moved: fire the silences the watermark reached."""
        return self._advance()

    def on_eof(self) -> list[Any]:
        """End of input: every pending silence fires (the final watermark)."""
        out: list[Any] = []
        for pattern, kind in self.kinds:
            out.extend(expand_actions(pattern, kind.advance(_INF)))
        return out

    def next_timer(self) -> datetime | None:
        """When the clock-advanced watermark reaches the next silence deadline."""
        if self._max_ts is None:
            return None
        deadlines = [d for _, k in self.kinds if (d := k.next_deadline()) is not None]
        if not deadlines:
            return None
        wait_ms = min(deadlines) - (self._max_ts - self._lateness_ms)
        return from_ms(self._max_seen_at + max(0, wait_ms))

    def snapshot(self) -> dict[str, Any]:
        """Plain data: per-pattern state by key, each key's last time and the watermark."""
        return {
            "fingerprint": self.fingerprint,
            "last": dict(self._last),
            "max_ts_ms": self._max_ts,
            "max_seen_at_ms": self._max_seen_at,
            "watermark_ms": self._watermark,
            "patterns": {p.name: k.copy_state() for p, k in self.kinds},
            "stats": dict(self._stats),
            "pattern_stats": copy.deepcopy(self._pattern_stats),
        }

    def stats(self) -> dict[str, Any]:
        """Counters: rows taken, rejected (late, future, incomplete), detections per pattern."""
        return {**self._stats, "patterns": copy.deepcopy(self._pattern_stats)}

    def watermark_ms(self) -> int | None:
        """The watermark now (epoch ms; None before the first event); it never goes back."""
        if self._max_ts is None:
            return None
        idle_ms = max(0, to_ms(self._now()) - self._max_seen_at)
        candidate = self._max_ts - self._lateness_ms + idle_ms
        if self._watermark is None or candidate > self._watermark:
            self._watermark = candidate
        return self._watermark

    # -- internals

    def _event(
        self,
        key: str | None,
        ts: Any,
        start: Any,
        values: Mapping[str, Any],
        out: list[Any],
        now_ms: int,
        reading: Reading | None = None,
    ) -> None:
        self._stats["rows"] += 1
        if key is None or ts is None or isinstance(ts, bool) or not isinstance(ts, int | float):
            self._reject(out, "incomplete", values, reading, None)
            return
        ts = int(ts)
        previous = self._last.get(key)
        if previous is not None and ts < previous:
            self._reject(out, "late", values, reading, previous)
            return
        if self._skew_ms is not None and ts > now_ms + self._skew_ms:
            self._reject(out, "future", values, reading, now_ms + self._skew_ms)
            return
        self._last[key] = ts
        if self._max_ts is None or ts > self._max_ts:
            self._max_ts = ts
            self._max_seen_at = now_ms
        env = {name: values.get(name) for name in self.names}
        begin = None if start is None else int(start)
        for pattern, kind in self.kinds:
            found = kind.process(key, ts, begin, env)
            if found:
                out.extend(expand_actions(pattern, found))

    def _reject(
        self,
        out: list[Any],
        reason: str,
        values: Mapping[str, Any],
        reading: Reading | None,
        at: int | None,
    ) -> None:
        self._stats[reason] += 1
        row = dict(values)
        if reading is not None:
            row = {"device_id": reading.device_id, "ts_ms": reading.ts_ms, **row}
        out.append(RejectedEvent(reason, row, at))

    def _advance(self) -> list[Any]:
        watermark = self.watermark_ms()
        if watermark is None:
            return []
        out: list[Any] = []
        for pattern, kind in self.kinds:
            out.extend(expand_actions(pattern, kind.advance(watermark)))
        return out

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            msg = (
                f"recovered edge pattern state was made by other pattern definitions "
                f"({state.get('fingerprint')} != {self.fingerprint} for input {self.input!r}); "
                "start with fresh state for the changed patterns"
            )
            raise ConfigError(msg)
        self._last = dict(state["last"])
        self._max_ts = state["max_ts_ms"]
        self._max_seen_at = state["max_seen_at_ms"]
        self._watermark = state["watermark_ms"]
        self._stats.update(state["stats"])
        for name, counters in state["pattern_stats"].items():
            self._pattern_stats[name].update(counters)
        for p, kind in self.kinds:
            kind.state = copy.deepcopy(state["patterns"][p.name])
