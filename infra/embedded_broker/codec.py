"""MQTT 5.0 and 3.1.1 wire format: what the embedded broker reads and writes.

Decoding raises ``ProtocolError(reason, message)`` on malformed input; the
reason is the MQTT 5 reason code the connection is closed with.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

__all__ = [
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "Message",
    "ProtocolError",
    "Reader",
    "Reason",
    "encode_connack",
    "encode_disconnect",
    "encode_publish",
    "encode_suback",
    "encode_unsuback",
    "encode_varint",
    "prop_byte",
    "prop_str",
    "prop_u32",
]

# Packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)


class Reason:
    """The MQTT 5 reason codes the broker sends."""

    SUCCESS = 0x00
    DISCONNECT_WITH_WILL = 0x04
    NO_SUBSCRIPTION_EXISTED = 0x11
    UNSPECIFIED = 0x80
    MALFORMED = 0x81
    PROTOCOL_ERROR = 0x82
    UNSUPPORTED_VERSION = 0x84
    CLIENT_ID_INVALID = 0x85
    BAD_AUTH_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    SERVER_SHUTTING_DOWN = 0x8B
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    SUB_IDS_NOT_SUPPORTED = 0xA1


class ProtocolError(Exception):
    """A client broke the protocol; ``reason`` is the MQTT 5 code to disconnect with."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Property identifiers used by name below.
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_AUTH_METHOD = 0x15
P_REQUEST_PROBLEM_INFO = 0x17
P_WILL_DELAY = 0x18
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS = 0x23
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27
P_SUB_IDS_AVAILABLE = 0x29

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTY_KIND = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _U32, 0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
# What a PUBLISH (or a will) carries on to subscribers unchanged.
_FORWARDED = frozenset({0x01, 0x03, 0x08, 0x09, 0x26})

_U16_STRUCT = struct.Struct(">H")
_U32_STRUCT = struct.Struct(">I")


