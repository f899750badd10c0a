"""twin_updates: twin updates per second on one worker, 100,000 twins.

The workload: ``devices`` temperature sensors of the simulator registry
(``temp-*``), each sending ``rounds`` telemetry messages (raw MQTT payloads
``{"ts", "seq", "temperature", "humidity"}``, every value different from the
device's previous one, so every message makes a new twin version). The first
round creates the twins; the figures are taken over the later rounds, when
all twins exist (the first round's rate is reported apart).

Two measurements, same messages:

- ``updates_per_s``: through the Bytewax twin step of ``dataflows.twins``
  (decode -> shard -> ``stateful_batch`` running ``TwinSync`` via
  ``LogicStep`` -> ``TwinOut`` downstream), ``run_main``, one worker, no
  recovery store (so no state snapshots, as the twins flow runs without one).
  Kafka and DuckDB encoding are not part of it.
- ``logic_updates_per_s``: the pure logic alone (``UpdateDecoder.decode`` then
  ``TwinSync.on_batch``, one instance holding every twin).

``cpu_updates_per_s`` and ``logic_cpu_updates_per_s`` are the same over the
process's CPU time (``time.process_time``) instead of the wall clock: on a
shared machine they move less with the load of other processes.

Building the messages is not timed, and they are frozen out of the garbage
collector's walks (``gc.freeze``): in a flow they come and go. After the run the benchmark checks that
every message made exactly one change, none was rejected, there is one twin
per device, and the flow's final versions (of the last batch's devices) equal
the logic's.
"""

from __future__ import annotations

import gc
import time
from datetime import timedelta
from typing import Any, NamedTuple

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from bench.harness import BenchError, Figure, Measured
from dataflows.twins import twin_step
from iotflow.events import DeviceMessage, from_ms
from twins.registry import simulator_registry
from twins.sync import TwinOut, TwinSync
from twins.updates import UpdateDecoder

__all__ = ["DEFAULTS", "DESCRIPTION", "QUICK", "build_batches", "run"]

DESCRIPTION = "twin updates/s (raw MQTT payload -> new twin version), 100,000 twins, one worker"
DEFAULTS: dict[str, Any] = {
    "devices": 100_000,
    "rounds": 4,  # the first creates the twins; the rest are measured
    "batch_size": 10_000,
    "shards": 16,  # the twins flow's default
    "seed": 3,
}
QUICK: dict[str, Any] = {"devices": 2_000, "rounds": 3, "batch_size": 1_000}
FIGURES = {"updates_per_s", "logic_updates_per_s"}
COMPLETE_COUNTS = ["flow_changes", "logic_changes"]

T0_MS = 1_767_225_600_000
BASE = "iotflow"


def build_batches(devices: int, rounds: int, batch_size: int) -> list[list[DeviceMessage]]:
    """Messages round by round, each device once per round (1 s apart), in batches."""
    encode = msgspec.json.encode
    messages = []
    for r in range(rounds):
        for d in range(devices):
            ts = T0_MS + r * 1000 + d * 1000 // devices
            payload = {
                "ts": ts,
                "seq": r,
                "temperature": round(15.0 + d % 100 / 10 + r * 0.01, 3),
                "humidity": round(40.0 + d % 50 / 5 + r * 0.01, 3),
            }
            messages.append(
                DeviceMessage(f"{BASE}/devices/temp-{d:06d}/telemetry", encode(payload), ts + 3)
            )
    return [messages[i : i + batch_size] for i in range(0, len(messages), batch_size)]


class _Times(NamedTuple):
    """Seconds of one measurement: the first round (wall), the later rounds (wall and CPU)."""

    first_s: float
    steady_s: float
    steady_cpu_s: float


def _check(params: dict[str, Any]) -> None:
    for name in ("devices", "batch_size", "shards"):
        if int(params[name]) < 1:
            raise BenchError(f"{name}={params[name]} must be at least 1")
    if int(params["rounds"]) < 2:
        raise BenchError(
            f"rounds={params['rounds']} must be at least 2 (the first only creates twins)"
        )


def _logic(
    batches: list[list[DeviceMessage]], first_batches: int, registry: Any, clock: Any
) -> tuple[_Times, int, int, dict[str, int], int]:
    """The decoder and one TwinSync: (times, changes, rejected, final versions of the last
    batch's devices, twins)."""
    decoder = UpdateDecoder(BASE)
    sync = TwinSync(registry, now=clock)
    changes = rejected = 0
    started = steady = time.perf_counter()
    steady_cpu = time.process_time()
    for index, batch in enumerate(batches):
        if index == first_batches:
            steady, steady_cpu = time.perf_counter(), time.process_time()
        ok, bad = decoder.decode(batch)
        rejected += len(bad)
        for out in sync.on_batch(ok):
            changes += len(out.changes)
            rejected += len(out.rejections)
    ended, ended_cpu = time.perf_counter(), time.process_time()
    last = batches[-1][0].topic.split("/")[2]  # versions of the devices of the last batch
    first_of_last = int(last.rsplit("-", 1)[1])
    versions = {
        d: t.version for d, t in sync.twins.items() if int(d.rsplit("-", 1)[1]) >= first_of_last
    }
    times = _Times(steady - started, ended - steady, ended_cpu - steady_cpu)
    return times, changes, rejected, versions, len(sync.twins)


