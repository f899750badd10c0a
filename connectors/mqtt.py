"""MQTT source and sink for Bytewax, on paho-mqtt.

Why paho-mqtt and not aiomqtt: paho carried ~42k msgs/s here against ~4k for
aiomqtt in one event loop, and paho has manual acknowledgment, while aiomqtt
2.5.1 acknowledges a QoS 1 message and then discards it when its queue is
full. This source must never acknowledge a message it then drops.

Security: ``mqtts://user:pass@host:port`` connects over TLS, verifying the
broker's certificate against ``IOTFLOW_MQTT_CA_FILE`` (else the system's
trust store) and its host name; ``IOTFLOW_MQTT_CERT_FILE`` and
``IOTFLOW_MQTT_KEY_FILE`` add a client certificate (see ``MqttTls``). A
refused login raises ``NotAuthorized``, a publish the broker's ACL denies
raises ``PublishRejected`` (MQTT 5 reason codes). Passwords never appear in a
``repr``, a log line or an error message: URLs are shown redacted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

import msgspec
import paho.mqtt.client as mqtt
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotflow.env import LeanSettings, lean_settings, redact_url
from iotflow.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    NotAuthorized,
    PublishRejected,
)
from iotflow.events import DeviceMessage

if TYPE_CHECKING:
    from iotflow.settings import Settings

__all__ = [
    "MqttEpochSink",
    "MqttMessage",
    "MqttSink",
    "MqttSource",
    "MqttTls",
    "MqttUrl",
    "connect_client",
    "no_delay",
]

log = logging.getLogger("iotflow.mqtt")

# CONNACK reason codes that mean "who you are is not accepted" (MQTT 5 and the
# 3.1.1 return codes 4 and 5 as paho maps them).
_LOGIN_REFUSED = {0x86: "bad user name or password", 0x87: "not authorized", 0x8A: "banned",
                  0x8C: "bad authentication method"}  # fmt: skip


@dataclass(frozen=True)
class MqttUrl:
    """A parsed ``mqtt://user:pass@host:port`` (``mqtts://`` for TLS); repr hides the password."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> MqttUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            msg = f"MQTT URL {redact_url(url)!r} must look like mqtt://[user:pass@]host[:port] or mqtts://..."
            raise ConfigError(msg)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            msg = (
                f"MQTT URL {redact_url(url)!r} has a path or query, which MQTT does not use; "
                "TLS files come from IOTFLOW_MQTT_CA_FILE, IOTFLOW_MQTT_CERT_FILE, IOTFLOW_MQTT_KEY_FILE"
            )
            raise ConfigError(msg)
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"MQTT URL {redact_url(url)!r} has a bad port") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __repr__(self) -> str:
        user = (
            f"{self.username}:***@"
            if self.password
            else (f"{self.username}@" if self.username else "")
        )
        return f"MqttUrl('{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}')"

    __str__ = __repr__


