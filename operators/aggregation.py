"""Windowed telemetry statistics per device and per device group, columnar.

``Aggregation`` is the declaration (a pydantic model: a dict, JSON or YAML
gives the same thing); ``build()`` gives a ``WindowAggregator`` that takes
reading frames (``iotflow.frame``) a batch at a time and emits result frames
when windows close. No Bytewax import: ``operators.steps`` wraps it.

Guarantees:

- Event time. The watermark is the largest device timestamp seen minus the
  allowed lateness, advanced by the clock while the stream is quiet; it never
  goes backwards. A window ``[start, end)`` closes when the watermark reaches
  ``end``; at end of input every window closes.
- A reading is *late* when every window that would hold it has closed: it goes
  to the late output, counted, never silently dropped. Out-of-order readings
  within the lateness land in their window.
- Tumbling windows, sliding windows (``length`` a multiple of ``step``; built
  from ``step``-long panes) and session windows (a device's readings with gaps
  under ``gap``; a session ``[first, last + gap)`` closes when the watermark
  passes its end, and a reading that bridges two sessions merges them).
- Rollups: each longer tumbling window (``rollups``, multiples of the base
  length) merges the closed partials of the level below, never raw readings.
- Groups: ``group_by`` lists grouping sets over the device dimensions given at
  build time (``{"dev-1": {"zone": "z1", "floor": "2"}}``); ``["device"]`` is
  per device. A device without a dimension of a set is left out of that set and
  counted in ``unassigned``.
- A result row is idempotent on ``(group_by, key, metric, window_start_ms,
  window_end_ms)``.

Result frames have the columns ``group_by`` (``"device"`` or the set's
dimensions joined by ``+``), ``key`` (the device id, or ``zone=z1`` /
``building=b1|floor=2``), ``metric``, ``window_start_ms``, ``window_end_ms``,
``count`` and each statistic asked for (``operators.stats``).

Example::

    >>> agg = Aggregation.model_validate(
    ...     {"window": {"kind": "tumbling", "length": "10s"}, "stats": ["avg", "max"]}
    ... ).build(None)
    >>> frame = pl.DataFrame({"device_id": ["d1", "d1"], "ts_ms": [1000, 2000], "t": [1.0, 3.0]})
    >>> agg.on_batch(frame)
    []
    >>> agg.on_eof()[0].select("key", "metric", "count", "avg", "max").rows()
    [('d1', 't', 2, 2.0, 3.0)]
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from iotflow.durations import Duration
from iotflow.errors import ConfigError
from iotflow.events import from_ms, to_ms
from iotflow.frame import DEVICE, TS, metric_columns
from operators.expr import Expr
from operators.groups import group_keys, set_label
from operators.stats import (
    StatSpec,
    exact,
    exact_columns,
    finalize,
    merge,
    merge_sketch,
    partial,
    sketch,
)
from operators.units import UnitConversion

__all__ = [
    "Aggregation",
    "LateFrame",
    "Session",
    "Sliding",
    "Tumbling",
    "WindowAggregator",
    "to_wide",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PANE = "w"
_GROUP_KEYS = ["group_by", "key", "metric", "window_start_ms", "window_end_ms"]
_INDEX = ["group_by", "key", "window_start_ms", "window_end_ms"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _ms(duration: timedelta) -> int:
    return round(duration.total_seconds() * 1000)


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tumbling(_Spec):
    """Fixed, non-overlapping windows ``[start, start + length)`` aligned to ``align_to``."""

    kind: Literal["tumbling"] = "tumbling"
    length: Duration

    @field_validator("length")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if _ms(value) <= 0:
            raise ValueError(f"window length {value} must be at least 1ms")
        return value


class Sliding(_Spec):
    """Overlapping windows of ``length`` starting every ``step``."""

    kind: Literal["sliding"] = "sliding"
    length: Duration
    step: Duration

    @model_validator(mode="after")
    def _fits(self) -> Sliding:
        length, step = _ms(self.length), _ms(self.step)
        if step <= 0 or length <= 0:
            raise ValueError(f"window length {self.length} and step {self.step} must be positive")
        if step > length:
            raise ValueError(
                f"window step {self.step} exceeds length {self.length}; "
                "overlapping windows need step <= length"
            )
        if length % step:
            raise ValueError(
                f"window length {self.length} is not a multiple of step {self.step}; "
                "sliding windows are built from step-long panes"
            )
        return self


class Session(_Spec):
    """Per-device sessions: readings closer than ``gap`` share a window."""

    kind: Literal["session"] = "session"
    gap: Duration

    @field_validator("gap")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if _ms(value) <= 0:
            raise ValueError(f"session gap {value} must be at least 1ms")
        return value


WindowSpec = Annotated[Tumbling | Sliding | Session, Field(discriminator="kind")]


class Aggregation(_Spec):
    """What to compute: the window, the metrics, the statistics, the groups, the rollups.

    ``metrics`` empty means every metric column. ``units`` converts a metric before
    anything else (``{"temperature": {"from": "degF", "to": "degC"}}``).

    ``kpis`` derives values from the statistics of one group and window: name ->
    an expression (``operators.expr``) over ``{metric}_{stat}`` fields, e.g.
    ``{"power_per_device": "power_total / power_device_count"}``. Each KPI adds a
    result row (``metric`` = its name) with its ``value`` for every (group_by, key,
    window) that has every field it reads and a finite value (a division by zero
    gives no row); its statistic columns are null, and statistic rows carry a null
    ``value``. A KPI name must not be a metric's name.
    """

    window: WindowSpec
    stats: list[str] = ["avg", "min", "max"]
    metrics: list[str] = []
    group_by: list[list[str]] = [["device"]]
    rollups: list[Duration] = []
    allowed_lateness: Duration = timedelta(0)
    align_to: datetime = EPOCH
    units: dict[str, UnitConversion] = {}
    kpis: dict[str, Expr] = {}

    @field_validator("stats")
    @classmethod
    def _stats(cls, value: list[str]) -> list[str]:
        try:
            return list(StatSpec.parse(value).names)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("group_by")
    @classmethod
    def _groups(cls, value: list[list[str]]) -> list[list[str]]:
        if not value:
            raise ValueError("group_by needs at least one grouping set, e.g. [['device']]")
        for names in value:
            if not names or len(set(names)) != len(names):
                raise ValueError(f"grouping set {names!r} must list distinct dimensions")
            if "device" in names and len(names) > 1:
                raise ValueError(f"grouping set {names!r}: 'device' stands alone")
        return value

    @field_validator("allowed_lateness")
    @classmethod
    def _lateness(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError(f"allowed lateness {value} must be zero or positive")
        return value

    @field_validator("align_to")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError(f"align_to {value!r} must be an aware UTC datetime")
        return value

    @model_validator(mode="after")
    def _rollups(self) -> Aggregation:
        if not self.rollups:
            return self
        if not isinstance(self.window, Tumbling):
            raise ValueError("rollups build on a tumbling window; set window.kind to 'tumbling'")
        below = self.window.length
        for length in self.rollups:
            if _ms(length) <= _ms(below) or _ms(length) % _ms(below):
                raise ValueError(
                    f"rollup {length} must be a longer multiple of {below} (the level below)"
                )
            below = length
        return self

    @model_validator(mode="after")
    def _kpis(self) -> Aggregation:
        suffixes = tuple(f"_{name}" for name in self.stats)
        for name, expr in self.kpis.items():
            if not name.isidentifier() or name in self.metrics:
                msg = f"KPI name {name!r} must be a plain name (letters, digits, _), not a metric"
                raise ValueError(msg)
            if expr.is_condition:
                raise ValueError(f"KPI {name!r} is a condition ({expr.text!r}); a KPI is a number")
            for field in sorted(expr.names):
                if not field.endswith(suffixes):
                    msg = (
                        f"KPI {name!r} reads {field!r}: KPIs read {{metric}}_{{stat}} fields "
                        f"of the statistics asked for ({', '.join(self.stats)})"
                    )
                    raise ValueError(msg)
        return self

    @property
    def fingerprint(self) -> str:
        """Identifies the definition, so state from another definition is never misread
        (KPIs are left out: they are computed from results and hold no state)."""
        text = json.dumps(self.model_dump(mode="json", exclude={"kpis"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def analyze(
        self, frame: pl.DataFrame, dimensions: dict[str, dict[str, str]] | None = None
    ) -> pl.DataFrame:
        """Batch analysis of a history (a reading frame, e.g. from DuckDB or Parquet):
        the same results, by the same code, as streaming the readings in any batches
        within the allowed lateness. Nothing is late: all of it is one batch."""
        aggregator = self.build(None, dimensions=dimensions)
        emitted = [*aggregator.on_batch(frame), *aggregator.on_eof()]
        frames = [e for e in emitted if isinstance(e, pl.DataFrame)]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="diagonal_relaxed")

    def build(
        self,
        resume_state: dict[str, Any] | None,
        *,
        dimensions: dict[str, dict[str, str]] | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> WindowAggregator:
        return WindowAggregator(self, resume_state, dimensions or {}, now)


@dataclass(frozen=True)
class LateFrame:
    """Readings whose windows had all closed, and the watermark then."""

    readings: pl.DataFrame
    watermark_ms: int


_PART_KEYS = [DEVICE, _PANE, "metric"]
# raw frames of at least this many rows are left alone (no further merging copies)
_MERGE_BELOW = 1 << 16


def _long(frame: pl.DataFrame) -> pl.DataFrame:
    """Wide reading rows (with ``_PANE``) -> one row per present metric value."""
    return frame.unpivot(
        index=[DEVICE, TS, _PANE], variable_name="metric", value_name="value"
    ).drop_nulls("value")


def _key_frame(keys: dict[str, str]) -> pl.DataFrame:
    """Device id -> group key as a frame to join on."""
    return pl.DataFrame(
        {DEVICE: list(keys), "key": list(keys.values())}, schema={DEVICE: pl.Utf8, "key": pl.Utf8}
    )


def _pack(frame: pl.DataFrame) -> bytes:
    """A frame as Arrow IPC bytes: plain, picklable state that keeps every dtype."""
    return frame.write_ipc(None).getvalue()


def _unpack(data: bytes) -> pl.DataFrame:
    return pl.read_ipc(data)


def _resolve(merged: dict[int, int], label: int) -> int:
    while label in merged:
        label = merged[label]
    return label


class _Partials:
    """Open mergeable partials of one window length: device partials and sketch rows."""

    def __init__(self, length_ms: int, state: dict[str, Any] | None = None) -> None:
        self.length_ms = length_ms
        self.parts: list[pl.DataFrame] = []
        self.sketches: list[pl.DataFrame] = []
        self.open: set[int] = set()
        if state:
            self.parts = [_unpack(p) for p in state["parts"]]
            self.sketches = [_unpack(s) for s in state["sketches"]]
            self.open = set(state["open"])

    def add(self, part: pl.DataFrame, buckets: pl.DataFrame) -> None:
        if part.height:
            self.parts.append(part)
            self.sketches.append(buckets)
            self.open.update(part.get_column(_PANE).unique().to_list())

    def _compact(self) -> None:
        if len(self.parts) > 1:
            self.parts = [merge(pl.concat(self.parts, how="diagonal_relaxed"), _PART_KEYS)]
            self.sketches = [merge_sketch(pl.concat(self.sketches), _PART_KEYS)]

    def select(self, panes: set[int], *, remove: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The partials of ``panes`` (removed from the open state when ``remove``)."""
        self._compact()
        if not self.parts or not panes:
            return pl.DataFrame(), pl.DataFrame()
        mask = pl.col(_PANE).is_in(sorted(panes))
        part, buckets = self.parts[0], self.sketches[0]
        if remove:
            self.parts = [part.filter(~mask)]
            self.sketches = [buckets.filter(~mask)]
            self.open -= panes
        return part.filter(mask), buckets.filter(mask)

    def snapshot(self) -> dict[str, Any]:
        self._compact()
        return {
            "parts": [_pack(p) for p in self.parts],
            "sketches": [_pack(s) for s in self.sketches],
            "open": sorted(self.open),
        }


