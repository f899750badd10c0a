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
from operators.aggregation import Aggregation, LateFrame
from operators.groups import group_keys, set_label
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


def _group_sharder(
    names: list[str], dimensions: dict[str, dict[str, str]], shards: int
) -> Callable[[pl.DataFrame], list[tuple[str, pl.DataFrame]]]:
    """Split a frame by the shard of each row's group in the set ``names``; rows of
    devices without a group there are left out. With one shard, the frame passes whole
    (the aggregator leaves those devices out itself and counts them)."""
    to_shard = {d: shard_of(k, shards) for d, k in group_keys(dimensions, names).items()}

    def split(frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
        if frame.height == 0:
            return []
        if shards == 1:
            return [("0", frame)]
        labels = frame.get_column(DEVICE).replace_strict(
            to_shard, default=None, return_dtype=pl.Utf8
        )
        assigned = frame.with_columns(labels.alias("_shard")).drop_nulls("_shard")
        parts = assigned.partition_by("_shard", as_dict=True, include_key=False)
        return [(key[0], part) for key, part in parts.items()]  # type: ignore[misc]

    return split


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
    recovery: bool = True,
) -> StatsOut:
    """Windowed statistics over reading frames.

    Per-device results shard the devices over ``shards`` keys; each grouping set
    over dimensions (zone, floor, ...) shards by its group key, so every group is
    aggregated whole by one shard, exactly. Late readings come out once, from
    the per-device (or first) grouping set. Each shard keeps its own watermark;
    all state is snapshotted by Bytewax recovery and refused after a change of
    ``aggregation``. ``recovery=False`` skips the state copies Bytewax asks for at each epoch's end (no recovery store records them).
    """
    dims = dimensions or {}
    outs: list[Stream[Any]] = []
    for index, names in enumerate(aggregation.group_by):
        single = aggregation.model_copy(update={"group_by": [names]})
        label = set_label(names)
        if names == ["device"]:
            cache: dict[str, str] = {}
            keyed = op.flat_map(f"shard-{label}", up, lambda f, c=cache: shard_frame(f, shards, c))
        else:
            keyed = op.flat_map(f"shard-{label}", up, _group_sharder(names, dims, shards))
        emitted = op.stateful_batch(
            f"aggregate-{label}",
            keyed,
            lambda state, a=single: LogicStep(
                a.build(state, dimensions=dims, now=now), recovery=recovery
            ),
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
