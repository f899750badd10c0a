"""The broker core: connections, sessions and routing, in one asyncio event loop.

Everything runs on the loop's thread, so there are no locks. A connection
(``_Connection``, an ``asyncio.Protocol``) parses packets; a session
(``_Session``) outlives its connection for its session expiry and owns the
subscriptions, the queue of messages waiting to be sent and the QoS 1
messages sent but not yet acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from infra.embedded_broker.codec import (
    CONNECT,
    DISCONNECT,
    P_ASSIGNED_CLIENT_ID,
    P_AUTH_METHOD,
    P_MAXIMUM_PACKET_SIZE,
    P_MESSAGE_EXPIRY,
    P_RECEIVE_MAXIMUM,
    P_REQUEST_PROBLEM_INFO,
    P_SESSION_EXPIRY,
    P_SUB_IDS_AVAILABLE,
    P_SUBSCRIPTION_ID,
    P_TOPIC_ALIAS,
    P_WILL_DELAY,
    PINGREQ,
    PINGRESP_PACKET,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Message,
    ProtocolError,
    Reader,
    Reason,
    encode_ack,
    encode_connack,
    encode_disconnect,
    encode_publish,
    encode_suback,
    encode_unsuback,
    prop_byte,
    prop_str,
    prop_u32,
)
from infra.embedded_broker.topics import (
    SubOptions,
    SubscriptionTree,
    filter_matches,
    parse_filter,
    topic_name_error,
)

__all__ = ["BrokerStats", "MqttBroker"]

log = logging.getLogger("infra.embedded_broker")

NEVER_EXPIRES = 0xFFFFFFFF
CONNECT_TIMEOUT_S = 10.0
MAX_GRANTED_QOS = 1
_WRITE_BUFFER_HIGH = 4 * 1024 * 1024
_DROP_LOG_EVERY = 10_000


@dataclass(frozen=True)
class BrokerStats:
    """Counters since the broker started, and the current sizes."""

    received: int
    delivered: int
    dropped_queue_full: int
    dropped_too_large: int
    expired: int
    offline_qos0_skipped: int
    connections: int
    sessions: int
    retained: int
    queued: int


class _Counters:
    __slots__ = (
        "delivered",
        "dropped_queue_full",
        "dropped_too_large",
        "expired",
        "offline_qos0_skipped",
        "received",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class _Will:
    __slots__ = ("delay_s", "expiry_s", "payload", "props", "qos", "retain", "topic", "topic_wire")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        raw = topic.encode()
        self.topic_wire = len(raw).to_bytes(2, "big") + raw
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = b""
        self.expiry_s: int | None = None
        self.delay_s = 0

    def message(self, clock: Callable[[], float]) -> Message:
        expiry_at = clock() + self.expiry_s if self.expiry_s else None
        return Message(
            self.topic, self.topic_wire, self.payload, self.qos, self.retain, self.props, expiry_at
        )


Delivery = tuple[Message, int, bool]  # message, QoS for this subscriber, retain flag


class _Session:
    """What the broker keeps for one client id, connected or not."""

    def __init__(self, client_id: str, broker: MqttBroker) -> None:
        self.client_id = client_id
        self.broker = broker
        self.subscriptions: dict[str, SubOptions] = {}
        self.queue: deque[Delivery] = deque()
        self.inflight: dict[int, Delivery] = {}
        self.incoming_qos2: set[int] = set()
        self.next_packet_id = 1
        self.conn: _Connection | None = None
        self.expiry_s = 0
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.pending_will: _Will | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self.receive_maximum = 65535
        self.max_packet_size = 0
        self.v5 = True
        self.dropped = 0

    def deliver(self, msg: Message, qos: int, retain: bool) -> None:
        """Send now if flow control allows, else queue in order (bounded, drops counted)."""
        conn = self.conn
        if conn is None:
            if qos == 0:
                self.broker.counters.offline_qos0_skipped += 1
                return
        elif (
            not self.queue
            and conn.writable
            and (qos == 0 or len(self.inflight) < self.receive_maximum)
        ):
            self._send(conn, msg, qos, retain)
            return
        if len(self.queue) >= self.broker.max_queued_messages:
            self.dropped += 1
            self.broker.counters.dropped_queue_full += 1
            if self.dropped % _DROP_LOG_EVERY == 1:
                log.warning(
                    "client %r: queue full at %d messages, dropped %d so far "
                    "(raise --max-queued-messages or consume faster)",
                    self.client_id,
                    len(self.queue),
                    self.dropped,
                )
            return
        self.queue.append((msg, qos, retain))

    def drain(self) -> None:
        """Send queued messages while the connection and the receive maximum allow."""
        conn = self.conn
        queue = self.queue
        if conn is None or not queue:
            return
        inflight = self.inflight
        limit = self.receive_maximum
        while queue and conn.writable:
            msg, qos, retain = queue[0]
            if qos and len(inflight) >= limit:
                break
            queue.popleft()
            self._send(conn, msg, qos, retain)

    def _send(self, conn: _Connection, msg: Message, qos: int, retain: bool) -> None:
        broker = self.broker
        if msg.expiry_at is not None and msg.expiry_at <= broker.clock():
            broker.counters.expired += 1
            return
        packet_id = 0
        if qos:
            packet_id = self.next_packet_id
            inflight = self.inflight
            while packet_id in inflight:
                packet_id = packet_id % 65535 + 1
            self.next_packet_id = packet_id % 65535 + 1
        data = encode_publish(msg, qos, retain, packet_id, False, self.v5, broker.clock)
        if self.max_packet_size and len(data) > self.max_packet_size:
            broker.counters.dropped_too_large += 1
            return
        if qos:
            self.inflight[packet_id] = (msg, qos, retain)
        conn.send(data)
        broker.counters.delivered += 1

    def resend_inflight(self, conn: _Connection) -> None:
        """On a resumed session: the unacknowledged messages again, with DUP, in order."""
        clock = self.broker.clock
        for packet_id, (msg, qos, retain) in self.inflight.items():
            conn.send(encode_publish(msg, qos, retain, packet_id, True, self.v5, clock))

    def acked(self, packet_id: int) -> None:
        if self.inflight.pop(packet_id, None) is not None and self.queue:
            self.drain()


class _Connection(asyncio.Protocol):
    """One client network connection: parses packets and writes coalesced replies."""

    def __init__(self, broker: MqttBroker) -> None:
        self.broker = broker
        self.loop = broker.loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.session: _Session | None = None
        self.connected = False
        self.v5 = True
        self.will: _Will | None = None
        self.problem_info = True
        self.keepalive_s = 0
        self.last_rx = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.out: list[bytes] = []
        self.flush_pending = False
        self.writable = True
        self.closed = False
        self.connect_expiry_zero = False
        self.peer = "?"

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=_WRITE_BUFFER_HIGH)
        self.peer = str(transport.get_extra_info("peername"))
        self.broker.connections.add(self)
        self.last_rx = self.loop.time()
        self.timer = self.loop.call_later(CONNECT_TIMEOUT_S, self._check_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.broker.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.broker.detach(self, publish_will=True)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.session is not None:
            self.session.drain()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        buffer = self.buffer
        buffer += data
        size = len(buffer)
        pos = 0
        try:
            while size - pos >= 2:
                length, shift, i, complete = 0, 0, pos + 1, False
                while i < size:
                    byte = buffer[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError(Reason.MALFORMED, "remaining length over 4 bytes")
                if not complete:
                    break
                if length > self.broker.max_packet_size:
                    msg = f"packet of {length} bytes exceeds the maximum {self.broker.max_packet_size}"
                    raise ProtocolError(Reason.PACKET_TOO_LARGE, msg)
                end = i + length
                if end > size:
                    break
                self._dispatch(buffer[pos], bytes(buffer[i:end]))
                pos = end
                if self.closed:
                    return
        except ProtocolError as exc:
            self.close(exc.reason, str(exc))
            return
        except (IndexError, struct.error):
            self.close(Reason.MALFORMED, "packet shorter than its fields")
            return
        if pos:
            del buffer[:pos]

    # --- writing and closing ----------------------------------------------

    def send(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def close(self, reason: int | None = None, why: str = "", *, publish_will: bool = True) -> None:
        """Close from the broker's side (DISCONNECT first for MQTT 5 when ``reason`` is given)."""
        if self.closed:
            return
        if reason is not None:
            log.info("closing %s (client %s): %s", self.peer, self._client_id(), why or reason)
            if self.v5 and self.connected:
                self.send(encode_disconnect(reason, why if self.problem_info else None))
        self._flush()
        self.closed = True
        self.broker.detach(self, publish_will=publish_will)
        if self.transport is not None:
            self.transport.close()

    def _client_id(self) -> str:
        return self.session.client_id if self.session is not None else "-"

    def _check_alive(self) -> None:
        if self.closed:
            return
        if not self.connected:
            self.close(None, "no CONNECT in time")
            return
        limit = self.keepalive_s * 1.5
        idle = self.loop.time() - self.last_rx
        if idle >= limit:
            self.close(Reason.KEEP_ALIVE_TIMEOUT, f"nothing received for {idle:.1f}s")
        else:
            self.timer = self.loop.call_later(limit - idle, self._check_alive)

    # --- packets -----------------------------------------------------------

    def _dispatch(self, first: int, body: bytes) -> None:
        ptype = first >> 4
        flags = first & 0x0F
        session = self.session
        if session is None:
            if ptype != CONNECT or self.connected:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "first packet is not CONNECT")
            self._on_connect(body)
            return
        if ptype == PUBLISH:
            self._on_publish(session, flags, body)
        elif ptype == PUBACK:
            session.acked((body[0] << 8) | body[1] if len(body) >= 2 else 0)
        elif ptype == PINGREQ:
            self.send(PINGRESP_PACKET)
        elif ptype == SUBSCRIBE and flags == 2:
            self._on_subscribe(session, body)
        elif ptype == UNSUBSCRIBE and flags == 2:
            self._on_unsubscribe(session, body)
        elif ptype == PUBREL and flags == 2:
            packet_id = Reader(body).u16()
            session.incoming_qos2.discard(packet_id)
            self.send(encode_ack(PUBCOMP, packet_id))
        elif ptype == DISCONNECT:
            self._on_disconnect(session, body)
        else:
            msg = f"unexpected packet type {ptype} (flags {flags:#x})"
            raise ProtocolError(Reason.PROTOCOL_ERROR, msg)

    def _on_connect(self, body: bytes) -> None:
        r = Reader(body)
        name = r.string()
        level = r.byte()
        if name != "MQTT" or level not in (4, 5):
            # 3.1.1 return code 1 (unacceptable protocol level) is what older clients read.
            v5 = level >= 5
            code = Reason.UNSUPPORTED_VERSION if v5 else 0x01
            self.send(encode_connack(False, code, b"", v5))
            self.close(None, f"protocol {name} level {level} is not supported")
            return
        self.v5 = level == 5
        flags = r.byte()
        if flags & 0x01:
            raise ProtocolError(Reason.MALFORMED, "CONNECT reserved flag is set")
        clean_start = bool(flags & 0x02)
        will_flag = bool(flags & 0x04)
        will_qos = (flags >> 3) & 0x03
        will_retain = bool(flags & 0x20)
        if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise ProtocolError(Reason.MALFORMED, "CONNECT will flags are inconsistent")
        self.keepalive_s = r.u16()
        props: dict[int, Any] = {}
        if self.v5:
            props, _ = r.properties()
        client_id = r.string()
        will = None
        if will_flag:
            will_props: dict[int, Any] = {}
            forward = b""
            if self.v5:
                will_props, forward = r.properties()
            topic = r.string()
            payload = r.binary()
            will = _Will(topic, payload, will_qos, will_retain)
            will.props = forward
            will.expiry_s = will_props.get(P_MESSAGE_EXPIRY) or None
            will.delay_s = will_props.get(P_WILL_DELAY, 0)
        if flags & 0x80:
            r.string()  # user name: accepted, anonymous broker
        if flags & 0x40:
            r.binary()  # password: accepted
        self.problem_info = bool(props.get(P_REQUEST_PROBLEM_INFO, 1))
        receive_maximum = props.get(P_RECEIVE_MAXIMUM, 65535)
        if receive_maximum == 0:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "Receive Maximum 0 is not allowed")
        if P_AUTH_METHOD in props:
            self.send(encode_connack(False, Reason.BAD_AUTH_METHOD, b"", True))
            self.close(None, "extended authentication is not supported")
            return
        if will is not None and (why := topic_name_error(will.topic)):
            if self.v5:
                self.send(encode_connack(False, Reason.TOPIC_NAME_INVALID, b"", True))
            self.close(None, f"will {why}")
            return
        assigned = ""
        if not client_id:
            if not self.v5 and not clean_start:
                # 3.1.1: an empty client id needs a clean session (return code 2).
                self.send(encode_connack(False, 0x02, b"", False))
                self.close(None, "empty client id without clean session")
                return
            client_id = assigned = f"auto-{uuid.uuid4().hex}"
        if self.v5:
            expiry_s = props.get(P_SESSION_EXPIRY, 0)
        else:
            expiry_s = 0 if clean_start else NEVER_EXPIRES
        self.connect_expiry_zero = expiry_s == 0
        self.will = will
        session, present = self.broker.attach(self, client_id, clean_start)
        self.session = session
        self.connected = True
        session.expiry_s = expiry_s
        session.receive_maximum = receive_maximum
        session.max_packet_size = props.get(P_MAXIMUM_PACKET_SIZE, 0)
        session.v5 = self.v5
        ack_props = b""
        if self.v5:
            ack_props = prop_u32(P_MAXIMUM_PACKET_SIZE, self.broker.max_packet_size)
            ack_props += prop_byte(P_SUB_IDS_AVAILABLE, 0)
            if assigned:
                ack_props += prop_str(P_ASSIGNED_CLIENT_ID, assigned)
        self.send(encode_connack(present, 0, ack_props, self.v5))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.keepalive_s:
            self.timer = self.loop.call_later(self.keepalive_s * 1.5, self._check_alive)
        if present:
            session.resend_inflight(self)
            session.drain()

    def _on_publish(self, session: _Session, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise ProtocolError(Reason.MALFORMED, "PUBLISH with QoS 3")
        n = (body[0] << 8) | body[1]
        end = 2 + n
        try:
            topic = body[2:end].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(Reason.MALFORMED, "topic name is not UTF-8") from exc
        r = Reader(body, end)
        packet_id = r.u16() if qos else 0
        props = b""
        expiry_at = None
        if self.v5:
            if body[r.pos] == 0:  # the common case: no properties
                r.pos += 1
            else:
                values, props = r.properties()
                if P_TOPIC_ALIAS in values:
                    msg = "topic aliases are not supported (Topic Alias Maximum is 0)"
                    raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, msg)
                if P_SUBSCRIPTION_ID in values:
                    msg = "a client must not send a Subscription Identifier in PUBLISH"
                    raise ProtocolError(Reason.PROTOCOL_ERROR, msg)
                if values.get(P_MESSAGE_EXPIRY):
                    expiry_at = self.broker.clock() + values[P_MESSAGE_EXPIRY]
        if "+" in topic or "#" in topic or "\x00" in topic or not topic:
            why = topic_name_error(topic) or "topic name contains U+0000"
            raise ProtocolError(Reason.TOPIC_NAME_INVALID, why)
        if qos and packet_id == 0:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "PUBLISH QoS > 0 with packet id 0")
        if qos == 2:
            if packet_id in session.incoming_qos2:  # a resend: already routed once
                self.send(encode_ack(PUBREC, packet_id))
                return
            session.incoming_qos2.add(packet_id)
        msg = Message(topic, body[:end], body[r.pos :], qos, bool(flags & 1), props, expiry_at)
        self.broker.publish(msg, session.client_id)
        if qos == 1:
            self.send(encode_ack(PUBACK, packet_id))
        elif qos == 2:
            self.send(encode_ack(PUBREC, packet_id))

    def _on_subscribe(self, session: _Session, body: bytes) -> None:
        r = Reader(body)
        packet_id = r.u16()
        if self.v5:
            props, _ = r.properties()
            if P_SUBSCRIPTION_ID in props:
                msg = "subscription identifiers are not supported"
                raise ProtocolError(Reason.SUB_IDS_NOT_SUPPORTED, msg)
        requests = []
        while r.remaining():
            text = r.string()
            options = r.byte()
            if options & 0xC0 or (options & 0x03) == 3 or (options >> 4) & 0x03 == 3:
                raise ProtocolError(Reason.MALFORMED, f"bad subscription options {options:#x}")
            if not self.v5 and options & 0xFC:
                raise ProtocolError(Reason.MALFORMED, "3.1.1 subscription options are QoS only")
            requests.append((text, options))
        if not requests:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        codes = []
        retained_for = []
        for text, options in requests:
            try:
                group, flt = parse_filter(text)
            except ValueError as exc:
                log.info("client %s: %s", session.client_id, exc)
                codes.append(Reason.TOPIC_FILTER_INVALID if self.v5 else 0x80)
                continue
            opts = SubOptions(
                min(options & 0x03, MAX_GRANTED_QOS),
                bool(options & 0x04),
                bool(options & 0x08),
                (options >> 4) & 0x03,
            )
            if group is not None and opts.no_local:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "No Local on a shared subscription")
            existed = self.broker.tree.add(group, flt, session.client_id, opts)
            session.subscriptions[text] = opts
            codes.append(opts.qos)
            if group is None and (
                opts.retain_handling == 0 or (opts.retain_handling == 1 and not existed)
            ):
                retained_for.append((flt, opts))
        self.send(encode_suback(packet_id, codes, self.v5))
        for flt, opts in retained_for:
            self.broker.send_retained(session, flt, opts)

    def _on_unsubscribe(self, session: _Session, body: bytes) -> None:
        r = Reader(body)
        packet_id = r.u16()
        if self.v5:
            r.properties()
        codes = []
        while r.remaining():
            text = r.string()
            if session.subscriptions.pop(text, None) is None:
                codes.append(Reason.NO_SUBSCRIPTION_EXISTED)
                continue
            group, flt = parse_filter(text)
            self.broker.tree.remove(group, flt, session.client_id)
            codes.append(Reason.SUCCESS)
        if not codes:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        self.send(encode_unsuback(packet_id, codes, self.v5))

    def _on_disconnect(self, session: _Session, body: bytes) -> None:
        reason = Reason.SUCCESS
        if self.v5 and body:
            r = Reader(body)
            reason = r.byte()
            if r.remaining():
                props, _ = r.properties()
                expiry = props.get(P_SESSION_EXPIRY)
                if expiry is not None:
                    if self.connect_expiry_zero and expiry:
                        msg = "session expiry set in DISCONNECT after 0 in CONNECT"
                        raise ProtocolError(Reason.PROTOCOL_ERROR, msg)
                    session.expiry_s = expiry
        self.close(publish_will=reason == Reason.DISCONNECT_WITH_WILL)


