"""Decode raw device messages into readings; everything else becomes a dead letter.

Guarantees: each input message yields readings or dead letters, never an
exception; a list payload is judged element by element, so one bad reading
never takes its valid neighbours down with it; every rejection names what
was wrong and where.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from connectors.mapping import FieldPath, SourceMapping, is_missing
from iotflow.events import DeadLetter, DeviceMessage, Reading
from iotflow.topics import check_device_id

__all__ = ["DEADLETTER_KEEP_BYTES", "DecodeOut", "TelemetryDecoder", "dead_letter"]

DEADLETTER_KEEP_BYTES = 4096
# Epoch milliseconds before 2000-01-01 are almost always epoch seconds sent by mistake.
_MIN_TS_MS = 946_684_800_000


@dataclass
class DecodeOut:
    """What one batch decoded to: readings and dead letters."""

    ok: list[Reading] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


def dead_letter(
    source: str, reason: str, payload: bytes, received_ms: int, topic: str | None = None
) -> DeadLetter:
    """A dead letter keeping the original bytes (their first 4 KiB when larger)."""
    kept = payload[:DEADLETTER_KEEP_BYTES]
    try:
        text, encoding = kept.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        if len(payload) > len(kept) and exc.end == len(kept) and exc.start >= len(kept) - 3:
            # The cut fell inside a multi-byte character: keep whole characters only.
            kept = kept[: exc.start]
        try:
            text, encoding = kept.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    return DeadLetter(
        source=source,
        reason=reason,
        payload=text,
        payload_encoding=encoding,
        payload_bytes=len(payload),
        truncated=len(payload) > len(kept),
        received_ms=received_ms,
        topic=topic,
    )


class _Rejected(Exception):
    """One reading is invalid; the message is the reason."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class TelemetryDecoder:
    """Turns device messages into readings following a ``SourceMapping``.

    Rejected, each with its reason: payloads over ``max_payload_bytes``,
    invalid JSON, a payload that is not an object or a list of objects, a
    missing or malformed device id, a timestamp that is not epoch ms or ISO
    8601, before 2000 (likely seconds) or more than ``max_future_skew_ms``
    ahead of the receive time, a non-finite metric, a declared metric that
    is missing or not a number, a reading without any metric. A reading
    without ``ts`` takes its receive time. Non-numeric fields of the flat
    layout (strings, booleans, objects) are attributes, not metrics: ignored.

    Example::

        >>> d = TelemetryDecoder()
        >>> msg = DeviceMessage(
        ...     "iotflow/devices/t1/telemetry",
        ...     b'{"ts": 1767268800000, "temp": 21.5}',
        ...     1767268800100,
        ... )
        >>> out = d.decode([msg])
        >>> out.ok[0]
        Reading(device_id='t1', ts_ms=1767268800000, metrics={'temp': 21.5})
    """

    def __init__(
        self,
        mapping: SourceMapping | None = None,
        *,
        max_payload_bytes: int = 256 * 1024,
        max_future_skew_ms: int = 300_000,
        source: str = "mqtt",
    ) -> None:
        self.mapping = mapping or SourceMapping()
        self._device_path: FieldPath = self.mapping.device_path
        self._ts_path: FieldPath = self.mapping.ts_path
        self._metric_paths = self.mapping.metric_paths
        flat_ts = self._ts_path.source == "payload" and len(self._ts_path.steps) == 1
        self._ts_field = self._ts_path.steps[0] if flat_ts else None
        self.max_payload_bytes = max_payload_bytes
        self.max_future_skew_ms = max_future_skew_ms
        self.source = source
        self._json = msgspec.json.Decoder()

    def decode(self, messages: list[DeviceMessage]) -> DecodeOut:
        out = DecodeOut()
        for msg in messages:
            self._decode_one(msg, out)
        return out

    def _decode_one(self, msg: DeviceMessage, out: DecodeOut) -> None:
        def reject(reason: str) -> None:
            out.dead.append(
                dead_letter(self.source, reason, msg.payload, msg.received_ms, msg.topic)
            )

        if len(msg.payload) > self.max_payload_bytes:
            reject(
                f"payload is {len(msg.payload)} bytes; the limit is {self.max_payload_bytes}"
                " (IOTFLOW_MAX_PAYLOAD_BYTES)"
            )
            return
        try:
            doc = self._json.decode(msg.payload)
        except msgspec.DecodeError as exc:
            reject(f"invalid JSON: {exc}")
            return
        except UnicodeDecodeError as exc:
            reject(f"payload is not valid UTF-8: {exc.reason} at byte {exc.start}")
            return
        except RecursionError:
            reject("invalid JSON: nested too deeply")
            return
        levels = msg.topic.split("/")
        if isinstance(doc, dict):
            items = [doc]
        elif isinstance(doc, list) and doc:
            items = doc
        else:
            reject(
                f"payload must be a JSON object or a non-empty list of objects, got {_kind(doc)}"
            )
            return
        for index, item in enumerate(items):
            where = "" if len(items) == 1 and isinstance(doc, dict) else f"item {index}: "
            try:
                out.ok.append(self._reading(levels, item, msg.received_ms))
            except _Rejected as exc:
                payload = msg.payload
                if where:
                    try:
                        payload = msgspec.json.encode(item)
                    except (RecursionError, msgspec.EncodeError, OverflowError):
                        payload = msg.payload
                out.dead.append(
                    dead_letter(self.source, where + str(exc), payload, msg.received_ms, msg.topic)
                )

    def _reading(self, levels: list[str], item: Any, received_ms: int) -> Reading:
        if not isinstance(item, dict):
            raise _Rejected(f"a reading must be a JSON object, got {_kind(item)}")
        device_id = self._device_path.get(levels, item)
        if is_missing(device_id):
            raise _Rejected(f"no device id at {self._device_path.text}")
        if not isinstance(device_id, str):
            raise _Rejected(
                f"device id must be a string, got {_kind(device_id)}"
                f" (from {self._device_path.text})"
            )
        problem = check_device_id(device_id)
        if problem:
            raise _Rejected(f"{problem} (from {self._device_path.text})")
        ts_ms = self._timestamp(levels, item, received_ms)
        metrics: dict[str, float] = {}
        if self._metric_paths:
            for name, path in self._metric_paths.items():
                value = path.get(levels, item)
                if is_missing(value):
                    raise _Rejected(f"metric {name!r}: nothing at {path.text}")
                metrics[name] = self._metric(name, value)
        else:
            for name, value in item.items():
                if name == self._ts_field or not _is_number(value):
                    continue
                metrics[name] = self._metric(name, value)
        if not metrics:
            raise _Rejected("no numeric metric in the reading")
        return Reading(device_id, ts_ms, metrics)

    @staticmethod
    def _metric(name: str, value: Any) -> float:
        if not _is_number(value):
            raise _Rejected(f"metric {name!r} must be a number, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise _Rejected(
                f"metric {name!r} is too large for a float (~1e{_magnitude(value)})"
            ) from None
        if not math.isfinite(number):
            raise _Rejected(f"metric {name!r} is not finite ({number})")
        return number

    def _timestamp(self, levels: list[str], item: dict[str, Any], received_ms: int) -> int:
        raw = self._ts_path.get(levels, item)
        if is_missing(raw) or raw is None:
            return received_ms
        if _is_number(raw):
            if isinstance(raw, float) and not math.isfinite(raw):
                raise _Rejected(f"ts is not finite ({raw})")
            ts_ms = int(raw)
        elif isinstance(raw, str):
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                if raw.isdecimal():
                    hint = "send epoch milliseconds as a JSON number, not a string"
                    raise _Rejected(f"ts {raw[:40]!r} is a string of digits; {hint}") from None
                raise _Rejected(f"ts {raw[:40]!r} is not ISO 8601 nor epoch milliseconds") from None
            if parsed.tzinfo is None:
                raise _Rejected(f"ts {raw[:40]!r} has no UTC offset; add 'Z' or '+00:00'")
            ts_ms = round(parsed.timestamp() * 1000)
        else:
            raise _Rejected(
                f"ts must be epoch milliseconds or an ISO 8601 string, got {_kind(raw)}"
            )
        if ts_ms < _MIN_TS_MS:
            raise _Rejected(
                f"ts {_show(ts_ms)} is before 2000-01-01; send epoch milliseconds, not seconds"
            )
        if ts_ms - received_ms > self.max_future_skew_ms:
            ahead_s = (ts_ms - received_ms) // 1000
            raise _Rejected(
                f"ts {_show(ts_ms)} is {_show(ahead_s)}s in the future; the limit is "
                f"{self.max_future_skew_ms / 1000:.0f}s (IOTFLOW_MAX_FUTURE_SKEW_S)"
            )
        return ts_ms


def _magnitude(number: int) -> int:
    return int(math.log10(abs(number))) if number else 0


def _show(number: int) -> str:
    """An integer for a message: its digits, or its order of magnitude when absurdly large."""
    if abs(number) < 10**16:
        return str(number)
    return f"{'-' if number < 0 else ''}~1e{_magnitude(number)}"


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
