"""rollout: a firmware rollout to 10,000 simulated nodes in waves 1 %, 10 %, 100 %, every update acked.

On a private Mosquitto and Tansu (``bench.workload.private_stack``), the real
orchestrator flow (``python -m bytewax.run dataflows.orchestrator:flow``)
hosts one rollout (``commands.rollout``) sent as a coordinator request to
``{prefix}.commands.requests``: ``update_firmware`` to version 2.0.0 on the
registry group ``fleet`` (``IOTFLOW_REGISTRY`` names a registry file with the
simulator's models and that group), every node of a simulated fleet (``infra.simulator`` ``node`` devices that ack
after ``ack_latency_ms`` and publish their new state), in waves of 1 %, 10 %
and 100 % of the fleet, at most ``max_in_flight`` updates unfinished at a
time. ``failure_rate`` of the nodes (a seeded draw) fail every update, so the
abort criteria (``abort_rate``) and the per-wave success threshold are judged
with real failures between waves, without tripping.

``seconds`` = from just before the request is produced to when the rollout's
terminal DONE event was consumed from ``{prefix}.commands.events``. A warm-up
command to one node runs first (Kafka consumer assignment, first
connections). The run fails unless the rollout ended DONE after its three
waves, every node that does not fail reports 2.0.0, every failing node still
1.0.0, and no node received a command twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from bench._commands import CommandWatch, orchestrator_flow, producer
from bench._latency import KafkaWatch
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from connectors.kafka import read_topic
from infra.simulator import Fleet, FleetConfig
from iotflow.topics import KafkaTopics
from twins.registry import simulator_registry

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "seconds for a firmware rollout to N simulated nodes over real MQTT in waves of 1%, 10%, "
    "100% with acks and the abort check between waves, through the orchestrator flow"
)
DEFAULTS: dict[str, Any] = {
    "devices": 10_000,
    "max_in_flight": 1000,
    "ack_latency_ms": 20,
    "failure_rate": 0.01,
    "abort_rate": 0.05,
    "timeout_s": 180.0,
}
QUICK: dict[str, Any] = {"devices": 200, "max_in_flight": 50, "timeout_s": 60.0}
FIGURES = {"seconds"}
COMPLETE_COUNTS = ("answered",)

CONFIG = {"ack_timeout": {"mqtt": "10s"}, "max_attempts": 3, "backoff": "1s"}
ROLLOUT_ID = "bench-fw-2.0.0"


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _terminal(
    watch: KafkaWatch, timeout_s: float, bootstrap: str, deadletter: str
) -> tuple[dict[str, Any], float, list[str]]:
    """The rollout's terminal event, when it was consumed, and the kinds of its events."""
    deadline = time.monotonic() + timeout_s
    read = 0
    kinds: list[str] = []
    while time.monotonic() < deadline:
        seen = watch.seen
        end = len(seen)
        for item in seen[read:end]:
            event = json.loads(item.value)
            if event.get("plan_id") != ROLLOUT_ID:
                continue
            kinds.append(event["kind"])
            if event["kind"] in ("done", "failed", "stuck"):
                return event, item.at, kinds
        read = end
        time.sleep(0.005)
    dead = [json.loads(r.value)["reason"][:300] for r in read_topic(bootstrap, deadletter)]
    msg = (
        f"the rollout did not finish within {timeout_s}s; its events: {kinds}; dead letters: {dead}"
    )
    raise BenchError(msg)