def encode_varint(value: int) -> bytes:
    """The MQTT variable byte integer for 0 <= value < 2**28."""
    if value < 128:
        return bytes((value,))
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Reader:
    """Reads the fields of one packet body; every overrun is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def _need(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.data):
            raise ProtocolError(Reason.MALFORMED, "packet shorter than its fields")
        self.pos = start + n
        return start

    def byte(self) -> int:
        return self.data[self._need(1)]

    def u16(self) -> int:
        return _U16_STRUCT.unpack_from(self.data, self._need(2))[0]

    def u32(self) -> int:
        return _U32_STRUCT.unpack_from(self.data, self._need(4))[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 21:
                raise ProtocolError(Reason.MALFORMED, "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        n = self.u16()
        start = self._need(n)
        return bytes(self.data[start : start + n])

    def string(self) -> str:
        try:
            text = self.binary().decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(Reason.MALFORMED, f"string is not UTF-8: {exc}") from exc
        if "\x00" in text:
            raise ProtocolError(Reason.MALFORMED, "string contains U+0000")
        return text

    def rest(self) -> bytes:
        data = bytes(self.data[self.pos :])
        self.pos = len(self.data)
        return data

    def properties(self) -> tuple[dict[int, Any], bytes]:
        """The property block: values by identifier, and the forwardable ones as raw bytes.

        A repeated property other than User Property is a protocol error.
        """
        end = self.varint()
        end += self.pos
        if end > len(self.data):
            raise ProtocolError(Reason.MALFORMED, "property length past the end of the packet")
        values: dict[int, Any] = {}
        forward: list[bytes] = []
        while self.pos < end:
            start = self.pos
            ident = self.varint()
            kind = _PROPERTY_KIND.get(ident)
            if kind is None:
                raise ProtocolError(Reason.MALFORMED, f"unknown property identifier {ident:#x}")
            value: Any
            if kind == _BYTE:
                value = self.byte()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _STR:
                value = self.string()
            elif kind == _BIN:
                value = self.binary()
            else:
                value = (self.string(), self.string())
            if ident == P_USER_PROPERTY:
                values.setdefault(ident, []).append(value)
            elif ident in values:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"property {ident:#x} appears twice")
            else:
                values[ident] = value
            if ident in _FORWARDED:
                forward.append(bytes(self.data[start : self.pos]))
        if self.pos != end:
            raise ProtocolError(Reason.MALFORMED, "a property runs past its block")
        return values, b"".join(forward)


class Message:
    """An application message as the broker keeps it.

    ``topic_wire`` is the topic as encoded on the wire (length prefix included),
    ``props`` the MQTT 5 properties forwarded to subscribers (without the expiry,
    which is re-encoded with the time left), ``expiry_at`` a ``clock()`` deadline.
    """

    __slots__ = ("expiry_at", "payload", "props", "qos", "retain", "topic", "topic_wire")

    def __init__(
        self,
        topic: str,
        topic_wire: bytes,
        payload: bytes,
        qos: int,
        retain: bool,
        props: bytes = b"",
        expiry_at: float | None = None,
    ) -> None:
        self.topic = topic
        self.topic_wire = topic_wire
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.expiry_at = expiry_at


def encode_publish(
    msg: Message,
    qos: int,
    retain: bool,
    packet_id: int,
    dup: bool,
    v5: bool,
    clock: Callable[[], float],
) -> bytes:
    """A PUBLISH for one subscriber; the expiry says what is left of it (at least 1 s)."""
    first = 0x30 | (dup << 3) | (qos << 1) | retain
    if v5:
        props = msg.props
        if msg.expiry_at is not None:
            left = max(1, math.ceil(msg.expiry_at - clock()))
            props += b"\x02" + _U32_STRUCT.pack(min(left, 0xFFFFFFFF))
        props = encode_varint(len(props)) + props
    else:
        props = b""
    head = msg.topic_wire + _U16_STRUCT.pack(packet_id) if qos else msg.topic_wire
    size = len(head) + len(props) + len(msg.payload)
    return b"".join((bytes((first,)), encode_varint(size), head, props, msg.payload))


def prop_byte(ident: int, value: int) -> bytes:
    return bytes((ident, value))


def prop_u32(ident: int, value: int) -> bytes:
    return bytes((ident,)) + _U32_STRUCT.pack(value)


def prop_str(ident: int, value: str) -> bytes:
    raw = value.encode()
    return bytes((ident,)) + _U16_STRUCT.pack(len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode_connack(session_present: bool, reason: int, props: bytes, v5: bool) -> bytes:
    """CONNACK; for 3.1.1 ``reason`` must already be a 3.1.1 return code."""
    body = bytes((int(session_present), reason))
    if v5:
        body += encode_varint(len(props)) + props
    return _packet(CONNACK << 4, body)


def encode_suback(packet_id: int, codes: list[int], v5: bool) -> bytes:
    props = b"\x00" if v5 else b""
    return _packet(SUBACK << 4, _U16_STRUCT.pack(packet_id) + props + bytes(codes))


def encode_unsuback(packet_id: int, codes: list[int], v5: bool) -> bytes:
    body = _U16_STRUCT.pack(packet_id)
    if v5:
        body += b"\x00" + bytes(codes)
    return _packet(UNSUBACK << 4, body)


def encode_disconnect(reason: int, reason_string: str | None) -> bytes:
    """An MQTT 5 DISCONNECT (3.1.1 has no server-sent DISCONNECT)."""
    props = prop_str(P_REASON_STRING, reason_string[:200]) if reason_string else b""
    return _packet(DISCONNECT << 4, bytes((reason,)) + encode_varint(len(props)) + props)


def encode_ack(ptype: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC or PUBCOMP with success (the short form)."""
    return bytes((ptype << 4, 2)) + _U16_STRUCT.pack(packet_id)


PINGRESP_PACKET = bytes((PINGRESP << 4, 0))
