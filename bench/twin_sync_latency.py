"""twin_sync_latency: MQTT publish of a reading -> its twin change seen on Kafka ``{prefix}.twins``.

End to end on a private Mosquitto and Tansu (``bench.workload.private_stack``)
with the real twins flow (``python -m bytewax.run dataflows.twins:flow``, one
worker, the built-in registry of the simulator's kinds, default policy).

Load: ``updates_per_s`` readings/s from ``devices`` temperature sensors
(``temp-*``), one flat reading per MQTT message (QoS 0), sent by
``publishers`` processes (``bench._latency.Load``), stamped with the wall
clock. Every reading changes its twin (the values move with each message).
Probes: ``probes_per_s`` single readings from ``probe_devices`` sensors of
their own, sent one at a time from the benchmark process after ``warmup_s``.

Figures:

- ``p50_ms``, ``p99_ms``, ``max_ms``: probes, ``time.time()`` when a low-latency
  consumer (assigned partitions, ``fetch.wait.max.ms`` 5, ``poll``, see
  ``bench._latency.KafkaWatch``) got the twin change
  (matched by device and reading timestamp) minus ``time.time()`` just before
  the PUBLISH packet went to the socket.
- Per hop, for the probes (p50 and p99 of the time from the publish, ms):
  ``to_source_*`` until the flow's MQTT source handed the message to the
  dataflow (the change's ``last_seen_ms``), ``to_step_*`` until the twin step
  made the change (``recorded_ms``), ``to_producer_*`` until the flow's
  producer took the record (its CreateTime). The wall clocks of the flow and
  the benchmark are the same machine's; the flow's stamps are whole milliseconds.
- ``slowest_update_ms``: the largest lag of any background update, from the
  reading's timestamp (the wall clock when it was published, to the
  millisecond) to its twin change on Kafka: under 1,000 means every twin was
  updated within one second of its physical update (``counts.twins_all_within_1s``
  says how many twins were); ``all_updates_p50_ms``/``all_updates_p99_ms`` is that
  lag over every background update after the warm-up.
- ``sync_accuracy_pct``: the share of published readings (background and
  probes) that became a twin change on Kafka.

Publishers, Mosquitto, Tansu, the flow and the consumer share this machine's
cores. The run fails unless every probe was seen exactly once and no dead
letter was written.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from bench._latency import (
    KafkaWatch,
    Load,
    LoadSpec,
    RawMqtt,
    percentile,
    publish_packet,
    split_devices,
    tail_log,
    wait_flow,
)
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack
from connectors.kafka import ensure_topics
from infra.flowproc import FlowProcess
from infra.stack import StackInfo
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "p50/p99 ms from MQTT publish of a reading to its twin change on Kafka, real twins "
    "flow, 5,000 updates/s from 1,000 twins"
)
DEFAULTS: dict[str, Any] = {
    "updates_per_s": 5_000,
    "devices": 1_000,
    "publishers": 1,
    "probes_per_s": 50.0,
    "probe_devices": 20,
    "duration_s": 30.0,
    "warmup_s": 3.0,
    "idle_stop_s": 1.5,
    "timeout_s": 120.0,
}
QUICK: dict[str, Any] = {
    "updates_per_s": 1_000,
    "devices": 100,
    "probes_per_s": 20.0,
    "duration_s": 5.0,
    "warmup_s": 1.0,
}
FIGURES = {"p50_ms", "p99_ms"}
COMPLETE_COUNTS = ["probes_seen"]


@contextmanager
def _twins_flow(
    info: StackInfo, tmp: Path, idle_stop_s: float
) -> Iterator[tuple[FlowProcess, Settings]]:
    """The twins flow, online, its output topics created."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        _env_file=None,
        mqtt_url=info.mqtt_url,
        kafka_bootstrap=info.kafka_bootstrap,
        mqtt_base=f"bench{tag}",
        topic_prefix=f"bench{tag}",
        mqtt_client_id=f"bench-twins-{tag}",
        mqtt_idle_stop_s=idle_stop_s,
        duckdb=tmp / "bench.duckdb",
    )
    topics = KafkaTopics(settings.topic_prefix)
    ensure_topics(
        info.kafka_bootstrap,
        [
            topics.twins,
            topics.deadletter,
            topics.command_requests,
            topics.detections,
            topics.twins_desired,
        ],
    )
    log = tmp / "flow.log"
    with FlowProcess.start("dataflows.twins:flow", settings, log=log) as flow:
        try:
            flow.wait_online(90)
        except StackError as exc:
            raise BenchError(f"{exc}\n{tail_log(log)}") from exc
        yield flow, settings


