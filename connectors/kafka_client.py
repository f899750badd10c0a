"""confluent-kafka helpers without Bytewax: settings, topic creation, reading topics.

Split from ``connectors.kafka`` (which re-exports every name) so that small
processes, such as the edge gateway, can produce and read Kafka without
importing Bytewax's Kafka connector. confluent-kafka errors are translated
into ``iotflow.errors`` at this boundary.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from iotflow.env import LeanSettings, lean_settings
from iotflow.errors import BrokerUnavailable, ConfigError

if TYPE_CHECKING:
    from iotflow.settings import Settings

__all__ = [
    "COMPACTED",
    "DEFAULT_PARTITIONS",
    "KafkaRecord",
    "ensure_topics",
    "producer_config",
    "read_topic",
    "redact_config",
    "security_config",
    "tail",
]

DEFAULT_PARTITIONS = 3
_SECRET_KEYS = ("sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret")


def security_config(settings: Settings | LeanSettings | None = None) -> dict[str, str]:
    """The librdkafka SASL/TLS options from ``IOTFLOW_KAFKA_SECURITY_PROTOCOL``,
    ``IOTFLOW_KAFKA_SASL_MECHANISM``, ``IOTFLOW_KAFKA_SASL_USERNAME``,
    ``IOTFLOW_KAFKA_SASL_PASSWORD`` and ``IOTFLOW_KAFKA_CA_FILE`` (by default read
    from the environment); empty when none is set. Every producer, consumer and
    admin client here merges it in (``settings``: ``Settings`` or, by default,
    ``iotflow.env.lean_settings()``). The result holds the password: log only
    ``redact_config(...)`` of it. An inconsistent combination (SASL settings
    without a SASL protocol, a CA file without TLS, a missing file) is a
    ``ConfigError`` naming the setting.

    Example::

        >>> from iotflow.settings import Settings
        >>> s = Settings(_env_file=None, kafka_security_protocol="sasl_ssl",
        ...              kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="flow",
        ...              kafka_sasl_password="pw")
        >>> redact_config(security_config(s))
        {'security.protocol': 'SASL_SSL', 'sasl.mechanisms': 'SCRAM-SHA-512', 'sasl.username': 'flow', 'sasl.password': '***'}
    """
    s = lean_settings() if settings is None else settings
    protocol = s.kafka_security_protocol
    sasl = {
        "IOTFLOW_KAFKA_SASL_MECHANISM": s.kafka_sasl_mechanism,
        "IOTFLOW_KAFKA_SASL_USERNAME": s.kafka_sasl_username,
        "IOTFLOW_KAFKA_SASL_PASSWORD": s.kafka_sasl_password,
    }
    config: dict[str, str] = {}
    if protocol is not None:
        config["security.protocol"] = protocol
    if protocol is not None and protocol.startswith("SASL_"):
        missing = [name for name, value in sasl.items() if value is None]
        if missing:
            msg = (
                f"IOTFLOW_KAFKA_SECURITY_PROTOCOL={protocol} needs {', '.join(missing)} "
                "(mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
            raise ConfigError(msg)
        config["sasl.mechanisms"] = str(s.kafka_sasl_mechanism)
        config["sasl.username"] = str(s.kafka_sasl_username)
        config["sasl.password"] = s.kafka_sasl_password.get_secret_value()  # type: ignore[union-attr]
    elif given := [name for name, value in sasl.items() if value is not None]:
        msg = (
            f"{', '.join(given)} set but IOTFLOW_KAFKA_SECURITY_PROTOCOL is {protocol}; "
            "set it to SASL_SSL (or SASL_PLAINTEXT) to log in with SASL"
        )
        raise ConfigError(msg)
    if s.kafka_ca_file is not None:
        if protocol not in ("SSL", "SASL_SSL"):
            msg = (
                f"IOTFLOW_KAFKA_CA_FILE is set but IOTFLOW_KAFKA_SECURITY_PROTOCOL is {protocol}; "
                "set it to SSL or SASL_SSL"
            )
            raise ConfigError(msg)
        if not s.kafka_ca_file.is_file():
            msg = f"IOTFLOW_KAFKA_CA_FILE={s.kafka_ca_file}: no such file; point it at the CA certificate (PEM) that signed the brokers'"
            raise ConfigError(msg)
        config["ssl.ca.location"] = str(s.kafka_ca_file)
    return config


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A librdkafka config safe to log: secrets replaced by ``***``."""
    return {k: ("***" if k in _SECRET_KEYS else v) for k, v in config.items()}


