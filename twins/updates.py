"""What reaches a twin: reported values from device messages, desired changes, and rejections.

``UpdateDecoder`` turns raw MQTT device messages (``{base}/devices/{id}/telemetry``
and ``.../state``) into ``Reported`` updates; ``decode_desired`` turns a JSON
desired change (as sent to ``{prefix}.twins.desired``) into a ``DesiredChange``.
Neither raises on bad input: what cannot be decoded becomes a
``TwinRejection`` naming the reason. Values are not checked here; the twin
step checks them against the device's model.

A desired change on the wire::

    {"device_id": "hvac-0001", "desired": {"setpoint": 23.5}, "version": 7,
     "source": "api", "ts": 1767268800000}

``version`` is the twin version the writer based the change on (optimistic
concurrency; ``null`` writes unconditionally), ``source`` names the writer
(default ``api``; ``source_priority`` policies rank it), ``ts`` is epoch
milliseconds or ISO 8601 (default: the receive time). A ``null`` desired
value clears that property's desire.

Example::

    >>> from iotflow.events import DeviceMessage
    >>> dec = UpdateDecoder("iotflow")
    >>> ok, bad = dec.decode([DeviceMessage(
    ...     "iotflow/devices/lock-1/state", b'{"locked": 1}', 1767268800000)])
    >>> ok[0]
    Reported(device_id='lock-1', ts_ms=1767268800000, values={'locked': 1}, source='state', received_ms=1767268800000)
"""

from __future__ import annotations

import math
import sys
from datetime import datetime
from typing import Any

import msgspec

from iotflow.events import DeviceMessage
from iotflow.topics import check_device_id

__all__ = [
    "DESIRED_SOURCE",
    "DesiredChange",
    "Reported",
    "TwinRejection",
    "UpdateDecoder",
    "decode_desired",
    "parse_ts_ms",
]

DESIRED_SOURCE = "twins.desired"
"""The ``source`` of rejections of desired changes (and of dead letters made from them)."""
# Epoch milliseconds before 2000-01-01 are almost always epoch seconds sent by mistake.
_MIN_TS_MS = 946_684_800_000
_MAX_TS_MS = 10**16
_KINDS = ("telemetry", "state")
_KNOWN_TOPICS_MAX = 1_000_000


class Reported(msgspec.Struct, frozen=True, gc=False):
    """Values a device reported at ``ts_ms`` (its clock), from ``source`` (telemetry, state...)."""

    device_id: str
    ts_ms: int
    values: dict[str, Any]
    source: str
    received_ms: int


class DesiredChange(msgspec.Struct, frozen=True, gc=False):
    """A desired change based on twin version ``base_version`` (None: unconditional)."""

    device_id: str
    values: dict[str, Any]
    base_version: int | None
    source: str
    ts_ms: int
    received_ms: int


class TwinRejection(msgspec.Struct, frozen=True):
    """Input a twin did not take, with the reason; the flow makes it a dead letter.

    ``kind`` counts it (``unknown_device``, ``wrong_type``, ``version_conflict``...);
    ``payload`` holds the original bytes when there were any.
    """

    kind: str
    reason: str
    source: str
    received_ms: int
    device_id: str | None = None
    topic: str | None = None
    payload: bytes = b""


class _DesiredIn(msgspec.Struct, forbid_unknown_fields=True):
    device_id: str
    desired: dict[str, Any]
    version: int | None = None
    source: str = "api"
    ts: int | float | str | None = None


_desired_decoder = msgspec.json.Decoder(_DesiredIn)


def parse_ts_ms(raw: object, received_ms: int) -> int | str:
    """Epoch ms from epoch ms or ISO 8601 (None: ``received_ms``), or the reason it is invalid."""
    if raw is None:
        return received_ms
    if isinstance(raw, bool):
        return "ts must be epoch milliseconds or an ISO 8601 string, got a boolean"
    if isinstance(raw, int | float):
        if not math.isfinite(raw) or abs(raw) > _MAX_TS_MS:
            return f"ts {raw!r} is not a plausible epoch milliseconds value"
        ts_ms = int(raw)
    elif isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            return f"ts {raw[:40]!r} is not ISO 8601 nor epoch milliseconds"
        if parsed.tzinfo is None:
            return f"ts {raw[:40]!r} has no UTC offset; add 'Z' or '+00:00'"
        ts_ms = round(parsed.timestamp() * 1000)
    else:
        return f"ts must be epoch milliseconds or an ISO 8601 string, got {type(raw).__name__}"
    if ts_ms < _MIN_TS_MS:
        return f"ts {ts_ms} is before 2000-01-01; send epoch milliseconds, not seconds"
    return ts_ms


