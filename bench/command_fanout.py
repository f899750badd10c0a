"""command_fanout: a 3-step sequence to 1,000 simulated HVAC units over real MQTT, all acked.

On a private Mosquitto and Tansu (``bench.workload.private_stack``), the real
orchestrator flow (``python -m bytewax.run dataflows.orchestrator:flow``) and
a simulated fleet of ``devices`` HVAC units (``infra.simulator``: they ack
each command after ``ack_latency_ms`` and publish their new state). One
instruction goes to ``{prefix}.commands.requests``: every unit, three steps
``set_mode cool``, ``set_temperature 23.5`` and ``set_fan_speed 2`` (the
simulator's fan speeds are 0-3, with no "auto"). The orchestrator sends each
unit its steps in order, the next only after the previous was acked.

``seconds`` = from just before the instruction is produced to when the last
of the ``3 * devices`` DONE events was consumed from ``{prefix}.commands.events``.
A warm-up command to one unit runs first (Kafka consumer assignment, first
connections). The run fails unless every command ended DONE exactly once,
each unit executed exactly three commands and reports mode cool, setpoint
23.5 and fan speed 2, and no command was received twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._commands import CommandWatch, orchestrator_flow, producer
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from infra.simulator import Fleet, FleetConfig
from iotflow.topics import KafkaTopics

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "seconds for a 3-step sequence (set_mode, set_temperature, set_fan_speed) to N simulated "
    "HVAC units over real MQTT, every command acked, through the orchestrator flow"
)
DEFAULTS: dict[str, Any] = {"devices": 1000, "ack_latency_ms": 20, "timeout_s": 120.0}
QUICK: dict[str, Any] = {"devices": 20, "timeout_s": 60.0}
FIGURES = {"seconds"}
COMPLETE_COUNTS = ("done", "executed")

CONFIG = {"ack_timeout": {"mqtt": "10s"}, "max_attempts": 3, "backoff": "1s"}
STEPS = [
    "set_mode cool",
    "set_temperature 23.5",
    {"command": "set_fan_speed", "params": {"speed": 2}},
]


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def run(params: dict[str, Any]) -> Measured:
    n = int(params["devices"])
    timeout_s = float(params["timeout_s"])
    with (
        private_stack() as info,
        tempfile.TemporaryDirectory(prefix="iotflow-fanout-") as tmp,
        orchestrator_flow(info, Path(tmp), CONFIG) as (flow, settings),
    ):
        fleet_config = FleetConfig(
            devices={"hvac": n},
            base=settings.mqtt_base,
            commands={"ack_latency_ms": int(params["ack_latency_ms"])},
        )
        requests = KafkaTopics(settings.topic_prefix).command_requests
        watch = CommandWatch(settings)
        out = producer(info.kafka_bootstrap)
        try:
            with Fleet(fleet_config, info.mqtt_url, schedule_telemetry=False) as fleet:
                devices = fleet.device_ids
                now = datetime.now(UTC)
                warmup = {
                    "command_id": "warmup",
                    "device_id": devices[0],
                    "name": "set_mode",
                    "params": {"mode": "auto"},
                    "issued_at": _iso(now),
                    "expires_at": _iso(now + timedelta(minutes=5)),
                }
                out.produce(requests, json.dumps(warmup).encode(), b"bench")
                out.flush(10)
                watch.wait("done", 1, 60)
                instruction = {
                    "instruction_id": "fanout",
                    "target": {"devices": devices},
                    "steps": STEPS,
                    "ttl": "5m",
                }
                payload = json.dumps(instruction).encode()
                start = time.time()
                out.produce(requests, payload, b"bench")
                out.flush(10)
                watch.wait("done", 1 + 3 * n, timeout_s)
                stats = fleet.stats
            ids = [i for i in watch.command_ids() if i.startswith("fanout/")]
            outcomes = [watch.outcome(i) for i in ids]
            last = max(o.done_seen_at or 0.0 for o in outcomes)
        finally:
            watch.close()
        flow.stop()
    done = sum(o.kinds.count("done") == 1 for o in outcomes)
    if len(ids) != 3 * n or done != 3 * n:
        raise BenchError(f"{done} of {3 * n} commands done once ({len(ids)} seen)")
    for device in devices:
        reported = stats.devices[device].reported
        got = (reported["mode"], reported["setpoint"], reported["fan_speed"])
        if got != ("cool", 23.5, 2):
            raise BenchError(f"{device} reports {got}, not ('cool', 23.5, 2)")
    if stats.duplicate_commands or stats.commands_executed != 3 * n + 1:
        raise BenchError(
            f"devices executed {stats.commands_executed} commands ({stats.duplicate_commands} "
            f"duplicates) for {3 * n + 1} sent"
        )
    return Measured(
        figures={"seconds": Figure(round(last - start, 3), "s")},
        counts={"sent": 3 * n, "done": done, "executed": stats.commands_executed - 1, "devices": n},
    )