def run(params: dict[str, Any]) -> Measured:
    rate, devices = float(params["updates_per_s"]), int(params["devices"])
    publishers, probe_rate = int(params["publishers"]), float(params["probes_per_s"])
    probe_devices, duration = int(params["probe_devices"]), float(params["duration_s"])
    warmup, timeout_s = float(params["warmup_s"]), float(params["timeout_s"])
    if min(rate, devices, publishers, probe_rate, probe_devices, duration) <= 0:
        raise BenchError(f"rates, sizes and durations must be positive: {params}")
    if warmup >= duration:
        raise BenchError(f"warmup_s={warmup} must be shorter than duration_s={duration}")
    decoder = msgspec.json.Decoder()

    with (
        private_stack() as info,
        tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp,
        _twins_flow(info, Path(tmp), float(params["idle_stop_s"])) as (flow, settings),
    ):
        topics = KafkaTopics(settings.topic_prefix)
        url, base = settings.require_mqtt_url(), settings.mqtt_base
        watch = KafkaWatch(info.kafka_bootstrap, [topics.twins, topics.deadletter])
        names = [f"temp-{i:05d}" for i in range(devices)]
        start_at = time.time() + 2.0
        stop_at = start_at + duration
        load = Load(
            [
                LoadSpec(url, base, part, rate / publishers, 1, start_at, stop_at)
                for part in split_devices(names, publishers)
            ]
        )
        sent_at: dict[tuple[str, int], float] = {}
        probe_topics = [
            f"{base}/devices/temp-probe-{i:03d}/telemetry".encode() for i in range(probe_devices)
        ]
        last_ts: dict[int, int] = {}
        try:
            client = RawMqtt(url, f"bench-probe-{uuid.uuid4().hex[:8]}")
            first = start_at + warmup
            k = 0
            while True:
                due = first + k / probe_rate
                if due >= stop_at - 0.5:
                    break
                pause = due - time.time()
                if pause > 0:
                    time.sleep(pause)
                d = k % probe_devices
                ts_ms = max(int(time.time() * 1000), last_ts.get(d, 0) + 1)
                last_ts[d] = ts_ms
                body = b'{"ts": %d, "temperature": %d.5}' % (ts_ms, k)  # always a change
                packet = publish_packet(probe_topics[d], body)
                sent_at[(f"temp-probe-{d:03d}", ts_ms)] = time.time()
                client.send(packet)
                k += 1
            client.close()
            published = load.join(timeout_s)
        finally:
            load.stop()
        wait_flow(flow, timeout_s)
        watch.settle(1.0, timeout_s)
        watch.close()

    probe_lat: list[float] = []
    hops: dict[str, list[float]] = {"to_source": [], "to_step": [], "to_producer": []}
    seen_probes: dict[tuple[str, int], int] = {}
    lag_by_twin: dict[str, float] = {}
    lags: list[float] = []
    background = dead = 0
    measured_from_ms = (start_at + warmup) * 1000
    for rec in watch.seen:
        if rec.topic == topics.deadletter:
            dead += 1
            continue
        change = decoder.decode(rec.value)
        device, ts_ms = change["device_id"], change["ts_ms"]
        key = (device, ts_ms)
        if key in sent_at:
            seen_probes[key] = seen_probes.get(key, 0) + 1
            if seen_probes[key] == 1:
                sent_ms = sent_at[key] * 1000
                probe_lat.append(rec.at * 1000 - sent_ms)
                hops["to_source"].append(change["last_seen_ms"] - sent_ms)
                hops["to_step"].append(change["recorded_ms"] - sent_ms)
                hops["to_producer"].append(rec.produced_ms - sent_ms)
            continue
        if change["cause"] not in ("reported", "online"):
            continue
        background += 1
        lag_ms = rec.at * 1000 - ts_ms
        lag_by_twin[device] = max(lag_by_twin.get(device, 0.0), lag_ms)
        if ts_ms >= measured_from_ms:
            lags.append(lag_ms)
    sent_background = int(published["readings"])
    counts = {
        "sent": len(sent_at),
        "probes_seen": len(seen_probes),
        "duplicate_probes": sum(n - 1 for n in seen_probes.values()),
        "dead_letters": dead,
        "background_sent": sent_background,
        "background_changes": background,
    }
    counts["twins"] = len(names)
    if len(seen_probes) != len(sent_at) or counts["duplicate_probes"] or dead:
        missing = sorted(
            (at - start_at, key) for key, at in sent_at.items() if key not in seen_probes
        )
        first = ", ".join(f"{d} ts {ts} sent at +{s:.2f}s" for s, (d, ts) in missing[:5])
        raise BenchError(
            f"incomplete or wrong work: {counts}; first missing probes: {first or '-'}"
        )
    if not lags:
        raise BenchError(f"no background update after the warm-up: {counts}")
    counts["twins_all_within_1s"] = sum(
        1 for name in names if lag_by_twin.get(name, float("inf")) <= 1000.0
    )
    accuracy = 100.0 * (background + len(seen_probes)) / (sent_background + len(sent_at))
    hop_figures = {
        f"{hop}_p{q}_ms": Figure(round(percentile(values, q), 2), "ms")
        for hop, values in hops.items()
        for q in (50, 99)
    }
    return Measured(
        figures={
            "p50_ms": Figure(round(percentile(probe_lat, 50), 2), "ms"),
            "p99_ms": Figure(round(percentile(probe_lat, 99), 2), "ms"),
            "max_ms": Figure(round(max(probe_lat), 2), "ms"),
            **hop_figures,
            "all_updates_p50_ms": Figure(round(percentile(lags, 50), 2), "ms"),
            "all_updates_p99_ms": Figure(round(percentile(lags, 99), 2), "ms"),
            "slowest_update_ms": Figure(round(max(lag_by_twin.values()), 2), "ms"),
            "sync_accuracy_pct": Figure(round(accuracy, 3), "%"),
        },
        counts=counts,
        resolved={"publisher_behind_max_s": round(published["behind_max_s"], 3)},
    )