def _flow(
    batches: list[list[DeviceMessage]], first_batches: int, registry: Any, clock: Any, shards: int
) -> tuple[_Times, int, int, dict[str, int]]:
    """The Bytewax twin step, one worker: the first four results of ``_logic``."""
    marks: dict[str, float] = {}
    pulled = [0]
    totals = {"changes": 0, "rejected": 0}
    versions: dict[str, int] = {}

    def mark(_step: str, _batch: list[DeviceMessage]) -> None:
        pulled[0] += 1
        if pulled[0] == first_batches + 1:
            marks["steady"], marks["steady_cpu"] = time.perf_counter(), time.process_time()

    def tally(_step: str, out: TwinOut) -> None:  # counted and dropped, as a sink would
        totals["changes"] += len(out.changes)
        totals["rejected"] += len(out.rejections)
        if pulled[0] == len(batches):  # the last round: every twin's final version
            versions.update((c.device_id, c.version) for c in out.changes)

    decoder = UpdateDecoder(BASE)
    flow = Dataflow("bench_twin_updates")
    source = op.inspect("mark", op.input("in", flow, TestingSource(batches)), mark)
    decoded = op.map("decode", source, decoder.decode)
    reported = op.map("reported", decoded, lambda pair: pair[0])
    outs = op.inspect(
        "tally", twin_step("twins", reported, registry, shards, clock, recovery=False), tally
    )
    op.output("out", op.filter("drop", outs, lambda _o: False), TestingSink([]))
    started = time.perf_counter()
    run_main(flow, epoch_interval=timedelta(seconds=10))
    ended, ended_cpu = time.perf_counter(), time.process_time()
    steady = marks["steady"]
    times = _Times(steady - started, ended - steady, ended_cpu - marks["steady_cpu"])
    return times, totals["changes"], totals["rejected"], versions


def run(params: dict[str, Any]) -> Measured:
    _check(params)
    devices, rounds = int(params["devices"]), int(params["rounds"])
    batch_size, shards = int(params["batch_size"]), int(params["shards"])
    batches = build_batches(devices, rounds, batch_size)
    sent = sum(len(b) for b in batches)
    first_batches = -(-devices // batch_size)  # batches holding round 0 (when it divides evenly)
    first_round = sum(len(b) for b in batches[:first_batches])
    steady = sent - first_round
    registry = simulator_registry()
    end_ms = T0_MS + rounds * 1000 + 10_000

    def clock() -> Any:  # the data's own time: no device goes stale during the replay
        return from_ms(end_ms)

    # The prepared messages are the benchmark's own: keep the collector from walking them.
    gc.collect()
    gc.freeze()
    try:
        logic, logic_changes, rejected, logic_versions, logic_twins = _logic(
            batches, first_batches, registry, clock
        )
        flow, flow_changes, flow_rejected, flow_versions = _flow(
            batches, first_batches, registry, clock, shards
        )
    finally:
        gc.unfreeze()
    rejected += flow_rejected
    counts = {
        "sent": sent,
        "flow_changes": flow_changes,
        "logic_changes": logic_changes,
        "rejected": rejected,
        "twins": logic_twins,
    }
    wrong = [f"{k}={counts[k]} (expected {sent})" for k in COMPLETE_COUNTS if counts[k] != sent]
    if rejected:
        wrong.append(f"rejected={rejected} (expected 0)")
    if logic_twins != devices or flow_versions != logic_versions:
        wrong.append("the flow's twin versions differ from the logic's")
    if wrong:
        raise BenchError("twin updates incomplete: " + "; ".join(wrong))
    return Measured(
        figures={
            "updates_per_s": Figure(round(steady / flow.steady_s, 1), "updates/s"),
            "logic_updates_per_s": Figure(round(steady / logic.steady_s, 1), "updates/s"),
            "cpu_updates_per_s": Figure(round(steady / flow.steady_cpu_s, 1), "updates/CPU-s"),
            "logic_cpu_updates_per_s": Figure(
                round(steady / logic.steady_cpu_s, 1), "updates/CPU-s"
            ),
            "first_round_updates_per_s": Figure(round(first_round / flow.first_s, 1), "updates/s"),
            "logic_first_round_updates_per_s": Figure(
                round(first_round / logic.first_s, 1), "updates/s"
            ),
        },
        counts=counts,
    )
