"""Telemetry statistics as mergeable partial aggregates (polars, columnar).

A *partial* is one row per group (device, window, metric, ...) with ``n``,
``sum``, ``m2`` (sum of squared deviations from the mean), ``min``, ``max``,
``first_ts``/``first``, ``last_ts``/``last`` and, when asked for, ``distinct``
(the distinct values). Quantiles come from a sketch (``operators.sketch``):
rows of ``(group..., bucket, n)``. Partials of any split of the data merge
into the partial of the whole (variance by Chan's parallel formula), so
panes roll up into sliding windows, minutes into hours, and devices into
zones without re-reading raw readings.

Statistics (``STATISTICS``): count, sum, avg, min, max, first, last (by the
device timestamp; among readings sharing that timestamp, the smallest value
is first and the largest last, so arrival order never matters), variance and stddev (sample,
``n - 1``; null below two readings), median and percentiles ``pNN`` (from the
sketch: within 0.5 % of the exact lower sample quantile, i.e. the value at rank
``floor(q * (n - 1))``), rate (change per second between the first and the last
reading; null when they share a timestamp) and distinct (exact count of
distinct values). Group results add ``device_count`` (devices that reported)
and ``total`` (the sum over devices of each device's average: "total power
per floor").

Example::

    >>> long = pl.DataFrame({"k": ["a", "a", "a"], "ts_ms": [0, 1000, 2000], "value": [1.0, 2.0, 4.0]})
    >>> spec = StatSpec.parse(["avg", "rate", "p50"])
    >>> part, sk = partial(long, ["k"], spec), sketch(long, ["k"])
    >>> row = finalize(part, sk, ["k"], spec).row(0, named=True)
    >>> row["count"], round(row["avg"], 4), row["rate"], round(row["p50"], 2)
    (3, 2.3333, 1.5, 2.0)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl

from iotflow.errors import ConfigError
from operators.sketch import bucket_expr, quantiles

__all__ = [
    "GROUP_STATISTICS",
    "STATISTICS",
    "StatSpec",
    "exact",
    "finalize",
    "merge",
    "merge_sketch",
    "partial",
    "sketch",
]

STATISTICS = (
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "variance",
    "stddev",
    "median",
    "rate",
    "distinct",
)
GROUP_STATISTICS = ("device_count", "total")
_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")


@dataclass(frozen=True)
class StatSpec:
    """Which statistics a result carries, validated; ``count`` is always there."""

    names: tuple[str, ...]

    @classmethod
    def parse(cls, names: Iterable[str]) -> StatSpec:
        """Check the names; a wrong one raises ConfigError listing the valid choices."""
        out: list[str] = []
        for name in names:
            if name in STATISTICS or name in GROUP_STATISTICS or _PERCENTILE.match(name):
                if name not in out:
                    out.append(name)
                continue
            valid = ", ".join((*STATISTICS, *GROUP_STATISTICS, "p50", "p95", "p99.9", "..."))
            msg = f"unknown statistic {name!r}; valid: {valid}"
            raise ConfigError(msg)
        if "count" not in out:
            out.insert(0, "count")
        return cls(tuple(out))

    @property
    def quantiles(self) -> dict[str, float]:
        """Quantile columns and their q: ``median`` and every ``pNN``."""
        wanted: dict[str, float] = {}
        for name in self.names:
            if name == "median":
                wanted[name] = 0.5
            elif m := _PERCENTILE.match(name):
                wanted[name] = float(m.group(1)) / 100
        return wanted

    @property
    def needs_distinct(self) -> bool:
        return "distinct" in self.names


def partial(long: pl.DataFrame, keys: Sequence[str], spec: StatSpec) -> pl.DataFrame:
    """Partials of ``long`` (columns ``keys``, ``ts_ms``, ``value``) per ``keys``."""
    value, ts = pl.col("value"), pl.col("ts_ms")
    aggs = [
        pl.len().cast(pl.Int64).alias("n"),
        value.sum().alias("sum"),
        ((value - value.mean()) ** 2).sum().alias("m2"),
        value.min().alias("min"),
        value.max().alias("max"),
        ts.min().alias("first_ts"),
        value.filter(ts == ts.min()).min().alias("first"),
        ts.max().alias("last_ts"),
        value.filter(ts == ts.max()).max().alias("last"),
    ]
    if spec.needs_distinct:
        aggs.append(value.unique().alias("distinct"))
    return long.group_by(list(keys)).agg(aggs)


def sketch(long: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    """The quantile sketch of ``long`` per ``keys``: ``(keys..., bucket, n)`` rows."""
    return long.group_by([*keys, bucket_expr(pl.col("value")).alias("bucket")]).agg(
        pl.len().cast(pl.Int64).alias("n")
    )


def exact(
    long: pl.DataFrame, keys: Sequence[str], spec: StatSpec, *, devices: bool = False
) -> pl.DataFrame:
    """Statistic columns per ``keys`` straight from raw rows (``keys``, ``ts_ms``, ``value``,
    and ``device_id`` when ``devices``): percentiles exact (the lower sample quantile),
    the same definitions as ``finalize``. ``total`` needs ``devices``."""
    keys = list(keys)
    exprs = _exact_exprs(pl.col("value"), spec, devices=devices)
    wanted = [n for n in spec.names if n != "total" or not devices]
    result = long.group_by(keys).agg([exprs[n].alias(n) for n in wanted])
    if devices and "total" in spec.names:
        value = pl.col("value")
        per_device = long.group_by([*keys, "device_id"]).agg(value.mean().alias("_avg"))
        totals = per_device.group_by(keys).agg(pl.col("_avg").sum().alias("total"))
        result = result.join(totals, on=keys, how="left", nulls_equal=True)
    return result.select([*keys, *spec.names])


def exact_columns(
    rows: pl.DataFrame, keys: Sequence[str], spec: StatSpec, metrics: Sequence[str]
) -> dict[str, pl.DataFrame]:
    """``exact`` of each metric column of ``rows`` (``keys``, ``ts_ms``, the metrics, no
    nulls in them) in one group-by: per metric a frame of ``keys`` and the statistics.
    One pass over the rows instead of one per metric (a window close of 10,000 devices
    and two metrics)."""
    keys = list(keys)
    aggs = []
    for i, metric in enumerate(metrics):
        exprs = _exact_exprs(pl.col(metric), spec, devices=False)
        aggs += [exprs[n].alias(f"{i}:{n}") for n in spec.names]
    wide = rows.group_by(keys).agg(aggs)
    return {
        metric: wide.select(*keys, *[pl.col(f"{i}:{n}").alias(n) for n in spec.names])
        for i, metric in enumerate(metrics)
    }


def _exact_exprs(value: pl.Expr, spec: StatSpec, *, devices: bool) -> dict[str, pl.Expr]:
    """The aggregation expression of each statistic of ``value`` (``total`` is computed apart)."""
    ts = pl.col("ts_ms")
    first, last = value.filter(ts == ts.min()).min(), value.filter(ts == ts.max()).max()
    span_s = (ts.max() - ts.min()) / 1000
    exprs: dict[str, pl.Expr] = {
        "count": pl.len().cast(pl.Int64),
        "sum": value.sum(),
        "avg": value.mean(),
        "min": value.min(),
        "max": value.max(),
        "first": first,
        "last": last,
        "variance": value.var(ddof=1),
        "stddev": value.std(ddof=1),
        "rate": pl.when(span_s > 0).then((last - first) / span_s).otherwise(None),
        "distinct": value.n_unique().cast(pl.Int64),
        "device_count": pl.col("device_id").n_unique().cast(pl.Int64)
        if devices
        else pl.lit(1, pl.Int64),
        "total": value.mean(),
    }
    for name, q in spec.quantiles.items():
        exprs[name] = value.quantile(q, interpolation="lower")
    return exprs


def merge(partials: pl.DataFrame, keys: Sequence[str], *, devices: bool = False) -> pl.DataFrame:
    """Merge partial rows that share ``keys`` into one each.

    With ``devices=True`` the rows are one per device of the group (already merged
    per device), and the result also counts them (``device_count``) and adds up
    their averages (``total``).
    """
    n, total = pl.col("n"), pl.col("sum")
    mean = total.sum() / n.sum()
    aggs = [
        n.sum().alias("n"),
        total.sum().alias("sum"),
        (pl.col("m2").sum() + (n * (total / n - mean) ** 2).sum()).alias("m2"),
        pl.col("min").min().alias("min"),
        pl.col("max").max().alias("max"),
        pl.col("first_ts").min().alias("first_ts"),
        pl.col("first").filter(pl.col("first_ts") == pl.col("first_ts").min()).min().alias("first"),
        pl.col("last_ts").max().alias("last_ts"),
        pl.col("last").filter(pl.col("last_ts") == pl.col("last_ts").max()).max().alias("last"),
    ]
    if "distinct" in partials.columns:
        aggs.append(pl.col("distinct").explode().unique().alias("distinct"))
    if devices:
        aggs.append(pl.len().cast(pl.Int64).alias("device_count"))
        aggs.append((total / n).sum().alias("total"))
    return partials.group_by(list(keys)).agg(aggs)


def merge_sketch(buckets: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    """Add up sketch rows that share ``keys`` and a bucket."""
    return buckets.group_by([*keys, "bucket"]).agg(pl.col("n").sum())


def finalize(
    partials: pl.DataFrame, buckets: pl.DataFrame, keys: Sequence[str], spec: StatSpec
) -> pl.DataFrame:
    """Statistic columns per ``keys`` from merged partials and their sketch rows.

    Columns: ``keys``, then ``count`` and each asked statistic in the order given.
    """
    keys = list(keys)
    n = pl.col("n")
    variance = pl.when(n > 1).then(pl.col("m2") / (n - 1)).otherwise(None)
    span_s = (pl.col("last_ts") - pl.col("first_ts")) / 1000
    exprs: dict[str, pl.Expr] = {
        "count": n.alias("count"),
        "sum": pl.col("sum"),
        "avg": (pl.col("sum") / n).alias("avg"),
        "min": pl.col("min"),
        "max": pl.col("max"),
        "first": pl.col("first"),
        "last": pl.col("last"),
        "variance": variance.alias("variance"),
        "stddev": variance.sqrt().alias("stddev"),
        "rate": pl.when(span_s > 0)
        .then((pl.col("last") - pl.col("first")) / span_s)
        .otherwise(None)
        .alias("rate"),
        "distinct": pl.col("distinct").list.len().cast(pl.Int64).alias("distinct")
        if "distinct" in partials.columns
        else pl.lit(None, pl.Int64).alias("distinct"),
        "device_count": pl.col("device_count")
        if "device_count" in partials.columns
        else pl.lit(1, pl.Int64).alias("device_count"),
        "total": pl.col("total")
        if "total" in partials.columns
        else (pl.col("sum") / n).alias("total"),
    }
    wanted = spec.quantiles
    result = partials.select([*keys, *(exprs[s] for s in spec.names if s not in wanted)])
    if wanted:
        result = result.join(
            quantiles(buckets, keys, wanted), on=keys, how="left", nulls_equal=True
        )
    return result.select([*keys, *spec.names])
