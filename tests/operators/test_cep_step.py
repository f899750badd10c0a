"""The CEP Bytewax step: streams split by kind, sharding, and state across a restart."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import polars as pl
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from iotflow.errors import ConfigError
from iotflow.events import Detection
from operators.cep import CommandRequest, RejectedRows, TimedOutMatch
from operators.cep_patterns import PatternSet
from operators.cep_step import cep
from tests.operators.test_cep import ZONES, ManualClock, at, frame, secs

PATTERNS = PatternSet.from_dict(
    [
        {
            "name": "door_then_motion",
            "kind": "sequence",
            "within": "30s",
            "steps": [
                {"name": "opened", "where": "door == 1"},
                {"name": "motion", "where": "motion > 0"},
            ],
            "actions": [{"type": "detect"}, {"type": "command", "name": "light_on"}],
        },
        {
            "name": "surge",
            "kind": "correlation",
            "condition": "t > 35",
            "group_by": "zone",
            "min_keys": 2,
            "within": "1m",
        },
    ]
)

BATCHES = [
    frame([("a", 0, {"door": 1.0}), ("b", 0, {"door": 1.0}), ("c", 1, {"t": 36.0})]),
    frame([("a", 10, {"motion": 1.0}), ("b", 15, {"t": 36.0})]),
    frame([("c", 20, {"door": 1.0}), ("a", 5, {"t": 1.0})]),  # a at 5 s is late
    frame([("c", 60, {"t": 20.0})]),
]


def run_flow(
    batches: list[Any],
    shards: int,
    recovery: RecoveryConfig | None = None,
    seen: list[pl.DataFrame] | None = None,
) -> dict[str, list[Any]]:
    flow = Dataflow("cep_test")
    frames = op.input("in", flow, TestingSource(batches))
    if seen is not None:
        frames = op.inspect("seen", frames, lambda _step, f: seen.append(f))
    out = cep("cep", frames, PATTERNS, dimensions=ZONES, shards=shards, now=ManualClock())
    got: dict[str, list[Any]] = {"detections": [], "actions": [], "timed_out": [], "rejected": []}
    for name in got:
        op.output(name, getattr(out, name), TestingSink(got[name]))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    return got


def summary(got: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {
        "detections": sorted((d.rule, d.key, secs(d.ts)) for d in got["detections"]),
        "actions": sorted((a.name, a.device_id, a.request_id) for a in got["actions"]),
        "timed_out": sorted((t.pattern, t.key, secs(t.timed_out_at)) for t in got["timed_out"]),
        "rejected": sorted((r.reason, r.rows.height) for r in got["rejected"]),
    }


EXPECTED = {
    "detections": [("door_then_motion", "a", 10.0), ("surge", "z1", 15.0)],
    "actions": [("light_on", "a", f"door_then_motion|a|{at(10)}|1")],
    # b's door at 0 s: no motion within 30 s; c's door at 20 s: input ends first
    "timed_out": [("door_then_motion", "b", 30.0), ("door_then_motion", "c", 50.0)],
    "rejected": [("late", 1)],
}


@pytest.mark.parametrize("shards", [1, 4])
def test_streams_carry_their_kind_and_sharding_does_not_change_results(shards: int) -> None:
    got = run_flow(BATCHES, shards)
    assert all(isinstance(d, Detection) for d in got["detections"])
    assert all(isinstance(a, CommandRequest) for a in got["actions"])
    assert all(isinstance(t, TimedOutMatch) for t in got["timed_out"])
    assert all(isinstance(r, RejectedRows) for r in got["rejected"])
    assert summary(got) == EXPECTED


def test_partial_matches_survive_a_restart_from_the_recovery_store(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    # the flow dies after the door opened and before the motion arrives
    batches: list[Any] = [BATCHES[0], TestingSource.ABORT(), *BATCHES[1:]]
    first = run_flow(batches, 4, recovery)
    assert first["detections"] == []
    seen: list[pl.DataFrame] = []
    second = run_flow(batches, 4, recovery, seen)
    # the resumed run does not read the door events again: they come from the state
    assert not any(f.equals(BATCHES[0]) for f in seen)
    assert summary(second) == EXPECTED


def test_bad_arguments_fail_when_the_flow_is_built() -> None:
    flow = Dataflow("bad")
    frames = op.input("in", flow, TestingSource([pl.DataFrame()]))
    with pytest.raises(ConfigError, match="shards=0 must be at least 1"):
        cep("cep", frames, PATTERNS, dimensions=ZONES, shards=0)
    with pytest.raises(ConfigError, match="pass dimensions="):
        cep("cep2", frames, PATTERNS)
    with pytest.raises(ConfigError, match="no pattern listens to input 'windows'"):
        cep("cep3", frames, PATTERNS, input="windows", dimensions=ZONES)


@pytest.mark.parametrize("shards", [1, 4])
def test_correlation_over_a_grouping_set_meets_in_one_shard(shards: int) -> None:
    """Every key of a group goes to the shard of its group, whatever the shard count."""
    floors = {f"d{i}": {"building": "A", "floor": str(i % 3)} for i in range(12)}
    patterns = PatternSet.from_dict(
        [
            {
                "name": "surge",
                "kind": "correlation",
                "condition": "t > 35",
                "group_by": ["building", "floor"],
                "min_keys": 4,
                "within": "1m",
            }
        ]
    )
    flow = Dataflow("cep_sets")
    rows = [(f"d{i}", i, {"t": 36.0}) for i in range(12)]
    frames = op.input("in", flow, TestingSource([frame(rows[:6]), frame(rows[6:])]))
    out = cep("cep", frames, patterns, dimensions=floors, shards=shards, now=ManualClock())
    got: list[Detection] = []
    op.output("detections", out.detections, TestingSink(got))
    run_main(flow, epoch_interval=timedelta(0))
    assert sorted((d.key, secs(d.ts)) for d in got) == [
        ("building=A|floor=0", 9.0),
        ("building=A|floor=1", 10.0),
        ("building=A|floor=2", 11.0),
    ]
