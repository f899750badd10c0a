"""``EmbeddedBroker``: the broker on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Self

from infra.embedded_broker.broker import BrokerStats, MqttBroker

__all__ = ["EmbeddedBroker"]


class EmbeddedBroker:
    """An MQTT 5 broker running in a daemon thread of this process.

    ``start()`` returns once it listens (``port=0`` picks a free port, see
    ``.port`` and ``.url``); ``stop()`` disconnects every client and joins the
    thread. Example::

        with EmbeddedBroker("127.0.0.1", 0).start() as broker:
            client = connect_client(broker.url)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_queued_messages: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self._broker = MqttBroker(max_queued_messages=max_queued_messages, clock=clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start listening; raise what prevented it (e.g. ``OSError`` for a taken port)."""
        if self._thread is not None:
            raise RuntimeError("this EmbeddedBroker was already started")
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"embedded MQTT broker did not listen within {timeout_s}s")
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect the clients (reason 0x8B), stop listening, join the thread."""
        loop, stopped, thread = self._loop, self._stopped, self._thread
        if loop is None or stopped is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout_s)

    def stats(self) -> BrokerStats:
        """A snapshot of the counters (read without stopping the broker)."""
        return self._broker.stats()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._failure = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        self.port = await self._broker.start(self.host, self.port)
        self._ready.set()
        await self._stopped.wait()
        await self._broker.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
