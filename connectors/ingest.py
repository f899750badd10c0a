"""Where a cloud or edge flow's device messages come from: MQTT directly, or Kafka behind the bridge.

``device_messages`` adds the input steps to a dataflow and returns batches of
``DeviceMessage`` plus the dead letters of records that were not valid ingest
records. Guarantees are those of the source: the direct MQTT source is
at-most-once across a crash of the flow (what it acknowledged and had not
made durable is gone); the Kafka ingest source resumes from the recovery
store's offsets (at least once; outputs de-duplicate by natural key).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from connectors.bridge import IngestBatch, ingest_topic, topic_matcher, unwrap_records
from connectors.kafka import KafkaInput
from connectors.mqtt import MqttSource
from iotflow.errors import ConfigError
from iotflow.events import DeadLetter, DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

__all__ = ["Ingest", "device_messages", "kafka_source", "mqtt_source", "telemetry_filters"]


def telemetry_filters(settings: Settings) -> list[str]:
    """The MQTT topic filters of device telemetry (``IOTFLOW_MQTT_TOPICS`` or the default)."""
    return settings.mqtt_topics or [MqttTopics(settings.mqtt_base).telemetry()]


def mqtt_source(settings: Settings, client_id: str | None = None) -> MqttSource:
    """The telemetry subscription of the settings' MQTT broker.

    ``client_id`` is the flow's own default; ``IOTFLOW_MQTT_CLIENT_ID``, when set,
    wins. Two flows must never share one: the broker would hand the session back
    and forth between them.
    """
    if "mqtt_client_id" in settings.model_fields_set:
        client_id = settings.mqtt_client_id
    idle = settings.mqtt_idle_stop_s
    return MqttSource(
        settings.require_mqtt_url(),
        telemetry_filters(settings),
        client_id=client_id or settings.mqtt_client_id,
        status_base=settings.mqtt_base,
        idle_stop=None if idle is None else timedelta(seconds=idle),
    )


def kafka_source(settings: Settings) -> KafkaInput:
    """The bridge's ingest topic; follows it, or ends at its end with ``IOTFLOW_INGEST_UNTIL_END``."""
    return KafkaInput(
        settings.require_kafka_bootstrap(),
        [ingest_topic(settings.topic_prefix)],
        tail=not settings.ingest_until_end,
    )


@dataclass(frozen=True)
class Ingest:
    """Device message batches, and dead letters of unusable ingest records (Kafka only)."""

    messages: Stream[list[DeviceMessage]]
    dead: Stream[DeadLetter] | None


def _messages(batch: IngestBatch) -> list[DeviceMessage]:
    return batch.messages


def device_messages(
    flow: Dataflow,
    settings: Settings,
    source: Source[list[DeviceMessage]] | None = None,
    client_id: str | None = None,
) -> Ingest:
    """Add the input of ``settings.ingest`` (or ``source``, for tests) to ``flow``."""
    if source is not None:
        return Ingest(op.input("in", flow, source), None)
    if settings.ingest == "mqtt":
        return Ingest(op.input("in", flow, mqtt_source(settings, client_id)), None)
    if settings.ingest != "kafka":
        msg = f"IOTFLOW_INGEST={settings.ingest!r} is not understood; use 'mqtt' or 'kafka'"
        raise ConfigError(msg)
    accept = topic_matcher(telemetry_filters(settings))
    records = op.input("ingest", flow, kafka_source(settings))
    unwrapped = op.flat_map_batch("unwrap", records, lambda batch: [unwrap_records(batch, accept)])
    return Ingest(
        op.map("messages", unwrapped, _messages),
        op.flat_map("ingest_dead", unwrapped, lambda b: b.dead),
    )
