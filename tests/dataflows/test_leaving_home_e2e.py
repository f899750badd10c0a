"""The leaving-home saga end to end: simulated devices over real MQTT, the real orchestrator flow.

The orchestrator runs as a real ``python -m bytewax.run dataflows.orchestrator:flow``
subprocess on the session's Mosquitto and Tansu, with a registry that declares the
routine's groups over 2 doors, a thermostat, 120 lights, an alarm and a notifier.
A simulated home (``infra.simulator.Fleet``) executes and acks the commands.
Scenarios: everything succeeds (started by the trigger flow, a repeated trigger
does nothing); the lighting hub goes offline midway (everything rolled back);
a protocol timeout that the orchestrator's retry recovers (the routine completes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.duckdb_store import command_history
from connectors.kafka import producer_config, read_topic
from connectors.mqtt import connect_client
from dataflows.leaving_home import home_registry, load_routine, routine_request, trigger_topic
from infra.flowproc import FlowProcess
from infra.simulator import Fleet, FleetConfig
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics
from tests.dataflows.flowkit import orchestrator_flow

LIGHTS = 120
ORCHESTRATOR = {"ack_timeout": {"mqtt": "1s"}, "max_attempts": 3, "backoff": "200ms", "jitter": 0.0}
T_TRIGGER_MS = 1_767_268_800_000


def home(settings: Settings, **extra: Any) -> FleetConfig:
    """The simulated home: some lights on at various brightness, the heating at 21.5 C."""
    return FleetConfig(
        devices={"lock": 2, "hvac": 1, "light": LIGHTS, "security": 1, "notifier": 1},
        base=settings.mqtt_base,
        commands={"ack_latency_ms": 5},
        initial_state={
            "light-00[0-3]?": {"on": 1, "brightness": 35},  # lights 1..39 on, dimmed
            "light-01[01]?": {"on": 1},  # 100..119 on at full brightness
            "lock-*": {"locked": 0},
            "hvac-0001": {"setpoint": 21.5},
        },
        **extra,
    )


def reported(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {d: dict(s.reported) for d, s in fleet.stats.devices.items()}


class Audit:
    """The orchestrator's events on Kafka, read back."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.require_kafka_bootstrap()
        self.topic = KafkaTopics(settings.topic_prefix).command_events

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in read_topic(self.bootstrap, self.topic)]

    def plan(self, plan_id: str) -> list[dict[str, Any]]:
        return [e for e in self.all() if e.get("plan_id") == plan_id]

    def wait(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 90
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self.all()
            if done(events):
                return events
            time.sleep(0.3)
        kinds = [
            (e.get("plan_id"), e["kind"], e.get("detail")) for e in self.all() if "plan_id" in e
        ]
        raise AssertionError(f"not finished within {timeout_s}s; plan events: {kinds}")


def finished(plan_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    terminal = {"done", "failed", "stuck"}
    return lambda events: any(e.get("plan_id") == plan_id and e["kind"] in terminal for e in events)


def produce(settings: Settings, key: str, value: bytes) -> None:
    producer = Producer(producer_config(settings.require_kafka_bootstrap()))
    producer.produce(KafkaTopics(settings.topic_prefix).command_requests, value, key=key.encode())
    assert producer.flush(10) == 0


@pytest.fixture
def orchestrator(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, FlowProcess]]:
    registry = home_registry(lights=LIGHTS).to_dict()
    with orchestrator_flow(
        settings, tmp_path, ORCHESTRATOR, registry=registry, log_name="orchestrator.log"
    ) as running:
        yield running


def test_all_steps_succeed_from_a_trigger_and_a_repeated_trigger_does_nothing(
    orchestrator: tuple[Settings, FlowProcess], tmp_path: Path
) -> None:
    settings, proc = orchestrator
    trigger_settings = settings.model_copy(
        update={"mqtt_client_id": f"leave-{settings.topic_prefix}"}
    )
    plan_id = f"leaving-home-home1-{T_TRIGGER_MS}"
    audit = Audit(settings)
    started = datetime.now(UTC)
    with (
        FlowProcess.start(
            "dataflows.leaving_home:flow", trigger_settings, log=tmp_path / "trigger.log"
        ) as trigger,
        Fleet(home(settings), settings.require_mqtt_url(), schedule_telemetry=False) as fleet,
    ):
        trigger.wait_online()
        client = connect_client(settings.require_mqtt_url())
        topic = trigger_topic(settings.mqtt_base, "home1")
        payload = json.dumps({"ts": T_TRIGGER_MS}).encode()
        bad = [
            (topic, b"{not json"),
            (topic, b'{"ts": "yesterday"}'),
            (topic, b'{"ts": -5}'),
            (trigger_topic(settings.mqtt_base, "h\u00e9 me"), b""),
        ]
        for bad_topic, bad_payload in bad:
            client.publish(bad_topic, bad_payload, qos=1).wait_for_publish(10)
        client.publish(topic, payload, qos=1).wait_for_publish(10)
        audit.wait(finished(plan_id))
        # the same trigger again (a redelivery, a double press): the same run id
        client.publish(topic, payload, qos=1).wait_for_publish(10)
        requests = KafkaTopics(settings.topic_prefix).command_requests
        for _ in range(100):
            if len(read_topic(settings.require_kafka_bootstrap(), requests)) == 2:
                break
            time.sleep(0.2)
        # a marker on the same key after it: once it is rejected, the repeat was seen
        marker = {"command_id": "marker", "device_id": "toaster-1", "name": "toast", "params": {}}
        produce(settings, plan_id, json.dumps(marker).encode())
        audit.wait(
            lambda ev: any(e.get("command_id") == "marker" and e["kind"] == "rejected" for e in ev)
        )
        client.disconnect()
        client.loop_stop()
        states = reported(fleet)
        executed = {d: s.executed for d, s in fleet.stats.devices.items()}

    dead = read_topic(
        settings.require_kafka_bootstrap(), KafkaTopics(settings.topic_prefix).deadletter
    )
    reasons = sorted(json.loads(r.value)["reason"] for r in dead)
    assert len(reasons) == 4, reasons
    assert sum("JSON object with ts" in r for r in reasons) == 2
    assert any("negative" in r for r in reasons)
    assert any("cannot name a run" in r for r in reasons)
    kinds = [e["kind"] for e in audit.plan(plan_id)]
    assert kinds.count("started") == 1  # the repeated trigger started nothing
    assert kinds[-1] == "done"
    assert [e["step"] for e in audit.plan(plan_id) if e["kind"] == "step_done"] == [
        "lock_doors",
        "thermostat_away",
        "lights_off",
        "arm_security",
        "notify",
    ]
    assert all(states[f"lock-000{i}"]["locked"] == 1 for i in (1, 2))
    assert states["hvac-0001"]["setpoint"] == 16.0
    assert all(states[f"light-{i:04d}"]["on"] == 0 for i in range(1, LIGHTS + 1))
    assert states["security-0001"]["armed"] == 1
    assert executed["notifier-0001"] == (f"{plan_id}/notify/notifier-0001",)  # notified once
    # the audit: one query says what happened to a light (the flow holds DuckDB until it stops)
    proc.stop()
    rows = command_history(settings.duckdb, "light-0042", started, datetime.now(UTC)).to_dicts()
    assert [r["kind"] for r in rows if r["entity"] == "command"] == [
        "requested",
        "queued",
        "sent",
        "done",
    ]


def test_lighting_hub_offline_midway_rolls_everything_back(
    orchestrator: tuple[Settings, FlowProcess],
) -> None:
    settings, proc = orchestrator
    plan_id = "leaving-home-hub-1"
    audit = Audit(settings)
    hub = {"lighting": {"devices": ["light-*"], "offline_after_commands": 60, "offline_for_s": 8}}
    started = datetime.now(UTC)
    with Fleet(
        home(settings, hubs=hub), settings.require_mqtt_url(), schedule_telemetry=False
    ) as fleet:
        before = reported(fleet)
        produce(settings, plan_id, routine_request(load_routine(), "hub", 1))
        audit.wait(finished(plan_id), timeout_s=120)
        after = reported(fleet)
        stats = fleet.stats
    events = audit.plan(plan_id)
    kinds = [e["kind"] for e in events]
    assert kinds[-1] == "failed" and "every applied step compensated" in events[-1]["detail"]
    failed = next(e for e in events if e["kind"] == "step_failed")
    assert failed["step"] == "lights_off"
    assert [e["step"] for e in events if e["kind"] == "compensated"] == [
        "lights_off",
        "thermostat_away",
        "lock_doors",
    ]
    # doors unlocked, thermostat and every light as they were, the alarm never armed
    assert after == before
    assert stats.ignored_commands["hub offline"] >= LIGHTS - 60
    assert stats.devices["security-0001"].executed == ()
    assert stats.devices["notifier-0001"].executed == ()
    undo = [
        e for e in audit.all() if "/undo/" in (e.get("command_id") or "") and e["kind"] == "done"
    ]
    assert {e["device_id"] for e in undo} >= {"lock-0001", "lock-0002", "hvac-0001"}
    proc.stop()
    rows = command_history(settings.duckdb, "hvac-0001", started, datetime.now(UTC)).to_dicts()
    restore = [r for r in rows if r["command_id"] == f"{plan_id}/thermostat_away/hvac-0001/undo/0"]
    assert [r["kind"] for r in restore] == ["requested", "queued", "sent", "done"]


def test_a_protocol_timeout_recovers_within_the_retries(
    orchestrator: tuple[Settings, FlowProcess],
) -> None:
    settings, _ = orchestrator
    plan_id = "leaving-home-timeout-1"
    audit = Audit(settings)
    drops = {"command_drops": [{"devices": ["hvac-0001", "light-0007"], "first_attempts": 2}]}
    with Fleet(
        home(settings, faults=drops), settings.require_mqtt_url(), schedule_telemetry=False
    ) as fleet:
        produce(settings, plan_id, routine_request(load_routine(), "timeout", 1))
        audit.wait(finished(plan_id))
        stats = fleet.stats
    assert audit.plan(plan_id)[-1]["kind"] == "done"
    events = audit.all()
    for device, step in (("hvac-0001", "thermostat_away"), ("light-0007", "lights_off")):
        cid = f"{plan_id}/{step}/{device}"
        sends = [e["attempt"] for e in events if e.get("command_id") == cid and e["kind"] == "sent"]
        assert sends == [1, 2, 3]  # two deliveries unanswered, the third taken
        assert stats.devices[device].executed == (cid,)
    assert stats.ignored_commands == {"dropped": 4}
    assert stats.devices["hvac-0001"].reported["setpoint"] == 16.0
