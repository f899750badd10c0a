"""A firmware rollout end to end: 500 simulated nodes over real MQTT, the real orchestrator flow.

10 % of the nodes fail every firmware update. The rollout (waves 1 %, 10 %,
100 %; abort above a 5 % failure rate once 20 devices finished) passes its
canary, aborts in the second wave, never touches the third, and rolls every
updated node back to the firmware it ran.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka import read_topic
from infra.simulator import Fleet, FleetConfig
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics
from tests.dataflows.flowkit import encode, orchestrator_flow, produce

NODES = [f"node-{i:04d}" for i in range(1, 501)]
FAILING = NODES[6::10]  # node-0007, node-0017, ...: 10 %, none of them in the canary
ORCHESTRATOR = {"ack_timeout": {"mqtt": "2s"}, "max_attempts": 2, "backoff": "200ms", "jitter": 0.0}


@pytest.fixture
def orchestrator(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    with orchestrator_flow(settings, tmp_path, ORCHESTRATOR, log_name="orchestrator.log") as run:
        yield run[0]


def plan_events(settings: Settings, plan_id: str) -> list[dict[str, Any]]:
    topic = KafkaTopics(settings.topic_prefix).command_events
    records = read_topic(settings.require_kafka_bootstrap(), topic)
    return [e for r in records if (e := json.loads(r.value)).get("plan_id") == plan_id]


def test_rollout_with_failing_devices_aborts_and_rolls_back(orchestrator: Settings) -> None:
    settings = orchestrator
    fleet_config = FleetConfig(
        devices={"node": 500},
        base=settings.mqtt_base,
        commands={"ack_latency_ms": 5},
        firmware={"version": "1.0.0", "failing": FAILING},
    )
    request = {
        "coordinator": {
            "type": "rollout",
            "id": "fw-2.0.0-1",
            "name": "fw-2.0.0",
            "target": {"devices": NODES},
            "command": "update_firmware",
            "params": {"version": "2.0.0"},
            "waves": [1, 10, 100],
            "max_in_flight": 25,
            "success_threshold": 0.8,
            "abort": {"failure_rate": 0.05, "min_finished": 20},
        }
    }
    with Fleet(fleet_config, settings.require_mqtt_url(), schedule_telemetry=False) as fleet:
        topic = KafkaTopics(settings.topic_prefix).command_requests
        produce(settings.require_kafka_bootstrap(), topic, [encode(request)], key=b"fw-2.0.0-1")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            events = plan_events(settings, "fw-2.0.0-1")
            if any(e["kind"] in ("done", "failed", "stuck") for e in events):
                break
            time.sleep(0.3)
        stats = fleet.stats

    kinds = [(e["kind"], e.get("wave")) for e in events]
    assert kinds[:4] == [
        ("started", None),
        ("wave_started", 0),
        ("wave_done", 0),
        ("wave_started", 1),
    ]
    aborted = [e for e in events if e["kind"] == "aborted"]
    assert len(aborted) == 1 and aborted[0]["wave"] == 1
    assert "is over 5%" in aborted[0]["detail"]
    assert events[-1]["kind"] == "failed" and "rolled back" in events[-1]["detail"]
    assert ("wave_started", 2) not in kinds  # no further wave
    # the third wave was never sent anything
    assert all(not stats.devices[d].executed for d in NODES[50:])
    # every node runs the firmware it ran before; updated ones were rolled back
    assert {s.reported["firmware"] for s in stats.devices.values()} == {"1.0.0"}
    updated = [
        d for d in NODES[:50] if any("/update_firmware/" in c for c in stats.devices[d].executed)
    ]
    assert updated  # the canary and part of wave 1 had been updated
    for device in updated:
        assert [c.split("/")[1] for c in stats.devices[device].executed] == [
            "update_firmware",
            "rollback",
        ]
    # the failing nodes refused the update and got no rollback
    assert all(not stats.devices[d].executed for d in FAILING)
