"""The telemetry decoder: readings out, every rejection a dead letter naming its problem."""

from __future__ import annotations

import base64
import doctest
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connectors.decode
from connectors.decode import DEADLETTER_KEEP_BYTES, DecodeOut, TelemetryDecoder, dead_letter
from connectors.mapping import SourceMapping
from iotflow.events import DeadLetter, DeviceMessage, Reading, to_ms

RECEIVED_MS = 1_767_268_800_000  # 2026-01-01T12:00:00Z
TOPIC = "iotflow/devices/t1/telemetry"
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
SKEW_MS = 300_000


def decode(
    payload: bytes | str | Any,
    topic: str = TOPIC,
    mapping: dict[str, Any] | None = None,
    **options: Any,
) -> DecodeOut:
    """Decode one message; str is UTF-8 encoded, other non-bytes are JSON-encoded."""
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    decoder = TelemetryDecoder(
        SourceMapping.model_validate(mapping) if mapping is not None else None, **options
    )
    return decoder.decode([DeviceMessage(topic, payload, RECEIVED_MS)])


def one_reading(out: DecodeOut) -> Reading:
    assert out.dead == [], [d.reason for d in out.dead]
    assert len(out.ok) == 1
    return out.ok[0]


def one_dead(out: DecodeOut) -> DeadLetter:
    assert out.ok == []
    assert len(out.dead) == 1, [d.reason for d in out.dead]
    return out.dead[0]


def original_bytes(dead: DeadLetter) -> bytes:
    if dead.payload_encoding == "base64":
        return base64.b64decode(dead.payload)
    assert dead.payload_encoding == "utf-8"
    return dead.payload.encode()


def test_docstring_examples_run() -> None:
    result = doctest.testmod(connectors.decode)
    assert result.failed == 0
    assert result.attempted > 0


# --- valid payloads --------------------------------------------------------


def test_flat_payload() -> None:
    reading = one_reading(decode({"ts": 1_767_268_790_000, "temperature": 22.5, "humidity": 45}))
    assert reading == Reading("t1", 1_767_268_790_000, {"temperature": 22.5, "humidity": 45.0})
    assert all(type(v) is float for v in reading.metrics.values())


def test_negative_and_zero_metrics_are_metrics() -> None:
    reading = one_reading(decode({"a": 0, "b": -3.25, "c": 0.0}))
    assert reading.metrics == {"a": 0.0, "b": -3.25, "c": 0.0}


def test_list_payload_is_a_batch_in_order() -> None:
    out = decode(
        [
            {"ts": 1_767_268_700_000, "temperature": 21.0},
            {"ts": 1_767_268_760_000, "temperature": 21.5},
        ]
    )
    assert out.dead == []
    assert out.ok == [
        Reading("t1", 1_767_268_700_000, {"temperature": 21.0}),
        Reading("t1", 1_767_268_760_000, {"temperature": 21.5}),
    ]


def test_several_messages_in_one_batch() -> None:
    decoder = TelemetryDecoder()
    out = decoder.decode(
        [
            DeviceMessage("iotflow/devices/a/telemetry", b'{"x": 1}', RECEIVED_MS),
            DeviceMessage("iotflow/devices/b/telemetry", b"not json", RECEIVED_MS + 1),
            DeviceMessage("iotflow/devices/c/telemetry", b'[{"x": 2}, {"x": 3}]', RECEIVED_MS + 2),
        ]
    )
    assert [(r.device_id, r.ts_ms, r.metrics["x"]) for r in out.ok] == [
        ("a", RECEIVED_MS, 1.0),
        ("c", RECEIVED_MS + 2, 2.0),
        ("c", RECEIVED_MS + 2, 3.0),
    ]
    assert len(out.dead) == 1
    assert out.dead[0].topic == "iotflow/devices/b/telemetry"
    assert out.dead[0].received_ms == RECEIVED_MS + 1


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-01-01T12:00:00Z", RECEIVED_MS),
        ("2026-01-01T12:00:00+00:00", RECEIVED_MS),
        ("2026-01-01T14:00:00+02:00", RECEIVED_MS),
        ("2026-01-01T06:30:00-05:30", RECEIVED_MS),
        ("2026-01-01T11:59:59.250Z", RECEIVED_MS - 750),
        ("2026-01-01T11:59:59.123456+00:00", RECEIVED_MS - 877),
    ],
)
def test_iso_8601_ts_with_offset(ts: str, expected: int) -> None:
    assert one_reading(decode({"ts": ts, "t": 1})).ts_ms == expected


