"""flow_throughput: readings per second through the whole telemetry flow on one worker.

The flow is ``dataflows.telemetry.build_flow`` unchanged (decode, Kafka
telemetry/aggregates/dead-letter outputs, tumbling windows, DuckDB upserts),
fed from memory by ``TestingSource`` with pre-built batches of raw JSON device
messages, and run with ``run_main``. The clock covers all of ``run_main``:
building the steps, every batch, the end-of-input window flush, the Kafka
producer flush and the DuckDB writes. Payload generation is not timed.

``decode_only_events_per_s`` times ``TelemetryDecoder.decode`` alone over the
same batches, outside Bytewax, to show how much of the time decoding takes.

After the run the benchmark checks the outputs: every reading on the Kafka
telemetry topic, every (device, window, metric) once on the aggregates topic
and in DuckDB with counts summing to the readings sent, no dead letters.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
from bytewax.testing import TestingSource, run_main

from bench.harness import BenchError, Figure, Measured
from bench.workload import T0_MS, kafka_count, payload, private_stack
from connectors.decode import TelemetryDecoder
from dataflows.telemetry import build_flow
from iotflow.events import DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics

__all__ = ["DEFAULTS", "DESCRIPTION", "QUICK", "build_batches", "run"]

DESCRIPTION = (
    "readings/s through the whole telemetry flow (decode, Kafka, windows, DuckDB), "
    "one worker, fed from memory"
)
DEFAULTS: dict[str, Any] = {
    "devices": 1000,
    "events": 200_000,
    "batch_size": 1000,
    "interval_ms": 1000,  # each device reports once per interval, in time order
    "window_s": 60.0,
    "lateness_s": 5.0,
}
QUICK: dict[str, Any] = {"devices": 20, "events": 2000, "batch_size": 200}
# figures every run reports; counts that must equal counts["sent"]
FIGURES = {"events_per_s", "decode_only_events_per_s"}
COMPLETE_COUNTS = ["kafka_telemetry", "duckdb_temperature_readings", "duckdb_humidity_readings"]

METRICS = ("temperature", "humidity")
RECEIVE_DELAY_MS = 20  # the receive time lags the device's timestamp a little


def build_batches(
    devices: int, events: int, batch_size: int, interval_ms: int, window_ms: int
) -> tuple[list[list[DeviceMessage]], int]:
    """The input batches, and how many (device, window) pairs they cover."""
    topics = MqttTopics("bench")
    names = [topics.telemetry(f"dev-{d:05d}") for d in range(devices)]
    batches: list[list[DeviceMessage]] = []
    batch: list[DeviceMessage] = []
    pairs: set[tuple[int, int]] = set()
    for k in range(events):
        device = k % devices
        ts_ms = T0_MS + (k // devices) * interval_ms
        pairs.add((device, (ts_ms - T0_MS) // window_ms))
        batch.append(DeviceMessage(names[device], payload(ts_ms, k), ts_ms + RECEIVE_DELAY_MS))
        if len(batch) == batch_size:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches, len(pairs)


def _check_params(params: dict[str, Any]) -> None:
    for name in ("devices", "events", "batch_size", "interval_ms"):
        if int(params[name]) < 1:
            raise BenchError(f"{name}={params[name]} must be at least 1")
    if float(params["window_s"]) <= 0:
        raise BenchError(f"window_s={params['window_s']} must be positive")


def run(params: dict[str, Any]) -> Measured:
    _check_params(params)
    events = int(params["events"])
    window_ms = int(float(params["window_s"]) * 1000)
    batches, pairs = build_batches(
        int(params["devices"]),
        events,
        int(params["batch_size"]),
        int(params["interval_ms"]),
        window_ms,
    )
    expected_aggregates = pairs * len(METRICS)

    with private_stack() as info, tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp:
        settings = Settings(
            _env_file=None,
            mqtt_url=info.mqtt_url,
            kafka_bootstrap=info.kafka_bootstrap,
            topic_prefix=f"bench{uuid.uuid4().hex[:8]}",
            duckdb=Path(tmp) / "bench.duckdb",
            window_s=float(params["window_s"]),
            lateness_s=float(params["lateness_s"]),
        )
        flow = build_flow(settings, source=TestingSource(batches))
        started = time.perf_counter()
        run_main(flow)
        flow_s = time.perf_counter() - started

        topics = KafkaTopics(settings.topic_prefix)
        counts = {
            "sent": events,
            "kafka_telemetry": kafka_count(info.kafka_bootstrap, topics.telemetry),
            "kafka_aggregates": kafka_count(info.kafka_bootstrap, topics.aggregates),
            "kafka_deadletter": kafka_count(info.kafka_bootstrap, topics.deadletter),
            "expected_aggregates": expected_aggregates,
        }
        con = duckdb.connect(str(settings.duckdb), read_only=True)
        try:
            per_metric = dict(
                con.execute("SELECT metric, sum(count) FROM aggregates GROUP BY metric").fetchall()
            )
            (rows,) = con.execute("SELECT count(*) FROM aggregates").fetchone()
        finally:
            con.close()
    counts["duckdb_rows"] = int(rows)
    for metric in METRICS:
        counts[f"duckdb_{metric}_readings"] = int(per_metric.get(metric) or 0)
    _verify(counts)

    decoder = TelemetryDecoder(
        max_payload_bytes=settings.max_payload_bytes,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
    )
    started = time.perf_counter()
    decoded = sum(len(decoder.decode(batch).ok) for batch in batches)
    decode_s = time.perf_counter() - started
    if decoded != events:
        raise BenchError(f"decode-only pass decoded {decoded} of {events} readings")

    return Measured(
        figures={
            "events_per_s": Figure(round(events / flow_s, 1), "events/s"),
            "decode_only_events_per_s": Figure(round(events / decode_s, 1), "events/s"),
            "seconds": Figure(round(flow_s, 3), "s"),
        },
        counts=counts,
    )


def _verify(counts: dict[str, int]) -> None:
    sent, aggregates = counts["sent"], counts["expected_aggregates"]
    wanted = {
        "kafka_telemetry": sent,
        "kafka_aggregates": aggregates,
        "kafka_deadletter": 0,
        "duckdb_rows": aggregates,
        **{f"duckdb_{metric}_readings": sent for metric in METRICS},
    }
    wrong = [f"{k}={counts[k]} (expected {v})" for k, v in wanted.items() if counts[k] != v]
    if wrong:
        raise BenchError("the flow's outputs do not match its input: " + ", ".join(wrong))