def producer_config(bootstrap: str) -> dict[str, Any]:
    """An idempotent ``acks=all`` producer that lingers 5 ms at most (the 5 ms default
    of librdkafka >= 1.5 is kept explicit: latency targets depend on it), with the
    SASL/TLS settings of ``security_config``."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.max.bytes": 2_000_000,
        **security_config(),
    }


COMPACTED = {"cleanup.policy": "compact"}
"""Topic config of a changelog topic (``{prefix}.twins``): Kafka keeps the last record per key."""


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = DEFAULT_PARTITIONS,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are.

    ``configs`` gives topic settings by topic name (``{"iot.twins": COMPACTED}``),
    applied when the topic is created.
    """
    configs = configs or {}
    admin = AdminClient({"bootstrap.servers": bootstrap, **security_config()})
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [
            NewTopic(
                t, num_partitions=partitions, replication_factor=1, config=dict(configs.get(t, {}))
            )
            for t in missing
        ]
    )
    for topic, future in futures.items():
        try:
            future.result(timeout=10)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a concurrent creator won the race
                raise BrokerUnavailable(f"cannot create Kafka topic {topic!r}: {exc}") from exc


@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def _consumer(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"iotflow-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 20,
            **security_config(),
        }
    )


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot read Kafka topic {topic!r}: {exc}") from exc
    info = meta.topics.get(topic)
    if info is None or info.error is not None:
        return []
    return sorted(info.partitions)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[KafkaRecord]:
    """Every record in ``topic`` up to its end offsets at call time (empty if no topic)."""
    consumer = _consumer(bootstrap)
    try:
        parts = _partitions(consumer, topic, timeout_s)
        targets: dict[int, int] = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                targets[p] = high
        if not targets:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in targets])
        records: list[KafkaRecord] = []
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, 0.3)
            for msg in batch:
                if msg.error() is not None:
                    continue
                records.append(_record(msg))
                if msg.offset() + 1 >= targets[msg.partition()]:
                    done.add(msg.partition())
            # Tansu reports the high watermark as the start of the last record batch + 1,
            # so reaching it is not the end: read on until a poll comes back empty.
            if len(done) == len(targets) and not batch:
                break
        if len(done) < len(targets):
            raise BrokerUnavailable(f"reading {topic!r} did not reach its end within {timeout_s}s")
        return records
    finally:
        consumer.close()


def tail(
    bootstrap: str,
    topics: str | list[str],
    *,
    from_beginning: bool = True,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
) -> Iterator[KafkaRecord]:
    """Follow topics (all their partitions) and yield records as they come.

    Topics that do not exist yet are picked up once they appear. Stops after
    ``idle_timeout_s`` without a record (never when None), or once ``stop`` is set.
    """
    names = [topics] if isinstance(topics, str) else list(topics)
    consumer = _consumer(bootstrap)
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    assigned: set[tuple[str, int]] = set()
    try:
        last = time.monotonic()
        next_lookup = 0.0
        while idle_timeout_s is None or time.monotonic() - last < idle_timeout_s:
            if stop is not None and stop.is_set():
                return
            if time.monotonic() >= next_lookup:
                new = [
                    TopicPartition(t, p, start)
                    for t in names
                    for p in _partitions(consumer, t, 10)
                    if (t, p) not in assigned
                ]
                if new:
                    consumer.incremental_assign(new)
                    # Partitions that appear later are new since we started: read them whole.
                    start = OFFSET_BEGINNING
                    assigned.update((tp.topic, tp.partition) for tp in new)
                next_lookup = time.monotonic() + 1.0
            if not assigned:
                time.sleep(0.2)
                continue
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    last = time.monotonic()
                    yield _record(msg)
    finally:
        consumer.close()


def _record(msg: Any) -> KafkaRecord:
    _kind, ts = msg.timestamp()
    return KafkaRecord(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), ts)
