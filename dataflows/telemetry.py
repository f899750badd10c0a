"""The telemetry flow: device telemetry -> decode -> Kafka, and per-device windows
-> Kafka and DuckDB.

Run it with ``python -m bytewax.run dataflows.telemetry:flow``; settings come
from ``IOTFLOW_*`` (see ``iotflow.settings``). Input (``IOTFLOW_INGEST``):

- ``mqtt`` (default; edge and simple setups): subscribes to the telemetry
  topics itself (``connectors.mqtt.MqttSource``). At most once across a crash
  of the flow process.
- ``kafka`` (cloud): reads ``{prefix}.ingest``, written by the ingest bridge
  (``iotflow bridge``), and keeps only records whose MQTT topic matches the
  same telemetry filters, so both modes decode the same bytes the same way.
  With a recovery store (``IOTFLOW_RECOVERY_DIR`` and ``bytewax.run -r``, or
  ``iotflow run telemetry``) at least once, and effectively once downstream:
  DuckDB upserts and readers de-duplicate by natural key (``connectors.dedupe``).
  Records that are not valid ingest records become dead letters.

Outputs:

- ``{prefix}.telemetry``: normalized readings, keyed by device id,
- ``{prefix}.aggregates``: window results, keyed ``device|metric|window_start``,
- ``{prefix}.deadletter``: rejected payloads and late readings, with the reason,
- DuckDB ``aggregates``: upserted on (key, metric, window_start).
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from connectors.decode import TelemetryDecoder, dead_letter
from connectors.duckdb_store import AGGREGATES, DuckDBSink, aggregate_rows
from connectors.ingest import device_messages
from connectors.kafka import KafkaOutput, message
from connectors.mapping import SourceMapping
from connectors.recovery import bind_definition, ensure_store, recovery_on
from iotflow.errors import ConfigError
from iotflow.events import DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics
from operators.steps import tumbling_window
from operators.windows import LateReading, TumblingWindow

__all__ = ["build_flow", "state_definition"]

_encode = msgspec.json.encode
log = logging.getLogger("iotflow.telemetry")


def _late_letter(late: LateReading) -> Any:
    reading = late.reading
    reason = (
        f"late reading: ts {reading.ts_ms} falls in a window already closed at "
        f"watermark {late.watermark_ms} (IOTFLOW_LATENESS_S allows more lateness)"
    )
    return dead_letter("window", reason, _encode(reading), reading.ts_ms)


def state_definition(settings: Settings) -> dict[str, Any]:
    """The settings that shape this flow's recovered state (its windows)."""
    return {"IOTFLOW_WINDOW_S": settings.window_s, "IOTFLOW_LATENESS_S": settings.lateness_s}


def _check_recovery(settings: Settings) -> None:
    if settings.recovery_dir is None:
        return
    # bytewax.run opens the store after building the flow: create it on the first run.
    ensure_store(settings.recovery_dir)
    # Refuse here, before any worker starts, with the settings named: a resumed window
    # state of another definition would otherwise fail deep inside a worker.
    bind_definition(settings.recovery_dir, "telemetry", state_definition(settings))
    argv = sys.argv
    launched = bool(argv) and argv[0].endswith(("bytewax/run.py", "bytewax.run"))
    recovering = recovery_on(None, argv)
    if launched and not recovering:
        log.warning(
            "IOTFLOW_RECOVERY_DIR=%s is set but bytewax.run has no -r: recovery is OFF. "
            "Run `iotflow run telemetry`, or add -r %s -s 5 -b 0",
            settings.recovery_dir,
            settings.recovery_dir,
        )


def build_flow(
    settings: Settings | None = None, source: Source[list[DeviceMessage]] | None = None
) -> Dataflow:
    """Wire the telemetry flow; ``source`` replaces the input (tests use ``TestingSource``).

    Raises ``ConfigError`` for a missing broker or a recovery store made with
    another window definition.
    """
    settings = settings or Settings()
    if settings.ingest not in ("mqtt", "kafka"):
        msg = f"IOTFLOW_INGEST={settings.ingest!r} is not understood; use 'mqtt' or 'kafka'"
        raise ConfigError(msg)
    _check_recovery(settings)
    topics = KafkaTopics(settings.topic_prefix)
    bootstrap = settings.require_kafka_bootstrap()
    mapping = settings.source_mapping
    decoder = TelemetryDecoder(
        SourceMapping.model_validate(mapping) if mapping is not None else None,
        max_payload_bytes=settings.max_payload_bytes,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
    )
    window = TumblingWindow(
        length=timedelta(seconds=settings.window_s),
        allowed_lateness=timedelta(seconds=settings.lateness_s),
    )

    flow = Dataflow("telemetry")
    ingest = device_messages(flow, settings, source)
    raw, ingest_dead = ingest.messages, ingest.dead
    decoded = op.map("decode", raw, decoder.decode)
    readings = op.map("readings", decoded, lambda out: out.ok)
    rejected = op.flat_map("rejected", decoded, lambda out: out.dead)
    if ingest_dead is not None:
        rejected = op.merge("rejected_all", rejected, ingest_dead)
    windows = tumbling_window("window", readings, window)

    to_kafka = op.merge(
        "to_kafka",
        op.flat_map(
            "telemetry_msgs",
            readings,
            lambda batch: [message(topics.telemetry, r.device_id, _encode(r)) for r in batch],
        ),
        op.map(
            "aggregate_msgs",
            windows.down,
            lambda r: message(topics.aggregates, r.natural_key, _encode(r)),
        ),
        op.map(
            "dead_msgs",
            op.merge("dead", rejected, op.map("late_letters", windows.late, _late_letter)),
            lambda d: message(topics.deadletter, d.topic or d.source, _encode(d)),
        ),
    )
    op.output(
        "kafka",
        to_kafka,
        KafkaOutput(bootstrap, [topics.telemetry, topics.aggregates, topics.deadletter]),
    )
    op.output(
        "duckdb",
        op.map("to_duckdb", windows.down, lambda r: (AGGREGATES.name, r)),
        DuckDBSink(settings.duckdb, AGGREGATES, aggregate_rows),
    )
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        return build_flow()
    raise AttributeError(name)
