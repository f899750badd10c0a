"""Where a cloud or edge flow's device messages come from: MQTT directly, or Kafka behind the bridge.

``device_messages`` adds the input steps to a dataflow and returns batches of
``DeviceMessage`` plus the dead letters of records that were not valid ingest
records. Guarantees are those of the source: the direct MQTT source is
at-most-once across a crash of the flow (what it acknowledged and had not
made durable is gone); the Kafka ingest source resumes from the recovery
store's offsets (at least once; outputs de-duplicate by natural key).

On the Kafka path the bridge's redelivered duplicates never reach the flow:
a stateful step sharded by device (``IOTFLOW_INGEST_DEDUPE_RECORDS``
messages remembered, ``connectors.reading_dedupe``) drops them before the
decoder, so windows count each reading once, across restarts of the bridge
and of the flow. The direct MQTT path has no such step: its source hands
over what it acknowledged and keeps no state across a crash, and the
messages it hands over do not carry the broker's DUP flag.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from connectors.bridge import IngestBatch, ingest_topic, topic_matcher, unwrap_records
from connectors.kafka import KafkaInput
from connectors.mqtt import MqttSource
from connectors.reading_dedupe import RedeliveryFilter
from iotflow.errors import ConfigError
from iotflow.events import DeadLetter, DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import MqttTopics
from operators.logic_step import LogicStep, shard_of

__all__ = [
    "DEDUPE_SHARDS",
    "Ingest",
    "device_messages",
    "drop_redeliveries",
    "kafka_source",
    "mqtt_source",
    "telemetry_filters",
]

log = logging.getLogger("iotflow.ingest")

# Fixed: a recovery store holds the de-duplication state per shard name.
DEDUPE_SHARDS = 16


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


def _record_sharder(shards: int) -> Callable[[list[Any]], list[tuple[str, list[Any]]]]:
    """Splits a batch of ingest records by the shard of their Kafka key (the device id:
    one device stays in one shard, in order), each key's shard computed once."""
    cache: dict[bytes | None, str] = {}

    def split(records: list[Any]) -> list[tuple[str, list[Any]]]:
        parts: dict[str, list[Any]] = {}
        for rec in records:
            key = rec.key
            shard = cache.get(key)
            if shard is None:
                if len(cache) >= 100_000:
                    cache.clear()
                name = key.decode("utf-8", "replace") if isinstance(key, bytes) else ""
                shard = cache[key] = shard_of(name, shards)
            part = parts.get(shard)
            if part is None:
                parts[shard] = [rec]
            else:
                part.append(rec)
        return list(parts.items())

    return split


def _merger() -> Callable[[list[IngestBatch]], list[IngestBatch]]:
    """Joins the shards' batches of one activation into one (the decoders work best on
    large batches) and logs the duplicates dropped."""
    dropped_here = 0

    def merge(batches: list[IngestBatch]) -> list[IngestBatch]:
        nonlocal dropped_here
        if len(batches) == 1:
            out = batches[0]
        else:
            out = IngestBatch()
            for batch in batches:
                out.messages.extend(batch.messages)
                out.dead.extend(batch.dead)
                out.skipped += batch.skipped
                out.duplicates += batch.duplicates
        if out.duplicates:
            dropped_here += out.duplicates
            log.warning(
                "ingest: dropped %d redelivered duplicate(s) of device messages (%d by this "
                "worker since it started): the ingest bridge had forwarded them before it "
                "stopped or lost its MQTT connection",
                out.duplicates,
                dropped_here,
            )
        return [out]

    return merge


def drop_redeliveries(
    step_id: str,
    records: Stream[Any],
    accept: Callable[[str], bool],
    remembered: int,
    shards: int = DEDUPE_SHARDS,
) -> Stream[IngestBatch]:
    """Ingest records -> ``IngestBatch`` without the bridge's redelivered duplicates.

    Records are sharded by Kafka key over ``shards`` Bytewax state keys; each
    shard runs a ``RedeliveryFilter`` remembering ``remembered // shards``
    messages, whose state is snapshotted with the flow. Per device, order is
    kept. One batch comes out per activation, whatever the shards.
    """
    capacity = max(1, remembered // shards)
    keyed = op.flat_map_batch(f"{step_id}_shard", records, _record_sharder(shards))
    filtered = op.stateful_batch(
        step_id, keyed, lambda state: LogicStep(RedeliveryFilter(capacity, accept, state))
    )
    return op.flat_map_batch(
        f"{step_id}_merge", op.key_rm(f"{step_id}_unshard", filtered), _merger()
    )


def device_messages(
    flow: Dataflow,
    settings: Settings,
    source: Source[list[DeviceMessage]] | None = None,
    client_id: str | None = None,
) -> Ingest:
    """Add the input of ``settings.ingest`` (or ``source``, for tests) to ``flow``.

    Kafka input passes ``drop_redeliveries`` unless ``IOTFLOW_INGEST_DEDUPE_RECORDS`` is 0.
    """
    if source is not None:
        return Ingest(op.input("in", flow, source), None)
    if settings.ingest == "mqtt":
        return Ingest(op.input("in", flow, mqtt_source(settings, client_id)), None)
    if settings.ingest != "kafka":
        msg = f"IOTFLOW_INGEST={settings.ingest!r} is not understood; use 'mqtt' or 'kafka'"
        raise ConfigError(msg)
    accept = topic_matcher(telemetry_filters(settings))
    records = op.input("ingest", flow, kafka_source(settings))
    if settings.ingest_dedupe_records:
        unwrapped = drop_redeliveries("dedupe", records, accept, settings.ingest_dedupe_records)
    else:
        unwrapped = op.flat_map_batch(
            "unwrap", records, lambda batch: [unwrap_records(batch, accept)]
        )
    return Ingest(
        op.map("messages", unwrapped, _messages),
        op.flat_map("ingest_dead", unwrapped, lambda b: b.dead),
    )
