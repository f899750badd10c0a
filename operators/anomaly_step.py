"""Bytewax steps for anomaly detection: thin wrappers over ``operators.anomaly``.

``detect_anomalies`` runs per-reading rules (``ZScoreRule``, ``EwmaRule``,
``MadRule``) over a stream of reading frames; ``detect_peer_anomalies`` runs a
``PeerRule`` over a stream of window-result frames. Both return
``AnomalyOut(detections, skipped)``: ``Detection`` items for
``{prefix}.detections`` and the DuckDB ``detections`` table, and the rows no
rule scored (``Skipped`` with reason ``late`` or ``future``) on their own
stream.

Work is spread over ``shards`` keys, the unit Bytewax distributes across
workers: readings by device (every reading of a device meets the same
state), window results by the group value of their key (every peer of a
group meets the same state). State is the logic's plain-data snapshot, so
Bytewax recovery restores it; a changed rule definition refuses old state
with ``ConfigError``.

Example::

    >>> from bytewax.dataflow import Dataflow
    >>> from bytewax.testing import TestingSink, TestingSource, run_main
    >>> from operators.anomaly import EwmaRule
    >>> frames = [pl.DataFrame({"device_id": ["a"] * 4, "ts_ms": [1, 2, 3, 4],
    ...                         "t": [1.0, 2.0, 1.5, 9.0]})]
    >>> flow = Dataflow("doc")
    >>> out = detect_anomalies("anomaly", op.input("in", flow, TestingSource(frames)),
    ...                        [EwmaRule(metric="t", warmup=2)], shards=2)
    >>> found = []
    >>> op.output("out", out.detections, TestingSink(found))
    >>> run_main(flow)
    >>> [(d.rule, d.key, d.value) for d in found]
    [('ewma:t', 'a', 9.0)]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream, operator

from iotflow.events import Detection
from operators.anomaly import (
    AnomalyDetector,
    AnomalyEmit,
    EwmaRule,
    MadRule,
    PeerRule,
    Skipped,
    ZScoreRule,
)
from operators.groups import group_keys
from operators.steps import LogicStep, shard_of

__all__ = ["AnomalyOut", "detect_anomalies", "detect_peer_anomalies"]

_SHARD = "__shard"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AnomalyOut:
    """Detections downstream; rows no rule scored (late, future) on their own stream."""

    detections: Stream[Detection]
    skipped: Stream[Skipped]


def _sharder(
    column: str, shard: Callable[[str | None], str]
) -> Callable[[pl.DataFrame], list[tuple[str, pl.DataFrame]]]:
    """Split a frame into one frame per shard of ``column``'s values. The
    per-value shard is cached, so per-batch Python work is per new value."""
    cache: dict[str, str] = {}

    def split(frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
        if frame.height == 0:
            return []
        if column not in frame.columns:
            # Still delivered, so the logic counts it as a missing column.
            return [(shard(None), frame)]
        keys = frame[column].cast(pl.Utf8, strict=False).fill_null("")
        for value in keys.unique().to_list():
            if value not in cache:
                cache[value] = shard(value or None)
        shards = keys.replace_strict(cache, return_dtype=pl.Utf8)
        if shards.n_unique() == 1:
            return [(shards[0], frame)]
        parts = frame.with_columns(shards.alias(_SHARD)).partition_by(
            _SHARD, as_dict=True, include_key=False, maintain_order=True
        )
        return [(key[0], part) for key, part in parts.items()]  # type: ignore[misc]

    return split


def _split_out(emitted: Stream[tuple[str, AnomalyEmit]]) -> AnomalyOut:
    items = op.key_rm("unshard", emitted)
    branches = op.branch("skipped", items, lambda e: isinstance(e, Detection))
    return AnomalyOut(branches.trues, branches.falses)  # type: ignore[arg-type]


@operator
def detect_anomalies(
    step_id: str,
    up: Stream[pl.DataFrame],
    rules: Sequence[ZScoreRule | EwmaRule | MadRule],
    shards: int = 16,
    now: Callable[[], datetime] = _utcnow,
    max_future: timedelta = timedelta(hours=1),
    recovery: bool = True,
) -> AnomalyOut:
    """Per-reading anomaly rules over a stream of reading frames.

    Rule names must be unique (``ConfigError`` at build time otherwise). Each
    device's readings are scored in ``ts_ms`` order against its own baseline;
    readings older than the device's newest (late) or more than
    ``max_future`` ahead of ``now`` (future) go to ``skipped``.
    ``recovery=False`` skips the state copies Bytewax asks for at each epoch's end (no recovery store records them).
    """
    AnomalyDetector(rules, None, now, max_future)  # validate now, not on the first batch
    split = _sharder("device_id", lambda key: shard_of(key or "", shards))
    keyed = op.flat_map("shard", up, split)
    emitted = op.stateful_batch(
        "detect",
        keyed,
        lambda state: LogicStep(AnomalyDetector(rules, state, now, max_future), recovery=recovery),
    )
    return _split_out(emitted)


@operator
def detect_peer_anomalies(
    step_id: str,
    up: Stream[pl.DataFrame],
    rule: PeerRule,
    dimensions: Mapping[str, Mapping[str, str]],
    shards: int = 16,
    now: Callable[[], datetime] = _utcnow,
    recovery: bool = True,
) -> AnomalyOut:
    """A device against its peers of the same group, over window-result frames.

    ``dimensions`` maps a window key (device id) to its dimensions, e.g.
    ``{"dev-1": {"zone": "z1"}}`` (the registry's metadata in the monitoring
    flow); window results are routed by the shard of their group so all peers
    of a group meet. A group-window is scored when
    all its devices reported, when a later window of the group is scored,
    after ``rule.max_wait`` or at end of input; results for a group-window
    already scored go to ``skipped``. ``recovery=False`` skips the state copies Bytewax asks for at each epoch's end (no recovery store records them).
    """
    groups = group_keys(dimensions, rule.group_by)
    split = _sharder("key", lambda key: shard_of(groups.get(key or "", ""), shards))
    keyed = op.flat_map("shard", up, split)
    emitted = op.stateful_batch(
        "detect",
        keyed,
        lambda state: LogicStep(rule.build(state, dimensions, now), recovery=recovery),
    )
    return _split_out(emitted)
