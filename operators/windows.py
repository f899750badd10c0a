"""Event-time tumbling windows over readings, as pure logic (no Bytewax import).

``TumblingWindow`` is the declaration; ``build()`` gives a ``TumblingAggregator``
that keeps count/sum/min/max partials per (device, metric, window) and closes
windows on a watermark. The watermark is the largest timestamp seen minus the
allowed lateness, advanced by wall-clock time elapsed since that timestamp
arrived, so windows also close when a stream goes quiet. It never goes
backwards. A reading whose window already closed goes to the late output,
counted, never silently dropped. At end of input every open window flushes.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from iotflow.errors import ConfigError
from iotflow.events import Reading, WindowResult, from_ms, to_ms

__all__ = ["LateReading", "TumblingAggregator", "TumblingWindow", "WindowEmit"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class LateReading:
    """A reading that arrived after its window closed, and the watermark then."""

    reading: Reading
    watermark_ms: int


# An emitted item: a window result, or a late reading for the side output.
WindowEmit = WindowResult | LateReading


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TumblingWindow:
    """Fixed, non-overlapping event-time windows ``[start, start + length)``.

    Example::

        >>> w = TumblingWindow(length=timedelta(seconds=10))
        >>> agg = w.build(None)
        >>> agg.on_batch([Reading("d1", 1_767_268_805_000, {"t": 2.0})])
        []
        >>> [r.count for r in agg.on_eof()]
        [1]
    """

    length: timedelta
    allowed_lateness: timedelta = timedelta(0)
    align_to: datetime = EPOCH

    def __post_init__(self) -> None:
        if self.length <= timedelta(0):
            raise ConfigError(f"window length {self.length} must be positive")
        if self.allowed_lateness < timedelta(0):
            raise ConfigError(f"allowed lateness {self.allowed_lateness} must be zero or positive")
        if self.align_to.tzinfo is None:
            raise ConfigError(f"align_to {self.align_to!r} must be an aware UTC datetime")

    @property
    def fingerprint(self) -> str:
        """Identifies the definition, so state from another definition is never misread."""
        text = f"tumbling|{self.length.total_seconds()}|{self.allowed_lateness.total_seconds()}|{to_ms(self.align_to)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def build(
        self, resume_state: dict[str, Any] | None, now: Callable[[], datetime] = _utcnow
    ) -> TumblingAggregator:
        return TumblingAggregator(self, resume_state, now)


@dataclass
class _State:
    fingerprint: str
    # window start ms -> device -> metric -> [count, sum, min, max]
    open: dict[int, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    max_ts_ms: int | None = None
    max_seen_at_ms: int = 0
    watermark_ms: int | None = None
    late_count: int = 0


class TumblingAggregator:
    """The logic behind a ``TumblingWindow``: ``on_batch``, ``on_timer``, ``on_eof``,
    ``next_timer``, ``snapshot``. Emits ``WindowResult`` for each metric of each
    device when its window closes, and ``LateReading`` for late readings."""

    def __init__(
        self,
        window: TumblingWindow,
        resume_state: dict[str, Any] | None,
        now: Callable[[], datetime],
    ) -> None:
        self.window = window
        self._now = now
        self._length_ms = int(window.length.total_seconds() * 1000)
        self._lateness_ms = int(window.allowed_lateness.total_seconds() * 1000)
        self._align_ms = to_ms(window.align_to)
        if resume_state is None:
            self._s = _State(window.fingerprint)
        else:
            if resume_state.get("fingerprint") != window.fingerprint:
                msg = (
                    f"recovered window state was made by another window definition "
                    f"({resume_state.get('fingerprint')} != {window.fingerprint}); "
                    "start with a fresh recovery store for the changed definition"
                )
                raise ConfigError(msg)
            self._s = _State(**copy.deepcopy(resume_state))

    @property
    def late_count(self) -> int:
        return self._s.late_count

    def window_start_ms(self, ts_ms: int) -> int:
        return ts_ms - (ts_ms - self._align_ms) % self._length_ms

    def watermark_ms(self) -> int | None:
        """The current watermark in epoch ms (None before the first reading)."""
        s = self._s
        if s.max_ts_ms is None:
            return None
        idle_ms = max(0, to_ms(self._now()) - s.max_seen_at_ms)
        candidate = s.max_ts_ms - self._lateness_ms + idle_ms
        if s.watermark_ms is None or candidate > s.watermark_ms:
            s.watermark_ms = candidate
        return s.watermark_ms

    def on_batch(self, readings: Iterable[Reading]) -> list[WindowEmit]:
        s = self._s
        emits: list[WindowEmit] = []
        watermark = self.watermark_ms()
        length = self._length_ms
        batch_max: int | None = None
        for reading in readings:
            ts = reading.ts_ms
            start = self.window_start_ms(ts)
            if watermark is not None and start + length <= watermark:
                s.late_count += 1
                emits.append(LateReading(reading, watermark))
                continue
            if batch_max is None or ts > batch_max:
                batch_max = ts
            devices = s.open.get(start)
            if devices is None:
                devices = s.open[start] = {}
            metrics = devices.get(reading.device_id)
            if metrics is None:
                metrics = devices[reading.device_id] = {}
            for name, value in reading.metrics.items():
                part = metrics.get(name)
                if part is None:
                    metrics[name] = [1, value, value, value]
                else:
                    part[0] += 1
                    part[1] += value
                    if value < part[2]:
                        part[2] = value
                    if value > part[3]:
                        part[3] = value
        if batch_max is not None and (s.max_ts_ms is None or batch_max > s.max_ts_ms):
            s.max_ts_ms = batch_max
            s.max_seen_at_ms = to_ms(self._now())
        emits.extend(self._close(self.watermark_ms()))
        return emits

    def on_timer(self) -> list[WindowEmit]:
        return list(self._close(self.watermark_ms()))

    def on_eof(self) -> list[WindowEmit]:
        """End of input: every open window closes."""
        return list(self._close(None))

    def next_timer(self) -> datetime | None:
        """When the watermark, advancing with the clock, reaches the earliest open window's end."""
        s = self._s
        if not s.open or s.max_ts_ms is None:
            return None
        end = min(s.open) + self._length_ms
        wait_ms = end - (s.max_ts_ms - self._lateness_ms)
        return from_ms(s.max_seen_at_ms + max(0, wait_ms))

    def snapshot(self) -> dict[str, Any]:
        # a structural copy (five times faster than deepcopy): edge gateways checkpoint often
        state = dict(self._s.__dict__)
        state["open"] = {
            start: {
                device: {name: list(part) for name, part in metrics.items()}
                for device, metrics in devices.items()
            }
            for start, devices in self._s.open.items()
        }
        return state

    def _close(self, watermark: int | None) -> Iterable[WindowResult]:
        s = self._s
        length = self._length_ms
        for start in sorted(s.open):
            if watermark is not None and start + length > watermark:
                break
            devices = s.open.pop(start)
            window_start, window_end = from_ms(start), from_ms(start + length)
            for device, metrics in devices.items():
                for name, (count, total, low, high) in metrics.items():
                    yield WindowResult(
                        key=device,
                        metric=name,
                        window_start=window_start,
                        window_end=window_end,
                        count=int(count),
                        sum=total,
                        avg=total / count,
                        min=low,
                        max=high,
                    )
