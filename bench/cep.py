"""cep: readings per second through the six CEP pattern kinds over 10,000 devices, one worker.

The flow is ``operators.cep_step.cep`` over a ``TestingSource`` of pre-built
reading frames (``device_id``, ``ts_ms``, ``temperature``, ``door``,
``motion``), run with ``run_main`` on one worker. The patterns are one of each
kind: ``threshold`` (temperature > 30 for 3 consecutive readings), ``range``
(max - min > 5 within 5m), ``rate`` (rises more than 30 C/min), ``absence``
(no reading for 60s), ``sequence`` (door opened, then motion within 30s) and
``correlation`` (3 devices of a zone above 30 within 1m). The clock covers all
of ``run_main``, including the end-of-input flush; building the frames is not
timed.

Every device reports every ``interval_ms`` in time order with a little noise;
the workload plants what each pattern looks for (heat spikes, three-reading
heat runs, zone-wide surges, devices that go silent, doors followed by motion)
so every kind has work to do. ``logic_events_per_s`` times the engine alone
(``CepEngine.on_batch``, no Bytewax) over the same frames. After the run the
benchmark checks that every row reached the engine, none was rejected, each
kind detected something, and the flow found exactly the detections the engine
alone found.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Any

import bytewax.operators as op
import numpy as np
import polars as pl
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from bench.harness import BenchError, Figure, Measured
from iotflow.events import Detection, from_ms
from operators.cep_patterns import PatternSet
from operators.cep_step import cep

__all__ = ["DEFAULTS", "DESCRIPTION", "PATTERNS", "QUICK", "build_frames", "run"]

DESCRIPTION = (
    "readings/s through six CEP pattern kinds (threshold, range, rate, absence, sequence, "
    "correlation) over 10,000 devices, one worker"
)
DEFAULTS: dict[str, Any] = {
    "devices": 10_000,
    "events": 400_000,
    "batch_size": 50_000,
    "interval_ms": 10_000,  # each device reports once per interval, in time order
    "shards": 1,  # Bytewax state keys; one worker needs one
    "zone_size": 100,  # devices per zone (the correlation group)
    "seed": 7,
}
QUICK: dict[str, Any] = {"devices": 200, "events": 6_000, "batch_size": 1_000, "shards": 2}
FIGURES = {"events_per_s"}
COMPLETE_COUNTS = ["flow_rows_in", "logic_rows"]

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
KINDS = ("threshold", "range", "rate", "absence", "sequence", "correlation")

PATTERNS = PatternSet.from_dict(
    {
        "max_future_skew": None,  # replayed data is stamped in the past or future of this clock
        "patterns": [
            {"name": "hot", "kind": "threshold", "condition": "temperature > 30", "times": 3},
            {
                "name": "swing",
                "kind": "range",
                "value": "temperature",
                "exceeds": 5,
                "within": "5m",
            },
            {
                "name": "heating",
                "kind": "rate",
                "value": "temperature",
                "exceeds": 30,
                "per": "1m",
            },
            {"name": "offline", "kind": "absence", "within": "60s"},
            {
                "name": "door_motion",
                "kind": "sequence",
                "within": "30s",
                "steps": [
                    {"name": "opened", "where": "door == 1"},
                    {"name": "motion", "where": "motion > 0"},
                ],
            },
            {
                "name": "surge",
                "kind": "correlation",
                "condition": "temperature > 30",
                "group_by": "zone",
                "min_keys": 3,
                "within": "1m",
            },
        ],
    }
)
RULE_KIND = {p.name: p.kind for p in PATTERNS.patterns}


def _names(devices: int) -> list[str]:
    return [f"dev-{d:05d}" for d in range(devices)]


def dimensions(devices: int, zone_size: int) -> dict[str, dict[str, str]]:
    return {name: {"zone": f"zone-{d // zone_size:04d}"} for d, name in enumerate(_names(devices))}


def build_frames(
    devices: int, events: int, batch_size: int, interval_ms: int, zone_size: int, seed: int
) -> list[pl.DataFrame]:
    """Reading frames in time order, with planted anomalies for every pattern kind."""
    rng = np.random.default_rng(seed)
    rounds = max(1, events // devices)
    k = np.arange(rounds * devices)
    device, rnd = k % devices, k // devices
    # devices report spread over the interval so the stream is in time order
    ts = T0_MS + rnd * interval_ms + device * interval_ms // devices
    base = 20.0 + (device % 50) / 10
    temperature = base + rng.normal(0.0, 0.05, len(k))
    # heat spikes: one reading 15 C up (range, rate, and a zone surge when three coincide)
    spike = rng.random(len(k)) < 0.001
    # three consecutive hot readings on a few devices (threshold)
    runner = (device % 997 == 5) & (rnd % 12 >= 3) & (rnd % 12 < 6)
    # a zone-wide surge: the first three devices of every 7th zone in round 4
    surge = (rnd == min(4, rounds - 1)) & (device % (7 * zone_size) < 3)
    temperature = temperature + np.where(spike | runner | surge, 15.0, 0.0)
    door = np.where(rng.random(len(k)) < 0.002, 1.0, 0.0)
    motion = np.where(rng.random(len(k)) < 0.05, 1.0, 0.0)
    # every 200th device goes silent halfway through (absence)
    keep = ~((device % 200 == 3) & (rnd >= rounds // 2))
    frame = pl.DataFrame(
        {
            "device_id": np.array(_names(devices))[device[keep]],
            "ts_ms": ts[keep],
            "temperature": temperature[keep],
            "door": door[keep],
            "motion": motion[keep],
        }
    )
    return [frame.slice(i, batch_size) for i in range(0, frame.height, batch_size)]


def _check_params(params: dict[str, Any]) -> None:
    for name in ("devices", "events", "batch_size", "interval_ms", "shards", "zone_size"):
        if int(params[name]) < 1:
            raise BenchError(f"{name}={params[name]} must be at least 1")
    if int(params["events"]) < 8 * int(params["devices"]):
        raise BenchError(
            f"events={params['events']} gives fewer than 8 readings per device; "
            f"use at least {8 * int(params['devices'])} for devices={params['devices']}"
        )


def run(params: dict[str, Any]) -> Measured:
    _check_params(params)
    devices, zone_size = int(params["devices"]), int(params["zone_size"])
    frames = build_frames(
        devices,
        int(params["events"]),
        int(params["batch_size"]),
        int(params["interval_ms"]),
        zone_size,
        int(params["seed"]),
    )
    sent = sum(f.height for f in frames)
    dims = dimensions(devices, zone_size)

    def clock() -> Any:  # replay: the data's own start; the watermark moves with the data
        return from_ms(T0_MS)

    flow = Dataflow("bench_cep")
    rows_in: list[int] = []
    source = op.input("in", flow, TestingSource(frames))
    source = op.inspect("count", source, lambda _step, f: rows_in.append(f.height))
    out = cep("cep", source, PATTERNS, dimensions=dims, shards=int(params["shards"]), now=clock)
    found: list[Detection] = []
    rejected: list[Any] = []
    op.output("detections", out.detections, TestingSink(found))
    op.output("rejected", out.rejected, TestingSink(rejected))
    started = time.perf_counter()
    run_main(flow, epoch_interval=timedelta(seconds=10))
    flow_s = time.perf_counter() - started

    engine = PATTERNS.build(None, now=clock, input="readings", dimensions=dims)
    logic: list[Any] = []
    started = time.perf_counter()
    for f in frames:
        logic.extend(engine.on_batch(f))
    logic.extend(engine.on_eof())
    logic_s = time.perf_counter() - started

    flow_kinds = Counter(RULE_KIND[d.rule] for d in found)
    logic_found = [d for d in logic if isinstance(d, Detection)]
    logic_kinds = Counter(RULE_KIND[d.rule] for d in logic_found)
    counts: dict[str, int] = {
        "sent": sent,
        "flow_rows_in": sum(rows_in),
        "logic_rows": int(engine.stats()["rows"]),
        "rejected_rows": sum(r.rows.height for r in rejected),
        "detections": len(found),
        "logic_detections": len(logic_found),
        **{f"detections_{kind}": flow_kinds.get(kind, 0) for kind in KINDS},
    }
    _verify(counts, found, logic_found, logic_kinds)
    return Measured(
        figures={
            "events_per_s": Figure(round(sent / flow_s, 1), "events/s"),
            "logic_events_per_s": Figure(round(sent / logic_s, 1), "events/s"),
            "seconds": Figure(round(flow_s, 3), "s"),
        },
        counts=counts,
    )


def _key(d: Detection) -> tuple[str, str, Any]:
    return (d.rule, d.key, d.ts)


def _verify(
    counts: dict[str, int], flow: list[Detection], logic: list[Detection], kinds: Counter[str]
) -> None:
    wrong = [
        f"{k}={counts[k]} (expected {counts['sent']})"
        for k in COMPLETE_COUNTS
        if counts[k] != counts["sent"]
    ]
    if counts["rejected_rows"]:
        wrong.append(f"rejected_rows={counts['rejected_rows']} (expected 0)")
    missing = [kind for kind in KINDS if kinds.get(kind, 0) == 0]
    if missing:
        wrong.append(f"no detections of kind {', '.join(missing)} (the workload plants them)")
    if sorted(map(_key, flow)) != sorted(map(_key, logic)):
        wrong.append(
            f"the flow found {len(flow)} detections, the engine alone {len(logic)}; they must be equal"
        )
    if wrong:
        raise BenchError("the CEP outputs do not match the input: " + "; ".join(wrong))
