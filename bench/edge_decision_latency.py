"""edge_decision_latency: a device's MQTT publish -> the gateway's local command on MQTT.

On a private Mosquitto and Tansu, the real edge flow (``python -m bytewax.run
dataflows.edge:flow``) runs a threshold rule (``temperature > 200`` -> command
``close`` to ``valve-{key}``) on each reading, 10 s windows and the uplink.
Background load: ``devices`` devices publish flat readings (QoS 0, raw-socket
publisher processes) so that, with the triggers, ``events_per_s`` readings/s
reach the gateway. Triggers: ``triggers_per_s`` readings at 250 °C from
``trigger_devices`` devices of their own, one PUBLISH at a time from this
process, after ``warmup_s``.

Latency of a trigger = ``time.time()`` when a subscriber on
``{base}/devices/+/cmd`` got the command minus ``time.time()`` just before the
trigger's PUBLISH went to the socket (one machine, one clock). The command is
matched to its trigger by its ``command_id`` (``overheat|{device}|{ts}|0``). The
command is QoS 1 and the edge waits for the broker's PUBACK before it goes on.
The run fails unless every trigger got exactly one command and no other
command was sent.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._edge import FLEET_WORKFLOW, Fleet, FleetSpec, edge_flow
from bench._latency import RawMqtt, percentile, publish_packet
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from connectors.mqtt import connect_client
from iotflow.topics import MqttTopics

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = "edge gateway: p50/p99 ms from a device's MQTT publish to the local command on MQTT, at 2,000 readings/s"
DEFAULTS: dict[str, Any] = {
    "events_per_s": 2000.0,
    "devices": 1000,
    "publishers": 1,
    "triggers_per_s": 20.0,
    "trigger_devices": 20,
    "duration_s": 30.0,
    "warmup_s": 3.0,
}
QUICK: dict[str, Any] = {"events_per_s": 500.0, "devices": 100, "duration_s": 5.0, "warmup_s": 1.0}
FIGURES = {"p50_ms", "p99_ms"}
COMPLETE_COUNTS = ("commands",)


def run(params: dict[str, Any]) -> Measured:
    rate, trig_rate = params["events_per_s"], params["triggers_per_s"]
    env = {"IOTFLOW_EDGE_STATUS_S": "3600"}
    with (
        tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp,
        private_stack() as info,
        edge_flow(info, Path(tmp), FLEET_WORKFLOW, env=env) as run,
    ):
        topics = MqttTopics(run.base)
        got: dict[str, float] = {}
        extra: list[str] = []

        def on_command(_c: Any, _u: Any, msg: Any) -> None:
            at = time.time()
            command_id = json.loads(msg.payload)["command_id"]
            if command_id in got:
                extra.append(command_id)
            else:
                got[command_id] = at

        watcher = connect_client(
            info.mqtt_url,
            on_connect=lambda c: c.subscribe(topics.cmd(), 1),
            on_message=on_command,
        )
        names = [f"dev{i:05d}" for i in range(params["devices"])]
        start = time.time() + 0.5
        duration = params["warmup_s"] + params["duration_s"]
        per = (rate - trig_rate) / params["publishers"]
        fleet = Fleet(
                [
                    FleetSpec(info.mqtt_url, run.base, tuple(names[p :: params["publishers"]]), per, start, start + duration + 1)
                    for p in range(params["publishers"])
                ]
            )  # fmt: skip
        trigger = RawMqtt(info.mqtt_url, "bench-triggers")
        sent: dict[str, float] = {}
        triggers = [f"trigger{i:03d}" for i in range(params["trigger_devices"])]
        last = dict.fromkeys(triggers, 0)
        begin = start + params["warmup_s"]
        while time.time() < begin:
            time.sleep(0.01)
        n = 0
        while (now := time.time()) < start + duration:
            due = begin + n / trig_rate
            if now < due:
                time.sleep(min(0.005, due - now))
                continue
            device = triggers[n % len(triggers)]
            ts = last[device] = max(int(time.time() * 1000), last[device] + 1)
            packet = publish_packet(
                topics.telemetry(device).encode(), b'{"ts": %d, "temperature": 250.0}' % ts
            )
            sent[f"overheat|{device}|{ts}|0"] = time.time()
            trigger.send(packet)
            n += 1
        trigger.close()
        published = fleet.join(60)["msgs"]
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        watcher.disconnect()
        watcher.loop_stop()
    unknown = sorted(set(got) - set(sent))
    if unknown or extra or len(got) != len(sent):
        raise BenchError(
            f"{len(sent)} triggers, {len(got)} commands, {len(unknown)} unexpected, {len(extra)} repeated"
        )
    latencies = [(got[k] - t) * 1000 for k, t in sent.items()]
    return Measured(
        figures={
            "p50_ms": Figure(round(percentile(latencies, 50), 2), "ms"),
            "p99_ms": Figure(round(percentile(latencies, 99), 2), "ms"),
            "max_ms": Figure(round(max(latencies), 2), "ms"),
        },
        counts={"sent": len(sent), "commands": len(got), "background_readings": published},
    )
