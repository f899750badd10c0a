"""Decoding device messages and desired changes: every bad input becomes a rejection with a reason."""

from __future__ import annotations

import json

import pytest

from iotflow.events import DeviceMessage
from twins.updates import DesiredChange, Reported, TwinRejection, UpdateDecoder, decode_desired

T = 1767268800000


def msg(topic: str, payload: bytes | str, received_ms: int = T + 5) -> DeviceMessage:
    return DeviceMessage(
        topic, payload if isinstance(payload, bytes) else payload.encode(), received_ms
    )


@pytest.fixture
def dec() -> UpdateDecoder:
    return UpdateDecoder("base", max_payload_bytes=1024)


def test_telemetry_state_and_batches(dec):
    ok, bad = dec.decode(
        [
            msg(
                "base/devices/d1/telemetry", '{"ts": 1767268800000, "temperature": 21.5, "seq": 3}'
            ),
            msg("base/devices/d1/state", '{"mode": "heat", "kind": "hvac"}'),
            msg("base/devices/d2/telemetry", '[{"ts": "2026-01-01T12:00:00Z", "a": 1}, {"a": 2}]'),
        ]
    )
    assert not bad
    assert ok == [
        Reported("d1", T, {"temperature": 21.5, "seq": 3}, "telemetry", T + 5),
        Reported("d1", T + 5, {"mode": "heat", "kind": "hvac"}, "state", T + 5),
        Reported("d2", T, {"a": 1}, "telemetry", T + 5),
        Reported("d2", T + 5, {"a": 2}, "telemetry", T + 5),
    ]


@pytest.mark.parametrize(
    ("topic", "payload", "kind", "needle"),
    [
        ("base/devices/d1/telemetry", b'{"a": 1', "invalid_json", "invalid JSON"),
        ("base/devices/d1/telemetry", b"\xff\xfe", "invalid_json", "invalid JSON"),
        ("base/devices/d1/telemetry", b'{"a": NaN}', "invalid_json", "invalid JSON"),
        ("base/devices/d1/telemetry", b'"oops"', "not_object", "got a string"),
        ("base/devices/d1/telemetry", b"[]", "not_object", "non-empty list"),
        (
            "base/devices/d1/state",
            b'[{"a": 1}]',
            "not_object",
            "state payload must be a JSON object",
        ),
        ("base/devices/d1/telemetry", b"[1, 2]", "not_object", "item 0"),
        ("base/devices/d1/telemetry", b'{"ts": "yesterday", "a": 1}', "bad_ts", "not ISO 8601"),
        ("base/devices/d1/telemetry", b'{"ts": 1767268800, "a": 1}', "bad_ts", "not seconds"),
        (
            "base/devices/d1/telemetry",
            b'{"ts": "2026-01-01T12:00:00", "a": 1}',
            "bad_ts",
            "no UTC offset",
        ),
        ("base/devices/d1/telemetry", b'{"ts": true, "a": 1}', "bad_ts", "boolean"),
        ("base/devices/d1/telemetry", b'{"ts": 1e300, "a": 1}', "bad_ts", "plausible"),
        ("base/devices/d1/telemetry", b'{"ts": 1767268800000}', "empty", "holds no value"),
        (
            "base/devices/d1/telemetry",
            b"{" + b'"a": 1,' * 300 + b'"b": 2}',
            "too_large",
            "limit is 1024",
        ),
        ("base/devices/d1/ack", b'{"a": 1}', "bad_topic", "is not base/devices/"),
        ("other/devices/d1/telemetry", b'{"a": 1}', "bad_topic", "is not base/devices/"),
        ("base/devices/a/b/telemetry", b'{"a": 1}', "bad_device_id", "contains '/'"),
        ("base/devices//telemetry", b'{"a": 1}', "bad_device_id", "empty"),
        ("base/devices/" + "x" * 300 + "/telemetry", b'{"a": 1}', "bad_device_id", "limit"),
        ("base/devices/d\x01/telemetry", b'{"a": 1}', "bad_device_id", "control"),
    ],
)
def test_bad_messages_are_rejected(dec, topic, payload, kind, needle):
    ok, bad = dec.decode([msg(topic, payload), msg("base/devices/fine/telemetry", b'{"a": 1}')])
    assert [r.device_id for r in ok] == ["fine"]  # a bad neighbour never takes a good one down
    rejection = bad[0]
    assert rejection.kind == kind and needle in rejection.reason, rejection.reason
    assert (
        rejection.topic == topic and rejection.payload == payload and rejection.received_ms == T + 5
    )


def test_topics_are_judged_alike_every_time(dec):
    # the decoder remembers the topics it accepted; a rejected one is judged again each time
    batch = [
        msg("base/devices/d1/telemetry", '{"a": 1}'),
        msg("base/devices/a/b/telemetry", '{"a": 1}'),
        msg("base/devices/d1/state", '{"b": 2}'),
    ]
    for _ in range(2):
        ok, bad = dec.decode(batch)
        assert [(r.device_id, r.source, r.values) for r in ok] == [
            ("d1", "telemetry", {"a": 1}),
            ("d1", "state", {"b": 2}),
        ]
        assert [(r.kind, r.topic) for r in bad] == [("bad_device_id", "base/devices/a/b/telemetry")]


def test_a_bad_item_keeps_its_good_neighbours(dec):
    ok, bad = dec.decode(
        [msg("base/devices/d1/telemetry", '[{"a": 1}, {"ts": "x", "a": 2}, {"a": 3}]')]
    )
    assert [r.values for r in ok] == [{"a": 1}, {"a": 3}]
    assert bad[0].reason.startswith("item 1: ")


def test_desired_changes():
    change = decode_desired(
        json.dumps(
            {
                "device_id": "d1",
                "desired": {"setpoint": 23.5, "mode": None},
                "version": 4,
                "source": "operator",
                "ts": T,
            }
        ).encode(),
        T + 9,
    )
    assert change == DesiredChange("d1", {"setpoint": 23.5, "mode": None}, 4, "operator", T, T + 9)
    minimal = decode_desired(b'{"device_id": "d1", "desired": {"a": 1}}', T)
    assert minimal == DesiredChange("d1", {"a": 1}, None, "api", T, T)


@pytest.mark.parametrize(
    ("payload", "kind", "needle"),
    [
        (b"{", "invalid_json", "invalid desired change"),
        (b'{"desired": {"a": 1}}', "invalid_json", "device_id"),
        (b'{"device_id": "d1", "desired": {"a": 1}, "version": "4"}', "invalid_json", "$.version"),
        (b'{"device_id": "d1", "desired": {"a": 1}, "verison": 4}', "invalid_json", "verison"),
        (b'{"device_id": "d1", "desired": [1]}', "invalid_json", "$.desired"),
        (b'{"device_id": "d1", "desired": {}}', "empty", "no property"),
        (b'{"device_id": "a/b", "desired": {"a": 1}}', "bad_device_id", "contains"),
        (b'{"device_id": "d1", "desired": {"a": 1}, "ts": "soon"}', "bad_ts", "not ISO 8601"),
    ],
)
def test_bad_desired_changes(payload, kind, needle):
    rejection = decode_desired(payload, T)
    assert isinstance(rejection, TwinRejection)
    assert rejection.kind == kind and needle in rejection.reason, rejection.reason
    assert rejection.source == "twins.desired" and rejection.payload == payload