@dataclass(frozen=True)
class MqttTls:
    """TLS files for ``mqtts://`` URLs (settings ``IOTFLOW_MQTT_CA_FILE``,
    ``IOTFLOW_MQTT_CERT_FILE``, ``IOTFLOW_MQTT_KEY_FILE``).

    ``ca_file`` is the CA that signed the broker's certificate (None: the
    system's trust store); ``cert_file`` and ``key_file`` are a client
    certificate for brokers that log clients in by certificate (the key may
    sit in ``cert_file``). The broker's certificate and host name are always
    verified. A file that is missing or unreadable is a ``ConfigError`` that
    names the setting and the path.

    Example::

        >>> MqttTls(cert_file=Path("/nonexistent/device.crt")).check()
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: IOTFLOW_MQTT_CERT_FILE=/nonexistent/device.crt: no such file; point it at the client certificate (PEM)
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings | LeanSettings | None = None) -> MqttTls:
        """The TLS files named by ``settings`` (by default, the environment and ``.env``,
        read by ``iotflow.env.lean_settings``)."""
        s = lean_settings() if settings is None else settings
        return cls(s.mqtt_ca_file, s.mqtt_cert_file, s.mqtt_key_file)

    @property
    def configured(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))

    def check(self) -> None:
        """Raise ``ConfigError`` naming the setting and the path of a missing file."""
        what = {
            "IOTFLOW_MQTT_CA_FILE": (self.ca_file, "the CA certificate that signed the broker's"),
            "IOTFLOW_MQTT_CERT_FILE": (self.cert_file, "the client certificate"),
            "IOTFLOW_MQTT_KEY_FILE": (self.key_file, "the client certificate's private key"),
        }
        for setting, (path, meaning) in what.items():
            if path is not None and not Path(path).is_file():
                msg = f"{setting}={path}: no such file; point it at {meaning} (PEM)"
                raise ConfigError(msg)
        if self.key_file is not None and self.cert_file is None:
            msg = (
                f"IOTFLOW_MQTT_KEY_FILE={self.key_file} is set without IOTFLOW_MQTT_CERT_FILE; "
                "set both for a client certificate, or neither"
            )
            raise ConfigError(msg)

    def apply(self, client: mqtt.Client, broker: MqttUrl) -> None:
        """Set up TLS on a paho client (certificate and host name verification on)."""
        self.check()
        try:
            client.tls_set(
                ca_certs=None if self.ca_file is None else str(self.ca_file),
                certfile=None if self.cert_file is None else str(self.cert_file),
                keyfile=None if self.key_file is None else str(self.key_file),
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            msg = (
                f"cannot load the TLS files for MQTT broker {broker} ({exc}); check "
                f"IOTFLOW_MQTT_CA_FILE={self.ca_file}, IOTFLOW_MQTT_CERT_FILE={self.cert_file} "
                f"and IOTFLOW_MQTT_KEY_FILE={self.key_file} (PEM, the key matching the certificate)"
            )
            raise ConfigError(msg) from exc


def _unreachable(broker: MqttUrl, exc: Exception) -> BrokerUnavailable:
    """A connect-time exception as a BrokerUnavailable with a hint at the fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = (
            f"MQTT broker {broker}: its TLS certificate is not trusted ({exc.verify_message}); "
            "set IOTFLOW_MQTT_CA_FILE to the CA that signed it, and connect by a host name "
            "the certificate lists"
        )
    elif isinstance(exc, ssl.SSLError):
        msg = (
            f"TLS handshake with MQTT broker {broker} failed ({exc.reason or exc}); is the port a "
            "TLS listener, and does it want a client certificate (IOTFLOW_MQTT_CERT_FILE)?"
        )
    else:
        msg = f"cannot reach MQTT broker {broker}: {exc}"
    return BrokerUnavailable(msg)


def _refused(broker: MqttUrl, reason: Any) -> BrokerUnavailable:
    """A failed CONNACK as NotAuthorized (login refused) or BrokerUnavailable."""
    code = getattr(reason, "value", None)
    if code in _LOGIN_REFUSED:
        who = f"user {broker.username!r}" if broker.username else "an anonymous client"
        fix = (
            "check the user name and password in IOTFLOW_MQTT_URL (or the client certificate "
            "in IOTFLOW_MQTT_CERT_FILE) against the broker's users"
            if broker.username or broker.tls
            else "put a user name and password in IOTFLOW_MQTT_URL (mqtts://user:pass@host:port)"
        )
        msg = f"MQTT broker {broker} refused the login of {who}: {_LOGIN_REFUSED[code]} (0x{code:02X}); {fix}"
        return NotAuthorized(msg)
    return BrokerUnavailable(f"MQTT broker {broker} refused the connection: {reason}")


def no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open`` hook: switch Nagle's algorithm off on the socket.

    Commands and acks are small packets answered by small packets; with Nagle on,
    each hop can hold one for a delayed-ACK round (tens of milliseconds).
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


RawPublish = tuple[str, bytes, int, int]
"""A received PUBLISH as ``connect_client(on_publishes=...)`` hands it over: (topic, payload, qos, mid)."""

_READ_BYTES = 256 * 1024
_PUBLISH = 0x30
_unpack_u16 = struct.Struct("!H").unpack_from
_PUBACK = struct.Struct("!BBH")


