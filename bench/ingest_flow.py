"""The consumer dataflow of the ingest benchmarks, run by ``python -m bytewax.run``.

Device messages -> ``TelemetryDecoder.decode`` -> a sink that counts readings
and dead letters. The messages come from ``MqttSource`` (QoS 1, manual ack;
``ingest_mqtt``), or with ``IOTFLOW_INGEST=kafka`` from the ingest topic
through ``connectors.ingest.device_messages``, the flows' own Kafka path with
its de-duplication of the bridge's redeliveries (off with
``IOTFLOW_INGEST_DEDUPE_RECORDS=0``; ``bridge_kill``). At close each worker
writes ``worker-{index}.json`` into ``IOTFLOW_BENCH_RESULT_DIR``: its counts
and the wall-clock times (``time.time()``) of the first and the last batch it
counted. The flow ends by itself ``IOTFLOW_MQTT_IDLE_STOP_S`` after the last
MQTT message, or at the ingest topic's end (``IOTFLOW_INGEST_UNTIL_END=1``).
``count_kafka_ingest`` runs it over an ingest topic and sums the workers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.decode import DecodeOut, TelemetryDecoder
from connectors.ingest import device_messages
from connectors.mqtt import MqttSource
from infra.flowproc import FlowProcess
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

__all__ = ["RESULT_DIR_ENV", "Counted", "CountingSink", "build_flow", "count_kafka_ingest"]

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
    """Telemetry -> decode -> count: from MQTT with the settings' broker, base and idle
    stop, or with ``IOTFLOW_INGEST=kafka`` from the settings' ingest topic."""
    decoder = TelemetryDecoder(
        max_payload_bytes=settings.max_payload_bytes,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
    )
    if settings.ingest == "kafka":
        flow = Dataflow("bench_ingest_kafka")
        raw = device_messages(flow, settings).messages
    else:
        idle = settings.mqtt_idle_stop_s
        source = MqttSource(
            settings.require_mqtt_url(),
            [MqttTopics(settings.mqtt_base).telemetry()],
            client_id=settings.mqtt_client_id,
            status_base=settings.mqtt_base,
            idle_stop=None if idle is None else timedelta(seconds=idle),
        )
        flow = Dataflow("bench_ingest_mqtt")
        raw = op.input("in", flow, source)
    decoded = op.map("decode", raw, decoder.decode)
    op.output("count", decoded, CountingSink(result_dir))
    return flow


@dataclass(frozen=True)
class Counted:
    """What one counting run over an ingest topic decoded, and how fast."""

    readings: int
    dead: int
    seconds: float  # first to last counted batch: the flow's steady work, not its start

    def rate(self, records: int) -> float:
        """``records`` (the input, duplicates included) per second of that work."""
        return records / self.seconds if self.seconds > 0 else 0.0


def count_kafka_ingest(settings: Settings, log: Path, timeout_s: float) -> Counted:
    """Run this flow (one worker) over ``settings``' ingest topic to its end and sum the
    workers' counts; ``StackError`` when it fails or does not finish in ``timeout_s``."""
    kafka = settings.model_copy(update={"ingest": "kafka", "ingest_until_end": True})
    with tempfile.TemporaryDirectory(prefix="iotflow-count-") as tmp:
        proc = FlowProcess.start(
            "bench.ingest_flow:flow", kafka, log=log, extra_env={RESULT_DIR_ENV: tmp}
        )
        try:
            code = proc.wait(timeout_s)
        finally:
            proc.kill()
        results = [json.loads(p.read_text()) for p in Path(tmp).glob("worker-*.json")]
    if code != 0 or not results:
        raise StackError(f"the counting flow exited {code}; see {log}")
    firsts = [r["first_at"] for r in results if r["first_at"] is not None]
    lasts = [r["last_at"] for r in results if r["last_at"] is not None]
    return Counted(
        readings=sum(r["ok"] for r in results),
        dead=sum(r["dead"] for r in results),
        seconds=(max(lasts) - min(firsts)) if firsts else 0.0,
    )


def __getattr__(name: str) -> Dataflow:
    # Built on first access (by bytewax.run), from the environment FlowProcess sets.
    if name == "flow":
        return build_flow(Settings(), Path(os.environ[RESULT_DIR_ENV]))
    raise AttributeError(name)
