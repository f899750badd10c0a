"""The consumer dataflow of the ``ingest_mqtt`` benchmark, run by ``python -m bytewax.run``.

``MqttSource`` (QoS 1, manual ack) -> ``TelemetryDecoder.decode`` -> a sink
that counts readings and dead letters. At close each worker writes
``worker-{index}.json`` into ``IOTFLOW_BENCH_RESULT_DIR``: its counts and the
wall-clock times (``time.time()``) of the first and the last batch it
counted. The flow ends by itself ``IOTFLOW_MQTT_IDLE_STOP_S`` after the last
message.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.decode import DecodeOut, TelemetryDecoder
from connectors.mqtt import MqttSource
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

__all__ = ["RESULT_DIR_ENV", "CountingSink", "build_flow"]

RESULT_DIR_ENV = "IOTFLOW_BENCH_RESULT_DIR"


class _CountingPartition(StatelessSinkPartition[DecodeOut]):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._ok = 0
        self._dead = 0
        self._first_at: float | None = None
        self._last_at: float | None = None

    def write_batch(self, items: list[DecodeOut]) -> None:
        ok = sum(len(out.ok) for out in items)
        dead = sum(len(out.dead) for out in items)
        if ok or dead:
            now = time.time()
            if self._first_at is None:
                self._first_at = now
            self._last_at = now
            self._ok += ok
            self._dead += dead

    def close(self) -> None:
        result = {
            "ok": self._ok,
            "dead": self._dead,
            "first_at": self._first_at,
            "last_at": self._last_at,
        }
        self._path.write_text(json.dumps(result))


class CountingSink(DynamicSink[DecodeOut]):
    """Counts decoded readings and dead letters; each worker writes its counts at close."""

    def __init__(self, result_dir: Path) -> None:
        self._dir = result_dir

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountingPartition:
        return _CountingPartition(self._dir / f"worker-{worker_index}.json")


def build_flow(settings: Settings, result_dir: Path) -> Dataflow:
    """MQTT telemetry -> decode -> count, with the settings' broker, base and idle stop."""
    idle = settings.mqtt_idle_stop_s
    source = MqttSource(
        settings.require_mqtt_url(),
        [MqttTopics(settings.mqtt_base).telemetry()],
        client_id=settings.mqtt_client_id,
        status_base=settings.mqtt_base,
        idle_stop=None if idle is None else timedelta(seconds=idle),
    )
    decoder = TelemetryDecoder(
        max_payload_bytes=settings.max_payload_bytes,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
    )
    flow = Dataflow("bench_ingest_mqtt")
    raw = op.input("in", flow, source)
    decoded = op.map("decode", raw, decoder.decode)
    op.output("count", decoded, CountingSink(result_dir))
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access (by bytewax.run), from the environment FlowProcess sets.
    if name == "flow":
        return build_flow(Settings(), Path(os.environ[RESULT_DIR_ENV]))
    raise AttributeError(name)
