"""Shared fixtures: real brokers on loopback, started by the project's own launcher.

The brokers live for the whole session on ephemeral ports; every test takes
its own topic names (``names`` fixture) so tests never see each other's data.
"""

from __future__ import annotations

import os
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
