"""The telemetry flow: MQTT telemetry -> decode -> Kafka, and per-device windows
-> Kafka and DuckDB.

Run it with ``python -m bytewax.run dataflows.telemetry:flow``; settings come
from ``IOTFLOW_*`` (see ``iotflow.settings``). Outputs:

- ``{prefix}.telemetry``: normalized readings, keyed by device id,
- ``{prefix}.aggregates``: window results, keyed ``device|metric|window_start``,
- ``{prefix}.deadletter``: rejected payloads and late readings, with the reason,
- DuckDB ``aggregates``: upserted on (key, metric, window_start).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from connectors.decode import TelemetryDecoder, dead_letter
from connectors.duckdb_store import AGGREGATES, DuckDBSink, aggregate_rows
from connectors.kafka import KafkaOutput, message
from connectors.mapping import SourceMapping
from connectors.mqtt import MqttSource
from iotflow.errors import ConfigError
from iotflow.events import DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from operators.steps import tumbling_window
from operators.windows import LateReading, TumblingWindow

__all__ = ["build_flow"]

_encode = msgspec.json.encode


def _late_letter(late: LateReading) -> Any:
    reading = late.reading
    reason = (
        f"late reading: ts {reading.ts_ms} falls in a window already closed at "
        f"watermark {late.watermark_ms} (IOTFLOW_LATENESS_S allows more lateness)"
    )
    return dead_letter("window", reason, _encode(reading), reading.ts_ms)


def mqtt_source(settings: Settings) -> MqttSource:
    """The telemetry subscription of the settings' MQTT broker."""
    idle = settings.mqtt_idle_stop_s
    return MqttSource(
        settings.require_mqtt_url(),
        settings.mqtt_topics or [MqttTopics(settings.mqtt_base).telemetry()],
        client_id=settings.mqtt_client_id,
        status_base=settings.mqtt_base,
        idle_stop=None if idle is None else timedelta(seconds=idle),
    )


def build_flow(
    settings: Settings | None = None, source: Source[list[DeviceMessage]] | None = None
) -> Dataflow:
    """Wire the telemetry flow; ``source`` replaces MQTT (tests use ``TestingSource``)."""
    settings = settings or Settings()
    if settings.ingest != "mqtt":
        msg = f"IOTFLOW_INGEST={settings.ingest!r} is not supported by this flow yet; use 'mqtt'"
        raise ConfigError(msg)
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
    raw = op.input("in", flow, source if source is not None else mqtt_source(settings))
    decoded = op.map("decode", raw, decoder.decode)
    readings = op.map("readings", decoded, lambda out: out.ok)
    rejected = op.flat_map("rejected", decoded, lambda out: out.dead)
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
