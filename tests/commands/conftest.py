"""Fixtures for the command tests: a manual clock, registries, command factories."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cmdkit import Clock, make_command

from commands.orchestrator import Orchestrator, OrchestratorConfig
from iotflow.events import Command
from twins.registry import Registry, simulator_registry


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> Registry:
    """The simulator's models by id pattern, plus a few devices with metadata."""
    reg = simulator_registry()
    reg.add_device("hvac-kitchen", "hvac", building="A", floor=1, x=0.0, y=0.0)
    reg.add_device("hvac-hall", "hvac", building="A", floor=2, x=3.0, y=4.0)
    reg.add_device("hvac-annex", "hvac", building="B", floor=1, x=10.0, y=0.0)
    reg.add_device("lamp-http", "light", protocol="http", entity_id="light.lamp")
    reg.add_device("lock-zigbee", "lock", protocol="zigbee")
    reg.add_group("hvacs", ["hvac-kitchen", "hvac-hall", "hvac-annex"])
    return reg


@pytest.fixture
def cmd() -> Callable[..., Command]:
    return make_command


@pytest.fixture
def orch(registry: Registry, clock: Clock) -> Orchestrator:
    """An orchestrator with 1 s ack timeouts, 3 sends, 1 s back-off without jitter."""
    config = OrchestratorConfig(
        ack_timeout={"mqtt": "1s", "kafka": "2s", "http": "3s"},
        max_attempts=3,
        backoff="1s",
        backoff_max="10s",
        jitter=0.0,
    )
    return config.build(None, registry, clock)
