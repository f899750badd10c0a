"""The Bytewax step for CEP patterns: a thin wrapper around ``operators.cep.CepEngine``.

``cep(step_id, frames, patterns, ...)`` takes a stream of polars frames of one
input and returns ``CepOut``: detections (for ``{prefix}.detections`` and the
DuckDB ``detections`` table), action requests (commands, twin updates), timed-out
partial matches and rejected rows, each on its own stream.

Keys are spread over ``shards`` Bytewax state keys (``operators.steps.shard_of``);
use about one shard per worker: the engine works a batch at a time, so fewer,
larger slices are faster. Each shard runs one engine over its slice of every
batch, so state (partial
matches, timers, buffered events, watermark) lives in Bytewax state and
survives a restart from the recovery store. ``correlation`` patterns need every
key of a group in one place: they run in a second engine per ``group_by``
dimension, sharded by the group's value. Each engine keeps its own watermark;
rejected rows (late, future, incomplete) are reported by the first engine only.

Example::

    >>> from bytewax.dataflow import Dataflow
    >>> from bytewax.testing import TestingSink, TestingSource, run_main
    >>> import bytewax.operators as op
    >>> from operators.cep_patterns import PatternSet
    >>> patterns = PatternSet.from_dict(
    ...     [{"name": "hot", "kind": "threshold", "condition": "t > 30", "times": 2}]
    ... )
    >>> frame = pl.DataFrame({"device_id": ["d"] * 3, "ts_ms": [1_000, 2_000, 3_000],
    ...                       "t": [31.0, 35.0, 20.0]})
    >>> flow = Dataflow("doc")
    >>> out = cep("cep", op.input("in", flow, TestingSource([frame])), patterns)
    >>> found = []
    >>> op.output("det", out.detections, TestingSink(found))
    >>> run_main(flow)
    >>> [(d.rule, d.key, d.details["events_ts_ms"]) for d in found]
    [('hot', 'd', [1000, 2000])]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream, operator

from iotflow.errors import ConfigError
from iotflow.events import Detection
from operators.cep import (
    CepEmit,
    CepEngine,
    CommandRequest,
    RejectedRows,
    TimedOutMatch,
    TwinUpdate,
)
from operators.cep_patterns import CorrelationPattern, PatternSet
from operators.steps import LogicStep, shard_of

__all__ = ["CepOut", "cep"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CepOut:
    """Detections, action requests, timed-out partial matches and rejected rows."""

    detections: Stream[Detection]
    actions: Stream[CommandRequest | TwinUpdate]
    timed_out: Stream[TimedOutMatch]
    rejected: Stream[RejectedRows]


class _Sharder:
    """Splits a frame by shard of a routing value (the key, or the key's group)."""

    def __init__(self, key_column: str, shards: int, route: Callable[[str], str]) -> None:
        self.key_column = key_column
        self.shards = shards
        self.route = route
        self.table = pl.DataFrame(schema={"__route_key": pl.Utf8, "__shard": pl.Utf8})

    def split(self, frame: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
        if frame.is_empty():
            return []
        if self.shards == 1 or self.key_column not in frame.columns:
            # a frame without its key column is passed on whole: the engine rejects it loudly
            return [("0", frame)]
        # a row without a key still gets a shard; its engine rejects it, counted
        route_key = pl.col(self.key_column).cast(pl.Utf8).fill_null("").alias("__route_key")
        keys = frame.select(route_key.unique())
        new = keys.join(self.table, on="__route_key", how="anti")
        if not new.is_empty():
            names = new["__route_key"].to_list()
            shard = [shard_of(self.route(k), self.shards) for k in names]
            self.table = pl.concat(
                [self.table, pl.DataFrame({"__route_key": names, "__shard": shard})]
            )
        routed = frame.with_columns(route_key)
        routed = routed.join(self.table, on="__route_key", how="left", maintain_order="left")
        parts = routed.drop("__route_key").partition_by(
            "__shard", as_dict=True, maintain_order=True
        )
        return [(str(k[0]), part.drop("__shard")) for k, part in sorted(parts.items())]


@operator
def cep(
    step_id: str,
    up: Stream[pl.DataFrame],
    patterns: PatternSet,
    input: str | None = None,
    dimensions: Mapping[str, Mapping[str, str]] | None = None,
    shards: int = 8,
    now: Callable[[], datetime] = _utcnow,
    recovery: bool = True,
) -> CepOut:
    """Run the patterns of one input over a stream of frames.

    ``input`` picks the patterns (and key/time columns) when ``patterns``
    listens to several inputs; ``dimensions`` maps keys to dimensions for
    ``correlation`` patterns. Per shard, outputs keep the engine's order.
    ``recovery=False`` skips the state copies Bytewax asks for at each epoch's end (no recovery store records them).
    """
    if shards < 1:
        raise ConfigError(f"shards={shards} must be at least 1")
    inputs = sorted({p.input for p in patterns.patterns})
    if input is None:
        if len(inputs) > 1:
            raise ConfigError(
                f"patterns listen to several inputs ({', '.join(inputs)}); pass input=..."
            )
        input = inputs[0]
    chosen = [p for p in patterns.patterns if p.input == input]
    if not chosen:
        raise ConfigError(
            f"no pattern listens to input {input!r}; they listen to {', '.join(inputs)}"
        )
    spec = patterns.all_inputs()[input]
    dims = dict(dimensions or {})

    # one engine for per-key patterns, one per grouping dimension for correlations
    groups: dict[str, list[Any]] = {}
    for p in chosen:
        where = f"group-{p.label}" if isinstance(p, CorrelationPattern) else "keyed"
        groups.setdefault(where, []).append(p)
    if any(k.startswith("group-") for k in groups) and dimensions is None:
        name = next(p.name for p in chosen if isinstance(p, CorrelationPattern))
        raise ConfigError(
            f"pattern {name!r} correlates keys by a dimension; pass dimensions={{key: {{dim: value}}}}"
        )

    outputs: list[Stream[CepEmit]] = []
    # the per-key engine first (it reports rejected rows), then one per dimension
    for where, members in sorted(groups.items(), key=lambda item: item[0] != "keyed"):
        subset = patterns.model_copy(update={"patterns": members})
        if where == "keyed":
            sharder = _Sharder(spec.key, shards, lambda k: k)
        else:
            # every key of a group to one shard: routed by its group (operators.groups)
            of_group = members[0].groups(dims)
            sharder = _Sharder(spec.key, shards, lambda k, g=of_group: g.get(k, ""))

        def build(state: dict[str, Any] | None, subset: PatternSet = subset) -> LogicStep:
            engine = CepEngine(subset, state, now=now, input=input, dimensions=dims)
            return LogicStep(engine, recovery=recovery)

        keyed = op.flat_map(f"shard_{where}", up, sharder.split)
        emitted = op.key_rm(
            f"unshard_{where}", op.stateful_batch(f"patterns_{where}", keyed, build)
        )
        if outputs:  # every engine sees every row: only the first reports rejected rows
            emitted = op.filter(f"once_{where}", emitted, lambda e: not isinstance(e, RejectedRows))
        outputs.append(emitted)

    items = outputs[0] if len(outputs) == 1 else op.merge("merge", *outputs)
    det = op.branch("detections", items, lambda e: isinstance(e, Detection))
    timed = op.branch("timed_out", det.falses, lambda e: isinstance(e, TimedOutMatch))
    rejected = op.branch("rejected", timed.falses, lambda e: isinstance(e, RejectedRows))
    return CepOut(
        detections=det.trues,  # type: ignore[arg-type]
        actions=rejected.falses,  # type: ignore[arg-type]
        timed_out=timed.trues,  # type: ignore[arg-type]
        rejected=rejected.trues,  # type: ignore[arg-type]
    )
