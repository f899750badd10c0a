"""Device writers (the message each protocol gets) and audit rows/keys."""

from __future__ import annotations

import json
from datetime import timedelta

from cmdkit import T0, make_command

from commands.audit import AUDIT_COLUMNS, audit_row, encode_event, event_key, record_key
from commands.coordinator import PlanEvent, PlanEventKind
from commands.orchestrator import Dropped, Write
from commands.writers import (
    HttpCall,
    HttpWriter,
    KafkaCommand,
    KafkaWriter,
    MqttCommand,
    MqttWriter,
    command_payload,
)
from iotflow.events import CommandEvent, CommandEventKind


def write(device_id: str = "lock-0001", name: str = "unlock", **meta: object) -> Write:
    cmd = make_command("c1", device_id=device_id, name=name, params={}, ttl_s=30)
    return Write(cmd, "mqtt", 1, meta)


def test_the_command_payload_has_exactly_the_documented_fields() -> None:
    doc = json.loads(command_payload(write().command))
    assert doc == {
        "command_id": "c1",
        "name": "unlock",
        "params": {},
        "issued_at": "2026-01-01T12:00:00Z",
        "expires_at": "2026-01-01T12:00:30Z",
    }


def test_mqtt_expiry_is_the_seconds_left_rounded_up_and_never_retained() -> None:
    writer = MqttWriter("home")
    for elapsed_s, expiry_s in ((0, 30), (0.2, 30), (29.5, 1), (29.999, 1)):
        msg = writer.encode(write(), T0 + timedelta(seconds=elapsed_s))
        assert isinstance(msg, MqttCommand)
        assert (msg.topic, msg.expiry_s, msg.qos, msg.retain) == (
            "home/devices/lock-0001/cmd",
            expiry_s,
            1,
            False,
        )


def test_every_writer_refuses_an_expired_command() -> None:
    late = T0 + timedelta(seconds=30)
    for writer in (MqttWriter(), KafkaWriter("t"), HttpWriter()):
        dropped = writer.encode(write(), late)
        assert isinstance(dropped, Dropped)
        assert "not sent" in dropped.reason
        assert dropped.source == "writer"


def test_kafka_writes_go_to_the_device_topic_keyed_by_device() -> None:
    msg = KafkaWriter("iot.commands.device").encode(write(), T0)
    assert msg == KafkaCommand("iot.commands.device", "lock-0001", command_payload(write().command))
    routed = KafkaWriter("default").encode(write(topic="gateway-7"), T0)
    assert isinstance(routed, KafkaCommand) and routed.topic == "gateway-7"


def test_http_rest_posts_the_payload_to_the_device() -> None:
    call = HttpWriter("rest").encode(write(device_id="lock 1/a"), T0)
    assert isinstance(call, HttpCall)
    assert (call.method, call.path) == ("POST", "/devices/lock%201%2Fa/commands")
    assert call.json["command_id"] == "c1"


def test_http_home_assistant_calls_the_mapped_service() -> None:
    cmd = make_command(
        "c2", device_id="light-0001", name="set_brightness", params={"brightness": 40}
    )
    meta = {"entity_id": "light.porch", "services": {"set_brightness": "turn_on"}}
    call = HttpWriter("home_assistant").encode(Write(cmd, "http", 1, meta), T0)
    assert isinstance(call, HttpCall)
    assert call.path == "/api/services/light/turn_on"
    assert call.json == {"entity_id": "light.porch", "brightness": 40}
    plain = HttpWriter("home_assistant").encode(write(domain="lock"), T0)
    assert isinstance(plain, HttpCall)
    assert (plain.path, plain.json) == (
        "/api/services/lock/unlock",
        {"entity_id": "lock.lock-0001"},
    )


def test_audit_rows_have_every_column_and_a_natural_key() -> None:
    sent = CommandEvent(
        "c1", "lock-0001", CommandEventKind.SENT, T0, attempt=2, correlation_id="p", name="unlock"
    )
    row = audit_row(sent)
    assert tuple(row) == AUDIT_COLUMNS
    assert (row["entity"], row["subject"], row["attempt"], row["correlation_id"]) == (
        "command",
        "c1",
        2,
        "p",
    )
    again = CommandEvent(
        "c1", "lock-0001", CommandEventKind.SENT, T0 + timedelta(seconds=1), attempt=3
    )
    assert event_key(sent) != event_key(again)
    assert record_key(sent) == "c1"
    assert json.loads(encode_event(sent))["kind"] == "sent"


def test_plan_events_become_rows_of_the_same_table() -> None:
    step = PlanEvent(
        "leave-1", PlanEventKind.STEP_DONE, T0, step="lock_doors", device_id="lock-0001"
    )
    row = audit_row(step)
    assert tuple(row) == AUDIT_COLUMNS
    assert (row["entity"], row["subject"], row["correlation_id"], row["step"]) == (
        "plan",
        "leave-1",
        "leave-1",
        "lock_doors",
    )
    other = PlanEvent("leave-1", PlanEventKind.STEP_DONE, T0, step="lights", device_id="lock-0001")
    assert event_key(step) != event_key(other)
    assert record_key(step) == "leave-1"
