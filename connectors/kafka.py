"""Kafka plumbing around Bytewax's own Kafka connector (``bytewax.connectors.kafka``).

``KafkaOutput`` is Bytewax's ``KafkaSink`` with an idempotent, ``acks=all``
producer tuned for low latency, that creates its topics when missing.
``KafkaEpochOutput`` is the same producer waiting for the broker once per
epoch instead of once per batch.
``read_topic`` and ``tail`` read a topic for tests, the demo and ``iotflow tail``
(Debian's kcat cannot talk to the local Kafka-compatible broker).
confluent-kafka errors are translated into ``iotflow.errors`` at this boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import Producer

from connectors.kafka_client import (
    COMPACTED,
    DEFAULT_PARTITIONS,
    KafkaRecord,
    ensure_topics,
    producer_config,
    read_topic,
    redact_config,
    security_config,
    tail,
)
from iotflow.errors import BrokerUnavailable, PublishRejected

__all__ = [
    "COMPACTED",
    "DEFAULT_PARTITIONS",
    "KafkaEpochOutput",
    "KafkaInput",
    "KafkaOutput",
    "KafkaRecord",
    "ensure_topics",
    "producer_config",
    "read_topic",
    "redact_config",
    "security_config",
    "tail",
]


class KafkaOutput(KafkaSink):
    """Bytewax's ``KafkaSink`` (topic per message) that creates ``topics`` when first built.

    At least once: Bytewax re-sends the resume epoch after a restart; consumers
    drop duplicates by the message key, which is always the record's natural key.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Iterable[str],
        configs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__([bootstrap], topic=None, add_config=producer_config(bootstrap))
        self._bootstrap = bootstrap
        self._topics = list(topics)
        self._configs = configs

    def build(self, step_id: str, worker_index: int, worker_count: int):
        if worker_index == 0:
            ensure_topics(self._bootstrap, self._topics, configs=self._configs)
        return super().build(step_id, worker_index, worker_count)


Record = tuple[str, bytes, bytes]
"""A record as ``KafkaEpochOutput`` takes lists of them: (topic, key, value)."""


class _EpochPartition(StatefulSinkPartition[KafkaSinkMessage[bytes, bytes], None]):
    def __init__(self, bootstrap: str, recovery: bool) -> None:
        self._failed: list[str] = []
        # Delivery reports for failures only, through one producer-wide callback: a
        # per-record callback cost a Python call per acknowledged record (a third of
        # the producer's CPU for a 20,000-record window close).
        config = {
            **producer_config(bootstrap),
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
        }
        self._producer = Producer(config)
        self._bootstrap = bootstrap
        self._recovery = recovery

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err}")

    def write_batch(self, items: list[KafkaSinkMessage[bytes, bytes] | list[Record]]) -> None:
        self._raise()
        produce = self._producer.produce
        for item in items:
            if type(item) is list:
                done = 0
                while done < len(item):
                    try:
                        for topic, key, value in item[done:] if done else item:
                            produce(topic, value, key)
                            done += 1
                    except BufferError:  # the local queue is full: let it drain, go on
                        self._producer.flush(30)
            else:
                msg = cast(KafkaSinkMessage[bytes, bytes], item)
                try:
                    produce(msg.topic, msg.value, msg.key, headers=msg.headers)
                except BufferError:
                    self._producer.flush(30)
                    produce(msg.topic, msg.value, msg.key, headers=msg.headers)
        self._producer.poll(0)

    def snapshot(self) -> None:
        if not self._recovery:
            # nothing records this epoch: the producer sends on its own (linger.ms), and
            # a refused record is raised at the next batch or at close
            self._producer.poll(0)
            self._raise()
            return
        # the epoch ends: every record it produced is acknowledged before Bytewax records it
        self._flush()

    def _flush(self) -> None:
        left = self._producer.flush(30)
        if left:
            msg = f"Kafka at {self._bootstrap} did not acknowledge {left} records within 30s"
            raise BrokerUnavailable(msg)
        self._raise()

    def close(self) -> None:
        self._flush()

    def _raise(self) -> None:
        if self._failed:
            shown = "; ".join(self._failed[:3])
            msg = f"Kafka at {self._bootstrap} refused {len(self._failed)} records: {shown}"
            raise PublishRejected(msg)


class KafkaEpochOutput(FixedPartitionedSink[KafkaSinkMessage[bytes, bytes], None]):
    """``KafkaOutput`` that waits for the broker once per epoch instead of per batch.

    Bytewax's ``KafkaSink`` flushes the producer after every batch: a broker
    round trip that holds up everything queued behind it. Here a batch is
    handed to the producer (which sends within ``linger.ms``) and the worker
    moves on. With ``recovery`` (the default; flows pass
    ``connectors.recovery.recovery_on(...)``) the end of each epoch (its
    snapshot) waits until the broker acknowledged every record of the epoch, so
    a recovery snapshot never runs ahead of Kafka: at least once, per epoch.
    With ``recovery=False`` nothing records the snapshots and the worker never
    waits for the broker; closing the sink (end of input) still waits for every
    acknowledgment. A record the broker refused raises ``PublishRejected`` at
    the next batch, at an epoch's end or at close. Items arrive as
    ``(key, KafkaSinkMessage)`` or ``(key, [(topic, key, value), ...])`` (any
    key: one partition, one producer); a list of records is one dataflow item
    and no ``KafkaSinkMessage`` per record, for steps that emit many records at once.
    The topics are created and the producer started when the flow starts, so the
    first record does not wait for either.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Iterable[str],
        configs: Mapping[str, Mapping[str, str]] | None = None,
        *,
        recovery: bool = True,
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = list(topics)
        self._configs = configs
        self._recovery = recovery
        self._ready: _EpochPartition | None = None

    def list_parts(self) -> list[str]:
        # Bytewax builds a sink partition when its first item arrives, but asks for the
        # parts at start-up: creating the topics and starting the producer here keeps the
        # first record from waiting for both (an idempotent producer needs ~500 ms to get
        # its producer id). A worker that does not own the part holds an idle producer.
        if self._ready is None:
            ensure_topics(self._bootstrap, self._topics, configs=self._configs)
            self._ready = _EpochPartition(self._bootstrap, self._recovery)
        return ["kafka"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _EpochPartition:
        part, self._ready = self._ready, None
        if part is None:
            ensure_topics(self._bootstrap, self._topics, configs=self._configs)
            part = _EpochPartition(self._bootstrap, self._recovery)
        return part


class KafkaInput(KafkaSource):
    """Bytewax's ``KafkaSource`` that creates missing topics and fetches with low latency.

    Each Kafka partition is a Bytewax input partition; offsets live in the
    Bytewax recovery store when recovery is on (at least once). With
    ``tail=False`` the input ends at the end offsets seen when it starts.
    """

    def __init__(
        self, bootstrap: str, topics: Iterable[str], *, tail: bool = True, batch_size: int = 1000
    ) -> None:
        # librdkafka waits up to 500 ms for a fetch to fill by default: too slow for alerts.
        config = {"fetch.wait.max.ms": "10", "fetch.min.bytes": "1", **security_config()}
        super().__init__(
            [bootstrap], list(topics), tail=tail, add_config=config, batch_size=batch_size
        )
        self._bootstrap = bootstrap

    def list_parts(self) -> list[str]:
        ensure_topics(self._bootstrap, self._topics)
        return super().list_parts()


def message(topic: str, key: str, value: bytes) -> KafkaSinkMessage[bytes, bytes]:
    return KafkaSinkMessage(key.encode(), value, topic=topic)
