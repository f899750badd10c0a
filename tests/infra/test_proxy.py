"""The test proxy: forwards bytes, and ``cut()`` drops live connections at once."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from infra.proxy import TcpProxy


@pytest.fixture
def echo_server():
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # the proxy resets links on cut()
        while data := conn.recv(1024):
            conn.sendall(data)


def test_forwards_both_ways(echo_server: int) -> None:
    with TcpProxy.start("127.0.0.1", echo_server) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
        assert proxy.stats.bytes_up == 4


def test_cut_resets_an_idle_connection_whose_pumps_are_blocked_reading(echo_server: int) -> None:
    """An idle client (an MQTT session between keepalives) must see its link drop on cut().

    Both pump threads sit in recv(); closing a socket another thread is reading
    does not end that read on Linux, so without a shutdown the link would stay up.
    """
    with TcpProxy.start("127.0.0.1", echo_server) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            proxy.cut()
            try:
                got = client.recv(1)
            except ConnectionResetError:
                got = b""
            assert got == b""  # reset or closed, within the 5 s timeout, never a hang
            with pytest.raises(OSError):
                for _ in range(100):
                    client.sendall(b"y" * 1024)


def _dropped_at_once(port: int) -> bool:
    """Whether a new connection through the proxy is reset (at connect or first read)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            return client.recv(1) == b""
    except (ConnectionResetError, ConnectionRefusedError):
        return True


def test_new_connections_are_refused_until_restore(echo_server: int) -> None:
    with TcpProxy.start("127.0.0.1", echo_server) as proxy:
        proxy.cut()
        assert _dropped_at_once(proxy.port)
        assert proxy.stats.refused == 1
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(b"ok")
            assert client.recv(2) == b"ok"
