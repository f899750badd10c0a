"""A TCP proxy on loopback that tests control: forward, cut the link, restore it.

Tests cut the link between an edge gateway and Kafka with it, because the
local Kafka-compatible broker keeps its topics in memory: it must never be
killed in a test. ``cut()`` resets every open connection and every new one
until ``restore()`` (a client sees "connection reset/refused", as when a
gateway's uplink drops).

Kafka clients ask the broker where its brokers are (Metadata) and then
connect there, past a plain proxy. With ``kafka=True`` the proxy rewrites
the target's own address to the proxy's in the responses that advertise
brokers (Metadata, FindCoordinator, DescribeCluster), so every connection of
the client goes through the proxy. It works on the wire format: a request's
API key is read from its header, and in those responses the 4-byte port
following the host string is replaced (the host stays the same, so no
length changes).

Example::

    >>> import socket, threading
    >>> server = socket.create_server(("127.0.0.1", 0))
    >>> _ = threading.Thread(target=lambda: server.accept()[0].sendall(b"hi"), daemon=True).start()
    >>> with TcpProxy.start("127.0.0.1", server.getsockname()[1]) as proxy:
    ...     with socket.create_connection(("127.0.0.1", proxy.port)) as client:
    ...         client.recv(2)
    b'hi'
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Self

__all__ = ["ProxyStats", "TcpProxy"]

# Kafka API keys whose responses carry broker addresses
_ADVERTISING = {3: "Metadata", 10: "FindCoordinator", 60: "DescribeCluster"}


@dataclass
class ProxyStats:
    """Connections accepted, refused while cut, and bytes each way."""

    accepted: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close with RST, as a dropped link looks to the client
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # close() alone does not end a recv() blocked in a pump thread (the kernel keeps
    # the socket open until that read returns), so an idle link would survive a cut;
    # SHUT_RD wakes the reader without sending a FIN ahead of the RST.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, need = [], n
    while need:
        chunk = sock.recv(min(need, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


class _Link:
    """One client connection and its upstream connection, with two pump threads."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.advertising: set[int] = set()  # correlation ids of requests that advertise brokers
        self.lock = threading.Lock()
        for target in (self._up, self._down):
            threading.Thread(target=target, daemon=True).start()

    def close(self) -> None:
        _reset(self.client)
        _reset(self.upstream)
        self.proxy._forget(self)

    def _up(self) -> None:
        try:
            if self.proxy.kafka:
                while frame := self._frame(self.client):
                    if len(frame) >= 12:
                        api_key, _version, correlation = struct.unpack(">hhi", frame[4:12])
                        if api_key in _ADVERTISING:
                            with self.lock:
                                self.advertising.add(correlation)
                    self.upstream.sendall(frame)
                    self.proxy.stats.bytes_up += len(frame)
            else:
                while chunk := self.client.recv(1 << 16):
                    self.upstream.sendall(chunk)
                    self.proxy.stats.bytes_up += len(chunk)
        except OSError:
            pass
        self.close()

    def _down(self) -> None:
        try:
            if self.proxy.kafka:
                while frame := self._frame(self.upstream):
                    correlation = struct.unpack(">i", frame[4:8])[0] if len(frame) >= 8 else None
                    with self.lock:
                        rewrite = correlation in self.advertising
                        self.advertising.discard(correlation)  # type: ignore[arg-type]
                    if rewrite:
                        frame = frame.replace(self.proxy._advertised, self.proxy._replacement)
                    self.client.sendall(frame)
                    self.proxy.stats.bytes_down += len(frame)
            else:
                while chunk := self.upstream.recv(1 << 16):
                    self.client.sendall(chunk)
                    self.proxy.stats.bytes_down += len(chunk)
        except OSError:
            pass
        self.close()

    @staticmethod
    def _frame(sock: socket.socket) -> bytes | None:
        head = _read_exact(sock, 4)
        if head is None:
            return None
        body = _read_exact(sock, struct.unpack(">i", head)[0])
        return None if body is None else head + body


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` until cut.

    ``cut()`` resets every connection and refuses new ones (accepted, then
    reset at once) until ``restore()``. ``kafka=True`` rewrites advertised
    broker addresses (see the module docstring). ``close()`` stops it.
    """

    def __init__(self, target_host: str, target_port: int, *, kafka: bool = False) -> None:
        self.target = (target_host, target_port)
        self.kafka = kafka
        self.stats = ProxyStats()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        host = target_host.encode()
        self._advertised = host + struct.pack(">i", target_port)
        self._replacement = host + struct.pack(">i", self.port)
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def start(cls, target_host: str, target_port: int, *, kafka: bool = False) -> Self:
        return cls(target_host, target_port, kafka=kafka)

    @classmethod
    def for_kafka(cls, bootstrap: str) -> Self:
        """A proxy in front of a one-broker Kafka at ``host:port`` that keeps clients on it."""
        host, _, port = bootstrap.rpartition(":")
        return cls(host, int(port), kafka=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Drop the link: reset every open connection and every new one until ``restore``."""
        with self._lock:
            self._cut = True
            links = list(self._links)
        for link in links:
            link.close()

    def restore(self) -> None:
        """Forward again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut:
                self.stats.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats.accepted += 1
            with self._lock:
                if self._cut:  # cut while connecting
                    _reset(client)
                    _reset(upstream)
                    continue
                self._links.add(_Link(self, client, upstream))