@contextmanager
def _fleet_registry(tmp: Path, n: int) -> Iterator[None]:
    """``IOTFLOW_REGISTRY`` = the simulator's models with a group ``fleet`` of ``n`` nodes,
    for the flows started meanwhile (a 10,000-id list would not fit in one request)."""
    path = tmp / "registry.yaml"
    registry = simulator_registry()
    registry.add_group("fleet", [f"node-{i:0{max(4, len(str(n)))}d}" for i in range(1, n + 1)])
    path.write_text(yaml.safe_dump(registry.to_dict()))
    before = os.environ.get("IOTFLOW_REGISTRY")
    os.environ["IOTFLOW_REGISTRY"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["IOTFLOW_REGISTRY"]
        else:
            os.environ["IOTFLOW_REGISTRY"] = before


def run(params: dict[str, Any]) -> Measured:
    n = int(params["devices"])
    timeout_s = float(params["timeout_s"])
    with (
        private_stack() as info,
        tempfile.TemporaryDirectory(prefix="iotflow-rollout-") as tmp,
        _fleet_registry(Path(tmp), n),
        orchestrator_flow(info, Path(tmp), CONFIG) as (flow, settings),
    ):
        fleet_config = FleetConfig(
            devices={"node": n},
            base=settings.mqtt_base,
            commands={"ack_latency_ms": int(params["ack_latency_ms"])},
            firmware={"version": "1.0.0", "failure_rate": float(params["failure_rate"])},
        )
        requests = KafkaTopics(settings.topic_prefix).command_requests
        watch = CommandWatch(settings)
        plans = KafkaWatch(
            info.kafka_bootstrap, [KafkaTopics(settings.topic_prefix).command_events]
        )
        out = producer(info.kafka_bootstrap)
        try:
            with Fleet(fleet_config, info.mqtt_url, schedule_telemetry=False) as fleet:
                nodes = fleet.device_ids
                now = datetime.now(UTC)
                warmup = {
                    "command_id": "warmup",
                    "device_id": nodes[0],
                    "name": "update_firmware",
                    "params": {"version": "1.0.0"},
                    "issued_at": _iso(now),
                    "expires_at": _iso(now + timedelta(minutes=5)),
                }
                out.produce(requests, json.dumps(warmup).encode(), b"bench")
                out.flush(10)
                watch.wait("done", 1, 60)
                request = {
                    "coordinator": {
                        "type": "rollout",
                        "id": ROLLOUT_ID,
                        "name": "fw-2.0.0",
                        "target": {"group": "fleet"},
                        "command": "update_firmware",
                        "params": {"version": "2.0.0"},
                        "waves": [1, 10, 100],
                        "max_in_flight": int(params["max_in_flight"]),
                        "success_threshold": 0.9,
                        "abort": {"failure_rate": float(params["abort_rate"])},
                        "timeout": "2m",
                    }
                }
                payload = json.dumps(request).encode()
                start = time.time()
                out.produce(requests, payload, b"bench")
                out.flush(10)
                final, seen_at, kinds = _terminal(
                    plans,
                    timeout_s,
                    info.kafka_bootstrap,
                    KafkaTopics(settings.topic_prefix).deadletter,
                )
                stats = fleet.stats
        finally:
            watch.close()
            plans.close()
        flow.stop()
    if final["kind"] != "done" or kinds.count("wave_done") != 3:
        raise BenchError(
            f"the rollout ended {final['kind']} ({final.get('detail')}); events {kinds}"
        )
    model = fleet_config.build()  # the same seeded draw of failing nodes as the fleet's
    failing = {d for d in nodes if model.devices[d].firmware_fails}
    for device in nodes:
        snapshot = stats.devices[device]
        want = "1.0.0" if device in failing else "2.0.0"
        if snapshot.reported["firmware"] != want:
            raise BenchError(f"{device} runs {snapshot.reported['firmware']}, not {want}")
    if stats.duplicate_commands:
        raise BenchError(f"devices received {stats.duplicate_commands} commands twice")
    if stats.commands_executed != n - len(failing) + 1:  # + the warm-up
        raise BenchError(f"{stats.commands_executed} updates executed for {n - len(failing)} nodes")
    return Measured(
        figures={"seconds": Figure(round(seen_at - start, 3), "s")},
        counts={
            "sent": n,
            # what the devices say: every node answered its update once, done or failed
            "answered": stats.commands_executed - 1 + stats.commands_failed,
            "updated": n - len(failing),
            "failed": len(failing),
        },
    )
