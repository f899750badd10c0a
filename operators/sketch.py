"""A mergeable quantile sketch with a relative-error guarantee, as polars expressions.

Values fall into logarithmic buckets (the DDSketch construction): bucket ``i``
holds magnitudes in ``(gamma**(i-1), gamma**i]`` with ``gamma = (1+a)/(1-a)``,
and is represented by ``2 * gamma**i / (gamma + 1)``, which is within ``a`` of
every value in the bucket. Negative values mirror positive ones; magnitudes
below ``MIN_MAGNITUDE`` share bucket 0 and are represented by 0.

A sketch is just rows of ``(..., bucket, n)``: merging two sketches is adding
counts per bucket, so partial sketches of panes, devices or shards merge into
the sketch of the whole. The ``q``-quantile is the value at rank
``floor(q * (n - 1))`` of the sorted values (the lower sample quantile); the
sketch returns its bucket's representative, so

    ``|estimate - exact| <= RELATIVE_ACCURACY * |exact|``  (0.5 %, within the 1 % the
    statistics promise), for any data, any merge order, any number of merges.

Example::

    >>> frame = pl.DataFrame({"v": [float(x) for x in range(1, 101)]})
    >>> buckets = frame.group_by(bucket_expr(pl.col("v")).alias("bucket")).len("n")
    >>> est = quantiles(buckets, [], {"p50": 0.5})["p50"][0]
    >>> abs(est - 50.0) <= RELATIVE_ACCURACY * 50.0
    True
"""

from __future__ import annotations

import math

import polars as pl

__all__ = ["MIN_MAGNITUDE", "RELATIVE_ACCURACY", "bucket_expr", "bucket_value", "quantiles"]

RELATIVE_ACCURACY = 0.005
MIN_MAGNITUDE = 1e-9
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LN_GAMMA = math.log(_GAMMA)
# Shift so the smallest magnitude kept gets bucket 1 and bucket 0 means "about zero".
_OFFSET = math.ceil(math.log(MIN_MAGNITUDE) / _LN_GAMMA) - 1


def bucket_expr(value: pl.Expr) -> pl.Expr:
    """The signed bucket (Int32) of each value; buckets sort in value order."""
    magnitude = value.abs()
    index = (magnitude.log() / _LN_GAMMA).ceil() - _OFFSET
    signed = pl.when(value < 0).then(-index).otherwise(index)
    return pl.when(magnitude < MIN_MAGNITUDE).then(0).otherwise(signed).cast(pl.Int32)


def bucket_value(bucket: pl.Expr) -> pl.Expr:
    """The representative value of a bucket, within ``RELATIVE_ACCURACY`` of its members."""
    index = bucket.abs().cast(pl.Float64) + _OFFSET
    magnitude = 2.0 * (index * _LN_GAMMA).exp() / (_GAMMA + 1.0)
    return pl.when(bucket == 0).then(0.0).when(bucket < 0).then(-magnitude).otherwise(magnitude)


def quantiles(buckets: pl.DataFrame, keys: list[str], wanted: dict[str, float]) -> pl.DataFrame:
    """Per ``keys`` group of ``(keys..., bucket, n)`` rows: one column per wanted quantile.

    ``wanted`` maps a column name to ``q`` in [0, 1]. Rows of one group may repeat
    a bucket (unmerged partial sketches); they are added up first.
    """
    merged = buckets.group_by([*keys, "bucket"]).agg(pl.col("n").sum())
    over = keys or None
    ranked = merged.sort([*keys, "bucket"]).with_columns(
        pl.col("n").cum_sum().over(over).alias("_cum")
        if over
        else pl.col("n").cum_sum().alias("_cum"),
        pl.col("n").sum().over(over).alias("_total") if over else pl.col("n").sum().alias("_total"),
    )
    columns = []
    for name, q in wanted.items():
        rank = (q * (pl.col("_total") - 1)).floor()
        columns.append(
            bucket_value(pl.col("bucket").filter(pl.col("_cum") > rank).first()).alias(name)
        )
    if not keys:
        return ranked.select(columns)
    return ranked.group_by(keys, maintain_order=True).agg(columns)