@pytest.mark.parametrize("payload", [{"t": 1}, {"ts": None, "t": 1}])
def test_missing_ts_takes_receive_time(payload: dict[str, Any]) -> None:
    assert one_reading(decode(payload)).ts_ms == RECEIVED_MS


def test_fractional_epoch_ms_is_accepted() -> None:
    assert one_reading(decode({"ts": 1_767_268_799_000.75, "t": 1})).ts_ms == 1_767_268_799_000


def test_old_ts_is_the_windowing_steps_business_not_the_decoders() -> None:
    assert one_reading(decode({"ts": MIN_TS_MS, "t": 1})).ts_ms == MIN_TS_MS


def test_ts_exactly_at_the_skew_limit_is_accepted() -> None:
    ts = RECEIVED_MS + SKEW_MS
    assert one_reading(decode({"ts": ts, "t": 1})).ts_ms == ts
    dead = one_dead(decode({"ts": ts + 1, "t": 1}))
    assert "in the future" in dead.reason


def test_attributes_are_ignored() -> None:
    payload = {
        "ts": RECEIVED_MS,
        "temperature": 20.5,
        "name": "kitchen",
        "online": True,
        "alarm": False,
        "config": {"interval": 30, "unit": "C"},
        "history": [1, 2, 3],
        "note": None,
    }
    assert one_reading(decode(payload)).metrics == {"temperature": 20.5}


def test_huge_integer_metric_is_a_float() -> None:
    reading = one_reading(decode(b'{"t": 100000000000000000000000000000}'))
    assert reading.metrics == {"t": 1e29}


# --- source mappings -------------------------------------------------------


def test_zigbee2mqtt_mapping() -> None:
    out = decode(
        {"temperature": 21.3, "humidity": 40, "linkquality": 120, "update": {"state": "idle"}},
        topic="zigbee2mqtt/living_room",
        mapping={"device_id": "topic[1]", "temperature": "payload.temperature"},
    )
    # Declared metrics only: humidity and linkquality are not asked for.
    assert one_reading(out) == Reading("living_room", RECEIVED_MS, {"temperature": 21.3})


def test_iot2mqtt_mapping() -> None:
    out = decode(
        {"value": 180, "ts": "2026-01-01T11:59:00Z"},
        topic="iot2mqtt/v1/instances/hue_bridge/devices/lamp_3/state",
        mapping={"device_id": "topic[-2]", "brightness": "payload.value"},
    )
    assert one_reading(out) == Reading("lamp_3", RECEIVED_MS - 60_000, {"brightness": 180.0})


def test_nested_payload_paths() -> None:
    out = decode(
        {"a": {"b": [4.5, 9]}, "meta": {"time": RECEIVED_MS - 5, "id": "dev-9"}},
        topic="anything",
        mapping={
            "device_id": "payload.meta.id",
            "ts": "payload.meta.time",
            "level": "payload.a.b[0]",
            "peak": "payload.a.b[1]",
        },
    )
    assert one_reading(out) == Reading("dev-9", RECEIVED_MS - 5, {"level": 4.5, "peak": 9.0})


def test_declared_metric_missing_is_named() -> None:
    dead = one_dead(
        decode({"other": 1}, "zigbee2mqtt/x", {"device_id": "topic[1]", "temp": "payload.value"})
    )
    assert dead.reason == "metric 'temp': nothing at payload.value"


