"""Running an asyncio server object: in a daemon thread, or in the foreground until a signal."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Protocol, Self

__all__ = ["AsyncServer", "ThreadedServer", "serve_until_signal"]


class AsyncServer(Protocol):
    async def start(self, host: str, port: int) -> int: ...

    async def close(self) -> None: ...


class ThreadedServer:
    """Runs ``server`` in a daemon thread of this process.

    ``start()`` returns once it listens (``port=0`` picks a free port, see
    ``.port``) and raises what prevented it (e.g. ``OSError`` for a taken
    port); ``stop()`` closes the server and joins the thread.
    """

    thread_name = "threaded-server"

    def __init__(self, server: AsyncServer, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"this {type(self).__name__} was already started")
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"{self.thread_name} did not listen within {timeout_s}s")
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        loop, stopped, thread = self._loop, self._stopped, self._thread
        if loop is None or stopped is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout_s)

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
        self.port = await self._server.start(self.host, self.port)
        self._ready.set()
        await self._stopped.wait()
        await self._server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_until_signal(
    server: AsyncServer, host: str, port: int, on_listening: Callable[[int], None]
) -> None:
    """Start ``server``, call ``on_listening(port)``, close it cleanly on SIGTERM or SIGINT."""
    bound = await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_listening(bound)
    await stop.wait()
    await server.close()
