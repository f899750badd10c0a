"""Kafka plumbing around Bytewax's own Kafka connector (``bytewax.connectors.kafka``).

``KafkaOutput`` is Bytewax's ``KafkaSink`` with an idempotent, ``acks=all``
producer tuned for low latency, that creates its topics when missing.
``read_topic`` and ``tail`` read a topic for tests, the demo and ``iotflow tail``
(Debian's kcat cannot talk to the local Kafka-compatible broker).
confluent-kafka errors are translated into ``iotflow.errors`` at this boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource

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

__all__ = [
    "COMPACTED",
    "DEFAULT_PARTITIONS",
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
