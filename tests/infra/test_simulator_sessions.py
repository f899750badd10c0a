"""Simulated devices with a persistent MQTT session against the real Mosquitto.

Offline for real (disconnected, the broker queueing), a connection lost
between taking a command and acknowledging it (the broker redelivers with
DUP), a link the broker side drops, a device restarted on its session.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from commands.orchestrator import Write
from commands.writers import MqttCommand, MqttWriter
from connectors.mqtt import connect_client
from infra.simulator import Fleet, FleetConfig
from infra.stack import StackInfo
from iotflow.errors import ConfigError
from iotflow.events import Command
from iotflow.topics import MqttTopics

SESSION_S = 60


def wait_until(done: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Controller:
    """Sends commands as the orchestrator's MQTT writer encodes them; records the acks."""

    def __init__(self, url: str, base: str) -> None:
        self.writer = MqttWriter(base)
        self.acks: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = connect_client(
            url,
            on_connect=lambda c: c.subscribe(MqttTopics(base).ack(), qos=1),
            on_subscribe=lambda *_a: subscribed.set(),
            on_message=self._on_ack,
        )
        assert subscribed.wait(10)

    def _on_ack(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.acks.append(msgspec.json.decode(msg.payload))

    def acks_of(self, command_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [a for a in self.acks if a["command_id"] == command_id]

    def send(self, command_id: str, device_id: str, name: str, ttl_s: float) -> None:
        now = datetime.now(UTC)
        command = Command(command_id, device_id, name, {}, now, now + timedelta(seconds=ttl_s))
        out = self.writer.encode(Write(command, "mqtt", 1, {}), now)
        assert isinstance(out, MqttCommand)
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = out.expiry_s
        self.client.publish(out.topic, out.payload, qos=1, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def controller(stack: StackInfo, names: Any) -> Iterator[Controller]:
    ctl = Controller(stack.mqtt_url, names.mqtt_base)
    yield ctl
    ctl.close()


def lock_fleet(base: str) -> FleetConfig:
    return FleetConfig(devices={"lock": 1}, base=base, commands={"ack_latency_ms": 50})


def session_fleet(url: str, base: str) -> Fleet:
    """One lock on a persistent session (stable client id, the broker queues while away)."""
    return Fleet(lock_fleet(base), url, schedule_telemetry=False, session_expiry_s=SESSION_S)


def test_offline_device_gets_queued_commands_once_back_and_never_an_expired_one(
    stack: StackInfo, names: Any, controller: Controller
) -> None:
    fleet = session_fleet(stack.mqtt_url, names.mqtt_base)
    with fleet:
        fleet.go_offline()
        assert not fleet.online
        controller.send("stale", "lock-0001", "unlock", ttl_s=1)
        controller.send("keep", "lock-0001", "unlock", ttl_s=60)
        threading.Event().wait(2.5)  # past the stale command's MQTT 5 message expiry
        fleet.go_online()
        wait_until(lambda: len(controller.acks_of("keep")) == 1)
        stats = fleet.stats
    device = stats.devices["lock-0001"]
    assert device.deliveries == {"keep": 1}  # the broker dropped the expired one
    assert device.executed == ("keep",)
    assert controller.acks_of("keep")[0]["status"] == "done"
    assert controller.acks_of("stale") == []
    assert stats.redeliveries == 0


def test_connection_lost_before_puback_redelivers_and_the_device_acts_once(
    stack: StackInfo, names: Any, controller: Controller
) -> None:
    fleet = session_fleet(stack.mqtt_url, names.mqtt_base)
    with fleet:
        fleet.drop_before_puback()
        # another fleet's device on the same base: heard, acknowledged, not what is dropped
        controller.send("other", "lock-0009", "unlock", ttl_s=60)
        controller.send("u1", "lock-0001", "unlock", ttl_s=60)
        wait_until(lambda: fleet.stats.redeliveries == 1 and len(controller.acks_of("u1")) == 2)
        assert fleet.connections == 2
        controller.send("l1", "lock-0001", "lock", ttl_s=60)  # the next one goes through once
        wait_until(lambda: len(controller.acks_of("l1")) == 1)
        stats = fleet.stats
    device = stats.devices["lock-0001"]
    assert device.deliveries == {"u1": 2, "l1": 1}
    assert device.executed == ("u1", "l1")
    assert (stats.commands_executed, stats.duplicate_commands) == (2, 1)
    first, again = controller.acks_of("u1")
    assert first == again and first["status"] == "done" and first["reported"]["locked"] == 0
    assert device.reported["locked"] == 1  # u1 did not run again after l1
    assert stats.ignored_commands == {"unknown device": 1}


def test_drop_before_puback_needs_a_persistent_session(stack: StackInfo, names: Any) -> None:
    fleet = Fleet(lock_fleet(names.mqtt_base), stack.mqtt_url, schedule_telemetry=False)
    with pytest.raises(ConfigError, match="session_expiry_s > 0"):
        fleet.drop_before_puback()


def test_a_lost_link_reconnects_by_itself_and_delivers_what_was_queued(
    stack: StackInfo, names: Any, controller: Controller
) -> None:
    fleet = session_fleet(stack.mqtt_url, names.mqtt_base)
    with fleet:
        for n in range(3):
            fleet.drop_link()
            controller.send(f"after-drop-{n}", "lock-0001", "unlock", ttl_s=60)
            wait_until(lambda n=n: len(controller.acks_of(f"after-drop-{n}")) == 1)
        stats = fleet.stats
    assert stats.devices["lock-0001"].executed == tuple(f"after-drop-{n}" for n in range(3))
    assert stats.commands_executed == 3
    assert fleet.connections == 4


def test_a_restarted_device_picks_up_its_session(
    stack: StackInfo, names: Any, controller: Controller
) -> None:
    first = session_fleet(stack.mqtt_url, names.mqtt_base)
    with first:
        pass
    controller.send("while-down", "lock-0001", "unlock", ttl_s=60)
    second = session_fleet(stack.mqtt_url, names.mqtt_base)
    assert second.client_id == first.client_id == f"iotflow-sim-{names.mqtt_base}"
    with second:
        wait_until(lambda: len(controller.acks_of("while-down")) == 1)
        stats = second.stats
    assert stats.devices["lock-0001"].executed == ("while-down",)


def test_runs_count_a_command_a_device_forgot_and_ran_again() -> None:
    """The ground truth behind "never acts twice": ``runs`` sees what the dedupe missed."""
    model = FleetConfig(devices={"lock": 1}, commands={"remember_commands": 1}).build()
    now = datetime.now(UTC)

    def deliver(command_id: str, name: str) -> None:
        command = Command(command_id, "lock-0001", name, {}, now, now + timedelta(minutes=1))
        model.receive_command("lock-0001", msgspec.json.encode(command), 0)
        model.follow_up("lock-0001", command_id, 0)

    deliver("a", "unlock")
    deliver("a", "unlock")  # remembered: answered, not run
    deliver("b", "lock")  # pushes "a" out of a memory of one
    deliver("a", "unlock")
    device = model.stats().devices["lock-0001"]
    assert device.runs == {"a": 2, "b": 1}
    assert device.deliveries == {"a": 1}  # bounded like the memory of results
