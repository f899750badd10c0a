"""The twins flow end to end: a simulated fleet over real MQTT, real Kafka and DuckDB out.

Simulated devices (``infra.simulator``) publish telemetry and retained state;
desired changes wait on ``{prefix}.twins.desired``. The flow runs as a real
``python -m bytewax.run`` subprocess. Standing in for the orchestrator (not
under test here), a relay forwards each command request from Kafka to the
device's MQTT cmd topic unchanged, so the simulator executes it and reports
the new state. After the run every twin's reported state must equal the
simulator's ground truth (twin sync accuracy 100%), deltas must have cleared,
and every bad input must be a dead letter with its reason.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connectors.kafka import read_topic, tail
from connectors.mqtt import connect_client
from infra.flowproc import FlowProcess
from infra.simulator import Fleet, FleetConfig
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from tests.dataflows.flowkit import forward_through_bridge, produce
from twins.history import property_history, state_at

KINDS = ("temp", "power", "hvac", "lock", "light")


def relay_commands(settings: Settings, stop: threading.Event, seen: list[dict]) -> threading.Thread:
    """Forward command requests to the devices, as an orchestrator would deliver them."""
    mqtt = MqttTopics(settings.mqtt_base)

    def run() -> None:
        client = connect_client(settings.require_mqtt_url())
        try:
            topic = KafkaTopics(settings.topic_prefix).command_requests
            for record in tail(settings.require_kafka_bootstrap(), topic, stop=stop):
                command = json.loads(record.value)
                seen.append(command)
                client.publish(
                    mqtt.cmd(command["device_id"]), record.value, qos=1
                ).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def truth(snapshot) -> dict:
    """What the twin should report: the state topic's values and the last reading's."""
    values = dict(snapshot.reported)
    values.update(
        {k: v for k, v in (snapshot.last_telemetry or {}).items() if k not in ("ts", "seq")}
    )
    return values


def test_twins_follow_a_simulated_fleet(settings: Settings, tmp_path: Path, mqtt_publish) -> None:
    kafka = KafkaTopics(settings.topic_prefix)
    mqtt = MqttTopics(settings.mqtt_base)
    bootstrap = settings.require_kafka_bootstrap()
    produce(
        bootstrap,
        kafka.twins_desired,
        [
            b'{"device_id": "hvac-0001", "desired": {"setpoint": 25.5}}',
            b'{"device_id": "lock-0001", "desired": {"locked": 0}}',
            b'{"device_id": "ghost-1", "desired": {"setpoint": 20}}',
            b'{"device_id": "hvac-0002", "desired": {"setpoint": 99}}',
            b'{"device_id": "hvac-0003", "desired": {"setpoint": 20}, "version": 7}',
            b"not json",
        ],
    )
    settings = settings.model_copy(
        update={"mqtt_idle_stop_s": 3.0, "mqtt_client_id": f"twins-{settings.topic_prefix}"}
    )
    stop, commands = threading.Event(), []
    started = datetime.now(UTC)
    with FlowProcess.start("dataflows.twins:flow", settings, log=tmp_path / "flow.log") as proc:
        proc.wait_online()
        relay = relay_commands(settings, stop, commands)
        config = FleetConfig(
            devices={k: 4 for k in KINDS}, rate_hz=4, base=settings.mqtt_base, seed=7
        )
        with Fleet(config, settings.require_mqtt_url()) as fleet:
            time.sleep(2.0)
            mqtt_publish(
                settings.require_mqtt_url(),
                [
                    (mqtt.telemetry("hvac-0004"), b'{"ts": "yesterday", "temperature": 1}'),
                    (mqtt.telemetry("hvac-0004"), b'{"colour": "red"}'),
                    (mqtt.telemetry("fridge-1"), b'{"temperature": 4.0}'),
                    (mqtt.state("lock-0002"), b"[1, 2"),
                ],
            )
            time.sleep(2.0)
        stats = fleet.stats
        assert proc.wait(60) == 0, proc.log.read_text()
    stop.set()
    relay.join(10)

    # the latest version of each twin on the compacted topic
    latest: dict[str, dict] = {}
    versions: dict[str, list[int]] = {}
    for record in read_topic(bootstrap, kafka.twins):
        change = json.loads(record.value)
        assert record.key.decode() == change["device_id"]
        versions.setdefault(change["device_id"], []).append(change["version"])
        latest[change["device_id"]] = change
    assert set(latest) == set(stats.devices)
    for device_id, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), device_id  # strictly increasing, none lost

    matching = [d for d, snap in stats.devices.items() if latest[d]["reported"] == truth(snap)]
    accuracy = len(matching) / len(stats.devices)
    mismatched = {
        d: (latest[d]["reported"], truth(stats.devices[d]))
        for d in stats.devices
        if d not in matching
    }
    assert accuracy == 1.0, mismatched
    assert all(change["online"] and change["delta"] == {} for change in latest.values())

    # the desired changes became commands, the simulator ran them, the deltas cleared
    assert sorted((c["device_id"], c["name"], c["params"]) for c in commands) == [
        ("hvac-0001", "set_temperature", {"setpoint": 25.5}),
        ("lock-0001", "unlock", {}),
    ]
    assert latest["hvac-0001"]["reported"]["setpoint"] == 25.5
    assert latest["hvac-0001"]["desired"] == {"setpoint": 25.5}
    assert latest["lock-0001"]["reported"]["locked"] == 0
    assert stats.commands_executed == 2

    letters = [json.loads(r.value) for r in read_topic(bootstrap, kafka.deadletter)]
    reasons = sorted(letter["reason"] for letter in letters)
    expected = [
        "unknown device 'ghost-1'",
        "setpoint: 99 is out of range 10..32 C",
        "based on version 7, but the twin is at version",
        "invalid desired change",
        "ts 'yesterday' is not ISO 8601",
        "unknown property 'colour'",
        "unknown device 'fridge-1'",
        "invalid JSON",
    ]
    assert len(letters) == len(expected), reasons
    for needle in expected:
        assert sum(needle in reason for reason in reasons) == 1, (needle, reasons)

    # DuckDB history agrees with Kafka
    db = settings.duckdb
    for device_id, change in latest.items():
        recorded = state_at(db, device_id, datetime.now(UTC) + timedelta(seconds=1))
        assert recorded is not None and recorded.version == change["version"]
        assert recorded.reported == change["reported"]
    assert state_at(db, "hvac-0001", started - timedelta(seconds=1)) is None
    setpoints = property_history(
        db, "hvac-0001", "setpoint", started - timedelta(hours=1), datetime.now(UTC)
    )
    assert [p.value for p in setpoints] == [21.0, 25.5]


def test_twins_from_the_kafka_ingest_path(settings: Settings, tmp_path: Path, mqtt_publish) -> None:
    """The cloud path: MQTT -> ingest bridge -> ``{prefix}.ingest`` -> the twins flow
    (``IOTFLOW_INGEST=kafka``, read to its end), telemetry and state alike."""
    mqtt = MqttTopics(settings.mqtt_base)
    kafka = KafkaTopics(settings.topic_prefix)
    bootstrap = settings.require_kafka_bootstrap()
    t0 = 1_767_268_800_000
    messages = [
        (
            mqtt.state("hvac-0001"),
            b'{"kind": "hvac", "mode": "auto", "setpoint": 21.0, "fan_speed": 1}',
        ),
        (mqtt.telemetry("hvac-0001"), b'{"ts": %d, "seq": 0, "temperature": 22.5}' % t0),
        (mqtt.telemetry("hvac-0001"), b'{"ts": %d, "seq": 1, "temperature": 22.7}' % (t0 + 1000)),
        (mqtt.state("lock-0001"), b'{"kind": "lock", "locked": 1}'),
        (
            mqtt.telemetry("lock-0001"),
            b'[{"ts": %d, "battery": 99.5}, {"ts": %d, "battery": 99.4}]' % (t0, t0 + 1000),
        ),
        (mqtt.telemetry("lock-0001"), b'{"ts": %d, "locked": 7}' % (t0 + 2000)),
    ]
    produce(
        bootstrap, kafka.twins_desired, [b'{"device_id": "hvac-0001", "desired": {"setpoint": 24}}']
    )
    forward_through_bridge(settings, messages, mqtt_publish)
    bounded = settings.model_copy(update={"ingest": "kafka", "ingest_until_end": True})
    with FlowProcess.start("dataflows.twins:flow", bounded, log=tmp_path / "flow.log") as proc:
        assert proc.wait(60) == 0, proc.log.read_text()

    latest = {}
    for record in read_topic(bootstrap, kafka.twins):
        change = json.loads(record.value)
        latest[change["device_id"]] = change
    assert latest["hvac-0001"]["reported"] == {
        "kind": "hvac",
        "mode": "auto",
        "setpoint": 21.0,
        "fan_speed": 1,
        "temperature": 22.7,
    }
    assert latest["hvac-0001"]["delta"] == {"setpoint": 24.0}
    assert latest["lock-0001"]["reported"] == {"kind": "lock", "locked": 1, "battery": 99.4}
    commands = [json.loads(r.value) for r in read_topic(bootstrap, kafka.command_requests)]
    assert [(c["device_id"], c["name"], c["params"]) for c in commands] == [
        ("hvac-0001", "set_temperature", {"setpoint": 24.0})
    ]
    letters = [json.loads(r.value) for r in read_topic(bootstrap, kafka.deadletter)]
    assert len(letters) == 1 and "locked: 7 is out of range 0..1" in letters[0]["reason"]