@pytest.mark.parametrize(
    ("value", "kind"),
    [("21.5", "a string"), (True, "a boolean"), (None, "null"), ({"v": 1}, "an object")],
)
def test_declared_metric_of_wrong_type_is_named(value: Any, kind: str) -> None:
    dead = one_dead(
        decode(
            {"value": value}, "zigbee2mqtt/x", {"device_id": "topic[1]", "temp": "payload.value"}
        )
    )
    assert dead.reason == f"metric 'temp' must be a number, got {kind}"


def test_ts_mapped_elsewhere_missing_takes_receive_time() -> None:
    out = decode({"v": 1}, mapping={"ts": "payload.meta.ts", "v": "payload.v"})
    assert one_reading(out).ts_ms == RECEIVED_MS


# --- bad JSON and bad shapes ------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "invalid JSON"),
        (b"", "truncated"),
        (b'{"temperature": 21.5', "truncated"),
        (b'[{"t": 1}, {"t": 2}', "truncated"),
        (b'{"t": 1} {"t": 2}', "trailing characters"),
        (b"{'t': 1}", "invalid JSON"),
    ],
)
def test_invalid_json(payload: bytes, fragment: str) -> None:
    dead = one_dead(decode(payload))
    assert dead.reason.startswith("invalid JSON: ")
    assert fragment in dead.reason
    assert original_bytes(dead) == payload
    assert dead.topic == TOPIC
    assert dead.received_ms == RECEIVED_MS
    assert dead.source == "mqtt"


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b'"oops"', "a string"),
        (b"42", "a number"),
        (b"null", "null"),
        (b"[]", "a list"),
        (b"true", "a boolean"),
        (b"1.5", "a number"),
    ],
)
def test_non_object_payload(payload: bytes, kind: str) -> None:
    dead = one_dead(decode(payload))
    assert dead.reason == (
        f"payload must be a JSON object or a non-empty list of objects, got {kind}"
    )
    assert original_bytes(dead) == payload


def test_list_of_non_objects_names_each_item() -> None:
    out = decode(b"[1, 2]")
    assert out.ok == []
    assert [d.reason for d in out.dead] == [
        "item 0: a reading must be a JSON object, got a number",
        "item 1: a reading must be a JSON object, got a number",
    ]
    assert [d.payload for d in out.dead] == ["1", "2"]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b'{"ts": true, "t": 1}', "a boolean"),
        (b'{"ts": {"ms": 1767268800000}, "t": 1}', "an object"),
        (b'{"ts": [1767268800000], "t": 1}', "a list"),
    ],
)
def test_ts_of_wrong_type(payload: bytes, kind: str) -> None:
    dead = one_dead(decode(payload))
    assert dead.reason == f"ts must be epoch milliseconds or an ISO 8601 string, got {kind}"


@pytest.mark.parametrize(
    ("ts", "fragment"),
    [
        ("yesterday", "'yesterday' is not ISO 8601"),
        ("2026-13-01T00:00:00Z", "is not ISO 8601"),
        ("2026-01-01T12:00:00", "has no UTC offset; add 'Z' or '+00:00'"),
        ("2026-01-01", "has no UTC offset"),
        ("1767268800000", "string of digits; send epoch milliseconds as a JSON number"),
    ],
)
def test_ts_strings_that_are_not_usable(ts: str, fragment: str) -> None:
    dead = one_dead(decode({"ts": ts, "t": 1}))
    assert dead.reason.startswith("ts ")
    assert fragment in dead.reason


def test_ts_far_in_the_future() -> None:
    dead = one_dead(decode({"ts": RECEIVED_MS + 3_600_000, "t": 1}))
    assert dead.reason == (
        f"ts {RECEIVED_MS + 3_600_000} is 3600s in the future; "
        "the limit is 300s (IOTFLOW_MAX_FUTURE_SKEW_S)"
    )