def _varint(buf: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """An MQTT variable byte integer at ``pos``: (value, position after it); None when
    ``buf`` ends before it does. Raises ValueError for more than 4 bytes."""
    value = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("MQTT variable byte integer longer than 4 bytes")
    return None


class _BulkReadClient(mqtt.Client):
    """A paho client that reads whatever the socket holds at once and hands QoS 0 and 1
    PUBLISH packets to ``on_publishes`` in lists of ``RawPublish``, in arrival order.

    Why: paho 2.2 reads one packet per ``select()``, one ``recv()`` per header byte, and
    builds a ``MQTTMessage``, MQTT 5 ``Properties`` and a ``Condition`` for every message:
    at 5,000 msgs/s the twins flow's MQTT thread took most of a core under load, and the
    flow fell seconds behind. Here a message costs a few slices. PUBLISH properties
    (message expiry, user properties...) are skipped: the sources do not use them.

    Every other packet (CONNACK, SUBACK, PUBACK, PINGRESP, DISCONNECT, and QoS 2
    PUBLISH) goes to paho's own handler, so connecting, sessions, TLS, keepalive and
    reconnects behave as paho's. It overrides paho-mqtt 2.x's private ``_packet_read``
    (and fills ``_in_packet`` for ``_packet_handle``); ``tests/connectors/test_mqtt.py``
    checks it against Mosquitto and the embedded broker.
    """

    def __init__(
        self, *args: Any, on_publishes: Callable[[list[RawPublish]], None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_publishes = on_publishes
        self._rx = bytearray()
        self._rx_sock: Any = None  # the socket _rx holds bytes of; a new one starts empty

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        if self._sock is not self._rx_sock:
            self._rx.clear()
            self._rx_sock = self._sock
        try:
            data = self._sock_recv(_READ_BYTES)
        except BlockingIOError:
            return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as exc:
            log.warning("failed to receive from the MQTT broker: %s", exc)
            return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
        with self._msgtime_mutex:  # keepalive: the broker was heard from
            self._last_bytes_received = mqtt.time_func()
        buf = self._rx
        buf += data
        end, pos = len(buf), 0
        publishes: list[RawPublish] = []
        rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            while pos < end:
                header = buf[pos]
                found = _varint(buf, pos + 1, end)
                if found is None:
                    break
                length, start = found
                stop = start + length
                if stop > end:
                    break
                pos = stop
                qos = (header >> 1) & 0x03
                if header & 0xF0 == _PUBLISH and qos < 2:
                    (topic_len,) = _unpack_u16(buf, start)
                    at = start + 2 + topic_len
                    topic = buf[start + 2 : at].decode("utf-8", "replace")
                    mid = 0
                    if qos:
                        (mid,) = _unpack_u16(buf, at)
                        at += 2
                    if self._protocol == mqtt.MQTTv5:
                        props = _varint(buf, at, stop)
                        if props is None:
                            raise ValueError("PUBLISH properties run past the packet")
                        at = props[1] + props[0]
                    if at > stop:
                        raise ValueError("PUBLISH header runs past the packet")
                    publishes.append((topic, bytes(buf[at:stop]), qos, mid))
                    continue
                if publishes:  # keep the order of messages and other packets' callbacks
                    self._deliver(publishes)
                    publishes = []
                rc = self._handle_other(header, bytes(buf[start:stop]), length)
                if rc:
                    break
        except (ValueError, struct.error) as exc:
            log.warning("malformed packet from the MQTT broker: %s", exc)
            rc = mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL
        del buf[:pos]
        if publishes:
            self._deliver(publishes)
        return rc

    def _deliver(self, publishes: list[RawPublish]) -> None:
        self._on_publishes(publishes)
        if not self._manual_ack:  # as paho does: acknowledged once the callback returned
            self.ack_all([(mid, qos) for _t, _p, qos, mid in publishes if qos])

    def ack_all(self, acks: list[tuple[int, int]]) -> None:
        """Acknowledge received messages, ``(mid, qos)`` each: the PUBACKs of QoS 1 go
        out in one write, not one wake-up and one write each."""
        pubacks = b"".join(_PUBACK.pack(0x40, 2, mid) for mid, qos in acks if qos == 1)
        if pubacks:
            self._packet_queue(0x40, pubacks, 0, 0)
        for mid, qos in acks:
            if qos == 2:
                self.ack(mid, qos)

    def _handle_other(self, header: int, body: bytes, length: int) -> mqtt.MQTTErrorCode:
        """Hand one whole packet to paho's handlers, as paho's own reader would (only
        ``command``, ``packet`` and ``remaining_length`` are read by them)."""
        self._in_packet = {**self._in_packet, "command": header, "packet": body,
                           "remaining_length": length}  # fmt: skip
        try:
            return self._packet_handle()
        except MalformedPacket as exc:
            log.warning("malformed packet from the MQTT broker: %s", exc)
            return mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL


def connect_client(
    url: str,
    client_id: str = "",
    *,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    receive_maximum: int | None = None,
    manual_ack: bool = False,
    will: tuple[str, bytes] | None = None,
    on_connect: Callable[[mqtt.Client], None] | None = None,
    on_subscribe: Callable[..., None] | None = None,
    on_message: Callable[..., None] | None = None,
    on_publishes: Callable[[list[RawPublish]], None] | None = None,
    timeout_s: float = 10.0,
    tls: MqttTls | None = None,
) -> mqtt.Client:
    """An MQTT 5 client, connected and with its network loop running.

    Reconnects by itself with backoff (0.1 s doubling to 10 s); ``on_connect``
    runs after every (re)connect, the place to (re)subscribe. Raises
    ``NotAuthorized`` when the broker refuses the login, ``BrokerUnavailable``
    when the first connection fails otherwise within ``timeout_s`` (both name
    the redacted URL and the fix, never the password), ``ConfigError`` for a
    bad URL or TLS file. ``tls`` defaults to ``MqttTls.from_settings()`` for
    ``mqtts://`` URLs. With ``on_publishes``, received QoS 0 and 1 messages come in
    lists of ``RawPublish`` (topic, payload, qos, mid) instead of one paho
    ``MQTTMessage`` each (``on_message`` then sees QoS 2 ones only): many times
    cheaper at thousands of messages a second; such a client also has ``ack_all``
    for ``manual_ack``. A ``will`` (retained, QoS 1) needs a stable ``client_id``: reconnecting with the same id takes the old session over,
    which ends the old connection at once, so its will (if the broker sends
    it at all) comes before the new connection's ``online``, never after it.
    """
    parsed = MqttUrl.parse(url)
    if will is not None and not client_id:
        msg = (
            f"a last will on {will[0]!r} needs a stable client id: with a random one, a dead "
            "connection's will can overwrite the status of the live one"
        )
        raise ConfigError(msg)
    if tls is not None and tls.configured and not parsed.tls:
        msg = f"TLS files are set but MQTT URL {parsed} is not TLS; use mqtts://"
        raise ConfigError(msg)
    options: dict[str, Any] = {
        "client_id": client_id,
        "protocol": mqtt.MQTTv5,
        "manual_ack": manual_ack,
    }
    client = (
        mqtt.Client(CallbackAPIVersion.VERSION2, **options)
        if on_publishes is None
        else _BulkReadClient(CallbackAPIVersion.VERSION2, on_publishes=on_publishes, **options)
    )
    if parsed.username:
        client.username_pw_set(parsed.username, parsed.password)
    if parsed.tls:
        (MqttTls.from_settings() if tls is None else tls).apply(client, parsed)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=0.1, max_delay=10)
    client.max_inflight_messages_set(1000)
    client.on_socket_open = no_delay
    connected, settled = threading.Event(), threading.Event()
    failure: list[BrokerUnavailable] = []

    def _on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            if not connected.is_set():
                failure.append(_refused(parsed, reason))
                settled.set()
            else:
                log.warning("MQTT broker %s refused a reconnect: %s", parsed, reason)
        else:
            if on_connect is not None:
                on_connect(c)
            connected.set()
            settled.set()

    def _on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not connected.is_set():
            # Closed before CONNACK: a TLS port spoken to without TLS, a client
            # certificate the broker wanted, a broker going away.
            why = f"the broker closed the connection before accepting it ({reason}); " + (
                "is the port a TLS listener? then use mqtts://"
                if not parsed.tls
                else "does it want a client certificate (IOTFLOW_MQTT_CERT_FILE)?"
            )
            failure.append(BrokerUnavailable(f"MQTT broker {parsed}: {why}"))
            settled.set()
        elif reason.is_failure or reason.value != 0:
            log.warning("lost the connection to MQTT broker %s (%s); reconnecting", parsed, reason)

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
    if on_subscribe is not None:
        client.on_subscribe = on_subscribe
    if on_message is not None:
        # Set before connecting: a resumed session delivers right after CONNACK.
        client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    try:
        client.connect(
            parsed.host, parsed.port, keepalive=30, clean_start=clean_start, properties=props
        )
    except (OSError, ValueError) as exc:
        raise _unreachable(parsed, exc) from exc
    client.loop_start()
    settled.wait(timeout_s)
    if failure or not connected.is_set():
        client.loop_stop()
        sock = client.socket()
        if sock is not None:  # paho keeps a refused socket open until garbage collection
            with contextlib.suppress(OSError):
                sock.close()
        if failure:
            raise failure[0]
        raise BrokerUnavailable(f"MQTT broker {parsed} sent no CONNACK within {timeout_s}s")
    log.debug("connected to MQTT broker %s as client %r", parsed, client_id)
    return client


def _now() -> datetime:
    return datetime.now(UTC)


class _MqttPartition(StatelessSourcePartition[list[DeviceMessage]]):
    def __init__(
        self,
        url: str,
        client_id: str,
        subscriptions: list[str],
        status_topic: str,
        batch_size: int,
        receive_maximum: int,
        session_expiry_s: int,
        idle_stop: timedelta | None,
        tls: MqttTls | None = None,
        linger: timedelta = timedelta(0),
    ) -> None:
        # filled by the client's network thread; deque appends and pops are atomic
        self._inbox: deque[RawPublish] = deque()
        self._batch_size = batch_size
        self._linger = linger
        self._waiting_since: datetime | None = None  # when a poll first saw the waiting ones
        self._idle_stop = idle_stop
        self._last_message: float | None = None
        self._awake: datetime | None = None
        self._status_topic = status_topic

        subscribed = threading.Event()
        refused: list[str] = []

        def subscribe(client: mqtt.Client) -> None:
            client.subscribe([(topic, 1) for topic in subscriptions])

        def on_subscribe(client: mqtt.Client, _u: Any, _mid: int, codes: list, _p: Any) -> None:
            refused.extend(
                f"{topic} ({code})"
                for topic, code in zip(subscriptions, codes, strict=False)
                if code.is_failure
            )
            # Online only once the broker confirmed the subscriptions: nothing published after is missed.
            client.publish(status_topic, b"online", qos=1, retain=True)
            subscribed.set()

        self._client = cast(
            _BulkReadClient,
            connect_client(
                url,
                client_id,
                clean_start=False,
                session_expiry_s=session_expiry_s,
                receive_maximum=receive_maximum,
                manual_ack=True,
                will=(status_topic, b"offline"),
                on_connect=subscribe,
                on_subscribe=on_subscribe,
                on_message=lambda _c, _u, m: self._inbox.append((m.topic, m.payload, m.qos, m.mid)),
                on_publishes=self._inbox.extend,
                tls=tls,
            ),
        )
        if not subscribed.wait(10) or refused:
            self.close()
            why = ", ".join(refused) if refused else "no SUBACK within 10s"
            raise BrokerError(f"MQTT broker {MqttUrl.parse(url)} refused the subscription: {why}")

    def next_batch(self) -> list[list[DeviceMessage]]:
        if self._linger and self._inbox and len(self._inbox) < self._batch_size:
            now = _now()
            if self._waiting_since is None:
                self._waiting_since = now
            due = self._waiting_since + self._linger
            if now < due:  # let a batch gather: each costs the flow a fixed ~1-4 ms
                self._awake = due
                return []
        self._waiting_since = None
        received_ms = time.time_ns() // 1_000_000
        batch: list[DeviceMessage] = []
        acks: list[tuple[int, int]] = []
        pop = self._inbox.popleft
        for _ in range(min(len(self._inbox), self._batch_size)):
            topic, payload, qos, mid = pop()
            batch.append(DeviceMessage(topic, payload, received_ms))
            if qos:
                acks.append((mid, qos))
        # Acknowledge only what is handed to the dataflow in this very return.
        if acks:
            self._client.ack_all(acks)
        if batch:
            self._last_message = time.monotonic()
            self._awake = None
            return [batch]
        if (
            self._idle_stop is not None
            and self._last_message is not None
            and time.monotonic() - self._last_message >= self._idle_stop.total_seconds()
        ):
            raise StopIteration
        self._awake = _now() + timedelta(milliseconds=2)
        return []

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        info = self._client.publish(self._status_topic, b"offline", qos=1, retain=True)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()


class MqttSource(DynamicSource[list[DeviceMessage]]):
    """Subscribe to MQTT topics; emit batches (lists) of ``DeviceMessage``.

    Guarantees: QoS 1 subscriptions on a persistent session (stable client id
    ``{client_id}-{worker}``, ``session_expiry``), so what is published while
    the flow is down waits in the broker. A message is acknowledged to the
    broker only in the poll that hands it to the dataflow, and the broker
    never has more than ``receive_maximum`` unacknowledged messages out, so
    nothing acknowledged is ever dropped by this source. Delivery into the
    dataflow is at most once across a crash of the flow process (a message
    acknowledged but not yet written downstream dies with the process); use
    the ingest bridge and the Kafka source for at least once.

    With several workers each subscribes through an MQTT 5 shared
    subscription (``$share/{client_id}/...``), so each message reaches one
    worker. Each worker publishes ``online`` (retained) on
    ``{status_base}/flows/{client_id}-{worker}/status`` once subscribed, and
    its last will sets ``offline``. Because the client id is stable, a worker
    restarted while its old connection hangs takes that session over: the old
    will can never land after the new ``online``.

    ``idle_stop`` ends the input once no message arrived for that long after
    the first one: windows then flush and the flow exits, which suits demos,
    backfills and tests.

    ``linger`` (default 0: each poll hands over whatever waits) lets a batch
    gather: messages are handed over once ``batch_size`` wait or the first of
    them was seen ``linger`` ago, so a message waits at most about ``linger``
    longer. Every batch costs the steps behind it a fixed amount (the
    monitoring flow: ~3.5 ms of CPU per batch, whatever its size), so at
    40,000 msgs/s batches of 1,000 instead of 200 take a third of the CPU.

    Security: ``tls`` (default: ``MqttTls.from_settings()``) for ``mqtts://``.
    A topic the user may not read is a subscription Mosquitto's ACL file still
    grants (SUBACK success) but never delivers on; a broker that refuses the
    subscription itself (SUBACK 0x87) makes ``build`` raise ``BrokerError``.
    """

    def __init__(
        self,
        url: str,
        topics: list[str],
        *,
        client_id: str = "iotflow",
        status_base: str = "iotflow",
        batch_size: int = 5000,
        receive_maximum: int = 10_000,
        session_expiry: timedelta = timedelta(hours=1),
        idle_stop: timedelta | None = None,
        tls: MqttTls | None = None,
        linger: timedelta = timedelta(0),
    ) -> None:
        MqttUrl.parse(url)  # fail at build time, not in the worker
        if linger < timedelta(0):
            raise ConfigError(f"linger {linger} must not be negative")
        if not client_id:
            raise ConfigError("MqttSource needs a stable client_id (its session and last will)")
        if not topics:
            raise ConfigError("MqttSource needs at least one topic filter")
        if not 0 < receive_maximum <= 65535:
            raise ConfigError(f"receive_maximum {receive_maximum} must be within 1..65535 (MQTT 5)")
        self._url = url
        self._topics = topics
        self._client_id = client_id
        self._status_base = status_base
        self._batch_size = batch_size
        self._receive_maximum = receive_maximum
        self._session_expiry_s = int(session_expiry.total_seconds())
        self._idle_stop = idle_stop
        self._tls = tls
        self._linger = linger

    def status_topic(self, worker_index: int) -> str:
        return f"{self._status_base}/flows/{self._client_id}-{worker_index}/status"

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MqttPartition:
        subs = (
            [f"$share/{self._client_id}/{t}" for t in self._topics]
            if worker_count > 1
            else list(self._topics)
        )
        return _MqttPartition(
            self._url,
            f"{self._client_id}-{worker_index}",
            subs,
            self.status_topic(worker_index),
            self._batch_size,
            self._receive_maximum,
            self._session_expiry_s,
            self._idle_stop,
            self._tls,
            self._linger,
        )


class MqttMessage(msgspec.Struct, frozen=True):
    """A message for ``MqttSink``. ``expiry_s`` becomes the MQTT 5 message expiry."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None


class _MqttSinkPartition(StatelessSinkPartition[MqttMessage]):
    def __init__(self, url: str, client_id: str, tls: MqttTls | None = None) -> None:
        self._client = connect_client(url, client_id, tls=tls)
        self._broker = MqttUrl.parse(url)
        # PUBACK reason codes by message id; paho marks a message published even when
        # the broker's PUBACK says 0x87 Not authorized, so the sink has to look.
        self._refused: dict[int, Any] = {}

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self._refused[mid] = reason

        self._client.on_publish = on_publish

    def write_batch(self, items: list[MqttMessage]) -> None:
        # At least once: a batch counts as written when the broker acknowledged all of it.
        self.confirm(self.publish(items))

    def publish(self, items: list[MqttMessage]) -> list[tuple[mqtt.MQTTMessageInfo, str]]:
        """Hand ``items`` to the client; return the QoS > 0 ones to ``confirm``."""
        for item in items:
            if item.retain and item.topic.endswith("/cmd"):
                msg = f"refusing a retained command on {item.topic!r}: commands are never retained"
                raise PublishRejected(msg)
        pending: list[tuple[mqtt.MQTTMessageInfo, str]] = []
        for item in items:
            props = None
            if item.expiry_s is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.MessageExpiryInterval = item.expiry_s
            info = self._client.publish(item.topic, item.payload, item.qos, item.retain, props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                msg = f"publish to {item.topic!r} failed: {mqtt.error_string(info.rc)}"
                raise PublishRejected(msg)
            if item.qos > 0:
                pending.append((info, item.topic))
        return pending

    def confirm(self, pending: list[tuple[mqtt.MQTTMessageInfo, str]]) -> None:
        """Wait for the broker's acks of ``pending``; PublishRejected for a refused one."""
        for info, topic in pending:
            info.wait_for_publish(30)
            if not info.is_published():
                raise PublishRejected(
                    f"MQTT broker did not acknowledge message {info.mid} within 30s"
                )
            reason = self._refused.pop(info.mid, None)
            if reason is not None:
                who = f"user {self._broker.username!r}" if self._broker.username else "this client"
                msg = (
                    f"MQTT broker {self._broker} refused the message to {topic!r}: {reason} "
                    f"(0x{reason.value:02X}); the broker's ACL must let {who} publish there"
                )
                raise PublishRejected(msg)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class _MqttEpochPartition(StatefulSinkPartition[MqttMessage, None]):
    def __init__(self, inner: _MqttSinkPartition) -> None:
        self._inner = inner
        self._pending: list[tuple[mqtt.MQTTMessageInfo, str]] = []

    def write_batch(self, items: list[MqttMessage]) -> None:
        acked, waiting = [], []
        for entry in self._pending:
            (acked if entry[0].is_published() else waiting).append(entry)
        self._inner.confirm(acked)  # no wait: only raises for a refused message
        self._pending = waiting + self._inner.publish(items)

    def snapshot(self) -> None:
        # the epoch ends: everything it published is acknowledged before Bytewax records it
        self._inner.confirm(self._pending)
        self._pending = []

    def close(self) -> None:
        self.snapshot()
        self._inner.close()


class MqttSink(DynamicSink[MqttMessage]):
    """Publish ``MqttMessage`` items; each batch waits for the broker's acks (QoS 1).

    Refuses at write time a retained message on a ``.../cmd`` topic: a
    retained command replays on every resubscribe. A QoS 1 message the broker
    refuses (MQTT 5 PUBACK reason code such as 0x87 Not authorized, from its
    ACL) raises ``PublishRejected`` naming the topic: never a silent drop.
    ``tls`` defaults to ``MqttTls.from_settings()`` for ``mqtts://``.
    """

    def __init__(
        self, url: str, *, client_id: str = "iotflow-sink", tls: MqttTls | None = None
    ) -> None:
        MqttUrl.parse(url)
        self._url = url
        self._client_id = client_id
        self._tls = tls

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MqttSinkPartition:
        return _MqttSinkPartition(self._url, f"{self._client_id}-{worker_index}", self._tls)


class MqttEpochSink(FixedPartitionedSink[MqttMessage, None]):
    """``MqttSink`` that waits for the broker's acks once per epoch instead of per batch.

    A batch is handed to the client and the worker moves on; at the end of each
    epoch (its snapshot) the sink waits until the broker acknowledged every
    QoS 1 message of the epoch, so a recovery snapshot never runs ahead of the
    broker: at least once, per epoch. A refused message (PUBACK 0x87) raises
    ``PublishRejected`` at the next batch or at the epoch's end. For flows where
    a broker round trip per batch would hold up everything behind it (command
    round trips). Items arrive as ``(key, MqttMessage)`` (any key: one partition).
    """

    def __init__(
        self, url: str, *, client_id: str = "iotflow-sink", tls: MqttTls | None = None
    ) -> None:
        self._sink = MqttSink(url, client_id=client_id, tls=tls)

    def list_parts(self) -> list[str]:
        return ["mqtt"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _MqttEpochPartition:
        return _MqttEpochPartition(self._sink.build(step_id, 0, 1))
