"""``LogicStep``: any pure logic object as a Bytewax ``stateful_batch`` step (no polars).

Split from ``operators.steps`` (which re-exports both names) so that small
processes, such as the edge gateway flow, can host logic objects without
importing the columnar operators.
"""

from __future__ import annotations

import zlib
from datetime import datetime
from typing import Any

from bytewax.operators import StatefulBatchLogic

__all__ = ["LogicStep", "shard_of"]


def shard_of(key: str, shards: int) -> str:
    """A stable shard name for a key (crc32, the same in every process)."""
    return str(zlib.crc32(key.encode()) % shards)


class LogicStep(StatefulBatchLogic[Any, Any, Any]):
    """Adapts a pure logic object to ``stateful_batch``.

    The object speaks the project's vocabulary: ``on_batch(item) -> list``,
    ``snapshot()``, and optionally ``on_timer() -> list``, ``on_eof() -> list``
    and ``next_timer() -> datetime | None`` (logic without timers leaves them out).
    Each value Bytewax hands over goes to ``on_batch`` in order; the state is
    always retained.

    ``recovery=False`` (no recovery store records this flow's snapshots)
    answers Bytewax's snapshot at each epoch's end with ``None`` instead of
    copying the state: Bytewax asks at every epoch's end either way and drops
    the answer without a store, and a copy of a minute of raw window rows held
    the worker for tens of milliseconds.
    """

    def __init__(self, logic: Any, *, recovery: bool = True) -> None:
        self._logic = logic
        self._recovery = recovery
        self._on_timer = getattr(logic, "on_timer", None)
        self._on_eof = getattr(logic, "on_eof", None)
        self._next_timer = getattr(logic, "next_timer", None)

    def on_batch(self, values: list[Any]) -> tuple[list[Any], bool]:
        emits: list[Any] = []
        for value in values:
            emits.extend(self._logic.on_batch(value))
        return emits, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Any], bool]:
        return (self._on_timer() if self._on_timer else []), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Any], bool]:
        return (self._on_eof() if self._on_eof else []), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._next_timer() if self._next_timer else None

    def snapshot(self) -> Any:
        return self._logic.snapshot() if self._recovery else None