def test_future_skew_is_configurable() -> None:
    out = decode({"ts": RECEIVED_MS + 3_600_000, "t": 1}, max_future_skew_ms=3_600_000)
    assert one_reading(out).ts_ms == RECEIVED_MS + 3_600_000


def test_ts_far_in_the_future_iso() -> None:
    dead = one_dead(decode({"ts": "9999-12-31T23:59:59+00:00", "t": 1}))
    assert "in the future" in dead.reason


@pytest.mark.parametrize("ts", [RECEIVED_MS // 1000, 1_767_268_800.5, 0, -5])
def test_ts_in_epoch_seconds_by_mistake(ts: float) -> None:
    dead = one_dead(decode({"ts": ts, "t": 1}))
    assert "is before 2000-01-01; send epoch milliseconds, not seconds" in dead.reason


def test_absurd_ts_gives_a_short_message() -> None:
    dead = one_dead(decode(b'{"ts": 1e300, "t": 1}'))
    assert dead.reason.startswith("ts ~1e300 is ~1e297s in the future")
    dead = one_dead(decode(b'{"ts": 1' + b"0" * 400 + b', "t": 1}'))
    assert dead.reason.startswith("ts ~1e400 is ")
    assert len(dead.reason) < 120


@pytest.mark.parametrize(
    "payload",
    [b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}', b'[{"t": 1}, {"t": NaN}]'],
)
def test_nan_and_infinity_literals(payload: bytes) -> None:
    dead = one_dead(decode(payload))
    assert dead.reason.startswith("invalid JSON: ")


@pytest.mark.parametrize("payload", [b'{"t": 1e999}', b'{"ts": 1e999, "t": 1}', b'{"t": -1e999}'])
def test_float_overflow(payload: bytes) -> None:
    dead = one_dead(decode(payload))
    assert dead.reason.startswith("invalid JSON: Number out of range")


def test_integer_too_large_for_a_float() -> None:
    dead = one_dead(decode(b'{"t": 1' + b"0" * 400 + b"}"))
    assert dead.reason == "metric 't' is too large for a float (~1e400)"


@pytest.mark.parametrize(
    "payload",
    [{"status": "ok"}, {"ts": RECEIVED_MS}, {"online": True, "cfg": {"a": 1}}, {}],
)
def test_reading_without_numeric_metric(payload: dict[str, Any]) -> None:
    assert one_dead(decode(payload)).reason == "no numeric metric in the reading"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_dead_letter_not_a_crash(depth: int) -> None:
    dead = one_dead(decode(b"[" * depth + b"]" * depth))
    assert dead.reason == "invalid JSON: nested too deeply"


# --- device ids ------------------------------------------------------------


@pytest.mark.parametrize("topic", ["iotflow", "iotflow/devices", ""])
def test_topic_too_short_has_no_device_id(topic: str) -> None:
    dead = one_dead(decode({"t": 1}, topic=topic))
    assert dead.reason == "no device id at topic[2]"
    assert dead.topic == topic


def test_empty_device_id_level() -> None:
    dead = one_dead(decode({"t": 1}, topic="iotflow/devices//telemetry"))
    assert dead.reason == "device id is empty (from topic[2])"


@pytest.mark.parametrize("level", ["a\x01b", "tab\there", "del\x7f", "nl\n"])
def test_control_characters_in_topic_device_id(level: str) -> None:
    dead = one_dead(decode({"t": 1}, topic=f"iotflow/devices/{level}/telemetry"))
    assert "contains control characters (from topic[2])" in dead.reason


PAYLOAD_ID = {"device_id": "payload.id"}


@pytest.mark.parametrize(
    ("device_id", "fragment"),
    [
        ("room+1", "contains '+'"),
        ("room#1", "contains '#'"),
        ("a/b", "contains '/'"),
        ("+", "contains '+'"),
        ("#", "contains '#'"),
        ("nul\x00", "contains '\\x00'"),
        ("bell\x07", "contains control characters"),
        ("esc\x1b[31m", "contains control characters"),
        ("", "device id is empty"),
        ("x" * 129, "device id is 129 characters; the limit is 128"),
        ("x" * 10_000, "device id is 10000 characters; the limit is 128"),
    ],
)
def test_bad_payload_mapped_device_id(device_id: str, fragment: str) -> None:
    dead = one_dead(decode({"id": device_id, "t": 1}, topic="gw", mapping=PAYLOAD_ID))
    assert fragment in dead.reason
    assert dead.reason.endswith("(from payload.id)")
    assert len(dead.reason) < 200  # the id is quoted, not dumped


def test_device_id_of_128_characters_is_fine() -> None:
    out = decode({"id": "x" * 128, "t": 1}, topic="gw", mapping=PAYLOAD_ID)
    assert one_reading(out).device_id == "x" * 128


@pytest.mark.parametrize(
    ("device_id", "kind"), [(None, "null"), (7, "a number"), (["a"], "a list"), (True, "a boolean")]
)
def test_non_string_payload_mapped_device_id(device_id: Any, kind: str) -> None:
    dead = one_dead(decode({"id": device_id, "t": 1}, topic="gw", mapping=PAYLOAD_ID))
    assert dead.reason == f"device id must be a string, got {kind} (from payload.id)"


def test_missing_payload_mapped_device_id() -> None:
    dead = one_dead(decode({"t": 1}, topic="gw", mapping=PAYLOAD_ID))
    assert dead.reason == "no device id at payload.id"


def test_unicode_device_id_is_fine() -> None:
    out = decode({"t": 1}, topic="iotflow/devices/küche-😀/telemetry")
    assert one_reading(out).device_id == "küche-😀"


# --- sizes and encodings ---------------------------------------------------


def test_one_megabyte_payload_is_truncated_in_the_dead_letter() -> None:
    payload = json.dumps({"t": 1, "pad": "x" * 1_000_000}).encode()
    dead = one_dead(decode(payload))
    assert dead.reason == (
        f"payload is {len(payload)} bytes; the limit is 262144 (IOTFLOW_MAX_PAYLOAD_BYTES)"
    )
    assert dead.payload_bytes == len(payload)
    assert dead.truncated is True
    assert dead.payload_encoding == "utf-8"
    assert original_bytes(dead) == payload[:DEADLETTER_KEEP_BYTES]


def test_payload_size_limit_is_inclusive_and_configurable() -> None:
    payload = b'{"t": 1}'
    assert one_reading(decode(payload, max_payload_bytes=len(payload)))
    dead = one_dead(decode(payload, max_payload_bytes=len(payload) - 1))
    assert dead.reason.startswith(
        f"payload is {len(payload)} bytes; the limit is {len(payload) - 1}"
    )
    assert dead.truncated is False


def test_non_utf8_bytes_are_kept_as_base64() -> None:
    payload = b"\xff\xfe\x00garbage\x80"
    dead = one_dead(decode(payload))
    assert dead.reason.startswith("invalid JSON: ")
    assert dead.payload_encoding == "base64"
    assert original_bytes(dead) == payload
    assert dead.payload_bytes == len(payload)
    assert dead.truncated is False


def test_non_utf8_inside_a_json_string() -> None:
    payload = b'{"t": 1, "name": "\xff"}'
    dead = one_dead(decode(payload))
    assert dead.reason.startswith("payload is not valid UTF-8")
    assert dead.payload_encoding == "base64"
    assert original_bytes(dead) == payload


def test_dead_letter_of_small_payload_is_whole() -> None:
    dead = dead_letter("mqtt", "why", b'{"a": 1}', RECEIVED_MS, "t/x")
    assert dead == DeadLetter("mqtt", "why", '{"a": 1}', "utf-8", 8, False, RECEIVED_MS, "t/x")


def test_dead_letter_truncation_never_splits_a_character() -> None:
    payload = ("a" + "é" * 5000).encode()  # the 4096-byte cut falls inside an "é"
    dead = dead_letter("mqtt", "why", payload, RECEIVED_MS)
    assert dead.payload_encoding == "utf-8"
    assert dead.truncated is True
    assert dead.payload_bytes == len(payload)
    assert payload.startswith(dead.payload.encode())
    assert len(dead.payload.encode()) == DEADLETTER_KEEP_BYTES - 1


def test_dead_letter_serializes() -> None:
    dead = one_dead(decode(b"\xff"))
    assert msgspec.json.decode(msgspec.json.encode(dead), type=DeadLetter) == dead


# --- lists: nothing valid lost ----------------------------------------------


def test_bad_items_do_not_take_valid_neighbours_down() -> None:
    items = [
        {"ts": RECEIVED_MS - 2000, "t": 1.0},
        {"ts": True, "t": 2.0},
        {"ts": RECEIVED_MS - 1000, "t": 3.0},
        "oops",
        {"name": "no metric"},
        {"t": 4.0},
        {"ts": RECEIVED_MS + 10 * SKEW_MS, "t": 5.0},
    ]
    out = decode(items)
    assert out.ok == [
        Reading("t1", RECEIVED_MS - 2000, {"t": 1.0}),
        Reading("t1", RECEIVED_MS - 1000, {"t": 3.0}),
        Reading("t1", RECEIVED_MS, {"t": 4.0}),
    ]
    reasons = [d.reason for d in out.dead]
    assert (
        reasons[0] == "item 1: ts must be epoch milliseconds or an ISO 8601 string, got a boolean"
    )
    assert reasons[1] == "item 3: a reading must be a JSON object, got a string"
    assert reasons[2] == "item 4: no numeric metric in the reading"
    assert reasons[3].startswith("item 6: ts ") and "in the future" in reasons[3]
    # Each dead letter keeps its own element, not the whole batch.
    assert [json.loads(d.payload) for d in out.dead] == [items[1], items[3], items[4], items[6]]
    assert all(d.topic == TOPIC and d.received_ms == RECEIVED_MS for d in out.dead)


def test_single_item_list_still_names_the_item() -> None:
    assert one_dead(decode([{"x": "y"}])).reason == "item 0: no numeric metric in the reading"


def test_bad_device_id_rejects_every_item() -> None:
    out = decode([{"t": 1}, {"t": 2}], topic="iotflow/devices//telemetry")
    assert out.ok == []
    assert [d.reason for d in out.dead] == [
        "item 0: device id is empty (from topic[2])",
        "item 1: device id is empty (from topic[2])",
    ]


def test_payload_mapped_device_ids_per_item() -> None:
    out = decode([{"id": "a", "t": 1}, {"id": "b+", "t": 2}, {"id": "c", "t": 3}], "gw", PAYLOAD_ID)
    assert [r.device_id for r in out.ok] == ["a", "c"]
    assert [d.reason for d in out.dead] == ["item 1: device id 'b+' contains '+' (from payload.id)"]


# --- properties ------------------------------------------------------------

_metric_names = st.text(st.characters(codec="utf-8"), max_size=8).filter(lambda s: s != "ts")
_finite = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**63), 2**63),
)
_attributes = st.dictionaries(
    _metric_names,
    st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.just({"n": 1}), st.just([1])),
    max_size=3,
)
_valid_ts = st.one_of(
    st.none(),
    st.integers(MIN_TS_MS, RECEIVED_MS + SKEW_MS),
    st.datetimes(
        min_value=datetime(2000, 1, 2),
        max_value=datetime(2026, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
        ),
    ),
)


