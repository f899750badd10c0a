"""Where a cloud or edge flow's device messages come from: MQTT directly, or Kafka behind the bridge.

``device_messages`` adds the input steps to a dataflow and returns batches of
``DeviceMessage`` plus the dead letters of records that were not valid ingest
records. Guarantees are those of the source: the direct MQTT source is
at-most-once across a crash of the flow (what it acknowledged and had not
made durable is gone); the Kafka ingest source resumes from the recovery
store's offsets (at least once; outputs de-duplicate by natural key).

On the Kafka path the bridge's redelivered duplicates never reach the flow:
each Kafka partition of the input drops them as it reads
(``DedupedIngest``, ``connectors.reading_dedupe``, remembering
``IOTFLOW_INGEST_DEDUPE_RECORDS`` messages per partition in the recovery
snapshot next to the partition's offset), so windows count each reading
once, across restarts of the bridge and of the flow. The bridge keys records
by device, so a message and its redelivery share a partition. The direct
MQTT path has no such filter: its source hands over what it acknowledged and
keeps no state across a crash, and the messages it hands over do not carry
the broker's DUP flag.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import FixedPartitionedSource, Source, StatefulSourcePartition

from connectors.bridge import IngestBatch, ingest_topic, topic_matcher, unwrap_records
from connectors.kafka import KafkaInput
from connectors.mqtt import MqttSource
from connectors.reading_dedupe import RedeliveryFilter
from iotflow.errors import ConfigError
from iotflow.events import DeadLetter, DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

__all__ = [
    "DedupedIngest",
    "Ingest",
    "device_messages",
    "kafka_source",
    "mqtt_source",
    "telemetry_filters",
]

log = logging.getLogger("iotflow.ingest")


def telemetry_filters(settings: Settings) -> list[str]:
    """The MQTT topic filters of device telemetry (``IOTFLOW_MQTT_TOPICS`` or the default)."""
    return settings.mqtt_topics or [MqttTopics(settings.mqtt_base).telemetry()]


def mqtt_source(
    settings: Settings, client_id: str | None = None, linger: timedelta = timedelta(0)
) -> MqttSource:
    """The telemetry subscription of the settings' MQTT broker.

    ``client_id`` is the flow's own default; ``IOTFLOW_MQTT_CLIENT_ID``, when set,
    wins. Two flows must never share one: the broker would hand the session back
    and forth between them. ``linger``: see ``MqttSource``.
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
        linger=linger,
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


class _DedupedPartition(StatefulSourcePartition[IngestBatch, dict[str, Any]]):
    def __init__(
        self, name: str, inner: StatefulSourcePartition[Any, Any], dedupe: RedeliveryFilter
    ) -> None:
        self._name = name
        self._inner = inner
        self._dedupe = dedupe

    def next_batch(self) -> list[IngestBatch]:
        records = list(self._inner.next_batch())
        if not records:
            return []
        batch = self._dedupe.on_batch(records)[0]
        if batch.duplicates:
            log.warning(
                "ingest: dropped %d redelivered duplicate(s) of device messages on %s "
                "(%d since this partition's state began): the ingest bridge had forwarded "
                "them before it stopped or lost its MQTT connection",
                batch.duplicates,
                self._name,
                self._dedupe.counts["duplicates"],
            )
        return [batch]

    def next_awake(self) -> datetime | None:
        return self._inner.next_awake()

    def snapshot(self) -> dict[str, Any]:
        return {"source": self._inner.snapshot(), "dedupe": self._dedupe.snapshot()}

    def close(self) -> None:
        self._inner.close()


class DedupedIngest(FixedPartitionedSource[IngestBatch, dict[str, Any]]):
    """Ingest records of ``source`` -> ``IngestBatch`` without the bridge's redelivered duplicates.

    Each partition of ``source`` (a Kafka partition of the ingest topic) runs
    its own ``RedeliveryFilter`` remembering ``remembered`` messages, whose
    state is snapshotted with the partition's own (its offset): a flow
    restarted from its recovery store resumes both together. Order within a
    partition is kept; one batch comes out per batch read. A store written
    before this filter existed (the partition's bare state) resumes with an
    empty memory.
    """

    def __init__(
        self,
        source: FixedPartitionedSource[Any, Any],
        accept: Callable[[str], bool] | None,
        remembered: int,
    ) -> None:
        RedeliveryFilter(remembered)  # a bad size fails here, at build time, not in a worker
        self._source = source
        self._accept = accept
        self._remembered = remembered

    def list_parts(self) -> list[str]:
        return self._source.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: dict[str, Any] | None
    ) -> _DedupedPartition:
        inner_state, dedupe_state = resume_state, None
        if isinstance(resume_state, dict) and set(resume_state) == {"source", "dedupe"}:
            inner_state, dedupe_state = resume_state["source"], resume_state["dedupe"]
        inner = self._source.build_part(step_id, for_part, inner_state)
        dedupe = RedeliveryFilter(self._remembered, self._accept, dedupe_state)
        return _DedupedPartition(for_part, inner, dedupe)


def _joined(batches: list[IngestBatch]) -> list[IngestBatch]:
    """The partitions' batches of one activation as one: downstream steps pay per batch
    (the decoder, Kafka sinks flushing), so they get what the plain unwrap would give."""
    if len(batches) <= 1:
        return batches
    out = IngestBatch()
    for batch in batches:
        out.messages.extend(batch.messages)
        out.dead.extend(batch.dead)
        out.skipped += batch.skipped
        out.duplicates += batch.duplicates
    return [out]


def device_messages(
    flow: Dataflow,
    settings: Settings,
    source: Source[list[DeviceMessage]] | None = None,
    client_id: str | None = None,
    linger: timedelta = timedelta(0),
) -> Ingest:
    """Add the input of ``settings.ingest`` (or ``source``, for tests) to ``flow``.

    ``linger`` lets MQTT batches gather (``MqttSource``); the Kafka input batches by
    its fetch already.

    Kafka input is read through ``DedupedIngest`` unless ``IOTFLOW_INGEST_DEDUPE_RECORDS``
    is 0.
    """
    if source is not None:
        return Ingest(op.input("in", flow, source), None)
    if settings.ingest == "mqtt":
        return Ingest(op.input("in", flow, mqtt_source(settings, client_id, linger)), None)
    if settings.ingest != "kafka":
        msg = f"IOTFLOW_INGEST={settings.ingest!r} is not understood; use 'mqtt' or 'kafka'"
        raise ConfigError(msg)
    accept = topic_matcher(telemetry_filters(settings))
    if settings.ingest_dedupe_records:
        source = DedupedIngest(kafka_source(settings), accept, settings.ingest_dedupe_records)
        unwrapped: Stream[IngestBatch] = op.flat_map_batch(
            "unwrap", op.input("ingest", flow, source), _joined
        )
    else:
        records = op.input("ingest", flow, kafka_source(settings))
        unwrapped = op.flat_map_batch(
            "unwrap", records, lambda batch: [unwrap_records(batch, accept)]
        )
    return Ingest(
        op.map("messages", unwrapped, _messages),
        op.flat_map("ingest_dead", unwrapped, lambda b: b.dead),
    )
