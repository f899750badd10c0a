"""``EmbeddedBroker``: the broker on its own event loop in a background thread."""

from __future__ import annotations

import time
from collections.abc import Callable

from infra.embedded_broker.broker import BrokerStats, MqttBroker
from infra.threaded import ThreadedServer

__all__ = ["EmbeddedBroker"]


class EmbeddedBroker(ThreadedServer):
    """An MQTT 5 broker running in a daemon thread of this process.

    ``start()`` returns once it listens (``port=0`` picks a free port, see
    ``.port`` and ``.url``); ``stop()`` disconnects every client (reason
    0x8B) and joins the thread. Example::

        with EmbeddedBroker("127.0.0.1", 0).start() as broker:
            client = connect_client(broker.url)
    """

    thread_name = "embedded-mqtt"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_queued_messages: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = MqttBroker(max_queued_messages=max_queued_messages, clock=clock)
        super().__init__(self._broker, host, port)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stats(self) -> BrokerStats:
        """A snapshot of the counters (read without stopping the broker)."""
        return self._broker.stats()
