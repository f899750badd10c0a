"""Shared fixtures: real brokers on loopback, started by the project's own launcher.

The brokers live for the whole session on ephemeral ports; every test takes
its own topic names (``names`` fixture) so tests never see each other's data.
Before the session broker stops, the session fails if any retained message is
left on a command topic (a retained command replays on every resubscribe).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connectors.mqtt import connect_client
from infra.stack import LocalStack, StackInfo
from iotflow.events import DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

# --doctest-modules would import every conftest.py a second time as a module named
# "conftest", which clashes with the per-package conftests; they hold no doctests.
collect_ignore_glob = ["conftest.py", "*/conftest.py"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A Mosquitto (or the configured broker) and a Tansu for the whole test session."""
    state_dir = tmp_path_factory.mktemp("stack")
    # Isolate from any stack a developer has running: the tests never write its state file.
    os.environ["IOTFLOW_STATE_DIR"] = str(state_dir)
    settings = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap=None)
    with LocalStack.start(state_dir, settings, write_state=False) as local:
        yield local.info
        left = find_retained_commands(local.info.mqtt_url)
        if left:
            shown = "; ".join(f"{topic!r}: {payload[:200]!r}" for topic, payload in left)
            pytest.fail(
                f"{len(left)} retained message(s) left on command topics after the suite "
                f"(a retained command replays on every resubscribe): {shown}; commands must "
                "be published with retain=False",
                pytrace=False,
            )


def find_retained_commands(
    url: str, base: str = "+", timeout_s: float = 10.0
) -> list[tuple[str, bytes]]:
    """(topic, payload) of every retained message on ``{base}/devices/+/cmd`` at ``url``.

    A broker sends the retained messages of a subscription before anything
    published after its SUBACK, so a plain (not retained) probe on a matching
    topic marks the end of them. Raises ``TimeoutError`` if the probe never
    comes back.
    """
    pattern = MqttTopics(base).cmd()
    probe_base = base if base != "+" else f"retained-probe-{uuid.uuid4().hex[:8]}"
    probe = MqttTopics(probe_base).cmd(f"probe-{uuid.uuid4().hex[:8]}")
    retained: list[tuple[str, bytes]] = []
    subscribed, probed = threading.Event(), threading.Event()

    def on_message(_c: object, _u: object, msg: object) -> None:
        if msg.topic == probe:  # type: ignore[attr-defined]
            probed.set()
        elif msg.retain:  # type: ignore[attr-defined]
            retained.append((msg.topic, msg.payload))  # type: ignore[attr-defined]

    client = connect_client(
        url,
        on_connect=lambda c: c.subscribe(pattern, qos=1),
        on_subscribe=lambda *_a: subscribed.set(),
        on_message=on_message,
    )
    try:
        if not subscribed.wait(timeout_s):
            raise TimeoutError(f"no SUBACK for {pattern!r} within {timeout_s}s")
        client.publish(probe, b"probe", qos=1).wait_for_publish(timeout_s)
        if not probed.wait(timeout_s):
            raise TimeoutError(f"the probe on {probe!r} did not come back within {timeout_s}s")
    finally:
        client.disconnect()
        client.loop_stop()
    return retained


@pytest.fixture(scope="session")
def retained_commands() -> Callable[..., list[tuple[str, bytes]]]:
    """``find_retained_commands(url, base="+")``: retained messages on command topics."""
    return find_retained_commands


@dataclass(frozen=True)
class Names:
    """Per-test topic names: an MQTT base and a Kafka prefix nobody else uses."""

    mqtt_base: str
    kafka_prefix: str


@pytest.fixture
def names() -> Names:
    tag = uuid.uuid4().hex[:10]
    return Names(mqtt_base=f"t{tag}", kafka_prefix=f"t{tag}")


@pytest.fixture
def settings(stack: StackInfo, names: Names, tmp_path: Path) -> Settings:
    """Settings pointing at the session brokers, this test's topics and its own DuckDB file."""
    return Settings(
        _env_file=None,
        mqtt_url=stack.mqtt_url,
        kafka_bootstrap=stack.kafka_bootstrap,
        topic_prefix=names.kafka_prefix,
        mqtt_base=names.mqtt_base,
        duckdb=tmp_path / "test.duckdb",
    )


def _publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    client = connect_client(url)
    for info in [client.publish(topic, payload, qos=1) for topic, payload in messages]:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def _poll(partition: object, want: int, timeout_s: float = 10.0) -> list[DeviceMessage]:
    got: list[DeviceMessage] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for batch in partition.next_batch():  # type: ignore[attr-defined]
            got.extend(batch)
        time.sleep(0.01)
    return got


@pytest.fixture
def mqtt_publish() -> Callable[[str, list[tuple[str, bytes]]], None]:
    """Publish (topic, payload) pairs at QoS 1 and wait for every PUBACK."""
    return _publish


@pytest.fixture
def mqtt_poll() -> Callable[..., list[DeviceMessage]]:
    """Poll an MQTT source partition until ``want`` messages arrived or the timeout passed."""
    return _poll