@st.composite
def valid_items(draw: st.DrawFn) -> tuple[dict[str, Any], Reading]:
    """A valid reading object and the reading it must decode to."""
    metrics = draw(st.dictionaries(_metric_names, _finite, min_size=1, max_size=4))
    attributes = draw(_attributes)
    item: dict[str, Any] = {k: v for k, v in attributes.items() if k not in metrics}
    item.update(metrics)
    ts = draw(_valid_ts)
    if isinstance(ts, datetime):
        item["ts"], ts_ms = ts.isoformat(), to_ms(ts)
    elif ts is None:
        if draw(st.booleans()):
            item["ts"] = None
        ts_ms = RECEIVED_MS
    else:
        item["ts"], ts_ms = ts, ts
    return item, Reading("t1", ts_ms, {k: float(v) for k, v in metrics.items()})


_invalid_items = st.one_of(
    st.builds(lambda m: {**m, "ts": True}, st.dictionaries(_metric_names, _finite, max_size=2)),
    st.builds(lambda t: {"ts": t, "x": 1}, st.integers(0, MIN_TS_MS - 1)),  # seconds
    st.builds(lambda t: {"ts": t, "x": 1}, st.integers(RECEIVED_MS + SKEW_MS + 1, 2**62)),
    st.builds(lambda t: {"ts": t, "x": 1}, st.text(max_size=5)),  # never ISO 8601 when this short
    _attributes,  # no numeric metric
    st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans(), st.just([])),
)

