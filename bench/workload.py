"""What the benchmarks feed and where: realistic flat readings, private brokers, Kafka counts."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from bench.harness import BenchError
from infra.stack import LocalStack, StackInfo
from iotflow.settings import Settings

__all__ = ["T0_MS", "kafka_count", "payload", "private_stack"]

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a window boundary


def payload(ts_ms: int, k: int) -> bytes:
    """A flat telemetry payload as devices send it (about 60 bytes), varied by ``k``."""
    temperature = 18.0 + (k * 7) % 80 / 10
    humidity = 35.0 + (k * 13) % 200 / 10
    return b'{"ts": %d, "temperature": %.1f, "humidity": %.1f}' % (ts_ms, temperature, humidity)


@contextmanager
def private_stack() -> Iterator[StackInfo]:
    """A Mosquitto and a Tansu of our own in a temp dir, stopped on exit.

    Never a broker already running on the machine: ``IOTFLOW_MQTT_URL`` and
    ``IOTFLOW_KAFKA_BOOTSTRAP`` are overridden, and no state file is written.
    """
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp:
        settings = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap=None)
        with LocalStack.start(Path(tmp), settings, write_state=False) as stack:
            yield stack.info


def kafka_count(bootstrap: str, topic: str, idle_s: float = 0.5, timeout_s: float = 60.0) -> int:
    """How many records ``topic`` holds (0 when it does not exist), by reading all of it.

    Reads to the end rather than trusting end offsets: Tansu's (memory
    storage) high watermark is the base offset of the last record batch + 1,
    which undercounts. Stops once every partition passed that watermark and
    nothing more came for ``idle_s``.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"iotflow-bench-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 20,
        }
    )
    try:
        info = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if info is None or info.error is not None:
            return 0
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in info.partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in marks])
        reached: dict[int, int] = dict.fromkeys(marks, 0)
        total = 0
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            messages = consumer.consume(10_000, 0.1)
            for msg in messages:
                if msg.error() is None:
                    total += 1
                    reached[msg.partition()] = msg.offset() + 1
            now = time.monotonic()
            if messages:
                last = now
            elif now - last >= idle_s and all(reached[p] >= marks[p] for p in marks):
                return total
        msg = f"reading Kafka topic {topic!r} did not reach its end within {timeout_s}s"
        raise BenchError(msg)
    except KafkaException as exc:
        raise BenchError(f"cannot count Kafka topic {topic!r} at {bootstrap}: {exc}") from exc
    finally:
        consumer.close()
