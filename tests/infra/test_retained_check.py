"""The suite's retained-command check (tests/conftest.py) can fail: it reports what it finds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from connectors.mqtt import connect_client
from infra.stack import StackInfo
from iotflow.topics import MqttTopics


def publish(url: str, topic: str, payload: bytes, *, retain: bool) -> None:
    client = connect_client(url)
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_retained_command_is_reported_with_its_topic_and_payload_then_cleared(
    stack: StackInfo, names: Any, retained_commands: Callable[..., list[tuple[str, bytes]]]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    retained = topics.cmd("alarm-0001")
    payload = b'{"command_id": "arm-1", "name": "arm"}'
    publish(stack.mqtt_url, topics.cmd("alarm-0002"), b'{"command_id": "plain"}', retain=False)
    publish(stack.mqtt_url, retained, payload, retain=True)
    try:
        assert retained_commands(stack.mqtt_url, names.mqtt_base) == [(retained, payload)]
        # the suite-wide filter (every base) sees it too
        assert (retained, payload) in retained_commands(stack.mqtt_url)
    finally:
        publish(stack.mqtt_url, retained, b"", retain=True)  # an empty retained message clears it
    assert retained_commands(stack.mqtt_url, names.mqtt_base) == []
