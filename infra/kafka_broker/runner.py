"""``EmbeddedKafka``: the Kafka-protocol broker on its own event loop in a background thread."""

from __future__ import annotations

from infra.kafka_broker.broker import BrokerStats, KafkaBroker
from infra.threaded import ThreadedServer

__all__ = ["EmbeddedKafka"]


class EmbeddedKafka(ThreadedServer):
    """A Kafka-protocol broker running in a daemon thread of this process.

    Example::

        with EmbeddedKafka().start() as broker:
            producer = Producer({"bootstrap.servers": broker.bootstrap})
    """

    thread_name = "embedded-kafka"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: object) -> None:
        self.broker = KafkaBroker(advertised_host=host, **options)  # type: ignore[arg-type]
        super().__init__(self.broker, host, port)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self) -> BrokerStats:
        """A snapshot of the counters (read without stopping the broker)."""
        return self.broker.stats()
