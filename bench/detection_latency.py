"""detection_latency: MQTT publish of a reading -> its CEP detection seen on Kafka.

End to end on a private Mosquitto and Tansu (``bench.workload.private_stack``)
with the real monitoring flow (``python -m bytewax.run dataflows.monitoring:flow``)
on a declaration written to a temp dir, one worker and ``shards: 1``: per-device
tumbling windows (avg, max; ``window_lateness``) and one per-reading CEP rule,
``threshold`` ``temperature > 90`` times 1 on input ``readings``. A one-event
threshold is *instant* in the CEP engine: it detects as the reading arrives,
without waiting for the patterns' watermark, so ``pattern_lateness`` no longer
bounds the figure (before, every detection waited about that long).

Background load: ``background_per_s`` readings/s from ``devices`` devices, one
flat reading per MQTT message (QoS 0), sent by ``publishers`` processes
(``bench._latency.Load``). Triggers: ``triggers_per_s`` single readings at 95 °C
from ``trigger_devices`` devices of their own, sent one at a time from the
benchmark process after ``warmup_s``. Event time = wall clock (ms).

Latency of a trigger = ``time.time()`` when a low-latency consumer (assigned
partitions, ``fetch.wait.max.ms`` 5) got its detection on ``{prefix}.detections``
minus ``time.time()`` just before its PUBLISH packet went to the socket; the
detection is matched by (key, ts) through a side table. ``to_producer_*`` splits
off the part up to the record's CreateTime (when the flow's Kafka producer took
the detection); the rest is the Kafka hop (producer flush, broker, consumer
fetch). Publishers, Mosquitto, Tansu, the flow and the consumer share this
machine's cores: the p99 is the flow's worst stall while it competes for them.

``window_lateness`` only keeps the background windows from turning readings
late (dead letters fail the run) when the starved flow stalls; it does not
touch the measured path. ``idle_stop_s`` is long for the same reason: a flow
that saw no message for that long ends its input.

Settings on the measured path: ``bytewax.run`` without recovery (10 s epochs; with
no recovery store the Kafka and DuckDB sinks and the stateful steps do not wait or
copy state at an epoch's end); the MQTT source hands over what waits at each poll
(up to 5,000 messages, a 2 ms poll when idle, no ``ingest_linger``); the flow's
producer: ``acks=all``, idempotent, ``linger.ms`` 5; the watching consumer:
``fetch.wait.max.ms`` 5. Per hop at load 4-6 (trace of one run): publish -> the
source took it p50 4 / p99 62-70 ms, decode -> CEP detection p50 5 / p99 30-44 ms,
CEP -> producer < 1 ms; the rest of the p99 is the Kafka hop (producer -> broker ->
consumer), p99 ~230-290 ms through the embedded broker.

The run fails unless every trigger was detected exactly once, no other
detection appeared, no dead letter was written, and the window results
(read after the flow ended) count every reading that was sent.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from bench._latency import (
    KafkaWatch,
    Load,
    LoadSpec,
    RawMqtt,
    monitoring_flow,
    percentile,
    publish_packet,
    split_devices,
    wait_flow,
)
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from connectors.kafka import read_topic
from iotflow.topics import KafkaTopics

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "p50/p99 ms from MQTT publish of a reading to its CEP threshold detection on Kafka, "
    "real monitoring flow, under background load"
)
DEFAULTS: dict[str, Any] = {
    "background_per_s": 10_000,
    "devices": 1000,
    "publishers": 2,
    "triggers_per_s": 20.0,
    "trigger_devices": 20,
    "duration_s": 30.0,
    "warmup_s": 3.0,
    "window": "1m",
    "pattern_lateness": "1s",
    "window_lateness": "10s",
    "idle_stop_s": 5.0,  # a CPU-starved flow must not take a stall for the end of input
    "timeout_s": 120.0,
}
QUICK: dict[str, Any] = {
    "background_per_s": 2000,
    "devices": 100,
    "publishers": 1,
    "triggers_per_s": 20.0,
    "duration_s": 6.0,
    "warmup_s": 1.5,
}
FIGURES = {"p50_ms", "p99_ms"}
COMPLETE_COUNTS = ["detected"]

RULE = "overheating_now"


def deployment(window: str, lateness: str, window_lateness: str = "10s") -> dict[str, Any]:
    return {
        "shards": 1,  # one worker: more shards only add per-batch cost
        "aggregation": {
            "window": {"kind": "tumbling", "length": window},
            "allowed_lateness": window_lateness,
            "stats": ["avg", "max"],
            "group_by": [["device"]],
        },
        "patterns": {
            "allowed_lateness": lateness,
            "patterns": [
                {
                    "name": RULE,
                    "kind": "threshold",
                    "input": "readings",
                    "condition": "temperature > 90",
                    "times": 1,
                }
            ],
        },
    }


def _ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def run(params: dict[str, Any]) -> Measured:
    rate, devices = float(params["background_per_s"]), int(params["devices"])
    publishers, trig_rate = int(params["publishers"]), float(params["triggers_per_s"])
    trig_devices, duration = int(params["trigger_devices"]), float(params["duration_s"])
    warmup, timeout_s = float(params["warmup_s"]), float(params["timeout_s"])
    if min(rate, devices, publishers, trig_rate, trig_devices, duration) <= 0:
        raise BenchError(f"rates, sizes and durations must be positive: {params}")
    if warmup >= duration:
        raise BenchError(f"warmup_s={warmup} must be shorter than duration_s={duration}")
    decoder = msgspec.json.Decoder()

    with private_stack() as info, tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp:
        with monitoring_flow(
            info,
            Path(tmp),
            deployment(
                str(params["window"]),
                str(params["pattern_lateness"]),
                str(params["window_lateness"]),
            ),
            idle_stop_s=float(params["idle_stop_s"]),
        ) as (flow, settings):
            topics = KafkaTopics(settings.topic_prefix)
            url, base = settings.require_mqtt_url(), settings.mqtt_base
            watch = KafkaWatch(info.kafka_bootstrap, [topics.detections, topics.deadletter])
            names = [f"dev-{i:05d}" for i in range(devices)]
            start_at = time.time() + 2.0
            stop_at = start_at + duration
            load = Load(
                [
                    LoadSpec(url, base, part, rate / publishers, 1, start_at, stop_at)
                    for part in split_devices(names, publishers)
                ]
            )
            sent_at: dict[tuple[str, int], float] = {}
            trig_topics = [
                f"{base}/devices/trig-{i:03d}/telemetry".encode() for i in range(trig_devices)
            ]
            last_ts: dict[int, int] = {}
            try:
                client = RawMqtt(url, f"bench-trigger-{uuid.uuid4().hex[:8]}")
                first = start_at + warmup
                k = 0
                while True:
                    due = first + k / trig_rate
                    if due >= stop_at - 0.5:
                        break
                    pause = due - time.time()
                    if pause > 0:
                        time.sleep(pause)
                    d = k % trig_devices
                    now = time.time()
                    ts_ms = max(int(now * 1000), last_ts.get(d, 0) + 1)
                    last_ts[d] = ts_ms
                    body = b'{"ts": %d, "temperature": 95.0, "humidity": 40.0}' % ts_ms
                    packet = publish_packet(trig_topics[d], body)
                    sent_at[(f"trig-{d:03d}", ts_ms)] = time.time()
                    client.send(packet)
                    k += 1
                if not client.close():
                    raise BenchError("the MQTT broker did not confirm reading the triggers in 60 s")
                published = load.join(timeout_s)
            finally:
                load.stop()
            wait_flow(flow, timeout_s)
            watch.settle(5.0, timeout_s)  # the consumer thread may be starved for a while
            watch.close()
        aggregates = read_topic(info.kafka_bootstrap, topics.aggregates, timeout_s=60)

    latencies: list[float] = []
    in_flow: list[float] = []  # publish -> the flow's producer took the detection
    found: dict[tuple[str, int], int] = defaultdict(int)
    other = dead = 0
    for rec in watch.seen:
        if rec.topic == topics.deadletter:
            dead += 1
            continue
        doc = decoder.decode(rec.value)
        key = (doc["key"], _ms(doc["ts"]))
        if doc["rule"] != RULE or key not in sent_at:
            other += 1
            continue
        found[key] += 1
        if found[key] == 1:
            latencies.append((rec.at - sent_at[key]) * 1000)
            in_flow.append(rec.produced_ms - sent_at[key] * 1000)
    windows: dict[bytes | None, int] = {}
    for rec in aggregates:
        doc = decoder.decode(rec.value)
        if doc["metric"] == "temperature":
            windows[rec.key] = doc["count"]
    readings_sent = int(published["readings"]) + len(sent_at)
    counts = {
        "sent": len(sent_at),
        "detected": len(found),
        "duplicate_detections": sum(n - 1 for n in found.values()),
        "other_detections": other,
        "dead_letters": dead,
        "background_sent": int(published["readings"]),
        "readings_sent": readings_sent,
        "readings_in_windows": sum(windows.values()),
    }
    if (
        len(found) != len(sent_at)
        or counts["duplicate_detections"]
        or other
        or dead
        or counts["readings_in_windows"] != readings_sent
    ):
        raise BenchError(f"incomplete or wrong work: {counts}")
    return Measured(
        figures={
            "p50_ms": Figure(round(percentile(latencies, 50), 2), "ms"),
            "p99_ms": Figure(round(percentile(latencies, 99), 2), "ms"),
            "max_ms": Figure(round(max(latencies), 2), "ms"),
            "to_producer_p50_ms": Figure(round(percentile(in_flow, 50), 2), "ms"),
            "to_producer_p99_ms": Figure(round(percentile(in_flow, 99), 2), "ms"),
        },
        counts=counts,
        resolved={"publisher_behind_max_s": round(published["behind_max_s"], 3)},
    )
