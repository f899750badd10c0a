"""command_rtt: command round trip (send -> ack) through the orchestrator at 500 commands/s.

On a private Mosquitto and Tansu, the real orchestrator flow and a simulated
fleet of ``devices`` HVAC units that ack at once (``ack_latency_ms`` 0: the
figure is the system's, not a device's think time). The benchmark produces
``rate_per_s`` single ``set_temperature`` commands per second to
``{prefix}.commands.requests`` for ``duration_s``, round-robin over the units
(each unit gets ``rate_per_s / devices`` commands per second, so none waits
behind its own previous command).

Round trip of a command = the orchestrator's DONE event time minus its SENT
event time (one clock, the flow's): the write to the MQTT sink, the broker,
the device, its ack back through the broker and the flow's MQTT source into
the orchestrator. Commands of the first ``warmup_s`` are left out.
``e2e_p50_ms``/``e2e_p99_ms`` add the request's way in (produce -> Kafka ->
flow) and the DONE event's way out (flow -> Kafka -> consumer). Everything
(publisher, brokers, flow, fleet, consumer) shares this machine's cores.

The run fails unless every command ended DONE exactly once and the fleet
executed each exactly once.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._commands import CommandWatch, orchestrator_flow, producer
from bench._latency import percentile
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from infra.simulator import Fleet, FleetConfig
from iotflow.topics import KafkaTopics

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "p50/p99 ms command round trip (orchestrator send -> device ack processed) at a steady "
    "rate of commands over real MQTT to simulated devices"
)
DEFAULTS: dict[str, Any] = {
    "rate_per_s": 500.0,
    "duration_s": 12.0,
    "warmup_s": 2.0,
    "devices": 500,
    "ack_latency_ms": 0,
    "timeout_s": 60.0,
}
QUICK: dict[str, Any] = {"rate_per_s": 50.0, "duration_s": 2.0, "warmup_s": 0.5, "devices": 20}
FIGURES = {"p50_ms", "p99_ms"}
COMPLETE_COUNTS = ("done", "executed")

CONFIG = {"ack_timeout": {"mqtt": "10s"}, "max_attempts": 3, "backoff": "1s"}


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def run(params: dict[str, Any]) -> Measured:
    rate = float(params["rate_per_s"])
    total = int(rate * float(params["duration_s"]))
    warm = int(rate * float(params["warmup_s"]))
    n = int(params["devices"])
    with (
        private_stack() as info,
        tempfile.TemporaryDirectory(prefix="iotflow-rtt-") as tmp,
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
        produced_at: dict[str, float] = {}
        try:
            with Fleet(fleet_config, info.mqtt_url, schedule_telemetry=False) as fleet:
                devices = fleet.device_ids
                start = time.monotonic()
                for k in range(total):
                    due = start + k / rate
                    while (wait := due - time.monotonic()) > 0:
                        time.sleep(min(wait, 0.002))
                    now = datetime.now(UTC)
                    command_id = f"rtt-{k}"
                    request = {
                        "command_id": command_id,
                        "device_id": devices[k % n],
                        "name": "set_temperature",
                        "params": {"setpoint": 20.0 + (k // n) % 2},
                        "issued_at": _iso(now),
                        "expires_at": _iso(now + timedelta(minutes=5)),
                    }
                    produced_at[command_id] = time.time()
                    out.produce(requests, json.dumps(request).encode(), b"bench")
                    out.poll(0)
                out.flush(10)
                watch.wait("done", total, float(params["timeout_s"]))
                stats = fleet.stats
            outcomes = {i: watch.outcome(i) for i in produced_at}
        finally:
            watch.close()
        flow.stop()
    done = sum(o.kinds.count("done") == 1 for o in outcomes.values())
    if done != total or stats.commands_executed != total or stats.duplicate_commands:
        raise BenchError(
            f"{done} of {total} commands done once; devices executed "
            f"{stats.commands_executed} ({stats.duplicate_commands} duplicates)"
        )
    rtt, e2e = [], []
    for k in range(warm, total):
        command_id = f"rtt-{k}"
        o = outcomes[command_id]
        if o.sent_ts is None or o.done_ts is None or o.done_seen_at is None:
            raise BenchError(f"{command_id} has no sent or done event: {o.kinds}")
        rtt.append((o.done_ts - o.sent_ts).total_seconds() * 1000)
        e2e.append((o.done_seen_at - produced_at[command_id]) * 1000)
    return Measured(
        figures={
            "p50_ms": Figure(round(percentile(rtt, 50), 2), "ms"),
            "p99_ms": Figure(round(percentile(rtt, 99), 2), "ms"),
            "e2e_p50_ms": Figure(round(percentile(e2e, 50), 2), "ms"),
            "e2e_p99_ms": Figure(round(percentile(e2e, 99), 2), "ms"),
        },
        counts={
            "sent": total,
            "done": done,
            "executed": stats.commands_executed,
            "measured": len(rtt),
            "devices": n,
        },
    )