# Each message: (payload bytes, readings it must yield, units it must account for).
_item = st.one_of(valid_items(), _invalid_items.map(lambda bad: (bad, None)))


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[Reading], int]:
    kind = draw(st.sampled_from(["object", "list", "broken"]))
    if kind == "broken":
        payload = draw(st.sampled_from([b"", b"{", b"[]", b"null", b'"s"', b"7", b"[{]", b"\xff"]))
        return payload, [], 1
    if kind == "object":
        item, reading = draw(
            st.one_of(
                valid_items(),
                _invalid_items.filter(lambda bad: isinstance(bad, dict)).map(
                    lambda bad: (bad, None)
                ),
            )
        )
        return json.dumps(item).encode(), [reading] if reading else [], 1
    pairs = draw(st.lists(_item, min_size=1, max_size=6))
    payload = json.dumps([item for item, _ in pairs]).encode()
    return payload, [reading for _, reading in pairs if reading], len(pairs)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), max_size=6))
def test_every_reading_unit_comes_out_exactly_once(
    batch: list[tuple[bytes, list[Reading], int]],
) -> None:
    decoder = TelemetryDecoder()
    for payload, expected, units in batch:
        out = decoder.decode([DeviceMessage(TOPIC, payload, RECEIVED_MS)])
        assert len(out.ok) + len(out.dead) == units
        assert out.ok == expected
        assert all(d.reason for d in out.dead)
    # The same holds when the whole batch is decoded at once.
    out = decoder.decode([DeviceMessage(TOPIC, p, RECEIVED_MS) for p, _, _ in batch])
    assert len(out.ok) + len(out.dead) == sum(units for _, _, units in batch)
    assert out.ok == [r for _, expected, _ in batch for r in expected]


def _units(payload: bytes) -> int:
    try:
        doc = msgspec.json.decode(payload)
    except Exception:
        return 1
    return len(doc) if isinstance(doc, list) and doc else 1


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(10**300, 10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=40),
    st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())),
)
def test_decode_never_raises(topic: str, payload: bytes) -> None:
    out = TelemetryDecoder().decode([DeviceMessage(topic, payload, RECEIVED_MS)])
    assert len(out.ok) + len(out.dead) == _units(payload)
    for dead in out.dead:
        assert dead.reason
        assert dead.topic == topic
    for reading in out.ok:
        assert reading.metrics


@given(st.binary(max_size=3 * DEADLETTER_KEEP_BYTES))
def test_dead_letter_keeps_a_faithful_prefix(payload: bytes) -> None:
    dead = dead_letter("mqtt", "why", payload, RECEIVED_MS)
    kept = original_bytes(dead)
    assert dead.payload_bytes == len(payload)
    assert dead.truncated == (len(payload) > DEADLETTER_KEEP_BYTES)
    assert payload.startswith(kept)
    if dead.truncated:
        assert DEADLETTER_KEEP_BYTES - 3 <= len(kept) <= DEADLETTER_KEEP_BYTES
    else:
        assert kept == payload
