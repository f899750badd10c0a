"""edge_throughput: readings/s one edge gateway process sustains on one core, with a
local rule and pre-aggregation.

The real edge flow (``python -m bytewax.run dataflows.edge:flow``) is pinned to
one CPU (``os.sched_setaffinity``; the last of this process's set) and this
process, the publishers, Mosquitto and Tansu are moved to the others. Per
reading it decodes, runs a threshold rule with a command action, adds to 10 s
tumbling windows per device and metric, checkpoints (state + SQLite buffer
commit) every 100 ms or 800 messages and uplinks the window records to Kafka.
Each message holds one flat reading (``devices`` devices, timestamps
increasing per device).

- ``qos`` 0 (default; as high-rate sensors publish): ``publishers`` raw-socket
  processes offer ``readings`` readings at ``offered_per_s``, faster than the
  edge takes them; the broker queues the rest for it.
- ``qos`` 1 (the guaranteed path: acknowledged only once durable): the edge
  starts once so its persistent session exists and is SIGKILLed, the readings
  are published at QoS 1 and queued by the broker, and the edge starts again
  and drains them. Here paho-mqtt's per-message work dominates (one Python
  client alone drains about 13k QoS 1 messages/s on this machine's core with
  acknowledgments batched, 6k acknowledging each at once).

Between the first and the last of the edge's status records taken while it
was busy (every 0.5 s, carrying its ``readings`` counter and time):

- ``readings_per_s``: readings processed / CPU seconds the edge process used
  (all its threads, from ``/proc``): its rate on one core of its own. On a
  shared machine the edge does not get its core to itself (other processes
  run there too), so the wall-clock rate understates it;
- ``wall_readings_per_s``: readings processed / wall seconds, in this run;
- ``cpu_share``: CPU seconds / wall seconds (1.0: the core was all the edge's).

``counts.starved_ms`` is how long its threads waited, runnable, for a CPU
(``/proc/PID/task/*/schedstat``) in that time: what a core of its own would
have given it.

The run fails unless every reading was processed and aggregated once.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._edge import (
    FLEET_WORKFLOW,
    CpuSampler,
    Fleet,
    FleetSpec,
    edge_flow,
    keep_off,
    pick_cpu,
    uplink_records,
)
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from connectors.uplink import dedupe_uplink, expand_aggregates

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = "edge gateway: readings/s one edge process sustains on one core (rule + 10 s windows)"
DEFAULTS: dict[str, Any] = {
    "readings": 200_000,
    "devices": 1000,
    "publishers": 2,
    "qos": 0,
    "offered_per_s": 40_000.0,
}
QUICK: dict[str, Any] = {"readings": 80_000, "devices": 100, "publishers": 1}  # >= 2 status records while busy on a fast machine
FIGURES = {"readings_per_s"}
COMPLETE_COUNTS = ("processed", "aggregated")


def _specs(
    url: str, base: str, params: dict[str, Any], cpus: tuple[int, ...] | None, qos: int
) -> list[FleetSpec]:
    n, publishers = params["readings"], params["publishers"]
    devs = [f"dev{i:05d}" for i in range(params["devices"])]
    start = time.time() + 0.5
    rate = params["offered_per_s"] / publishers
    return [
        FleetSpec(url, base, tuple(devs[p::publishers]), rate, start, start + 600, qos=qos,
                  limit=n // publishers + (n % publishers if p == 0 else 0), cpus=cpus)
        for p in range(publishers)
    ]  # fmt: skip


def run(params: dict[str, Any]) -> Measured:
    if params["qos"] not in (0, 1):
        raise BenchError(f"qos {params['qos']} must be 0 or 1")
    cpu = pick_cpu()
    env = {"IOTFLOW_EDGE_IDLE_STOP_S": "3", "IOTFLOW_EDGE_STATUS_S": "0.5"}
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp_dir, private_stack() as info:
        tmp = Path(tmp_dir)
        others = keep_off(cpu, info)
        if params["qos"] == 1:
            with edge_flow(info, tmp, FLEET_WORKFLOW, env=env, name="first") as first:
                names = (first.base, first.prefix)
                first.popen.kill()  # the session stays; the broker queues for it
                first.popen.wait()
            sent = Fleet(_specs(info.mqtt_url, names[0], params, others, 1)).join(600)["msgs"]
            time.sleep(1)  # the broker has them all queued
            with edge_flow(info, tmp, FLEET_WORKFLOW, env=env, cpu=cpu, names=names) as run:
                cpu_time = CpuSampler(run.popen.pid)
                run.wait(600)
                records = uplink_records(run)
        else:
            with edge_flow(info, tmp, FLEET_WORKFLOW, env=env, cpu=cpu) as run:
                cpu_time = CpuSampler(run.popen.pid)
                sent = Fleet(_specs(info.mqtt_url, run.base, params, others, 0)).join(600)["msgs"]
                run.wait(600)
                records = uplink_records(run)
        cpu_time.stop()
    got = dedupe_uplink(records)
    status = sorted(
        (json.loads(bytes(e.body)) | {"_ts": e.created_ms} for e in got if e.kind == "status"),
        key=lambda s: s["_ts"],
    )
    processed = max((s["readings"] for s in status), default=0)
    busy = [s for s in status if 0 < s["readings"] < processed]
    if len(busy) < 2:
        raise BenchError(f"too few status records while busy ({len(busy)}); raise readings")
    first, last = busy[0]["_ts"] / 1000, busy[-1]["_ts"] / 1000
    done = busy[-1]["readings"] - busy[0]["readings"]
    (ran0, waited0), (ran1, waited1) = cpu_time.at(first), cpu_time.at(last)
    used_s, starved_s = ran1 - ran0, waited1 - waited0
    aggregated = sum(
        w.count for e in got for w in expand_aggregates(e) if w.metric == "temperature"
    )
    return Measured(
        figures={
            "readings_per_s": Figure(round(done / used_s), "readings/s"),
            "wall_readings_per_s": Figure(round(done / (last - first)), "readings/s"),
            "cpu_share": Figure(round(used_s / (last - first), 2), "core"),
        },
        counts={
            "sent": sent,
            "processed": processed,
            "aggregated": aggregated,
            "starved_ms": round(starved_s * 1000),
        },
        resolved={"cpu": cpu},
    )
