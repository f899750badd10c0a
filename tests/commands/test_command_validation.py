"""Decoding requests and device messages: every shape understood, every bad input named."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cmdkit import T0, make_command

from commands.instructions import Instruction
from commands.validation import (
    MAX_ID_CHARS,
    CommandValidator,
    CoordinatorRequest,
    DeviceAck,
    DeviceState,
    InvalidDeviceMessage,
    InvalidRequest,
    check_command_id,
    decode_device_message,
    decode_request,
    state_matches,
)
from iotflow.errors import TwinRejected
from iotflow.events import AckStatus, Command, DeviceMessage
from iotflow.topics import MqttTopics
from twins.registry import Registry


def body(**fields: object) -> bytes:
    doc = {
        "command_id": "c1",
        "device_id": "hvac-0001",
        "name": "set_mode",
        "params": {"mode": "cool"},
        "issued_at": "2026-01-01T12:00:00Z",
        "expires_at": "2026-01-01T12:05:00Z",
    }
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_a_command_decodes_with_its_optional_fields() -> None:
    cmd = decode_request(body(priority=100, correlation_id="plan-1"))
    assert isinstance(cmd, Command)
    assert (cmd.priority, cmd.correlation_id) == (100, "plan-1")
    assert cmd.expires_at == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("payload", "kind", "command_id", "words"),
    [
        (b"{not json", "malformed", None, "not valid JSON"),
        (b'{"command_id": "x", "params": {"v": NaN}}', "malformed", None, "not valid JSON"),
        (b"[1, 2]", "malformed", None, "must be a JSON object, got list"),
        (b'"text"', "malformed", None, "got str"),
        (b'{"hello": 1}', "unknown_request", None, "neither a command"),
        (body(name=5), "invalid_command", "c1", "Expected `str`"),
        (body(issued_at="yesterday"), "invalid_command", "c1", "issued_at"),
        (body(params=None), "invalid_command", "c1", "params"),
        (body(command_id="a" * (MAX_ID_CHARS + 1), name=1), "invalid_command", None, ""),
        (b"x" * 70_000, "too_large", None, "the limit is 65536"),
        (
            b'{"coordinator": {"steps": []}}',
            "invalid_coordinator",
            None,
            "string 'type'",
        ),
        (b'{"instruction_id": "i", "steps": []}', "invalid_instruction", None, "target"),
    ],
)
def test_bad_requests_say_what_is_wrong(
    payload: bytes, kind: str, command_id: str | None, words: str
) -> None:
    got = decode_request(payload)
    assert isinstance(got, InvalidRequest)
    assert (got.kind, got.command_id) == (kind, command_id)
    assert words in got.reason
    assert got.payload == payload


def test_a_pattern_action_becomes_a_command() -> None:
    action = {
        "request_id": "hot|hvac-0001|1767268800000|0",
        "pattern": "hot",
        "key": "hvac-0001",
        "device_id": "hvac-0001",
        "name": "set_mode",
        "params": {"mode": "cool"},
        "ts": "2026-01-01T12:00:00Z",
        "ttl_s": 60.0,
    }
    cmd = decode_request(json.dumps(action).encode())
    assert isinstance(cmd, Command)
    assert cmd.command_id == action["request_id"]
    assert cmd.expires_at - cmd.issued_at == timedelta(seconds=60)
    assert cmd.correlation_id == "pattern:hot"
    for ttl in (0, -1, 1e300):
        bad = decode_request(json.dumps(action | {"ttl_s": ttl}).encode())
        assert isinstance(bad, InvalidRequest)
        assert bad.command_id == action["request_id"]


def test_twin_updates_on_the_requests_topic_are_not_for_the_orchestrator() -> None:
    update = {
        "request_id": "r",
        "device_id": "d",
        "properties": {"x": 1},
        "ts": "2026-01-01T00:00:00Z",
    }
    assert decode_request(json.dumps(update).encode()) is None


def test_instructions_and_coordinators_are_recognized() -> None:
    instruction = decode_request(
        b'{"instruction_id": "i1", "target": {"group": "g"}, "steps": ["turn_on"]}'
    )
    assert isinstance(instruction, Instruction)
    coordinator = decode_request(b'{"coordinator": {"type": "saga", "id": "s1"}}')
    assert isinstance(coordinator, CoordinatorRequest)
    assert (coordinator.type, coordinator.spec["id"]) == ("saga", "s1")


def test_ids_are_checked() -> None:
    assert check_command_id("plan/1/hvac-0001") is None
    assert "empty" in (check_command_id("") or "")
    assert "control" in (check_command_id("a\tb") or "")
    assert "must be a string" in (check_command_id(7) or "")
    assert "the limit is" in (check_command_id("x" * 201) or "")


def message(topic: str, payload: bytes) -> DeviceMessage:
    return DeviceMessage(topic, payload, 0)


def test_device_messages_decode_by_topic() -> None:
    topics = MqttTopics("home")
    ack = decode_device_message(
        message("home/devices/lock-1/ack", b'{"command_id": "c1", "status": "done"}'), topics
    )
    assert isinstance(ack, DeviceAck)
    assert (ack.device_id, ack.ack.status) == ("lock-1", AckStatus.DONE)
    state = decode_device_message(message("home/devices/lock-1/state", b'{"locked": 1}'), topics)
    assert state == DeviceState("lock-1", {"locked": 1})
    assert decode_device_message(message("home/devices/lock-1/telemetry", b"{}"), topics) is None
    assert decode_device_message(message("other/devices/lock-1/ack", b"{}"), topics) is None


@pytest.mark.parametrize(
    ("topic", "payload", "words"),
    [
        ("home/devices/lock-1/ack", b'{"command_id": "c1", "status": "maybe"}', "invalid ack"),
        ("home/devices/lock-1/ack", b"{broken", "invalid ack"),
        ("home/devices/lock-1/state", b"[1]", "must be a JSON object"),
        ("home/devices/lock-1/state", b"{broken", "invalid state"),
        ("home/devices/\x01evil/ack", b"{}", "control characters"),
    ],
)
def test_bad_device_messages_are_named(topic: str, payload: bytes, words: str) -> None:
    got = decode_device_message(message(topic, payload), MqttTopics("home"))
    assert isinstance(got, InvalidDeviceMessage)
    assert words in got.reason


def test_validated_commands_carry_normalized_params_expectation_and_route(
    registry: Registry,
) -> None:
    validator = CommandValidator(registry)
    valid = validator.check(make_command("c1", params={"setpoint": 23}), T0)
    assert valid.command.params == {"setpoint": 23.0}
    assert valid.expected == {"setpoint": 23.0}
    assert valid.properties == ("setpoint",)
    assert valid.protocol == "mqtt"
    lamp = validator.check(make_command("c2", device_id="lamp-http", name="turn_on"), T0)
    assert (lamp.protocol, lamp.metadata["entity_id"]) == ("http", "light.lamp")
    with pytest.raises(TwinRejected, match="no writer"):
        CommandValidator(registry, protocols=["mqtt"]).check(
            make_command("c3", device_id="lamp-http", name="turn_on"), T0
        )


def test_state_matching_compares_numbers_closely_and_everything_else_exactly() -> None:
    assert state_matches({"setpoint": 23.5}, {"setpoint": 23.5000000001, "mode": "cool"})
    assert not state_matches({"setpoint": 23.5}, {"setpoint": 23.6})
    assert not state_matches({"setpoint": 23.5}, {})
    assert state_matches({"mode": "cool"}, {"mode": "cool"})
    assert state_matches({"on": True}, {"on": True})
    assert not state_matches({"on": True}, {"on": False})
    assert state_matches({}, {"anything": 1})