class WindowAggregator:
    """The logic of an ``Aggregation``: ``on_batch``, ``on_timer``, ``on_eof``,
    ``next_timer``, ``snapshot``. Emits result frames and ``LateFrame``s.

    Readings stay raw until their window (or, for sliding windows, their pane)
    closes: a batch costs a filter and an append, and a close is one group-by
    over the window's rows. Tumbling and session windows are therefore exact,
    percentiles included; sliding windows and rollups merge partials, with
    percentiles from the sketch (within 0.5 %).
    """

    def __init__(
        self,
        spec: Aggregation,
        resume_state: dict[str, Any] | None,
        dimensions: dict[str, dict[str, str]],
        now: Callable[[], datetime],
    ) -> None:
        self.spec = spec
        self._now = now
        self._stats = StatSpec.parse(spec.stats)
        self._lateness_ms = _ms(spec.allowed_lateness)
        self._align_ms = to_ms(spec.align_to)
        window = spec.window
        if isinstance(window, Sliding):
            self._length_ms, self._pane_ms = _ms(window.length), _ms(window.step)
        elif isinstance(window, Tumbling):
            self._length_ms = self._pane_ms = _ms(window.length)
        else:
            self._length_ms = self._pane_ms = _ms(window.gap)
        self._session = isinstance(window, Session)
        self._sliding = isinstance(window, Sliding)
        # grouping set -> (device_id, key) rows of the devices that have a group in it
        self._groups = {
            tuple(names): _key_frame(group_keys(dimensions, names))
            for names in spec.group_by
            if names != ["device"]
        }
        if resume_state is not None and resume_state.get("fingerprint") != spec.fingerprint:
            msg = (
                f"recovered window state was made by another aggregation definition "
                f"({resume_state.get('fingerprint')} != {spec.fingerprint}); "
                "start with a fresh recovery store for the changed definition"
            )
            raise ConfigError(msg)
        state = resume_state or {}
        self._raw: list[pl.DataFrame] = [_unpack(r) for r in state.get("raw", [])]
        self._open: set[int] = set(state.get("open", []))
        self._panes = _Partials(self._pane_ms, state.get("panes"))
        lengths = [_ms(r) for r in spec.rollups]
        levels = state.get("rollups") or [None] * len(lengths)
        self._rollups = [_Partials(n, s) for n, s in zip(lengths, levels, strict=True)]
        self._max_ts: int | None = state.get("max_ts")
        self._max_seen_at: int = state.get("max_seen_at", 0)
        self._watermark: int | None = state.get("watermark")
        self._emitted_end: int | None = state.get("emitted_end")
        # device -> [[first_ts, last_ts, session id], ...] (session windows only)
        self._sessions: dict[str, list[list[int]]] = copy.deepcopy(state.get("sessions", {}))
        self._next_session: int = state.get("next_session", 0)
        self.late_count: int = state.get("late_count", 0)
        self.unassigned: int = state.get("unassigned", 0)

    # -- the logic vocabulary -------------------------------------------------

    def on_batch(self, frame: pl.DataFrame) -> list[pl.DataFrame | LateFrame]:
        emits: list[pl.DataFrame | LateFrame] = []
        watermark = self.watermark_ms()
        frame = self._prepare(frame)
        if frame.height == 0:
            return emits
        if self._session:
            frame, late = self._assign_sessions(frame, watermark)
        else:
            start = pl.col(TS) - (pl.col(TS) - self._align_ms) % self._pane_ms
            frame = frame.with_columns(start.alias(_PANE))
            late = None
            # the filters copy the batch: only when its oldest window has closed
            if watermark is not None and frame[_PANE].min() + self._length_ms <= watermark:
                is_late = pl.col(_PANE) + self._length_ms <= watermark
                late = frame.filter(is_late).drop(_PANE)
                frame = frame.filter(~is_late)
        if late is not None and late.height:
            self.late_count += late.height
            emits.append(LateFrame(late, watermark if watermark is not None else 0))
        if frame.height:
            self._append_raw(frame)
            self._open.update(frame.get_column(_PANE).unique().to_list())
            batch_max = frame.get_column(TS).max()
            if self._max_ts is None or batch_max > self._max_ts:
                self._max_ts = batch_max
                self._max_seen_at = to_ms(self._now())
        emits.extend(self._close(self.watermark_ms()))
        return emits

    def on_timer(self) -> list[pl.DataFrame | LateFrame]:
        return list(self._close(self.watermark_ms()))

    def on_eof(self) -> list[pl.DataFrame | LateFrame]:
        """End of input: every open window closes."""
        return list(self._close(None))

    def next_timer(self) -> datetime | None:
        """When the watermark, advancing with the clock, reaches the next window end."""
        end = self._next_end()
        if end is None or self._max_ts is None:
            return None
        wait_ms = end - (self._max_ts - self._lateness_ms)
        return from_ms(self._max_seen_at + max(0, wait_ms))

    def snapshot(self) -> dict[str, Any]:
        if len(self._raw) > 1:
            self._raw = [pl.concat(self._raw, how="diagonal_relaxed")]
        return {
            "fingerprint": self.spec.fingerprint,
            "raw": [_pack(r) for r in self._raw],
            "open": sorted(self._open),
            "panes": self._panes.snapshot(),
            "rollups": [level.snapshot() for level in self._rollups],
            "max_ts": self._max_ts,
            "max_seen_at": self._max_seen_at,
            "watermark": self._watermark,
            "emitted_end": self._emitted_end,
            "sessions": copy.deepcopy(self._sessions),
            "next_session": self._next_session,
            "late_count": self.late_count,
            "unassigned": self.unassigned,
        }

    def watermark_ms(self) -> int | None:
        """The current watermark in epoch ms (None before the first reading)."""
        if self._max_ts is None:
            return None
        idle_ms = max(0, to_ms(self._now()) - self._max_seen_at)
        candidate = self._max_ts - self._lateness_ms + idle_ms
        if self._watermark is None or candidate > self._watermark:
            self._watermark = candidate
        return self._watermark

    # -- inside ---------------------------------------------------------------

    def _prepare(self, frame: pl.DataFrame) -> pl.DataFrame:
        metrics = self.spec.metrics or metric_columns(frame)
        present = [m for m in metrics if m in frame.columns]
        if not present:
            return frame.select(DEVICE, TS).clear()
        frame = frame.select(DEVICE, TS, *present)
        conversions = [c.expr(m) for m, c in self.spec.units.items() if m in present]
        return frame.with_columns(conversions) if conversions else frame

    def _append_raw(self, frame: pl.DataFrame) -> None:
        """Keep a batch's rows; small frames merge like a binary counter (each row copied
        a few times at most), so a close concatenates a few frames, not thousands: at
        10k readings/s in batches of 50, a minute's 12,000 frames took a second."""
        raw = self._raw
        raw.append(frame)
        while len(raw) > 1 and raw[-2].height <= raw[-1].height and raw[-2].height < _MERGE_BELOW:
            last = raw.pop()
            raw[-1] = pl.concat([raw[-1], last], how="diagonal_relaxed")

    def _take_raw(self, panes: set[int]) -> pl.DataFrame:
        """Remove and return the raw rows of ``panes``."""
        if not self._raw:
            return pl.DataFrame()
        raw = pl.concat(self._raw, how="diagonal_relaxed") if len(self._raw) > 1 else self._raw[0]
        if panes >= self._open:  # every open pane (end of input, a quiet stream): no filter
            self._raw, self._open = [], set()
            return raw
        mask = pl.col(_PANE).is_in(sorted(panes))
        rest = raw.filter(~mask)
        self._raw = [rest] if rest.height else []
        self._open -= panes
        return raw.filter(mask)

    def _assign_sessions(
        self, frame: pl.DataFrame, watermark: int | None
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Label each reading with its session id in ``_PANE``, merging bridged sessions."""
        gap = self._pane_ms
        frame = frame.sort([DEVICE, TS], maintain_order=True)
        labels: list[int] = []
        late_rows: list[bool] = []
        merged: dict[int, int] = {}
        pairs = zip(frame.get_column(DEVICE).to_list(), frame.get_column(TS).to_list(), strict=True)
        for device, ts in pairs:
            sessions = self._sessions.setdefault(device, [])
            touching = [s for s in sessions if s[0] - gap < ts < s[1] + gap]
            if not touching and watermark is not None and ts + gap <= watermark:
                labels.append(-1)
                late_rows.append(True)
                continue
            late_rows.append(False)
            if not touching:
                self._next_session += 1
                sessions.append([ts, ts, self._next_session])
                labels.append(self._next_session)
                continue
            keep = touching[0]
            keep[0], keep[1] = min(keep[0], ts), max(keep[1], ts)
            for other in touching[1:]:
                keep[0], keep[1] = min(keep[0], other[0]), max(keep[1], other[1])
                sessions.remove(other)
                self._relabel(other[2], keep[2])
                merged[other[2]] = keep[2]
            labels.append(keep[2])
        if merged:
            # rows of this batch labelled before their session merged into another
            labels = [_resolve(merged, label) for label in labels]
        for device in {d for d, ss in self._sessions.items() if not ss}:
            del self._sessions[device]
        frame = frame.with_columns(pl.Series(_PANE, labels, dtype=pl.Int64))
        late_mask = pl.Series(late_rows, dtype=pl.Boolean)
        return frame.filter(~late_mask), frame.filter(late_mask).drop(_PANE)

    def _relabel(self, old: int, new: int) -> None:
        self._raw = [r.with_columns(pl.col(_PANE).replace(old, new)) for r in self._raw]
        self._open.discard(old)
        self._open.add(new)

    def _next_end(self) -> int | None:
        ends: list[int] = []
        if self._session:
            ends = [s[1] + self._pane_ms for ss in self._sessions.values() for s in ss]
        elif self._open:
            ends.append(min(self._open) + self._pane_ms)
        if self._sliding and self._panes.open:
            done = self._emitted_end if self._emitted_end is not None else 0
            ends.append(max(done, min(self._panes.open)) + self._pane_ms)
        for level in self._rollups:
            if level.open:
                ends.append(min(level.open) + level.length_ms)
        return min(ends) if ends else None

    def _close(self, watermark: int | None) -> list[pl.DataFrame]:
        out: list[pl.DataFrame] = []
        if self._session:
            closed = self._close_sessions(watermark)
        elif self._sliding:
            closed = self._close_sliding(watermark)
        else:
            closed = self._close_tumbling(watermark)
        if closed is not None:
            out.append(closed)
        for index in range(len(self._rollups)):
            rolled = self._close_rollup(index, watermark)
            if rolled is not None:
                out.append(rolled)
        return out

    def _close_tumbling(self, watermark: int | None) -> pl.DataFrame | None:
        length = self._length_ms
        ready = {w for w in self._open if watermark is None or w + length <= watermark}
        if not ready:
            return None
        rows = self._take_raw(ready).with_columns((pl.col(_PANE) + length).alias("_end"))
        if self._rollups:
            long = _long(rows.drop("_end"))
            self._roll_up(0, partial(long, _PART_KEYS, self._stats), sketch(long, _PART_KEYS))
        return self._exact_results(rows)

    def _close_sessions(self, watermark: int | None) -> pl.DataFrame | None:
        gap = self._pane_ms
        bounds: dict[int, tuple[int, int]] = {}
        for device in list(self._sessions):
            keep = []
            for first, last, sid in self._sessions[device]:
                if watermark is None or last + gap <= watermark:
                    bounds[sid] = (first, last + gap)
                else:
                    keep.append([first, last, sid])
            if keep:
                self._sessions[device] = keep
            else:
                del self._sessions[device]
        if not bounds:
            return None
        ids = list(bounds)
        spans = pl.DataFrame(
            {
                _PANE: ids,
                "_start": [bounds[i][0] for i in ids],
                "_end": [bounds[i][1] for i in ids],
            },
            schema={_PANE: pl.Int64, "_start": pl.Int64, "_end": pl.Int64},
        )
        rows = self._take_raw(set(ids)).join(spans, on=_PANE)
        return self._exact_results(rows.drop(_PANE).rename({"_start": _PANE}))

    def _close_sliding(self, watermark: int | None) -> pl.DataFrame | None:
        step, length = self._pane_ms, self._length_ms
        # panes whose end passed the watermark become partials
        ready = {w for w in self._open if watermark is None or w + step <= watermark}
        if ready:
            long = _long(self._take_raw(ready))
            self._panes.add(partial(long, _PART_KEYS, self._stats), sketch(long, _PART_KEYS))
        panes = self._panes.open
        if not panes:
            return None
        ends = sorted({w + k * step for w in panes for k in range(1, length // step + 1)})
        done = self._emitted_end if self._emitted_end is not None else min(ends) - step
        due = [e for e in ends if e > done and (watermark is None or e <= watermark)]
        if not due:
            return None
        parts, sketches = [], []
        for end in due:
            part, buckets = self._panes.select(
                {w for w in panes if end - length <= w < end}, remove=False
            )
            label = [pl.lit(end - length).alias(_PANE), pl.lit(end).alias("_end")]
            parts.append(part.with_columns(label))
            sketches.append(buckets.with_columns(label))
        self._emitted_end = due[-1]
        expired = {w for w in panes if watermark is None or w + length <= watermark}
        self._panes.select(expired, remove=True)
        return self._merged_results(pl.concat(parts), pl.concat(sketches))

    def _close_rollup(self, index: int, watermark: int | None) -> pl.DataFrame | None:
        level = self._rollups[index]
        length = level.length_ms
        ready = {w for w in level.open if watermark is None or w + length <= watermark}
        if not ready:
            return None
        part, buckets = level.select(ready, remove=True)
        self._roll_up(index + 1, part, buckets)
        end = (pl.col(_PANE) + length).alias("_end")
        return self._merged_results(part.with_columns(end), buckets.with_columns(end))

    def _roll_up(self, index: int, part: pl.DataFrame, buckets: pl.DataFrame) -> None:
        """Hand closed device partials to rollup level ``index`` (relabelled to its windows)."""
        if index >= len(self._rollups) or part.height == 0:
            return
        length = self._rollups[index].length_ms
        start = (pl.col(_PANE) - (pl.col(_PANE) - self._align_ms) % length).alias(_PANE)
        self._rollups[index].add(
            part.drop("_end", strict=False).with_columns(start),
            buckets.drop("_end", strict=False).with_columns(start),
        )

    def _exact_results(self, rows: pl.DataFrame) -> pl.DataFrame | None:
        """Results for every grouping set from raw reading rows labelled ``_PANE`` and ``_end``."""
        if rows.height == 0:
            return None
        window = [_PANE, "_end"]
        metrics = [c for c in rows.columns if c not in (DEVICE, TS, *window)]
        # a close of one window (the usual tumbling close): group by the key alone and
        # add the window as constants (a third less group-by work than three keys)
        single = rows.get_column(_PANE).n_unique() == 1 and rows.get_column("_end").n_unique() == 1
        bounds = [pl.lit(rows[c][0], rows.schema[c]).alias(c) for c in window] if single else []
        by_window = [] if single else window
        frames = []
        for names in self.spec.group_by:
            device = names == ["device"]
            if device and not any(rows.get_column(m).null_count() for m in metrics):
                # every reading has every metric: all metrics in one group-by
                per_metric = exact_columns(rows, [DEVICE, *by_window], self._stats, metrics)
                frames += [
                    stats.rename({DEVICE: "key"}).with_columns(
                        *bounds, pl.lit(metric).alias("metric"), pl.lit("device").alias("group_by")
                    )
                    for metric, stats in per_metric.items()
                ]
                continue
            keyed = rows if device else self._keyed(rows, names)
            keys = [DEVICE] if device else ["key", DEVICE]
            # one metric at a time: no wide-to-long copy and no metric name to group by
            for metric in metrics:
                value = pl.col(metric).alias("value")
                one = keyed.select(*keys, TS, *by_window, value)
                if one.get_column("value").null_count():
                    one = one.drop_nulls("value")
                if one.height == 0:
                    continue
                stats = exact(one, [keys[0], *by_window], self._stats, devices=not device)
                frames.append(
                    stats.rename({DEVICE: "key"} if device else {}).with_columns(
                        *bounds,
                        pl.lit(metric).alias("metric"),
                        pl.lit(set_label(names)).alias("group_by"),
                    )
                )
        return self._finish(frames)

    def _merged_results(self, part: pl.DataFrame, buckets: pl.DataFrame) -> pl.DataFrame | None:
        """Results for every grouping set from device partials labelled ``_PANE`` and ``_end``."""
        if part.height == 0:
            return None
        window = [_PANE, "_end", "metric"]
        devices = merge(part, [DEVICE, *window])
        device_buckets = merge_sketch(buckets, [DEVICE, *window])
        frames = []
        for names in self.spec.group_by:
            if names == ["device"]:
                stats = finalize(devices, device_buckets, [DEVICE, *window], self._stats)
                frames.append(
                    stats.rename({DEVICE: "key"}).with_columns(pl.lit("device").alias("group_by"))
                )
            else:
                keyed = self._keyed(devices, names)
                merged = merge(keyed, ["key", *window], devices=True)
                group_buckets = device_buckets.join(
                    keyed.select(DEVICE, "key", *window), on=[DEVICE, *window]
                ).drop(DEVICE)
                stats = finalize(merged, group_buckets, ["key", *window], self._stats)
                frames.append(stats.with_columns(pl.lit(set_label(names)).alias("group_by")))
        return self._finish(frames)

    def _keyed(self, rows: pl.DataFrame, names: list[str]) -> pl.DataFrame:
        """Rows of devices that have a group in ``names``, with the group ``key``; the
        others are counted in ``unassigned``."""
        keys = self._groups[tuple(names)]
        keyed = rows.join(keys, on=DEVICE, how="inner")
        if keyed.height < rows.height:
            left_out = rows.join(keys, on=DEVICE, how="anti")
            self.unassigned += left_out.get_column(DEVICE).n_unique()
        return keyed

    def _finish(self, frames: list[pl.DataFrame]) -> pl.DataFrame | None:
        frames = [f for f in frames if f.height]
        if not frames:
            return None
        result = pl.concat(frames, how="diagonal_relaxed")
        result = result.rename({_PANE: "window_start_ms", "_end": "window_end_ms"})
        result = result.select(*_GROUP_KEYS, *self._stats.names)
        if self.spec.kpis:
            result = pl.concat([result, *self._kpi_rows(result)], how="diagonal_relaxed")
        return result.sort(["window_start_ms", "window_end_ms", "group_by", "key", "metric"])

    def _kpi_rows(self, result: pl.DataFrame) -> list[pl.DataFrame]:
        wide = to_wide(result)
        rows = []
        for name, expr in self.spec.kpis.items():
            if not expr.names <= set(wide.columns):  # no group of this close has the fields
                continue
            value = expr.to_polars().cast(pl.Float64).alias("value")
            rows.append(
                wide.select(*_INDEX, pl.lit(name).alias("metric"), value).filter(
                    pl.col("value").is_finite()
                )
            )
        return rows


def to_wide(results: pl.DataFrame) -> pl.DataFrame:
    """Window results -> one row per (group_by, key, window) with ``{metric}_{stat}`` columns,
    and a column per KPI named as the KPI: the layout KPIs, CEP conditions and peer rules
    read (``temperature_avg > 30``, ``power_per_device > 100``)."""
    if results.height == 0:
        return pl.DataFrame(schema={c: results.schema.get(c, pl.Utf8) for c in _INDEX})
    kpis = None
    if "value" in results.columns:  # KPI rows carry a value, statistic rows do not
        is_kpi = pl.col("value").is_not_null()
        kpis, results = results.filter(is_kpi), results.filter(~is_kpi).drop("value")
    stats = [c for c in results.columns if c not in (*_INDEX, "metric")]
    parts = [
        part.select(*_INDEX, *(pl.col(s).alias(f"{metric}_{s}") for s in stats))
        for (metric,), part in results.group_by("metric", maintain_order=True)
    ]
    if kpis is not None:
        parts += [
            part.select(*_INDEX, pl.col("value").alias(name))
            for (name,), part in kpis.group_by("metric", maintain_order=True)
        ]
    if not parts:
        return pl.DataFrame(schema={c: results.schema.get(c, pl.Utf8) for c in _INDEX})
    wide = parts[0]
    for part in parts[1:]:
        wide = wide.join(part, on=_INDEX, how="full", coalesce=True)
    return wide.sort(["window_start_ms", "group_by", "key"])
