"""command_rtt: command round trip (send -> ack) through the orchestrator at 500 commands/s.

On a private Mosquitto and Tansu, the real orchestrator flow and ``devices``
simulated HVAC units (``bench._commands.SimulatedDevices``, a process of
their own) that run each command and ack it ``done`` at once, with their
reported state, then publish that state retained (QoS 1 both): the figure is
the system's, not a device's think time nor the simulator's own queueing.
The benchmark produces
``rate_per_s`` single ``set_temperature`` commands per second to
``{prefix}.commands.requests`` for ``duration_s``, round-robin over the units
(each unit gets ``rate_per_s / devices`` commands per second, so none waits
behind its own previous command).

Round trip (``p50_ms``, ``p99_ms``) = the command's DONE event time minus its
SENT event time, both stamped by the orchestrator step on the flow's clock:
the orchestrator hands the write to the MQTT sink, the broker delivers it,
the device runs it and publishes its ``done`` ack, the broker delivers the ack
to the flow's MQTT source and the orchestrator step takes it. Commands of the
first ``warmup_s`` are left out.

Where the time goes, per command (``*_p50_ms``/``*_p99_ms``, same commands):

- ``in``: request produced -> REQUESTED event (Kafka, the flow's Kafka
  source, the orchestrator step; the bench's clock to the flow's);
- ``to_device``: SENT -> the command passes the broker (routing, the MQTT
  sink, Mosquitto);
- ``device``: command passes the broker -> its ``done`` ack passes the
  broker (the simulated device: receive, run, publish);
- ``from_device``: ack passes the broker -> DONE (the flow's MQTT source,
  waiting for the worker, the orchestrator step);
- ``e2e``: request produced -> DONE event consumed from
  ``{prefix}.commands.events`` (``in`` + round trip + the event's way out).

"Passes the broker" is when a separate subscriber process (``WireTap``) got
the message; ``hops`` 0 runs without it (no ``to_device``/``device``/
``from_device`` figures, ~0.1 core less load). All times are this machine's
wall clock. Everything (producer,
brokers, flow, fleet, tap, consumer) shares this machine's cores.

The run fails unless every command ended DONE exactly once and the fleet
executed each exactly once.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._commands import (
    CommandWatch,
    SimulatedDevices,
    WireTap,
    orchestrator_flow,
    producer,
)
from bench._latency import percentile
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from iotflow.topics import KafkaTopics

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "p50/p99 ms command round trip (orchestrator SENT -> DONE: MQTT sink, broker, device, "
    "ack, broker, flow) at a steady rate of commands to simulated devices, with per-hop figures"
)
ROUND_TRIP = (
    "DONE event ts - SENT event ts of the same command (flow clock): the orchestrator's write "
    "through the MQTT sink and broker to the device, the device's done ack back through the "
    "broker and the flow's MQTT source into the orchestrator step"
)
DEFAULTS: dict[str, Any] = {
    "rate_per_s": 500.0,
    "duration_s": 12.0,
    "warmup_s": 2.0,
    "devices": 500,
    "timeout_s": 60.0,
    "hops": 1,
}
QUICK: dict[str, Any] = {"rate_per_s": 50.0, "duration_s": 2.0, "warmup_s": 0.5, "devices": 20}
FIGURES = {"p50_ms", "p99_ms"}
COMPLETE_COUNTS = ("done", "executed")

CONFIG = {"ack_timeout": {"mqtt": "10s"}, "max_attempts": 3, "backoff": "1s"}


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _ms(later: float, earlier: float) -> float:
    return (later - earlier) * 1000


def _figures(name: str, values: list[float]) -> dict[str, Figure]:
    return {
        f"{name}p50_ms": Figure(round(percentile(values, 50), 2), "ms"),
        f"{name}p99_ms": Figure(round(percentile(values, 99), 2), "ms"),
    }


def run(params: dict[str, Any]) -> Measured:
    rate = float(params["rate_per_s"])
    total = int(rate * float(params["duration_s"]))
    warm = int(rate * float(params["warmup_s"]))
    n = int(params["devices"])
    timeout_s = float(params["timeout_s"])
    hops = int(params["hops"])
    with (
        private_stack() as info,
        tempfile.TemporaryDirectory(prefix="iotflow-rtt-") as tmp,
        orchestrator_flow(info, Path(tmp), CONFIG) as (flow, settings),
    ):
        requests = KafkaTopics(settings.topic_prefix).command_requests
        out = producer(info.kafka_bootstrap)
        produced_at: dict[str, float] = {}
        with ExitStack() as cleanup:
            tap = WireTap(info.mqtt_url, settings.mqtt_base, total, timeout_s) if hops else None
            if tap is not None:
                cleanup.callback(tap.stop)
            watch = CommandWatch(settings)
            cleanup.callback(watch.close)
            fleet = SimulatedDevices(info.mqtt_url, settings.mqtt_base, total, timeout_s)
            cleanup.callback(fleet.stop)
            # steady pacing: no full collection over the events gathered so far
            gc.disable()
            cleanup.callback(gc.enable)
            devices = [f"hvac-{d + 1:04d}" for d in range(n)]  # in the simulator's registry
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
            watch.wait("done", total, timeout_s)
            ran = fleet.result()
            outcomes = {i: watch.outcome(i) for i in produced_at}
            cmd_at, ack_at = tap.result() if tap is not None else ({}, {})
        flow.stop()
    done = sum(o.kinds.count("done") == 1 for o in outcomes.values())
    if done != total or ran["executed"] != total or ran["duplicates"] or ran["expired"]:
        raise BenchError(f"{done} of {total} commands done once; devices: {ran}")
    names = ["", "in_", "to_device_", "device_", "from_device_", "e2e_"]
    spans: dict[str, list[float]] = {
        name: [] for name in names if hops or name in ("", "in_", "e2e_")
    }
    for k in range(warm, total):
        command_id = f"rtt-{k}"
        o = outcomes[command_id]
        if o.requested_ts is None or o.sent_ts is None or o.done_ts is None:
            raise BenchError(f"{command_id} lacks a requested, sent or done event: {o.kinds}")
        if o.done_seen_at is None:
            raise BenchError(f"{command_id}'s DONE event was not consumed: {o.kinds}")
        sent, done_ts = o.sent_ts.timestamp(), o.done_ts.timestamp()
        spans[""].append(_ms(done_ts, sent))
        spans["in_"].append(_ms(o.requested_ts.timestamp(), produced_at[command_id]))
        spans["e2e_"].append(_ms(o.done_seen_at, produced_at[command_id]))
        if hops:
            if command_id not in cmd_at or command_id not in ack_at:
                raise BenchError(f"{command_id} or its ack was not seen on the wire")
            spans["to_device_"].append(_ms(cmd_at[command_id], sent))
            spans["device_"].append(_ms(ack_at[command_id], cmd_at[command_id]))
            spans["from_device_"].append(_ms(done_ts, ack_at[command_id]))
    figures: dict[str, Figure] = {}
    for name, values in spans.items():
        figures.update(_figures(name, values))
    return Measured(
        figures=figures,
        counts={
            "sent": total,
            "done": done,
            "executed": ran["executed"],
            "measured": len(spans[""]),
            "devices": n,
        },
        resolved={"round_trip": ROUND_TRIP},
    )
