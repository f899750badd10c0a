"""Thin Bytewax wrappers that turn the pure operator logic into dataflow steps.

The logic classes live in their own modules without a Bytewax import; this
module only adapts them to ``stateful_batch`` and splits their outputs into
streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream, operator

from iotflow.events import Reading, WindowResult
from iotflow.frame import DEVICE
from operators.aggregation import Aggregation, LateFrame, WindowAggregator
from operators.logic_step import LogicStep, shard_of
from operators.windows import LateReading, TumblingWindow

__all__ = [
    "LogicStep",
    "StatsOut",
    "WindowOut",
    "shard_frame",
    "shard_of",
    "tumbling_window",
    "window_stats",
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class WindowOut:
    """Window results downstream; late readings on their own stream."""

    down: Stream[WindowResult]
    late: Stream[LateReading]


@operator
def tumbling_window(
    step_id: str,
    up: Stream[list[Reading]],
    window: TumblingWindow,
    shards: int = 16,
    now: Callable[[], datetime] = _utcnow,
) -> WindowOut:
    """Per-device event-time tumbling windows over batches of readings.

    Devices are spread over ``shards`` keys (the unit Bytewax distributes
    across workers); each shard aggregates its devices a batch at a time.
    """

    def split(batch: list[Reading]) -> list[tuple[str, list[Reading]]]:
        parts: dict[str, list[Reading]] = {}
        for reading in batch:
            parts.setdefault(shard_of(reading.device_id, shards), []).append(reading)
        return list(parts.items())

    keyed = op.flat_map("shard", up, split)
    emitted = op.stateful_batch(
        "aggregate", keyed, lambda state: LogicStep(window.build(state, now))
    )
    items = op.key_rm("unshard", emitted)
    split_out = op.branch("late", items, lambda item: isinstance(item, WindowResult))
    return WindowOut(split_out.trues, split_out.falses)


def shard_frame(
    frame: pl.DataFrame, shards: int, cache: dict[str, str], by: str = DEVICE
) -> list[tuple[str, pl.DataFrame]]:
    """Split a frame by ``shard_of`` its ``by`` column; ``cache`` remembers each value's shard."""
    if frame.height == 0:
        return []
    if shards == 1:
        return [("0", frame)]
    values = frame.get_column(by)
    for value in values.unique().to_list():
        if value not in cache:
            cache[value] = shard_of(value, shards)
    labels = values.replace_strict(cache, return_dtype=pl.Utf8)
    parts = frame.with_columns(labels.alias("_shard")).partition_by("_shard", as_dict=True)
    return [(key[0], part.drop("_shard")) for key, part in parts.items()]


def _group_keys(frame: pl.DataFrame, names: list[str], dims: pl.DataFrame) -> pl.DataFrame:
    """Rows with a ``_group`` column naming their group (null when a dimension is missing)."""
    present = [n for n in names if n in dims.columns]
    if len(present) < len(names):
        return frame.with_columns(pl.lit(None, pl.Utf8).alias("_group"))
    key = pl.concat_str([pl.lit(f"{n}=") + pl.col(n) for n in names], separator="|")
    joined = frame.join(dims.select(DEVICE, *names), on=DEVICE, how="left")
    return joined.with_columns(key.alias("_group")).drop(names)


def _shard_groups(
    frame: pl.DataFrame, shards: int, cache: dict[str, str]
) -> list[tuple[str, pl.DataFrame]]:
    # devices without every dimension of the set are left out of it
    assigned = frame.filter(pl.col("_group").is_not_null())
    return [(k, part.drop("_group")) for k, part in shard_frame(assigned, shards, cache, "_group")]


@dataclass(frozen=True)
class StatsOut:
    """Result frames downstream (``operators.aggregation``); late readings on their own."""

    down: Stream[pl.DataFrame]
    late: Stream[LateFrame]


@operator
def window_stats(
    step_id: str,
    up: Stream[pl.DataFrame],
    aggregation: Aggregation,
    dimensions: dict[str, dict[str, str]] | None = None,
    shards: int = 8,
    now: Callable[[], datetime] = _utcnow,
) -> StatsOut:
    """Windowed statistics over reading frames.

    Per-device results shard the devices over ``shards`` keys; each grouping set
    over dimensions (zone, floor, ...) shards by its group key, so every group is
    aggregated whole by one shard, exactly. Late readings come out once, from
    the per-device (or first) grouping set. Each shard keeps its own watermark;
    all state is snapshotted by Bytewax recovery and refused after a change of
    ``aggregation``.
    """
    dims = dimensions or {}
    dim_frame = WindowAggregator.dimension_frame(dims)
    outs: list[Stream[Any]] = []
    for index, names in enumerate(aggregation.group_by):
        single = aggregation.model_copy(update={"group_by": [names]})
        label = "+".join(names)
        cache: dict[str, str] = {}
        if names == ["device"]:
            keyed = op.flat_map(f"shard-{label}", up, lambda f, c=cache: shard_frame(f, shards, c))
        else:
            grouped = op.map(f"group-{label}", up, lambda f, n=names: _group_keys(f, n, dim_frame))
            keyed = op.flat_map(
                f"shard-{label}", grouped, lambda f, c=cache: _shard_groups(f, shards, c)
            )
        emitted = op.stateful_batch(
            f"aggregate-{label}",
            keyed,
            lambda state, a=single: LogicStep(a.build(state, dimensions=dims, now=now)),
        )
        items = op.key_rm(f"unshard-{label}", emitted)
        if index:
            items = op.filter(
                f"no-late-{label}", items, lambda item: isinstance(item, pl.DataFrame)
            )
        outs.append(items)
    merged = op.merge("results", *outs) if len(outs) > 1 else outs[0]
    split = op.branch("late", merged, lambda item: isinstance(item, pl.DataFrame))
    return StatsOut(split.trues, split.falses)
