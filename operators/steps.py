"""Thin Bytewax wrappers that turn the pure operator logic into dataflow steps.

The logic classes live in their own modules without a Bytewax import; this
module only adapts them to ``stateful_batch`` and splits their outputs into
streams.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic

from iotflow.events import Reading, WindowResult
from operators.windows import LateReading, TumblingAggregator, TumblingWindow, WindowEmit

__all__ = ["WindowOut", "shard_of", "tumbling_window"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def shard_of(key: str, shards: int) -> str:
    """A stable shard name for a key (crc32, the same in every process)."""
    return str(zlib.crc32(key.encode()) % shards)


@dataclass(frozen=True)
class WindowOut:
    """Window results downstream; late readings on their own stream."""

    down: Stream[WindowResult]
    late: Stream[LateReading]


class _WindowLogic(StatefulBatchLogic[list[Reading], WindowEmit, dict[str, Any]]):
    def __init__(self, aggregator: TumblingAggregator) -> None:
        self._agg = aggregator

    def on_batch(self, values: list[list[Reading]]) -> tuple[list[WindowEmit], bool]:
        emits: list[WindowEmit] = []
        for batch in values:
            emits.extend(self._agg.on_batch(batch))
        return emits, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[WindowEmit], bool]:
        return self._agg.on_timer(), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[WindowEmit], bool]:
        return self._agg.on_eof(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._agg.next_timer()

    def snapshot(self) -> dict[str, Any]:
        return self._agg.snapshot()


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
        "aggregate", keyed, lambda state: _WindowLogic(window.build(state, now))
    )
    items = op.key_rm("unshard", emitted)
    split_out = op.branch("late", items, lambda item: isinstance(item, WindowResult))
    return WindowOut(split_out.trues, split_out.falses)
