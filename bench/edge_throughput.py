"""edge_throughput: readings/s one edge gateway process sustains on one core, local rules
and pre-aggregation on, every message acknowledged only once durable.

The broker holds a backlog and the edge drains it as fast as it can:

1. the real edge flow (``python -m bytewax.run dataflows.edge:flow``) starts once so
   that its persistent MQTT session exists, and is SIGKILLed;
2. ``publishers`` raw-socket processes publish ``readings`` flat readings at QoS 1
   (one per message, ``devices`` devices, timestamps increasing per device) to
   the gateway's local Mosquitto, which queues them for the session;
3. the edge starts again, pinned to one CPU (``os.sched_setaffinity``; the last
   one of this process's set), and drains them: decode, a threshold rule with a
   command action per reading, 10 s tumbling windows per device and metric,
   checkpoints (state + SQLite buffer commit) every 50 ms or 500 messages, each
   followed by the MQTT acknowledgments, and the uplink of aggregates to Kafka.

``readings_per_s`` = readings processed between the first and the last of the
edge's status records (every 0.5 s, carrying its ``readings`` counter and time)
/ the time between them. Mosquitto, Tansu and the uplink's librdkafka threads
share the machine; the figure is for the edge's own core. The run fails unless
every reading was processed and aggregated once.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._edge import FLEET_WORKFLOW, Fleet, FleetSpec, edge_flow, pick_cpu, uplink_records
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from connectors.uplink import dedupe_uplink, expand_aggregates

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = "edge gateway: readings/s one edge process drains on one core (rules + 10 s windows, QoS 1, acks after commit)"
DEFAULTS: dict[str, Any] = {"readings": 200_000, "devices": 1000, "publishers": 2}
QUICK: dict[str, Any] = {"readings": 20_000, "devices": 100, "publishers": 1}
FIGURES = {"readings_per_s"}
COMPLETE_COUNTS = ("processed", "aggregated")


def run(params: dict[str, Any]) -> Measured:
    readings, devices, publishers = params["readings"], params["devices"], params["publishers"]
    cpu = pick_cpu()
    env = {"IOTFLOW_EDGE_IDLE_STOP_S": "3", "IOTFLOW_EDGE_STATUS_S": "0.5"}
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp_dir, private_stack() as info:
        tmp = Path(tmp_dir)
        with edge_flow(info, tmp, FLEET_WORKFLOW, env=env, name="first") as first:
            names = (first.base, first.prefix)
            first.popen.kill()  # the session stays; the broker queues for it
            first.popen.wait()
        devs = [f"dev{i:05d}" for i in range(devices)]
        start = time.time() + 0.5
        per = readings // publishers
        fleet = Fleet(
            [
                FleetSpec(info.mqtt_url, names[0], tuple(devs[p::publishers]), 50_000, start,
                          start + 600, qos=1, limit=per + (readings % publishers if p == 0 else 0))
                for p in range(publishers)
            ]
        )  # fmt: skip
        sent = fleet.join(600)["msgs"]
        time.sleep(1)  # the broker has them all queued
        with edge_flow(
            info, tmp, FLEET_WORKFLOW, env=env, cpu=cpu, names=names, name="drain"
        ) as run:
            run.wait(600)
            records = uplink_records(run)
    got = dedupe_uplink(records)
    status = sorted(
        (json.loads(bytes(e.body)) | {"_ts": e.created_ms} for e in got if e.kind == "status"),
        key=lambda s: s["_ts"],
    )
    processed = max((s["readings"] for s in status), default=0)
    moving = [s for s in status if 0 < s["readings"] < processed] or status
    if len(moving) < 2:
        raise BenchError(
            f"too few status records to time the drain ({len(status)}); raise readings"
        )
    rate = (moving[-1]["readings"] - moving[0]["readings"]) / (
        (moving[-1]["_ts"] - moving[0]["_ts"]) / 1000
    )
    aggregated = sum(
        w.count for e in got for w in expand_aggregates(e) if w.metric == "temperature"
    )
    return Measured(
        figures={"readings_per_s": Figure(round(rate), "readings/s")},
        counts={"sent": sent, "processed": processed, "aggregated": aggregated},
        resolved={"cpu": cpu},
    )