class UpdateDecoder:
    """Device messages -> ``Reported`` updates and rejections.

    Accepted topics: ``{base}/devices/{device_id}/telemetry`` (one reading
    object or a list of them) and ``{base}/devices/{device_id}/state`` (one
    object). ``ts`` is taken out of the values; when missing, the receive time
    stands in. Rejected with a reason: payloads over ``max_payload_bytes``,
    invalid JSON, a payload that is not an object (or a list of objects for
    telemetry), an empty reading, a bad ``ts``, another topic, a device id MQTT
    could not carry. A list is judged item by item.
    """

    def __init__(self, base: str = "iotflow", max_payload_bytes: int = 256 * 1024) -> None:
        self.prefix = f"{base}/devices/"
        self.max_payload_bytes = max_payload_bytes
        self._json = msgspec.json.Decoder()
        # accepted topics -> (device id, kind): one lookup per message instead of parsing it.
        # The ids are interned, so the twin step's per-device lookups match them by identity.
        self._topics: dict[str, tuple[str, str]] = {}

    def decode(self, messages: list[DeviceMessage]) -> tuple[list[Reported], list[TwinRejection]]:
        ok: list[Reported] = []
        bad: list[TwinRejection] = []
        topics, max_bytes, decode = self._topics, self.max_payload_bytes, self._json.decode
        for msg in messages:
            known = topics.get(msg.topic)
            if known is None:
                known = self._accept_topic(msg, bad)
                if known is None:
                    continue
            device_id, kind = known
            received_ms = msg.received_ms
            payload = msg.payload
            if len(payload) > max_bytes:
                bad.append(
                    self._reject(
                        msg,
                        device_id,
                        "too_large",
                        f"payload is {len(payload)} bytes; the limit is {max_bytes} (IOTFLOW_MAX_PAYLOAD_BYTES)",
                    )
                )
                continue
            try:
                doc = decode(payload)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                bad.append(self._reject(msg, device_id, "invalid_json", f"invalid JSON: {exc}"))
                continue
            if type(doc) is dict:  # the common case: one reading, its ts a plausible int
                ts = doc.pop("ts", None)
                if type(ts) is int and _MIN_TS_MS <= ts <= _MAX_TS_MS and doc:
                    ok.append(Reported(device_id, ts, doc, kind, received_ms))
                    continue
                doc["ts"] = ts  # judged below, with the reasons
                items: list[Any] = [doc]
            elif type(doc) is list and doc and kind == "telemetry":
                items = doc
            else:
                what = (
                    "a JSON object"
                    if kind == "state"
                    else "a JSON object or a non-empty list of objects"
                )
                bad.append(
                    self._reject(
                        msg,
                        device_id,
                        "not_object",
                        f"{kind} payload must be {what}, got {_kind(doc)}",
                    )
                )
                continue
            for index, item in enumerate(items):
                where = f"item {index}: " if len(items) > 1 or type(doc) is list else ""
                if type(item) is not dict:
                    bad.append(
                        self._reject(
                            msg,
                            device_id,
                            "not_object",
                            f"{where}a reading must be a JSON object, got {_kind(item)}",
                        )
                    )
                    continue
                ts = item.pop("ts", None)
                if type(ts) is not int or ts < _MIN_TS_MS or ts > _MAX_TS_MS:
                    ts = parse_ts_ms(ts, received_ms)
                if type(ts) is str:
                    bad.append(self._reject(msg, device_id, "bad_ts", where + ts))
                    continue
                if not item:
                    bad.append(
                        self._reject(
                            msg, device_id, "empty", f"{where}the {kind} message holds no value"
                        )
                    )
                    continue
                ok.append(Reported(device_id, ts, item, kind, received_ms))  # type: ignore[arg-type]
        return ok, bad

    def _accept_topic(self, msg: DeviceMessage, bad: list[TwinRejection]) -> tuple[str, str] | None:
        """(device id, kind) of a topic seen for the first time, remembered; or None after
        adding its rejection to ``bad``."""
        topic, prefix = msg.topic, self.prefix
        device_id, _, kind = topic[len(prefix) :].rpartition("/")
        if not topic.startswith(prefix) or kind not in _KINDS:
            reason = f"topic {topic[:120]!r} is not {prefix}<device_id>/telemetry or /state"
            bad.append(self._reject(msg, None, "bad_topic", reason))
            return None
        problem = check_device_id(device_id)
        if problem is not None:
            bad.append(self._reject(msg, None, "bad_device_id", problem))
            return None
        if len(self._topics) >= _KNOWN_TOPICS_MAX:
            self._topics.clear()
        known = self._topics[topic] = (sys.intern(device_id), sys.intern(kind))
        return known

    @staticmethod
    def _reject(msg: DeviceMessage, device_id: str | None, kind: str, reason: str) -> TwinRejection:
        return TwinRejection(
            kind, reason, "twins", msg.received_ms, device_id, msg.topic, msg.payload
        )


def decode_desired(payload: bytes, received_ms: int) -> DesiredChange | TwinRejection:
    """A desired change from its JSON form, or the rejection saying what is wrong."""

    def reject(kind: str, reason: str, device_id: str | None = None) -> TwinRejection:
        return TwinRejection(kind, reason, DESIRED_SOURCE, received_ms, device_id, None, payload)

    try:
        doc = _desired_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return reject("invalid_json", f"invalid desired change: {exc}")
    problem = check_device_id(doc.device_id)
    if problem is not None:
        return reject("bad_device_id", problem)
    if not doc.desired:
        return reject("empty", "desired holds no property", doc.device_id)
    ts = parse_ts_ms(doc.ts, received_ms)
    if isinstance(ts, str):
        return reject("bad_ts", ts, doc.device_id)
    return DesiredChange(doc.device_id, doc.desired, doc.version, doc.source, ts, received_ms)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        str: "a string",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)
