"""Anomaly detection over reading and window frames, as pure logic (no Bytewax import).

Four rule declarations (pydantic models: they load from dicts, JSON or YAML
and a wrong value fails at load time with ``ConfigError``):

- ``ZScoreRule``: a reading against the mean and sample standard deviation
  of the device's own previous readings (the last ``window`` readings and/or
  those within ``window_time``).
- ``EwmaRule``: a reading against exponentially weighted control limits
  ``mean ± L·std`` of the device's own history (O(1) state per device).
- ``MadRule``: robust z-score ``0.6745·(x - median) / MAD`` over a rolling
  window, so one spike does not inflate the baseline of the next readings.
- ``PeerRule``: a device's window statistic (``temperature_avg``) against its
  peers in the same group (``zone``, or ``[building, floor]``) for the same
  window; groups come from the device dimensions (registry metadata) the way
  the group statistics' do (``operators.groups``).

Each declaration's ``build(resume_state)`` returns a logic object with
``on_batch(frame) -> list[Detection | Skipped]`` and ``snapshot()`` (plain
dicts, lists, ints and floats). ``AnomalyDetector`` runs several per-reading
rules over the same stream and is what the dataflow step wraps.

Guarantees shared by the per-reading rules:

- **Order.** A batch is processed per device in ``ts_ms`` order (a stable
  sort: equal timestamps keep arrival order), so results do not depend on how
  a device-ordered stream is cut into batches, and restoring a snapshot
  continues exactly where an uninterrupted run would be. A batch's
  detections come ordered by device id, then time.
- **Cost.** Per batch the work is array operations over all its readings
  (histories live in one arena array, devices map to dense rows); Python
  work is per distinct device id and per detection, never per reading.
- **Before, then included.** A reading is scored against the baseline of the
  readings *before* it and only then joins the baseline, so an anomalous
  reading never masks itself. Anomalous readings do join the baseline
  afterwards (the baseline adapts; ``MadRule`` is the choice when spikes
  must not widen it).
- **Warm-up.** No reading is scored until the baseline holds
  ``min_samples`` readings (``warmup`` for EWMA); those are counted as
  ``warming``.
- **Strictly beyond.** A detection needs ``|score| > k`` (``L``,
  ``threshold``); a value at exactly the limit is not an anomaly.
- **Flat baseline.** When every baseline value is equal (zero variance, or
  MAD and mean absolute deviation both zero) and no ``min_std`` floor applies,
  any value different from the baseline is a detection with ``score=None``
  and ``details["flat"] = True``; an equal value is not. No division by
  zero, no infinite score: scores are finite and saturate at
  ``±SCORE_LIMIT``.
- **Bad input.** Null, NaN and ±inf values are skipped and counted
  (``null``, ``nonfinite``) and never enter a baseline. Rows without a
  device id or with a timestamp outside years 1..9999 are counted
  (``bad_key``). A frame without the rule's metric column is a counted no-op
  (``missing_column``). Huge finite values are scaled by a power of two
  before the arithmetic, so they neither overflow nor poison the baseline.
- **Late and future readings** are not scored and come back as ``Skipped``:
  ``late`` when older than the newest reading already processed for the
  device (its baseline has moved past it), ``future`` when more than
  ``max_future`` (default 1 h) ahead of the injected clock, so one reading
  from a wrong clock cannot make every later reading of the device late.

Example::

    >>> rule = ZScoreRule(metric="t", window=4, k=3.0)
    >>> logic = rule.build(None)
    >>> frame = pl.DataFrame({"device_id": ["d1"] * 6, "ts_ms": [1, 2, 3, 4, 5, 6],
    ...                       "t": [8.0, 12.0, 8.0, 12.0, 10.0, 30.0]})
    >>> [(d.rule, d.value, d.baseline, round(d.score, 3)) for d in detections(logic.on_batch(frame))]
    [('zscore:t', 30.0, 10.5, 10.184)]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from iotflow.durations import Duration
from iotflow.errors import ConfigError
from iotflow.events import Detection, from_ms, to_ms
from operators.groups import group_keys, set_label

__all__ = [
    "SCORE_LIMIT",
    "AnomalyDetector",
    "AnomalyEmit",
    "EwmaLogic",
    "EwmaRule",
    "MadLogic",
    "MadRule",
    "PeerLogic",
    "PeerRule",
    "ReadingRule",
    "Rule",
    "Skipped",
    "WindowRuleLogic",
    "ZScoreRule",
    "detections",
    "load_rules",
]

DEVICE = "device_id"
TS = "ts_ms"
KEY = "key"
WINDOW_START = "window_start_ms"
WINDOW_END = "window_end_ms"

# Scores are clipped here: a billion sigmas says all there is to say, and stays finite.
SCORE_LIMIT = 1e9
_FMAX = float(np.finfo(np.float64).max)
# Timestamps that datetime can represent (years 1..9999): others are counted as bad_key.
_MIN_TS_MS = -62_135_596_800_000
_MAX_TS_MS = 253_402_300_799_999
_INT64_MIN = np.iinfo(np.int64).min
_MAD_K = 0.6745  # Iglewicz & Hoaglin: MAD / 0.6745 estimates sigma for normal data
_MEANAD_K = 1.253314  # sqrt(pi/2): mean absolute deviation -> sigma, the fallback when MAD is 0
# Rows of the (readings x window) matrix handled at once, to bound memory for long windows.
_CHUNK_CELLS = 2_000_000


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Skipped:
    """Rows a rule did not score, with the reason (``late`` or ``future``)."""

    reason: str
    frame: pl.DataFrame


AnomalyEmit = Detection | Skipped


def detections(emits: Iterable[AnomalyEmit]) -> list[Detection]:
    """Only the detections of a list of emits."""
    return [e for e in emits if isinstance(e, Detection)]


# --------------------------------------------------------------------------- declarations


def _explain(exc: ValidationError, model: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join([model, *(str(p) for p in err["loc"])])
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        if err["type"] == "missing":
            lines.append(f"{where} is required")
        elif isinstance(shown, dict):
            lines.append(f"{where}: {msg}")
        else:
            lines.append(f"{model}.{field}={shown!r}: {msg}")
    return "; ".join(lines)


class _RuleBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    kind: str
    name: str = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, type(self).__name__)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, cls.__name__)) from None

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None:
            target = data.get("column", data.get("metric"))
            if isinstance(target, str):
                data = {**data, "name": cls._name_for(data, target)}
        return data

    @classmethod
    def _name_for(cls, data: dict[str, Any], target: str) -> str:
        return f"{cls.model_fields['kind'].default}:{target}"

    @property
    def fingerprint(self) -> str:
        """Identifies the definition (every field but ``name``), so state from
        another definition is refused, never misread."""
        text = json.dumps(self.model_dump(mode="json", exclude={"name"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class _WindowRuleBase(_RuleBase):
    metric: str
    window: int | None = None
    window_time: Duration | None = None
    min_samples: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _window_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("window"), timedelta | str):
            w = data["window"]
            msg = f"window={w!r} counts readings; for a time window use window_time={w!r}"
            raise ValueError(msg)
        return data

    @model_validator(mode="after")
    def _check_window(self) -> _WindowRuleBase:
        if self.window is None and self.window_time is None:
            raise ValueError(
                "give window (a number of readings, e.g. 30) and/or window_time (e.g. 5 minutes)"
            )
        if self.window is not None and self.window < 2:
            raise ValueError(f"window={self.window} must be at least 2 readings")
        if self.window_time is not None and self.window_time <= timedelta(0):
            raise ValueError(f"window_time={self.window_time} must be positive")
        if self.min_samples is None:
            # Frozen model: fill the resolved default so the fingerprint states it.
            object.__setattr__(self, "min_samples", self.window or 10)
        elif self.min_samples < 2:
            raise ValueError(f"min_samples={self.min_samples} must be at least 2")
        elif self.window is not None and self.min_samples > self.window:
            raise ValueError(
                f"min_samples={self.min_samples} exceeds window={self.window}; "
                "the baseline never holds more than window readings"
            )
        return self


class ZScoreRule(_WindowRuleBase):
    """Rolling z-score against the device's own previous readings.

    ``score = (x - mean) / max(std, min_std)`` where mean and the sample
    standard deviation (ddof=1) come from the baseline: the last ``window``
    readings before ``x`` and/or (both given: both limits apply) the readings
    with ``ts`` in ``(x.ts - window_time, x.ts]`` before it. Detects when
    ``|score| > k``. ``min_samples`` defaults to ``window`` (else 10).
    ``baseline`` is the mean; ``details`` has ``std``, ``n``, ``lower`` and
    ``upper`` (``mean ± k·std``), ``metric``.

        >>> ZScoreRule(metric="temperature", window=30).name
        'zscore:temperature'
        >>> ZScoreRule(metric="t", window=30, k=0)
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: ZScoreRule: k=0.0 must be > 0 (a number of standard deviations, e.g. 3)
    """

    kind: Literal["zscore"] = "zscore"
    k: float = 3.0
    min_std: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> ZScoreRule:
        if self.k <= 0:
            raise ValueError(f"k={self.k} must be > 0 (a number of standard deviations, e.g. 3)")
        if self.min_std < 0:
            raise ValueError(f"min_std={self.min_std} must be >= 0 (e.g. the sensor resolution)")
        return self

    def build(
        self,
        resume_state: dict[str, Any] | None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> ZScoreLogic:
        return ZScoreLogic(self, resume_state, now, max_future)


class MadRule(_WindowRuleBase):
    """Robust rolling outliers: ``score = 0.6745·(x - median) / MAD``.

    Median and MAD (median absolute deviation from the median) of the same
    baseline as ``ZScoreRule``. When MAD is 0 (over half the baseline equal)
    the score falls back to ``(x - median) / (1.253314·mean absolute
    deviation)``; when that is 0 too the baseline is flat. Detects when
    ``|score| > threshold`` (3.5 by default, after Iglewicz & Hoaglin).
    ``baseline`` is the median; ``details`` has ``mad``, ``dispersion``
    (``mad`` or ``meanad``), ``n``, ``metric``.

        >>> MadRule(metric="t", window=20).threshold
        3.5
    """

    kind: Literal["mad"] = "mad"
    threshold: float = 3.5

    @model_validator(mode="after")
    def _check(self) -> MadRule:
        if self.threshold <= 0:
            raise ValueError(f"threshold={self.threshold} must be > 0 (a robust z, e.g. 3.5)")
        return self

    def build(
        self,
        resume_state: dict[str, Any] | None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> MadLogic:
        return MadLogic(self, resume_state, now, max_future)


class EwmaRule(_RuleBase):
    """Exponentially weighted control limits: ``mean ± L·max(std, min_std)``.

    Per device, before each reading ``x``: ``d = x - mean``, score
    ``d / max(std, min_std)``, detect when ``|score| > L``; then
    ``mean = (1 - alpha)·mean + alpha·x`` and
    ``var = (1 - alpha)·(var + alpha·d²)`` (the first reading sets
    ``mean = x, var = 0``). No reading is scored before ``warmup`` readings
    built the baseline. ``baseline`` is the mean; ``details`` has ``std``,
    ``n``, ``lower``, ``upper``, ``metric``.

        >>> EwmaRule(metric="t", alpha=1.5)
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: EwmaRule: alpha=1.5 must be in (0, 1] (the weight of the newest reading, e.g. 0.1)
    """

    kind: Literal["ewma"] = "ewma"
    metric: str
    alpha: float = 0.1
    L: float = 3.0
    warmup: int = 20
    min_std: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> EwmaRule:
        if not 0 < self.alpha <= 1:
            raise ValueError(
                f"alpha={self.alpha} must be in (0, 1] (the weight of the newest reading, e.g. 0.1)"
            )
        if self.L <= 0:
            raise ValueError(f"L={self.L} must be > 0 (the control limit width in std, e.g. 3)")
        if self.warmup < 1:
            raise ValueError(f"warmup={self.warmup} must be at least 1 reading")
        if self.min_std < 0:
            raise ValueError(f"min_std={self.min_std} must be >= 0 (e.g. the sensor resolution)")
        return self

    def build(
        self,
        resume_state: dict[str, Any] | None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> EwmaLogic:
        return EwmaLogic(self, resume_state, now, max_future)


class PeerRule(_RuleBase):
    """A device against its peers in the same group for the same window.

    Works on window frames (``key``, ``window_start_ms``, ``window_end_ms``,
    ``column`` such as ``temperature_avg``): peers are compared "at the same
    time" as the same window of the same group, so noise is smoothed by the
    window operator first. ``dimension`` names the peer group: one dimension
    (``zone``) or a grouping set of several (``[building, floor]``), over the
    device dimensions given at build (``{"dev-1": {"zone": "z1"}}``, which the
    monitoring flow takes from the registry's metadata). A device's group is
    the key its group statistics carry (``zone=z1``, ``building=A|floor=2``,
    ``operators.groups``); a device without every dimension of the set is
    ``ungrouped``. The baseline of a device is the median and MAD of the
    *other* devices of its group in that window, so one outlier does not hide
    another; the score is the robust z of ``MadRule`` (with the same
    mean-absolute-deviation fallback and flat rule); a device needs at least
    ``min_peers`` peers (default 3). Detects when ``|score| > threshold``.

    A group-window is scored once: when every device of the group reported
    it, when a later window of the group is scored, when ``max_wait`` wall
    time passed since its first result arrived, or at end of input. Results
    for a group-window already scored come back as ``Skipped("late", ...)``;
    a repeated result for an open one replaces the earlier value (replays).

        >>> PeerRule(column="temperature_avg", dimension="zone").name
        'peer:zone:temperature_avg'
        >>> PeerRule(column="power_avg", dimension=["building", "floor"]).name
        'peer:building+floor:power_avg'
    """

    kind: Literal["peer"] = "peer"
    column: str
    dimension: str | list[str]
    threshold: float = 3.5
    min_peers: int = 3
    max_wait: Duration = timedelta(seconds=2)

    @classmethod
    def _name_for(cls, data: dict[str, Any], target: str) -> str:
        dimension = data.get("dimension")
        label = set_label(dimension) if isinstance(dimension, list) else dimension
        return f"peer:{label}:{target}"

    @property
    def group_by(self) -> list[str]:
        """The dimensions of the peer group, as a grouping set."""
        return [self.dimension] if isinstance(self.dimension, str) else list(self.dimension)

    @model_validator(mode="after")
    def _check(self) -> PeerRule:
        names = self.group_by
        if not names or len(set(names)) != len(names) or "device" in names or "" in names:
            raise ValueError(
                f"dimension={self.dimension!r} must name one dimension or distinct ones "
                "(e.g. zone or [building, floor]); 'device' is no peer group"
            )
        if self.threshold <= 0:
            raise ValueError(f"threshold={self.threshold} must be > 0 (a robust z, e.g. 3.5)")
        if self.min_peers < 2:
            raise ValueError(
                f"min_peers={self.min_peers} must be at least 2 (a median of fewer is no baseline)"
            )
        if self.max_wait <= timedelta(0):
            raise ValueError(f"max_wait={self.max_wait} must be positive")
        return self

    def build(
        self,
        resume_state: dict[str, Any] | None,
        dimensions: Mapping[str, Mapping[str, str]] | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> PeerLogic:
        return PeerLogic(self, resume_state, dimensions or {}, now)


ReadingRule = Annotated[ZScoreRule | EwmaRule | MadRule, Field(discriminator="kind")]
Rule = Annotated[ZScoreRule | EwmaRule | MadRule | PeerRule, Field(discriminator="kind")]
_RULES: TypeAdapter[list[Any]] = TypeAdapter(list[Rule])


def load_rules(data: str | Sequence[Mapping[str, Any]]) -> list[Any]:
    """Rule declarations from a YAML/JSON text or a list of dicts (``kind``
    picks the rule). Names must be unique.

        >>> [r.name for r in load_rules("[{kind: zscore, metric: t, window: 10}, {kind: ewma, metric: t}]")]
        ['zscore:t', 'ewma:t']
        >>> load_rules([{"kind": "zscore", "metric": "t", "windw": 10}])
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: rules[0]: ZScoreRule.windw=10: Extra inputs are not permitted
    """
    if isinstance(data, str):
        data = yaml.safe_load(data)
    try:
        rules = _RULES.validate_python(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            where = f"rules[{loc[0]}]" if loc else "rules"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "value_error":  # a rule's own ConfigError, already named
                lines.append(f"{where}: {msg}")
            else:
                lines.append(f"{where}.{'.'.join(str(p) for p in loc[1:])}: {msg}")
        raise ConfigError("; ".join(lines)) from None
    _check_unique([r.name for r in rules])
    return rules


def _check_unique(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            msg = f"two rules are named {name!r}; give each rule a distinct name="
            raise ConfigError(msg)
        seen.add(name)


def _check_fingerprint(state: Mapping[str, Any], rule: _RuleBase) -> None:
    if state.get("fingerprint") != rule.fingerprint:
        msg = (
            f"recovered state of rule {rule.name!r} was made by another definition "
            f"({state.get('fingerprint')} != {rule.fingerprint}); rename the changed rule "
            "or start with a fresh recovery store"
        )
        raise ConfigError(msg)


# --------------------------------------------------------------------------- numeric kernels


def _finite(x: float) -> float:
    return float(min(max(x, -_FMAX), _FMAX))


def _pow2_scale(w: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row, a power of two near the largest |value|: dividing by it is exact
    and keeps sums and squares far from overflow."""
    amax = np.where(valid, np.abs(w), 0.0).max(axis=1)
    _, exp = np.frexp(amax)
    return np.ldexp(1.0, exp - 1)


def _pick(a: np.ndarray, col: np.ndarray) -> np.ndarray:
    return a[np.arange(a.shape[0]), col]


def _mean_std(
    w: np.ndarray, valid: np.ndarray, cnt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a left-aligned window matrix: (mean, sample std, flat) in the
    row's scale. cumsum adds in sequence order, so a row's result depends only
    on its values, never on the matrix width (that is what makes results
    independent of batching)."""
    total = _pick(np.cumsum(np.where(valid, w, 0.0), axis=1), cnt - 1)
    mean = total / cnt
    dev = np.where(valid, w - mean[:, None], 0.0)
    ss = _pick(np.cumsum(dev * dev, axis=1), cnt - 1)
    std = np.sqrt(ss / np.maximum(cnt - 1, 1))
    flat = np.where(valid, w, -np.inf).max(axis=1) == np.where(valid, w, np.inf).min(axis=1)
    mean = np.where(flat, w[:, 0], mean)
    std = np.where(flat, 0.0, std)
    return mean, std, flat


def _median_sorted(s: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    return (_pick(s, (cnt - 1) // 2) + _pick(s, cnt // 2)) / 2


def _robust(
    w: np.ndarray, valid: np.ndarray, cnt: np.ndarray, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Robust z of x against each row (scaled): (median, spread, score, flat, used_mad)."""
    med = _median_sorted(np.sort(np.where(valid, w, np.inf), axis=1), cnt)
    absdev = np.abs(w - med[:, None])
    mad = _median_sorted(np.sort(np.where(valid, absdev, np.inf), axis=1), cnt)
    meanad = _pick(np.cumsum(np.where(valid, absdev, 0.0), axis=1), cnt - 1) / cnt
    used_mad = mad > 0
    spread = np.where(used_mad, mad / _MAD_K, meanad * _MEANAD_K)
    flat = spread == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = x - med
        by_mad = _MAD_K * d / np.where(used_mad, mad, 1.0)
        by_meanad = d / np.where(flat, 1.0, _MEANAD_K * meanad)
        score = np.where(used_mad, by_mad, np.where(flat, np.nan, by_meanad))
    return med, spread, score, flat, used_mad


def _first_after(ts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Vectorized binary search: per row, the first j in [lo, hi) with ts[j] > bound
    (hi when none); ts is ascending within each [lo, hi)."""
    lo = lo.copy()
    hi = hi.copy()
    last = len(ts) - 1
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        right = ts[np.minimum(mid, last)] <= bound
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


def _minus(ts: np.ndarray, span_ms: int) -> np.ndarray:
    """ts - span, saturating at the int64 minimum."""
    return np.maximum(ts, _INT64_MIN + span_ms) - span_ms


# --------------------------------------------------------------------------- per-reading logic


@dataclass
class _Batch:
    """One metric of a frame, valid rows only, sorted by (device, ts)."""

    devices: list[str]
    lens: np.ndarray  # readings per device, same order as devices
    ts: np.ndarray  # int64
    values: np.ndarray  # float64, finite


_COUNTERS = (
    "rows",
    "scored",
    "warming",
    "detections",
    "null",
    "nonfinite",
    "bad_key",
    "late",
    "future",
    "missing_column",
)

_EMPTY_F = np.empty(0, dtype=np.float64)
_EMPTY_I = np.empty(0, dtype=np.int64)


def _excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    np.cumsum(a[:-1], out=out[1:])
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lens.sum())
    if total == 0:
        return _EMPTY_I
    return np.repeat(starts - _excl_cumsum(lens), lens) + np.arange(total, dtype=np.int64)


class _Devices:
    """Device id -> a dense row index into per-device arrays (append-only), so
    per-batch state access is array indexing, not per-device Python."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def rows(self, devices: list[str]) -> np.ndarray:
        get = self._index.get
        out = [get(d, -1) for d in devices]
        if -1 in out:
            for k, row in enumerate(out):
                if row == -1:
                    out[k] = self._index[devices[k]] = len(self.names)
                    self.names.append(devices[k])
        return np.array(out, dtype=np.int64)


def _grown(a: np.ndarray, size: int, fill: Any) -> np.ndarray:
    if len(a) >= size:
        return a
    out = np.full(max(size, 2 * len(a), 64), fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


@dataclass
class _Keys:
    """The rows of a frame with a usable device and time, in (device, ts) order
    (stable: equal timestamps keep arrival order), split into runs per device."""

    order: np.ndarray  # row numbers in the frame
    ts: np.ndarray  # int64, in that order
    rows: np.ndarray  # per run: the device's row in the registry
    lens: np.ndarray  # per run: its number of readings

    def take(self, keep: np.ndarray) -> _Keys:
        """Only the rows where ``keep`` (runs that lose every row disappear)."""
        run = np.repeat(np.arange(len(self.rows)), self.lens)
        lens = np.bincount(run[keep], minlength=len(self.rows))
        present = lens > 0
        return _Keys(self.order[keep], self.ts[keep], self.rows[present], lens[present])


def _keys(frame: pl.DataFrame, devices: _Devices, counts: dict[str, int]) -> _Keys | None:
    """Resolve and sort the keys of a frame with array operations: device ids are
    dictionary-encoded once (Python work per distinct device, not per row)."""
    if DEVICE not in frame.columns or TS not in frame.columns:
        counts["missing_column"] += 1
        return None
    n = frame.height
    counts["rows"] += n
    if n == 0:
        return None
    dev = frame[DEVICE]
    if dev.dtype != pl.Utf8:
        dev = dev.cast(pl.Utf8, strict=False)
    enc = pc.dictionary_encode(dev.to_arrow())
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    lut = np.append(devices.rows(enc.dictionary.to_pylist()), -1)
    idx = enc.indices
    if idx.null_count:
        idx = pc.fill_null(idx, -1)
    codes = lut[np.asarray(idx, dtype=np.int64)]
    ts_s = frame[TS]
    if ts_s.dtype != pl.Int64:
        ts_s = ts_s.cast(pl.Int64, strict=False)
    if ts_s.null_count():
        ts_s = ts_s.fill_null(_MIN_TS_MS - 1)
    ts = ts_s.to_numpy()
    ok = (codes >= 0) & (ts >= _MIN_TS_MS) & (ts <= _MAX_TS_MS)
    if not ok.all():
        counts["bad_key"] += int(n - ok.sum())
        sel = np.flatnonzero(ok)
        order = sel[np.lexsort((ts[sel], codes[sel]))]
    else:
        order = np.lexsort((ts, codes))
    if len(order) == 0:
        return None
    c = codes[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    lens = np.diff(np.r_[starts, len(c)])
    return _Keys(order, ts[order], c[starts], lens)


class _ReadingLogic:
    """Shared batch plumbing of the per-reading rules: resolve keys, take the
    metric, route late and future rows; subclasses score."""

    rule: Any

    def __init__(
        self,
        rule: Any,
        resume_state: dict[str, Any] | None,
        now: Callable[[], datetime],
        max_future: timedelta,
        devices: _Devices | None = None,
    ) -> None:
        self.rule = rule
        self._now = now
        self._max_future_ms = int(max_future.total_seconds() * 1000)
        self.counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        # AnomalyDetector shares one registry among its rules: keys resolve once.
        self._devices = devices if devices is not None else _Devices()
        if resume_state is not None:
            _check_fingerprint(resume_state, rule)
            self.counts.update(resume_state.get("counts", {}))
            self._restore(resume_state["devices"])
        else:
            self._restore({})

    # subclasses: per-device state in and out, and the scoring
    def _restore(self, devices: dict[str, Any]) -> None:
        raise NotImplementedError

    def _dump(self) -> dict[str, Any]:
        raise NotImplementedError

    def _last_ts(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _score(self, batch: _Batch, rows: np.ndarray) -> list[Detection]:
        raise NotImplementedError

    def on_batch(self, frame: pl.DataFrame) -> list[AnomalyEmit]:
        """Score a reading frame; returns detections and ``Skipped`` rows."""
        keys = _keys(frame, self._devices, self.counts)
        if keys is None:
            if frame.height and DEVICE in frame.columns and TS in frame.columns:
                self._values(frame, None)  # every row had a bad key: still count the metric
            return []
        return self._on_keys(frame, keys)

    def _values(self, frame: pl.DataFrame, keys: _Keys | None) -> np.ndarray | None:
        metric = self.rule.metric
        if metric not in frame.columns:
            self.counts["missing_column"] += 1
            return None
        if keys is None:
            return None
        col = frame[metric]
        if col.dtype != pl.Float64:
            col = col.cast(pl.Float64, strict=False)
        values = col.to_numpy()[keys.order]  # nulls arrive as NaN
        nulls = 0
        if col.null_count():
            nulls = int(np.asarray(pc.is_null(col.to_arrow()))[keys.order].sum())
        finite = np.isfinite(values)
        self.counts["null"] += nulls
        self.counts["nonfinite"] += int(len(values) - finite.sum()) - nulls
        return values

    def _on_keys(self, frame: pl.DataFrame, keys: _Keys) -> list[AnomalyEmit]:
        values = self._values(frame, keys)
        if values is None:
            return []
        emits: list[AnomalyEmit] = []
        keep = np.isfinite(values)
        limit = to_ms(self._now()) + self._max_future_ms
        ahead = keep & (keys.ts > limit)
        if ahead.any():
            self.counts["future"] += int(ahead.sum())
            emits.append(Skipped("future", frame[keys.order[ahead]]))
            keep &= ~ahead
        late = keep & (keys.ts < np.repeat(self._last_ts(keys.rows), keys.lens))
        if late.any():
            self.counts["late"] += int(late.sum())
            emits.append(Skipped("late", frame[keys.order[late]]))
            keep &= ~late
        if not keep.all():
            keys, values = keys.take(keep), values[keep]
            if len(keys.rows) == 0:
                return emits
        names = self._devices.names
        batch = _Batch([names[r] for r in keys.rows.tolist()], keys.lens, keys.ts, values)
        found = self._score(batch, keys.rows)
        # Registry order is arrival order; report by device, then time.
        found.sort(key=lambda d: d.key)
        self.counts["detections"] += len(found)
        emits.extend(found)
        return emits

    def snapshot(self) -> dict[str, Any]:
        """Plain data: the fingerprint, the counters and per-device baselines."""
        return {
            "fingerprint": self.rule.fingerprint,
            "counts": dict(self.counts),
            "devices": self._dump(),
        }


class WindowRuleLogic(_ReadingLogic):
    """Rolling-window baselines (``ZScoreRule``, ``MadRule``). State per device:
    the values and timestamps a future reading's baseline can still contain,
    kept as ranges of one arena array (compacted when it fills), so a batch
    gathers and stores every device's history with array operations."""

    def _restore(self, devices: dict[str, Any]) -> None:
        rows = self._devices.rows(list(devices))
        lens = np.array([len(v) for v, _ in devices.values()], dtype=np.int64)
        size = len(self._devices.names)
        self._start = _grown(_EMPTY_I, size, 0)
        self._len = _grown(_EMPTY_I, size, 0)
        self._start[rows] = _excl_cumsum(lens)
        self._len[rows] = lens
        self._sv = np.array([x for v, _ in devices.values() for x in v], dtype=np.float64)
        self._st = np.array([x for _, t in devices.values() for x in t], dtype=np.int64)
        self._used = len(self._sv)

    def _dump(self) -> dict[str, Any]:
        out = {}
        for name, s, n in zip(
            self._devices.names, self._start.tolist(), self._len.tolist(), strict=False
        ):
            if n:
                out[name] = [self._sv[s : s + n].tolist(), self._st[s : s + n].tolist()]
        return out

    def _last_ts(self, rows: np.ndarray) -> np.ndarray:
        size = len(self._devices.names)
        self._start = _grown(self._start, size, 0)
        self._len = _grown(self._len, size, 0)
        n = self._len[rows]
        if self._st.size == 0:
            return np.full(len(rows), _INT64_MIN, dtype=np.int64)
        at = np.maximum(self._start[rows] + n - 1, 0)
        return np.where(n > 0, self._st[np.minimum(at, self._st.size - 1)], _INT64_MIN)

    def _store(
        self, rows: np.ndarray, values: np.ndarray, ts: np.ndarray, lens: np.ndarray
    ) -> None:
        """Replace the histories of ``rows`` (values given device after device)."""
        need = len(values)
        if self._used + need > len(self._sv):
            # Compact: keep the other devices' live ranges, drop garbage and the
            # ranges being replaced; leave room so compaction stays rare.
            self._len[rows] = 0
            live = np.flatnonzero(self._len)
            live_lens = self._len[live]
            src = _ranges(self._start[live], live_lens)
            cap = 2 * (len(src) + need) + 1024
            sv = np.empty(cap, dtype=np.float64)
            st = np.empty(cap, dtype=np.int64)
            sv[: len(src)] = self._sv[src]
            st[: len(src)] = self._st[src]
            self._start[live] = _excl_cumsum(live_lens)
            self._sv, self._st, self._used = sv, st, len(src)
        at = self._used
        self._sv[at : at + need] = values
        self._st[at : at + need] = ts
        self._start[rows] = at + _excl_cumsum(lens)
        self._len[rows] = lens
        self._used = at + need

    def _score(self, batch: _Batch, rows: np.ndarray) -> list[Detection]:
        rule = self.rule
        lens = batch.lens
        u = len(rows)
        n = len(batch.values)
        # One array per batch: each device's history followed by its new readings.
        hc = self._len[rows]
        size = hc + lens
        block = _excl_cumsum(size)
        end = block + size
        cv = np.empty(int(end[-1]), dtype=np.float64)
        ct = np.empty(int(end[-1]), dtype=np.int64)
        old_dst = _ranges(block, hc)
        old_src = _ranges(self._start[rows], hc)
        cv[old_dst] = self._sv[old_src]
        ct[old_dst] = self._st[old_src]
        pos = _ranges(block + hc, lens)  # where each new reading lands, in batch order
        cv[pos] = batch.values
        ct[pos] = batch.ts
        lo = np.repeat(block, lens)
        if rule.window is not None:
            lo = np.maximum(lo, pos - rule.window)
        span_ms = None
        if rule.window_time is not None:
            span_ms = int(rule.window_time.total_seconds() * 1000)
            lo = _first_after(ct, lo, pos, _minus(ct[pos], span_ms))
        cnt = pos - lo

        ready = cnt >= rule.min_samples
        self.counts["warming"] += int(n - ready.sum())
        self.counts["scored"] += int(ready.sum())
        found: list[Detection] = []
        idx_ready = np.flatnonzero(ready)
        if len(idx_ready):
            seg = np.repeat(np.arange(u), lens)
            width = int(cnt[idx_ready].max())
            step = max(1, _CHUNK_CELLS // width)
            cols = np.arange(width)
            for c0 in range(0, len(idx_ready), step):
                r = idx_ready[c0 : c0 + step]
                rl, rc = lo[r], cnt[r]
                idx = np.minimum(rl[:, None] + cols, len(cv) - 1)
                valid = cols < rc[:, None]
                # Padding cells hold 0, so no kernel sees another device's values.
                w = np.where(valid, cv[idx], 0.0)
                found.extend(self._rows(batch, seg[r], pos[r], w, valid, rc, cv, ct))

        # Keep what a later reading's baseline can still contain.
        keep = end - rule.window if rule.window is not None else block
        keep = np.maximum(keep, block)
        if span_ms is not None:
            keep = _first_after(ct, keep, end, _minus(ct[end - 1], span_ms))
        src = _ranges(keep, end - keep)
        self._store(rows, cv[src], ct[src], end - keep)
        return found

    def _rows(
        self,
        batch: _Batch,
        seg: np.ndarray,
        pos: np.ndarray,
        w: np.ndarray,
        valid: np.ndarray,
        cnt: np.ndarray,
        cv: np.ndarray,
        ct: np.ndarray,
    ) -> list[Detection]:
        raise NotImplementedError


def _detection(
    rule: str,
    device: str,
    ts_ms: int,
    value: float,
    baseline: float,
    score: float | None,
    **details: Any,
) -> Detection:
    return Detection(
        rule=rule,
        key=device,
        ts=from_ms(ts_ms),
        value=value,
        baseline=_finite(baseline),
        score=None if score is None else float(np.clip(score, -SCORE_LIMIT, SCORE_LIMIT)),
        details=details,
    )


class ZScoreLogic(WindowRuleLogic):
    """The logic of a ``ZScoreRule``."""

    rule: ZScoreRule

    def _rows(self, batch, seg, pos, w, valid, cnt, cv, ct):  # type: ignore[no-untyped-def]
        rule = self.rule
        scale = _pow2_scale(w, valid)
        mean_s, std_s, _ = _mean_std(w / scale[:, None], valid, cnt)
        x = cv[pos]
        floor_s = rule.min_std / scale
        sigma_s = np.maximum(std_s, floor_s)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            d = x / scale - mean_s
            z = np.where(sigma_s > 0, d / np.where(sigma_s > 0, sigma_s, 1.0), np.nan)
        hit = np.where(sigma_s > 0, np.abs(z) > rule.k, d != 0)
        out = []
        for i in np.flatnonzero(hit).tolist():
            s = float(scale[i])
            sigma = _finite(float(sigma_s[i]) * s)
            mean = float(mean_s[i]) * s
            is_flat = bool(sigma_s[i] == 0)
            out.append(
                _detection(
                    rule.name,
                    batch.devices[seg[i]],
                    int(ct[pos[i]]),
                    float(x[i]),
                    mean,
                    None if is_flat else float(z[i]),
                    metric=rule.metric,
                    std=_finite(float(std_s[i]) * s),
                    n=int(cnt[i]),
                    lower=_finite(mean - rule.k * sigma),
                    upper=_finite(mean + rule.k * sigma),
                    **({"flat": True} if is_flat else {}),
                )
            )
        return out


class MadLogic(WindowRuleLogic):
    """The logic of a ``MadRule``."""

    rule: MadRule

    def _rows(self, batch, seg, pos, w, valid, cnt, cv, ct):  # type: ignore[no-untyped-def]
        rule = self.rule
        scale = _pow2_scale(w, valid)
        x = cv[pos]
        with np.errstate(over="ignore"):
            med_s, spread_s, score, flat, used_mad = _robust(
                w / scale[:, None], valid, cnt, x / scale
            )
        with np.errstate(over="ignore"):
            hit = np.where(flat, x / scale != med_s, np.abs(score) > rule.threshold)
        out = []
        for i in np.flatnonzero(hit).tolist():
            s = float(scale[i])
            is_flat = bool(flat[i])
            dispersion = "mad" if used_mad[i] else "meanad"
            out.append(
                _detection(
                    rule.name,
                    batch.devices[seg[i]],
                    int(ct[pos[i]]),
                    float(x[i]),
                    float(med_s[i]) * s,
                    None if is_flat else float(score[i]),
                    metric=rule.metric,
                    # The spread as a sigma estimate in metric units.
                    sigma=_finite(float(spread_s[i]) * s),
                    dispersion=dispersion,
                    n=int(cnt[i]),
                    **({"flat": True} if is_flat else {}),
                )
            )
        return out


class EwmaLogic(_ReadingLogic):
    """The logic of an ``EwmaRule``. State per device: ``[n, mean, var, last_ts_ms]``."""

    rule: EwmaRule

    def _restore(self, devices: dict[str, Any]) -> None:
        rows = self._devices.rows(list(devices))
        size = len(self._devices.names)
        self._n = _grown(_EMPTY_I, size, 0)
        self._mean = _grown(_EMPTY_F, size, 0.0)
        self._var = _grown(_EMPTY_F, size, 0.0)
        self._last = _grown(_EMPTY_I, size, _INT64_MIN)
        for row, (n, mean, var, last) in zip(rows.tolist(), devices.values(), strict=True):
            self._n[row], self._mean[row], self._var[row], self._last[row] = n, mean, var, last

    def _dump(self) -> dict[str, Any]:
        arrays = (self._n.tolist(), self._mean.tolist(), self._var.tolist(), self._last.tolist())
        return {
            name: [n, mean, var, last]
            for name, n, mean, var, last in zip(self._devices.names, *arrays, strict=False)
            if n
        }

    def _last_ts(self, rows: np.ndarray) -> np.ndarray:
        size = len(self._devices.names)
        self._n = _grown(self._n, size, 0)
        self._mean = _grown(self._mean, size, 0.0)
        self._var = _grown(self._var, size, 0.0)
        self._last = _grown(self._last, size, _INT64_MIN)
        return self._last[rows]

    def _score(self, batch: _Batch, rows: np.ndarray) -> list[Detection]:
        rule = self.rule
        alpha, keep = rule.alpha, 1.0 - rule.alpha
        lens = batch.lens
        offs = _excl_cumsum(lens)
        cnt = self._n[rows]
        mean = self._mean[rows]
        var = self._var[rows]
        found: list[Detection] = []
        hits: list[tuple[int, int, float, float, float, float | None, int]] = []
        # A device's readings are a recursion; step q handles every device's q-th
        # reading at once, so the work is vectorized across devices and the
        # arithmetic per device is the same however the stream was batched.
        for q in range(int(lens.max())):
            act = np.flatnonzero(lens > q)
            i = offs[act] + q
            x = batch.values[i]
            n0, m0, v0 = cnt[act], mean[act], var[act]
            scored = n0 >= rule.warmup
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                d = x - m0
                sigma = np.maximum(np.sqrt(v0), rule.min_std)
                z = d / np.where(sigma > 0, sigma, 1.0)
                hit = scored & np.where(sigma > 0, np.abs(z) > rule.L, d != 0)
                first = n0 == 0
                m1 = np.where(first, x, keep * m0 + alpha * x)
                # Clamp before scaling: with alpha=1, 0·inf would be NaN.
                v1 = np.where(first, 0.0, keep * np.minimum(v0 + alpha * (d * d), _FMAX))
            self.counts["scored"] += int(scored.sum())
            self.counts["warming"] += int(len(act) - scored.sum())
            for j in np.flatnonzero(hit).tolist():
                flat = float(sigma[j]) == 0
                hits.append(
                    (
                        int(act[j]),
                        int(i[j]),
                        float(m0[j]),
                        float(sigma[j]),
                        float(np.sqrt(v0[j])),
                        None if flat else float(z[j]),
                        int(n0[j]),
                    )
                )
            cnt[act] = n0 + 1
            mean[act] = m1
            var[act] = v1
        for k, i, m, sigma, std, z, n in hits:
            found.append(
                _detection(
                    rule.name,
                    batch.devices[k],
                    int(batch.ts[i]),
                    float(batch.values[i]),
                    m,
                    z,
                    metric=rule.metric,
                    std=_finite(std),
                    n=n,
                    lower=_finite(m - rule.L * sigma),
                    upper=_finite(m + rule.L * sigma),
                    **({"flat": True} if z is None else {}),
                )
            )
        self._n[rows] = cnt
        self._mean[rows] = mean
        self._var[rows] = var
        self._last[rows] = batch.ts[offs + lens - 1]
        return found


# --------------------------------------------------------------------------- several rules


_LOGICS: dict[type, Any] = {ZScoreRule: ZScoreLogic, MadRule: MadLogic, EwmaRule: EwmaLogic}


class AnomalyDetector:
    """Several per-reading rules over one reading stream: the logic the dataflow
    step wraps. Device ids and timestamps are resolved once for all rules (rows
    without them count as ``bad_key`` in ``AnomalyDetector.counts``); late and
    future rows are routed once (as ``Skipped`` with the full rows) before any
    rule sees the batch; each rule's state is kept under
    its name, so adding a rule starts it fresh and a changed definition under
    the same name is refused with ``ConfigError``.

        >>> det = AnomalyDetector([EwmaRule(metric="t", warmup=2)], None)
        >>> f = pl.DataFrame({"device_id": ["a", "a", "a", "a"], "ts_ms": [1, 2, 3, 4],
        ...                   "t": [1.0, 2.0, 1.5, 9.0]})
        >>> [(d.rule, d.value) for d in detections(det.on_batch(f))]
        [('ewma:t', 9.0)]
    """

    def __init__(
        self,
        rules: Sequence[ZScoreRule | EwmaRule | MadRule],
        resume_state: dict[str, Any] | None,
        now: Callable[[], datetime] = _utcnow,
        max_future: timedelta = timedelta(hours=1),
    ) -> None:
        for rule in rules:
            if not isinstance(rule, ZScoreRule | EwmaRule | MadRule):
                msg = f"{rule!r} is not a per-reading rule (ZScoreRule, EwmaRule or MadRule)"
                raise ConfigError(msg)
        _check_unique([r.name for r in rules])
        state = resume_state or {}
        saved = state.get("rules", {})
        self._now = now
        self._max_future_ms = int(max_future.total_seconds() * 1000)
        # One registry for every rule, so a batch resolves its device ids once.
        self._devices = _Devices()
        saved_last = state.get("last_ts_ms", {})
        rows = self._devices.rows(list(saved_last))
        self._last = _grown(_EMPTY_I, len(rows), _INT64_MIN)
        self._last[rows] = np.array(list(saved_last.values()), dtype=np.int64)
        self.counts: dict[str, int] = {
            "rows": 0,
            "bad_key": 0,
            "missing_column": 0,
            "late": 0,
            "future": 0,
            **state.get("counts", {}),
        }
        self.logics: dict[str, _ReadingLogic] = {
            r.name: _LOGICS[type(r)](r, saved.get(r.name), now, max_future, self._devices)
            for r in rules
        }

    def on_batch(self, frame: pl.DataFrame) -> list[AnomalyEmit]:
        keys = _keys(frame, self._devices, self.counts)
        if keys is None:
            return []
        emits: list[AnomalyEmit] = []
        limit = to_ms(self._now()) + self._max_future_ms
        ahead = keys.ts > limit
        if ahead.any():
            self.counts["future"] += int(ahead.sum())
            emits.append(Skipped("future", frame[keys.order[ahead]]))
            keys = keys.take(~ahead)
        if len(keys.order) == 0:
            return emits
        self._last = _grown(self._last, len(self._devices.names), _INT64_MIN)
        last = self._last[keys.rows]
        late = keys.ts < np.repeat(last, keys.lens)
        # Sorted by (device, ts): a run's last row is the device's newest.
        self._last[keys.rows] = np.maximum(last, keys.ts[_excl_cumsum(keys.lens) + keys.lens - 1])
        if late.any():
            self.counts["late"] += int(late.sum())
            emits.append(Skipped("late", frame[keys.order[late]]))
            keys = keys.take(~late)
            if len(keys.order) == 0:
                return emits
        for logic in self.logics.values():
            emits.extend(logic._on_keys(frame, keys))
        return emits

    def snapshot(self) -> dict[str, Any]:
        return {
            "last_ts_ms": dict(zip(self._devices.names, self._last.tolist(), strict=False)),
            "counts": dict(self.counts),
            "rules": {name: logic.snapshot() for name, logic in self.logics.items()},
        }


# --------------------------------------------------------------------------- peers


class PeerLogic:
    """The logic of a ``PeerRule``: ``on_batch``, ``on_timer``, ``on_eof``,
    ``next_timer``, ``snapshot``.

        >>> rule = PeerRule(column="t_avg", dimension="zone", min_peers=3)
        >>> dims = {d: {"zone": "z1"} for d in ("a", "b", "c", "d")}
        >>> logic = rule.build(None, dims)
        >>> f = pl.DataFrame({"key": ["a", "b", "c", "d"], "window_start_ms": [0] * 4,
        ...                   "window_end_ms": [60_000] * 4, "t_avg": [20.0, 21.0, 20.5, 35.0]})
        >>> [(d.key, d.baseline, round(d.score, 2)) for d in detections(logic.on_batch(f))]
        [('d', 20.5, 19.56)]
    """

    def __init__(
        self,
        rule: PeerRule,
        resume_state: dict[str, Any] | None,
        dimensions: Mapping[str, Mapping[str, str]],
        now: Callable[[], datetime],
    ) -> None:
        self.rule = rule
        self._now = now
        self._wait_ms = int(rule.max_wait.total_seconds() * 1000)
        self._group_of = group_keys(dimensions, rule.group_by)
        members: dict[str, int] = {}
        for group in self._group_of.values():
            members[group] = members.get(group, 0) + 1
        self._members = members
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "rows",
                "scored",
                "detections",
                "null",
                "nonfinite",
                "bad_key",
                "ungrouped",
                "too_few_peers",
                "late",
                "missing_column",
            ),
            0,
        )
        # group -> (start_ms, end_ms) -> [first_seen_ms, {device: value}]
        self._open: dict[str, dict[tuple[int, int], list[Any]]] = {}
        # group -> the end of the latest scored window: results up to it are late
        self._closed: dict[str, int] = {}
        if resume_state is not None:
            _check_fingerprint(resume_state, rule)
            self.counts.update(resume_state["counts"])
            self._closed = dict(resume_state["closed"])
            for group, start, end, seen, values in resume_state["open"]:
                self._open.setdefault(group, {})[(start, end)] = [seen, dict(values)]

    def on_batch(self, frame: pl.DataFrame) -> list[AnomalyEmit]:
        rule = self.rule
        c = self.counts
        needed = (KEY, WINDOW_START, WINDOW_END, rule.column)
        if any(name not in frame.columns for name in needed):
            c["missing_column"] += 1
            return []
        df = frame.select(
            pl.col(KEY).cast(pl.Utf8, strict=False),
            pl.col(WINDOW_START).cast(pl.Int64, strict=False),
            pl.col(WINDOW_END).cast(pl.Int64, strict=False),
            pl.col(rule.column).cast(pl.Float64, strict=False),
        )
        c["rows"] += df.height
        now_ms = to_ms(self._now())
        late_rows: list[int] = []
        touched: set[tuple[str, tuple[int, int]]] = set()
        group_of = self._group_of
        columns = (df[KEY].to_list(), df[WINDOW_START].to_list(), df[WINDOW_END].to_list())
        values = df[rule.column].to_list()
        for row, (key, start, end) in enumerate(zip(*columns, strict=True)):
            value = values[row]
            if key is None or start is None or end is None:
                c["bad_key"] += 1
                continue
            if value is None:
                c["null"] += 1
                continue
            if not np.isfinite(value):
                c["nonfinite"] += 1
                continue
            group = group_of.get(key)
            if group is None:
                c["ungrouped"] += 1
                continue
            if end <= self._closed.get(group, _INT64_MIN):
                late_rows.append(row)
                continue
            windows = self._open.setdefault(group, {})
            entry = windows.get((start, end))
            if entry is None:
                entry = windows[(start, end)] = [now_ms, {}]
            entry[1][key] = value
            touched.add((group, (start, end)))
        emits: list[AnomalyEmit] = []
        if late_rows:
            c["late"] += len(late_rows)
            emits.append(Skipped("late", frame[late_rows]))
        complete = [
            (group, win)
            for group, win in sorted(touched)
            if win in self._open.get(group, {})
            and len(self._open[group][win][1]) >= self._members.get(group, 0)
        ]
        for group, win in complete:
            emits.extend(self._close_through(group, win))
        return emits

    def on_timer(self) -> list[AnomalyEmit]:
        """Score group-windows that waited ``max_wait`` for missing devices."""
        now_ms = to_ms(self._now())
        due = [
            (group, win)
            for group, windows in self._open.items()
            for win, (seen, _) in windows.items()
            if seen + self._wait_ms <= now_ms
        ]
        out: list[AnomalyEmit] = []
        for group, win in sorted(due):
            out.extend(self._close_through(group, win))
        return out

    def on_eof(self) -> list[AnomalyEmit]:
        """End of input: every open group-window is scored."""
        out: list[AnomalyEmit] = []
        for group in sorted(self._open):
            windows = self._open.get(group)
            if windows:
                out.extend(self._close_through(group, max(windows, key=lambda w: w[1])))
        return out

    def next_timer(self) -> datetime | None:
        seen = [s for windows in self._open.values() for s, _ in windows.values()]
        return from_ms(min(seen) + self._wait_ms) if seen else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "fingerprint": self.rule.fingerprint,
            "counts": dict(self.counts),
            "closed": dict(self._closed),
            "open": [
                [group, start, end, seen, dict(values)]
                for group, windows in self._open.items()
                for (start, end), (seen, values) in windows.items()
            ],
        }

    def _close_through(self, group: str, win: tuple[int, int]) -> list[Detection]:
        """Score this group-window and every earlier open one of the group."""
        windows = self._open.get(group, {})
        out: list[Detection] = []
        for w in sorted(k for k in windows if k[1] <= win[1]):
            _, values = windows.pop(w)
            out.extend(self._score(group, w, values))
            self._closed[group] = max(self._closed.get(group, _INT64_MIN), w[1])
        if not windows:
            self._open.pop(group, None)
        self.counts["detections"] += len(out)
        return out

    def _score(self, group: str, win: tuple[int, int], values: dict[str, float]) -> list[Detection]:
        rule = self.rule
        devices = sorted(values)
        n = len(devices)
        if n - 1 < rule.min_peers:
            self.counts["too_few_peers"] += n
            return []
        self.counts["scored"] += n
        v = np.array([values[d] for d in devices], dtype=np.float64)
        # Row i: every value but device i's own (leave-one-out peers).
        cols = np.arange(n - 1)
        idx = cols[None, :] + (cols[None, :] >= np.arange(n)[:, None])
        w = v[idx]
        valid = np.ones_like(w, dtype=bool)
        cnt = np.full(n, n - 1, dtype=np.int64)
        scale = float(_pow2_scale(v[None, :], np.ones((1, n), dtype=bool))[0])
        with np.errstate(over="ignore"):
            med_s, spread_s, score, flat, used_mad = _robust(w / scale, valid, cnt, v / scale)
        with np.errstate(over="ignore"):
            hit = np.where(flat, v / scale != med_s, np.abs(score) > rule.threshold)
        out = []
        for i in np.flatnonzero(hit).tolist():
            is_flat = bool(flat[i])
            out.append(
                _detection(
                    rule.name,
                    devices[i],
                    win[0],
                    float(v[i]),
                    float(med_s[i]) * scale,
                    None if is_flat else float(score[i]),
                    column=rule.column,
                    dimension=set_label(rule.group_by),
                    group=group,
                    window_start=from_ms(win[0]).isoformat(),
                    window_end=from_ms(win[1]).isoformat(),
                    peers=n - 1,
                    sigma=_finite(float(spread_s[i]) * scale),
                    dispersion="mad" if used_mad[i] else "meanad",
                    **({"flat": True} if is_flat else {}),
                )
            )
        return out
