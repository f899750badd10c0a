"""Prediction for maintenance: when will a property cross a threshold, from its recent trend.

A ``PredictionRule`` (a pydantic declaration: it loads from a dict, JSON or
YAML through ``iotflow.declarations`` and a wrong value fails at load time
with ``ConfigError`` naming the field) says which property to watch, the
threshold, the direction of the crossing (``below``: battery empty;
``above``: bearing temperature limit), the ``horizon`` within which a
predicted crossing is worth a detection, and the ``window`` of recent points
the trend is fitted on. ``rule.build(resume_state)`` returns a
``PredictionLogic``, a pure logic object in the project's vocabulary
(``on_batch(items) -> list[Detection]``, ``snapshot()``) that
``operators.steps.LogicStep`` adapts to Bytewax; ``Predictor`` runs several
rules over the same stream.

Guarantees:

- **The fit.** At each accepted point of a device, a least-squares line is
  fitted (numpy, two-pass, centred) to the device's points with
  ``ts`` in ``(ts - window, ts]`` (at most ``max_points`` of them, the
  newest): ``value ~ intercept + slope·(t - ts)`` with ``t`` in hours, so
  ``intercept`` is the fitted value at the point's time. ``fit="exponential"``
  fits ``ln(value)`` the same way (``value ~ intercept·e^(slope·(t - ts))``;
  ``r2`` is then the log-space r²). The predicted crossing time is
  ``ts + (threshold - intercept) / slope`` (in log space for exponential).
- **No prediction** (and no detection) with fewer than ``min_points`` points,
  when every point has the same time, when ``r2 < min_r2``, for a flat trend
  or one going away from the threshold. When the fitted value is already
  past the threshold and the trend goes its way, the ETA is 0.
- **One detection per episode.** A device's episode starts at the first
  point whose ETA is within the ``horizon`` (``eta <= horizon``): one
  ``Detection`` then, none for the following points while the ETA stays
  within the horizon; the episode ends when a trusted fit puts the crossing
  beyond the horizon or the trend turns flat or away (counted
  ``recovered``); a later approach is a new episode and a new detection.
  Points without a prediction (too few points, untrusted fit) neither start
  nor end an episode.
- **Per point, in order.** Each device's points are taken in ``ts`` order
  (stable within a batch), each evaluated on the window ending at it, so
  results do not depend on how the stream is cut into batches once a
  device's points arrive in order; a restored ``snapshot()`` continues
  exactly where an uninterrupted run would be.
- **Cost.** Per batch, array work proportional to the points times their
  window sizes (every fit of the batch in one pass); Python work per distinct
  device, never per point. On the 2-core dev machine: ~35k readings/s with
  1,000 devices and 360-point windows one reading per device per batch, and
  ~140k readings/s replaying 200 readings per device in one batch.
- **Bad input never raises.** Missing/null values (``null``), NaN and ±inf
  (``nonfinite``), non-numeric values (``non_numeric``), values ``<= 0`` for
  an exponential fit (``nonpositive``), rows without a device id or with a
  timestamp outside years 1..9999 (``bad_key``), points older than the
  device's newest point already taken (``late``: the fits have moved past
  them), points more than ``max_future`` ahead of the injected clock
  (``future``: a wrong device clock must not make every later point late),
  and frames without the property column (``missing_column``) are counted in
  ``counts`` and left out.

The ``Detection``: ``rule`` is the rule's name, ``key`` the device id, ``ts``
the time of the point that started the episode, ``value`` its observed value,
``baseline`` the threshold, ``score`` the urgency ``1 - eta / horizon`` (1
when the crossing is now, 0 at the horizon), and ``details`` the fit:
``property``, ``direction``, ``threshold``, ``fit``, ``slope_per_h``,
``intercept``, ``r2``, ``n``, ``span_s``, ``eta_s``, ``crossing_at`` (ISO 8601;
None beyond year 9999) and ``horizon_s``.

Example::

    >>> rule = PredictionRule(property="battery", threshold=10, direction="below",
    ...                       horizon="30h", window="6h", min_points=4)
    >>> logic = rule.build(None, now=lambda: datetime(2026, 1, 2, tzinfo=UTC))
    >>> hour = 3_600_000
    >>> t0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    >>> points = [Reading("lock-1", t0 + k * hour, {"battery": 40.0 - 1.0 * k}) for k in range(6)]
    >>> [(d.rule, d.key, d.details["eta_s"] / 3600, d.details["crossing_at"])
    ...  for d in logic.on_batch(points)]
    [('predict:battery:below:10', 'lock-1', 27.0, '2026-01-02T06:00:00Z')]
    >>> logic.on_batch([Reading("lock-1", t0 + 6 * hour, {"battery": 34.0})])  # same episode
    []
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from iotflow.declarations import load_file, validate
from iotflow.durations import Duration
from iotflow.durations import label as label_of
from iotflow.errors import ConfigError
from iotflow.events import Detection, Reading, from_ms, to_ms

__all__ = [
    "PredictionLogic",
    "PredictionRule",
    "PredictionRules",
    "Predictor",
    "load_prediction_rules",
]

DEVICE = "device_id"
TS = "ts_ms"
_HOUR_MS = 3_600_000.0
# Timestamps that datetime can represent (years 1..9999): others are bad_key.
_MIN_TS_MS = -62_135_596_800_000
_MAX_TS_MS = 253_402_300_799_999
# Cells of the (points x window) matrix computed at once, to bound memory.
_CHUNK_CELLS = 1_000_000

_COUNTERS = (
    "rows",
    "accepted",
    "null",
    "nonfinite",
    "non_numeric",
    "nonpositive",
    "bad_key",
    "late",
    "future",
    "missing_column",
    "warming",
    "untrusted",
    "detections",
    "recovered",
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(ts_ms: float) -> str | None:
    """ISO 8601 UTC, or None past what datetime holds (a crossing ages away)."""
    if not _MIN_TS_MS <= ts_ms <= _MAX_TS_MS:
        return None
    return from_ms(int(ts_ms)).isoformat().replace("+00:00", "Z")


class PredictionRule(BaseModel):
    """When will ``property`` cross ``threshold`` going ``direction``; detect when within ``horizon``.

    ``window`` is the span of recent points the trend is fitted on,
    ``min_points`` the fewest points a fit needs, ``min_r2`` the least r² a
    fit needs to be trusted (0 trusts every fit), ``max_points`` bounds the
    points kept per device (the newest), ``fit`` is ``linear`` or
    ``exponential`` (log-linear; needs a positive threshold). ``name``
    defaults to ``predict:{property}:{direction}:{threshold}``.

        >>> PredictionRule(property="bearing_temp", threshold=90, direction="above",
        ...                horizon="2h", window="30m").name
        'predict:bearing_temp:above:90'
        >>> validate(PredictionRule, {"property": "battery", "threshold": 10,
        ...          "direction": "down", "horizon": "1d", "window": "6h"}, "prediction rule")
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: prediction rule declaration is invalid: direction: Input should be 'below' or 'above' (got 'down')

    Built directly in Python, a wrong field raises pydantic's ``ValidationError``
    (a ``ValueError`` naming the field); ``iotflow.declarations.validate`` and
    ``load_prediction_rules`` turn it into ``ConfigError``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    property: str
    threshold: float
    direction: Literal["below", "above"]
    horizon: Duration
    window: Duration
    min_points: int = 10
    min_r2: float = 0.0
    max_points: int = 10_000
    fit: Literal["linear", "exponential"] = "linear"
    name: str = ""

    @field_validator("property")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a property, e.g. 'battery'")
        return value

    @field_validator("horizon", "window")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be positive, e.g. '6h'; got {label_of(value)}")
        return value

    @field_validator("min_points")
    @classmethod
    def _two(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"must be at least 2 (a line needs two points); got {value}")
        return value

    @field_validator("min_r2")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"must be in 0..1 (0 trusts every fit); got {value:g}")
        return value

    @model_validator(mode="after")
    def _check(self) -> PredictionRule:
        if self.max_points < self.min_points:
            raise ValueError(
                f"max_points={self.max_points} is below min_points={self.min_points}; "
                "no fit could ever be made"
            )
        if self.fit == "exponential" and self.threshold <= 0:
            raise ValueError(
                f"threshold={self.threshold:g} must be > 0 for fit='exponential' "
                "(it fits ln(value)); use fit='linear' for thresholds at or below 0"
            )
        if not self.name:
            # Frozen model: fill the resolved default once, at validation.
            name = f"predict:{self.property}:{self.direction}:{self.threshold:g}"
            object.__setattr__(self, "name", name)
        return self

    @property
    def fingerprint(self) -> str:
        """Identifies the definition (every field but ``name``), so state from
        another definition is refused, never misread."""
        text = json.dumps(self.model_dump(mode="json", exclude={"name"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def build(
        self,
        resume_state: Mapping[str, Any] | None = None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> PredictionLogic:
        """The logic object; ``resume_state`` is an earlier ``snapshot()`` of the same rule."""
        return PredictionLogic(self, resume_state, now, max_future)


class PredictionRules(BaseModel):
    """Several rules with distinct names, as a file holds them (``rules: [...]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: list[PredictionRule]

    @model_validator(mode="after")
    def _unique(self) -> PredictionRules:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; give each a distinct name=")
            seen.add(rule.name)
        return self


def load_prediction_rules(
    source: str | Path | Sequence[Any] | Mapping[str, Any],
) -> list[PredictionRule]:
    """Rules from a ``.yaml``/``.json`` file path, a list of rule dicts or ``{"rules": [...]}``.

    >>> [r.name for r in load_prediction_rules([
    ...     {"property": "battery", "threshold": 10, "direction": "below",
    ...      "horizon": "1d", "window": "6h"}])]
    ['predict:battery:below:10']
    >>> load_prediction_rules([{"property": "battery", "threshold": 10, "direction": "below",
    ...                         "horizon": "-1h", "window": "6h"}])
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: prediction rules declaration is invalid: rules[0].horizon: must be positive, e.g. '6h'; got -1h
    """
    data: Any = source
    if isinstance(source, str | Path):
        data = load_file(source, "prediction rules")
    if isinstance(data, list):
        data = {"rules": data}
    return validate(PredictionRules, data, "prediction rules").rules


# --------------------------------------------------------------------------- input


@dataclass
class _Points:
    """The points of one batch: device ids, times, values, and which rows hold a number."""

    devices: list[Any]
    ts: np.ndarray  # int64
    values: np.ndarray  # float64
    numeric: np.ndarray  # bool: a number (maybe NaN or inf), not null or another type


def _from_frame(frame: pl.DataFrame, prop: str, counts: dict[str, int]) -> _Points | None:
    if DEVICE not in frame.columns or TS not in frame.columns or prop not in frame.columns:
        counts["missing_column"] += 1
        counts["rows"] += frame.height
        return None
    counts["rows"] += frame.height
    if frame.height == 0:
        return None
    col = frame[prop]
    if col.dtype.is_numeric():
        values = col.cast(pl.Float64)
        bad_type = 0
    elif col.dtype == pl.Utf8:
        values = col.cast(pl.Float64, strict=False)
        bad_type = values.null_count() - col.null_count()
    else:  # booleans, lists, structs: not a measured quantity
        values = pl.Series(prop, [None] * frame.height, dtype=pl.Float64)
        bad_type = frame.height - col.null_count()
    counts["null"] += col.null_count()
    counts["non_numeric"] += bad_type
    ts = frame[TS].cast(pl.Int64, strict=False).fill_null(_MIN_TS_MS - 1).to_numpy()
    dev = frame[DEVICE]
    devices = dev.to_list() if dev.dtype == pl.Utf8 else [None] * frame.height
    numeric = values.is_not_null().to_numpy()
    return _Points(devices, ts, values.fill_null(np.nan).to_numpy().astype(np.float64), numeric)


def _value(raw: Any, counts: dict[str, int]) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    counts["null" if raw is None else "non_numeric"] += 1
    return None


def _as_points(items: object) -> list[Any]:
    """One point object, or an iterable of them, as a list (anything else: a list of one,
    which ``_from_readings`` counts as ``bad_key``)."""
    if hasattr(items, "device_id") or isinstance(items, str | bytes | Mapping):
        return [items]
    try:
        return list(items)  # type: ignore[call-overload]
    except TypeError:
        return [items]


def _from_readings(readings: Iterable[Any], prop: str, counts: dict[str, int]) -> _Points:
    devices: list[Any] = []
    stamps: list[int] = []
    values: list[float] = []
    numeric: list[bool] = []
    for reading in readings:
        counts["rows"] += 1
        # a Reading's metrics, or the values of a twin's reported update
        metrics = getattr(reading, "metrics", None) or getattr(reading, "values", None)
        if not isinstance(metrics, Mapping):
            counts["bad_key"] += 1
            continue
        ts = getattr(reading, "ts_ms", None)
        ok_ts = isinstance(ts, int) and not isinstance(ts, bool) and _MIN_TS_MS <= ts <= _MAX_TS_MS
        devices.append(getattr(reading, "device_id", None))
        stamps.append(ts if ok_ts else _MIN_TS_MS - 1)  # type: ignore[arg-type]
        value = _value(metrics.get(prop), counts)
        values.append(math.nan if value is None else value)
        numeric.append(value is not None)
    return _Points(
        devices,
        np.array(stamps, dtype=np.int64),
        np.array(values, dtype=np.float64),
        np.array(numeric, dtype=bool),
    )


# --------------------------------------------------------------------------- logic


@dataclass
class _Device:
    """One device's recent points (ascending ``ts``) and whether an episode is open."""

    ts: np.ndarray
    values: np.ndarray
    alerting: bool = False


@dataclass
class _Fits:
    """Per evaluated point: the line fitted on its window (y is ln(value) for exponential)."""

    n: np.ndarray
    span_ms: np.ndarray
    slope: np.ndarray  # per hour
    intercept: np.ndarray  # fitted y at the point's time
    r2: np.ndarray


def _fit_windows(ts: np.ndarray, y: np.ndarray, lo: np.ndarray, pos: np.ndarray) -> _Fits:
    """Least squares of y on t over ``[lo[i], pos[i]]`` for each i, t in hours from ``ts[pos[i]]``.

    Two-pass (means first, then centred sums) over a left-aligned masked
    matrix, chunked to bound memory. Sums are cumulative along each row and
    read at its last point, so they add in sequence order whatever the matrix
    width: a window's fit does not depend on which other windows share its
    batch (numpy's pairwise ``sum`` would).
    """
    cnt = pos - lo + 1
    k = len(pos)
    out = _Fits(cnt, ts[pos] - ts[lo], *(np.empty(k) for _ in range(3)))
    width = int(cnt.max()) if k else 0
    step = max(1, _CHUNK_CELLS // max(width, 1))
    cols = np.arange(width)
    for c0 in range(0, k, step):
        sl = slice(c0, c0 + step)
        valid = cols < cnt[sl, None]
        idx = np.minimum(lo[sl, None] + cols, pos[sl, None])
        t = np.where(valid, (ts[idx] - ts[pos[sl], None]) / _HOUR_MS, 0.0)
        v = np.where(valid, y[idx], 0.0)
        n = cnt[sl]
        last = (np.arange(len(n)), n - 1)
        mt = np.cumsum(t, axis=1)[last] / n
        mv = np.cumsum(v, axis=1)[last] / n
        dt = np.where(valid, t - mt[:, None], 0.0)
        dv = np.where(valid, v - mv[:, None], 0.0)
        sxx = np.cumsum(dt * dt, axis=1)[last]
        sxy = np.cumsum(dt * dv, axis=1)[last]
        syy = np.cumsum(dv * dv, axis=1)[last]
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(sxx > 0, sxy / sxx, np.nan)
            r2 = np.where(syy > 0, sxy * sxy / (sxx * syy), 1.0)
        out.slope[sl] = slope
        out.intercept[sl] = mv - slope * mt
        out.r2[sl] = np.where(sxx > 0, np.minimum(r2, 1.0), np.nan)
    return out


class PredictionLogic:
    """The logic of one ``PredictionRule`` over many devices (see the module docstring)."""

    def __init__(
        self,
        rule: PredictionRule,
        resume_state: Mapping[str, Any] | None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> None:
        self.rule = rule
        self._now = now
        self._max_future_ms = round(max_future.total_seconds() * 1000)
        self._window_ms = round(rule.window.total_seconds() * 1000)
        self._horizon_h = rule.horizon.total_seconds() / 3600
        self._log = rule.fit == "exponential"
        self._target = math.log(rule.threshold) if self._log else rule.threshold
        self._sign = -1.0 if rule.direction == "below" else 1.0
        self.counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._devices: dict[str, _Device] = {}
        if resume_state is not None:
            self._restore(resume_state)

    def _restore(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.rule.fingerprint:
            msg = (
                f"recovered state of prediction rule {self.rule.name!r} was made by another "
                f"definition ({state.get('fingerprint')} != {self.rule.fingerprint}); rename "
                "the changed rule or start with a fresh recovery store"
            )
            raise ConfigError(msg)
        self.counts.update(state.get("counts", {}))
        for device, (ts, values, alerting) in state.get("devices", {}).items():
            self._devices[device] = _Device(
                np.array(ts, dtype=np.int64), np.array(values, dtype=np.float64), bool(alerting)
            )

    def snapshot(self) -> dict[str, Any]:
        """Plain data: the rule's fingerprint, the counters, per device its window and episode."""
        return {
            "fingerprint": self.rule.fingerprint,
            "counts": dict(self.counts),
            "devices": {
                name: [d.ts.tolist(), d.values.tolist(), d.alerting]
                for name, d in self._devices.items()
            },
        }

    def alerting(self) -> list[str]:
        """The devices with an open episode (a crossing predicted within the horizon)."""
        return sorted(name for name, d in self._devices.items() if d.alerting)

    def on_batch(self, items: pl.DataFrame | Reading | Iterable[Reading]) -> list[Detection]:
        """Take a reading frame, a ``Reading`` or an iterable of point objects; return
        the episodes they start, ordered by device id, then time.

        A point object has ``device_id``, ``ts_ms`` and a mapping ``metrics``
        (``iotflow.events.Reading``) or ``values`` (a twin's reported update);
        anything else is counted as ``bad_key``.
        """
        prop = self.rule.property
        if isinstance(items, pl.DataFrame):
            points = _from_frame(items, prop, self.counts)
            if points is None:
                return []
        else:
            points = _from_readings(_as_points(items), prop, self.counts)
        return self._on_points(points)

    def _on_points(self, points: _Points) -> list[Detection]:
        counts = self.counts
        ts, values = points.ts, points.values
        good_key = (
            np.array([isinstance(d, str) and d != "" for d in points.devices], dtype=bool)
            & (ts >= _MIN_TS_MS)
            & (ts <= _MAX_TS_MS)
        )
        has_value = points.numeric
        counts["bad_key"] += int((~good_key & has_value).sum())
        keep = good_key & has_value
        finite = np.isfinite(values)
        counts["nonfinite"] += int((keep & ~finite).sum())
        keep &= finite
        if self._log:
            positive = values > 0
            counts["nonpositive"] += int((keep & ~positive).sum())
            keep &= positive
        ahead = keep & (ts > to_ms(self._now()) + self._max_future_ms)
        counts["future"] += int(ahead.sum())
        keep &= ~ahead
        chosen = np.flatnonzero(keep)
        if len(chosen) == 0:
            return []
        found = self._take(
            np.array(points.devices, dtype=object)[chosen], ts[chosen], values[chosen]
        )
        counts["detections"] += len(found)
        return found

    def _take(self, names: np.ndarray, ts: np.ndarray, values: np.ndarray) -> list[Detection]:
        """Evaluate valid points: sorted by (device, ts), each device's stored window
        followed by its new points in one array, every fit of the batch in one pass.
        Python work is per distinct device (a searchsorted, the store), not per point."""
        rule = self.rule
        uniq, codes = np.unique(names, return_inverse=True)
        order = np.lexsort((ts, codes))  # stable: equal times keep arrival order
        codes, ts, values = codes[order], ts[order], values[order]
        states = [self._devices.get(name) for name in uniq.tolist()]
        newest = np.array(
            [st.ts[-1] if st is not None and len(st.ts) else _MIN_TS_MS - 1 for st in states],
            dtype=np.int64,
        )
        late = ts < newest[codes]
        if late.any():
            self.counts["late"] += int(late.sum())
            codes, ts, values = codes[~late], ts[~late], values[~late]
            if len(codes) == 0:
                return []
        self.counts["accepted"] += len(ts)
        first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        lens = np.diff(np.r_[first, len(codes)])
        present: list[_Device] = []
        pieces_t: list[np.ndarray] = []
        pieces_v: list[np.ndarray] = []
        for code, s0, n in zip(codes[first].tolist(), first.tolist(), lens.tolist(), strict=True):
            st = states[code]
            if st is None:
                st = self._devices[uniq[code]] = _Device(np.empty(0, np.int64), np.empty(0))
            present.append(st)
            pieces_t += [st.ts, ts[s0 : s0 + n]]
            pieces_v += [st.values, values[s0 : s0 + n]]
        ct, cv = np.concatenate(pieces_t), np.concatenate(pieces_v)
        held = np.array([len(st.ts) for st in present], dtype=np.int64)
        block = np.r_[0, np.cumsum(held + lens)[:-1]]
        end = block + held + lens
        pos = np.repeat(block + held - first, lens) + np.arange(len(ts))
        lo = np.empty(len(pos), dtype=np.int64)
        for b, e, s0, n in zip(
            block.tolist(), end.tolist(), first.tolist(), lens.tolist(), strict=True
        ):
            at = pos[s0 : s0 + n]
            lo[s0 : s0 + n] = b + np.searchsorted(ct[b:e], ct[at] - self._window_ms, side="right")
        lo = np.maximum(lo, pos - rule.max_points + 1)
        ready = pos - lo + 1 >= rule.min_points
        self.counts["warming"] += int((~ready).sum())

        # Episode events per point: +1 crossing within the horizon, -1 beyond or none, 0 no say.
        events = np.zeros(len(pos), dtype=np.int8)
        eval_at = np.flatnonzero(ready)
        eta_h = np.full(len(pos), np.nan)
        fits = None
        if len(eval_at):
            y = np.log(cv) if self._log else cv
            fits = _fit_windows(ct, y, lo[eval_at], pos[eval_at])
            trusted = np.isfinite(fits.slope) & (fits.r2 >= rule.min_r2)
            self.counts["untrusted"] += int((~trusted).sum())
            toward = self._sign * fits.slope > 0
            # a slope near 0 puts the crossing at +-inf: never within the horizon
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                eta = np.where(toward, (self._target - fits.intercept) / fits.slope, np.nan)
            eta = np.where(toward, np.maximum(eta, 0.0), np.inf)  # past the threshold: now
            within = trusted & (eta <= self._horizon_h)
            events[eval_at] = np.where(within, 1, np.where(trusted, -1, 0))
            eta_h[eval_at] = eta
        # State before each point: the device's last event before it, else its stored state.
        seg = np.repeat(np.arange(len(present)), lens)
        seg_first = np.repeat(first, lens)
        stored = np.array([st.alerting for st in present], dtype=bool)
        last = np.maximum.accumulate(np.where(events != 0, np.arange(len(pos)), -1))
        prev = np.r_[-1, last[:-1]]
        before = np.where(prev >= seg_first, events[np.maximum(prev, 0)] == 1, stored[seg])
        self.counts["recovered"] += int(((events == -1) & before).sum())
        tail = last[first + lens - 1]
        final = np.where(tail >= first, events[np.maximum(tail, 0)] == 1, stored)
        starts = np.flatnonzero((events == 1) & ~before)

        found = []
        if fits is not None:
            where = np.searchsorted(eval_at, starts)
            for k, i in zip(where.tolist(), starts.tolist(), strict=True):
                device = str(uniq[codes[i]])
                point = int(pos[i])
                found.append(
                    self._detection(device, int(ct[point]), float(cv[point]), fits, k, eta_h[i])
                )
        # Keep what later windows can still hold.
        for st, b, e, alerting in zip(
            present, block.tolist(), end.tolist(), final.tolist(), strict=True
        ):
            keep_from = b + int(np.searchsorted(ct[b:e], ct[e - 1] - self._window_ms, side="right"))
            keep_from = max(keep_from, e - rule.max_points)
            st.ts, st.values, st.alerting = ct[keep_from:e].copy(), cv[keep_from:e].copy(), alerting
        return found

    def _detection(
        self, device: str, ts_ms: int, value: float, fits: _Fits, k: int, eta_h: float
    ) -> Detection:
        rule = self.rule
        eta_h = float(eta_h)
        intercept = float(fits.intercept[k])
        eta_s = eta_h * 3600
        return Detection(
            rule=rule.name,
            key=device,
            ts=from_ms(ts_ms),
            value=value,
            baseline=rule.threshold,
            score=1.0 - eta_h / self._horizon_h,
            details={
                "property": rule.property,
                "direction": rule.direction,
                "threshold": rule.threshold,
                "fit": rule.fit,
                "slope_per_h": float(fits.slope[k]),
                "intercept": math.exp(intercept) if self._log else intercept,
                "r2": float(fits.r2[k]),
                "n": int(fits.n[k]),
                "span_s": int(fits.span_ms[k]) / 1000,
                "eta_s": eta_s,
                "crossing_at": _iso(ts_ms + eta_s * 1000),
                "horizon_s": rule.horizon.total_seconds(),
            },
        )


class Predictor:
    """Several ``PredictionRule`` over the same stream; one logic object for ``LogicStep``.

    Names must be unique (``ConfigError`` otherwise). ``on_batch`` hands the
    batch to every rule and returns their detections in rule order;
    ``snapshot()`` holds each rule's state under its name, so adding a rule
    keeps the others' state and a changed rule refuses its old state.
    """

    def __init__(
        self,
        rules: Sequence[PredictionRule],
        resume_state: Mapping[str, Any] | None = None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> None:
        names = [r.name for r in rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(
                f"two prediction rules are named {dup[0]!r}; give each a distinct name"
            )
        state = resume_state or {}
        self.logics = [r.build(state.get(r.name), now, max_future) for r in rules]

    def on_batch(self, items: pl.DataFrame | Reading | Iterable[Reading]) -> list[Detection]:
        """Every rule's detections for this batch."""
        if not isinstance(items, pl.DataFrame):
            items = _as_points(items)  # iterated once per rule
        return [d for logic in self.logics for d in logic.on_batch(items)]

    def snapshot(self) -> dict[str, Any]:
        """Each rule's snapshot under its name."""
        return {logic.rule.name: logic.snapshot() for logic in self.logics}