class MqttBroker:
    """An MQTT 5.0 (and 3.1.1) broker on the running asyncio loop.

    ``clock`` (seconds, monotonic) times message expiry; keepalive, session
    expiry and will delay run on the loop's own timers.
    """

    def __init__(
        self,
        *,
        max_queued_messages: int = 1_000_000,
        max_packet_size: int = 2 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queued_messages < 1:
            msg = f"max_queued_messages {max_queued_messages} must be at least 1"
            raise ValueError(msg)
        self.max_queued_messages = max_queued_messages
        self.max_packet_size = max_packet_size
        self.clock = clock
        self.counters = _Counters()
        self.tree = SubscriptionTree()
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, Message] = {}
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 1883) -> int:
        """Listen on host:port (0 picks a free port); return the port."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and disconnect every client (0x8B, no wills)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close(Reason.SERVER_SHUTTING_DOWN, "server shutting down", publish_will=False)
        for session in self.sessions.values():
            for timer in (session.expiry_timer, session.will_timer):
                if timer is not None:
                    timer.cancel()
        await asyncio.sleep(0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def stats(self) -> BrokerStats:
        c = self.counters
        return BrokerStats(
            received=c.received,
            delivered=c.delivered,
            dropped_queue_full=c.dropped_queue_full,
            dropped_too_large=c.dropped_too_large,
            expired=c.expired,
            offline_qos0_skipped=c.offline_qos0_skipped,
            connections=len(self.connections),
            sessions=len(self.sessions),
            retained=len(self.retained),
            queued=sum(len(s.queue) for s in list(self.sessions.values())),
        )

    # --- sessions -----------------------------------------------------------

    def attach(self, conn: _Connection, client_id: str, clean_start: bool) -> tuple[_Session, bool]:
        """Bind a new connection to its session; return it and whether it was resumed."""
        session = self.sessions.get(client_id)
        if session is not None and session.conn is not None:
            old = session.conn
            log.info("client %r taken over by %s", client_id, conn.peer)
            old.close(Reason.SESSION_TAKEN_OVER, "another connection used this client id")
            session = self.sessions.get(client_id)
        if session is not None and clean_start:
            self.end_session(session)
            session = None
        present = session is not None
        if session is None:
            session = self.sessions[client_id] = _Session(client_id, self)
        else:
            for timer in (session.expiry_timer, session.will_timer):
                if timer is not None:
                    timer.cancel()
            session.expiry_timer = session.will_timer = None
            session.pending_will = None  # reconnected within the will delay: no will
        session.conn = conn
        return session, present

    def detach(self, conn: _Connection, *, publish_will: bool) -> None:
        """The connection is gone: publish or schedule its will, start the session expiry."""
        session = conn.session
        will = conn.will
        conn.session = None
        conn.will = None
        if session is None or session.conn is not conn:
            return
        session.conn = None
        if will is not None and publish_will:
            if will.delay_s and session.expiry_s:
                session.pending_will = will
                delay = min(will.delay_s, session.expiry_s)
                session.will_timer = self.loop.call_later(delay, self._fire_will, session)
            else:
                self.publish(will.message(self.clock), session.client_id)
        if session.expiry_s == 0:
            self.end_session(session)
        elif session.expiry_s != NEVER_EXPIRES:
            session.expiry_timer = self.loop.call_later(session.expiry_s, self.end_session, session)

    def _fire_will(self, session: _Session) -> None:
        will, session.pending_will = session.pending_will, None
        session.will_timer = None
        if will is not None:
            self.publish(will.message(self.clock), session.client_id)

    def end_session(self, session: _Session) -> None:
        """Forget a session: its subscriptions, queue and in-flight messages."""
        for timer in (session.expiry_timer, session.will_timer):
            if timer is not None:
                timer.cancel()
        if session.pending_will is not None:
            self._fire_will(session)
        for text in session.subscriptions:
            group, flt = parse_filter(text)
            self.tree.remove(group, flt, session.client_id)
        session.subscriptions.clear()
        session.queue.clear()
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    # --- routing --------------------------------------------------------------

    def publish(self, msg: Message, sender: str) -> None:
        """Store a retained message and deliver msg to every matching subscription."""
        self.counters.received += 1
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        subs, groups = self.tree.match(msg.topic)
        sessions = self.sessions
        if len(subs) == 1 and not groups:
            client_id, opts = subs[0]
            if not (opts.no_local and client_id == sender):
                sessions[client_id].deliver(
                    msg, min(msg.qos, opts.qos), msg.retain and opts.retain_as_published
                )
            return
        # One copy per client: the highest QoS of its matching subscriptions.
        targets: dict[str, tuple[int, bool]] = {}
        picks = [group.pick(self._online) for group in groups]
        for client_id, opts in itertools.chain(subs, picks):
            if opts.no_local and client_id == sender:
                continue
            qos, rap = targets.get(client_id, (0, False))
            targets[client_id] = (max(qos, opts.qos), rap or opts.retain_as_published)
        for client_id, (qos, rap) in targets.items():
            sessions[client_id].deliver(msg, min(msg.qos, qos), msg.retain and rap)

    def _online(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        return session is not None and session.conn is not None

    def send_retained(self, session: _Session, flt: str, opts: SubOptions) -> None:
        """Retained messages matching a new subscription, with the retain flag set."""
        now = self.clock()
        for topic, msg in list(self.retained.items()):
            if msg.expiry_at is not None and msg.expiry_at <= now:
                del self.retained[topic]
                continue
            if filter_matches(flt, topic):
                session.deliver(msg, min(msg.qos, opts.qos), True)
