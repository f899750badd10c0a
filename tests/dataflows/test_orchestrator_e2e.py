"""The orchestrator flow end to end: simulated devices over real MQTT, real Kafka and DuckDB.

The flow runs as a real ``python -m bytewax.run`` subprocess. An online fleet
(3 HVAC units, 2 locks) executes and acks commands; a second fleet holds one
light that is offline the whole time. Requests arrive on Kafka, in one
partition (one key), so their order is the order they were produced.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from connectors.dedupe import Deduper, command_event_key
from connectors.duckdb_store import command_history
from connectors.kafka import read_topic
from connectors.mqtt import connect_client
from infra.flowproc import FlowProcess
from infra.simulator import Fleet, FleetConfig
from infra.stack import StackInfo
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from tests.dataflows.flowkit import (
    Events,
    command,
    encode,
    orchestrator_flow,
    produce,
    request,
    terminal,
)
from twins.registry import simulator_registry

CONFIG = {
    "ack_timeout": {"mqtt": "1s"},
    "max_attempts": 5,
    "backoff": "200ms",
    "jitter": 0.0,
}


@pytest.fixture
def flow(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, FlowProcess]]:
    with orchestrator_flow(settings, tmp_path, CONFIG) as running:
        yield running


def test_commands_are_sequenced_acked_expired_deduplicated_and_audited(
    flow: tuple[Settings, FlowProcess], stack: StackInfo
) -> None:
    settings, proc = flow
    url = settings.require_mqtt_url()
    bootstrap = settings.require_kafka_bootstrap()
    requests = KafkaTopics(settings.topic_prefix).command_requests
    base = settings.mqtt_base
    online = FleetConfig(devices={"hvac": 3, "lock": 2}, base=base, seed=1)
    offline = FleetConfig(devices={"light": 1}, base=base, faults={"offline_rate": 1.0})
    events = Events(settings)
    started = datetime.now(UTC)
    with (
        Fleet(online, url, schedule_telemetry=False) as fleet,
        Fleet(offline, url, schedule_telemetry=False) as dark,
    ):
        unlock = encode(command("dup-1", "lock-0001", "unlock", {}))
        produce(
            bootstrap,
            requests,
            [
                encode(
                    {
                        "instruction_id": "cool",
                        "target": {"devices": ["hvac-0001", "hvac-0002", "hvac-0003"]},
                        "steps": [
                            "set_mode cool",
                            "set_temperature 23.5",
                            {"command": "set_fan_speed", "params": {"speed": 2}},
                        ],
                    }
                ),
                unlock,
                unlock,  # a replayed request
                encode(command("off-1", "light-0001", "turn_on", {}, ttl_s=3)),
                encode(
                    command("off-2", "light-0001", "set_brightness", {"brightness": 40}, ttl_s=3)
                ),
                # bad requests
                b"{not json",
                b'{"command_id": "nan-1", "device_id": "hvac-0001", "name": "set_temperature",'
                b' "params": {"setpoint": NaN}}',
                encode(command("bad-device", "toaster-1", "turn_on", {})),
                encode(command("bad-command", "hvac-0001", "self_destruct", {})),
                encode(command("bad-params", "hvac-0001", "set_temperature", {"setpoint": 99})),
                encode(command("bad-type", "hvac-0001", "set_temperature", {"setpoint": "hot"})),
                encode(
                    command(
                        "far-future",
                        "hvac-0001",
                        "set_mode",
                        {"mode": "off"},
                        ttl_s=10 * 365 * 86400,
                    )
                ),
                encode(command("hostile-device", "hvac-0001/#", "set_mode", {"mode": "off"})),
                encode(command("evil\u0000id", "hvac-0002", "set_mode", {"mode": "off"})),
                encode({"command_id": "no-fields"}),
                unlock,  # replayed again, later
            ],
        )
        cool_ids = [f"cool/{step}/hvac-000{n}" for step in range(3) for n in (1, 2, 3)]
        wanted = [*cool_ids, "dup-1", "off-1", "off-2"]
        got = events.wait(lambda ev: all(i in terminal(ev) for i in wanted))
        # a redelivered ack, then an ack from the wrong device: both change nothing
        client = connect_client(url)
        for device in ("lock-0001", "lock-0002"):
            ack = json.dumps({"command_id": "dup-1", "status": "done"}).encode()
            client.publish(MqttTopics(base).ack(device), ack, qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        dead_wait = threading.Event()
        for _ in range(100):
            if any("'lock-0002' acked command 'dup-1'" in d["reason"] for d in events.dead()):
                break
            dead_wait.wait(0.3)
        stats, dark_stats = fleet.stats, dark.stats
    # the audit is written in batches by a thread of its own; stopping the flow (SIGINT)
    # writes what is still queued, so nothing is lost at the stop
    proc.stop()
    got = events.commands()
    ends = terminal(got)

    # every command reached exactly one terminal state
    requested = {e["command_id"] for e in got if e["kind"] == "requested"}
    assert all(len(ends[i]) == 1 for i in requested), ends
    assert requested == set(ends)

    # the instruction: each HVAC unit got its three steps in order, and shows them
    for n in (1, 2, 3):
        device = f"hvac-000{n}"
        sent = [e["command_id"] for e in got if e["kind"] == "sent" and e["device_id"] == device]
        assert sent == [f"cool/{s}/{device}" for s in range(3)]
        assert {
            k: stats.devices[device].reported[k] for k in ("mode", "setpoint", "fan_speed")
        } == {
            "mode": "cool",
            "setpoint": 23.5,
            "fan_speed": 2,
        }
    assert all(ends[i] == ["done"] for i in cool_ids)

    # duplicates: the unlock ran once, though requested three times and acked again
    assert ends["dup-1"] == ["done"]
    assert sum(e["command_id"] == "dup-1" and e["kind"] == "sent" for e in got) == 1
    assert stats.duplicate_commands == 0
    assert stats.commands_received == stats.commands_executed == 10
    assert stats.devices["lock-0001"].reported["locked"] == 0

    # the offline light: the first command was tried until it expired, the second never sent
    off1 = [e for e in got if e["command_id"] == "off-1"]
    assert [e["kind"] for e in off1 if e["kind"] in ("sent", "expired")][-1] == "expired"
    sends = sum(e["kind"] == "sent" for e in off1)
    assert sends >= 2
    assert dark_stats.ignored_commands.get("offline") == sends
    assert dark_stats.commands_received == 0
    off2 = [e["kind"] for e in got if e["command_id"] == "off-2"]
    assert off2 == ["requested", "queued", "expired"]
    # sent and never confirmed: unknown whether it acted; never sent: certainly not
    applied = {e["command_id"]: e["applied"] for e in got if e["kind"] == "expired"}
    assert applied == {"off-1": None, "off-2": False}

    # bad requests: rejected with a reason (audited) or dead-lettered, never sent
    reasons = {e["command_id"]: e["reason"] for e in got if e["kind"] == "rejected"}
    assert reasons == {
        "bad-device": "unknown_device",
        "bad-command": "unknown_command",
        "bad-params": "out_of_range",
        "bad-type": "wrong_type",
        "far-future": "far_future_expiry",
        "hostile-device": "bad_id",
        "no-fields": "invalid_command",
    }
    dead = [d["reason"] for d in proc_dead(events)]
    assert sum("not valid JSON" in r for r in dead) == 2  # the broken one and the NaN
    assert any("control characters" in r for r in dead)
    assert any("'lock-0002' acked command 'dup-1'" in r for r in dead)

    # the audit: what happened to hvac-0001, one query
    history = command_history(settings.duckdb, "hvac-0001", started, datetime.now(UTC))
    rows = history.to_dicts()
    for step in range(3):
        kinds = [r["kind"] for r in rows if r["command_id"] == f"cool/{step}/hvac-0001"]
        assert kinds == ["requested", "queued", "sent", "done"]
    rejected = {r["command_id"]: r["reason"] for r in rows if r["kind"] == "rejected"}
    assert rejected == {
        "bad-command": "unknown_command",
        "bad-params": "out_of_range",
        "bad-type": "wrong_type",
        "far-future": "far_future_expiry",
    }
    assert len(rows) == 12 + 8
    assert history["ts"].is_sorted()


def proc_dead(events: Events) -> list[dict[str, Any]]:
    return events.dead()


class HomeAssistant:
    """A Home Assistant-style service API on loopback: records each call with its token."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                api.calls.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"[]")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_kafka_and_http_writers_deliver_and_devices_confirm(
    settings: Settings, tmp_path: Path
) -> None:
    """A lock behind a Kafka gateway and a light behind a Home Assistant: both DONE."""
    token = "ha-long-lived-token"
    registry = simulator_registry().to_dict()
    registry["devices"] = {
        "gw-lock-1": {"model": "lock", "protocol": "kafka"},
        "porch-light": {
            "model": "light",
            "protocol": "http",
            "entity_id": "light.porch",
            "services": {"set_brightness": "turn_on"},
        },
    }
    config = CONFIG | {"ack_timeout": {"mqtt": "1s", "kafka": "5s", "http": "5s"}}
    ha = HomeAssistant()
    settings = settings.model_copy(
        update={
            "http_url": ha.url,
            "http_token": SecretStr(token),
            "http_style": "home_assistant",
        }
    )
    bootstrap = settings.require_kafka_bootstrap()
    mqtt = MqttTopics(settings.mqtt_base)
    events = Events(settings)
    try:
        with orchestrator_flow(settings, tmp_path, config, registry=registry) as (settings, _):
            request(
                settings,
                [
                    command("gw-1", "gw-lock-1", "unlock", {}),
                    command("ha-1", "porch-light", "set_brightness", {"brightness": 40}),
                ],
            )
            # the gateway reads its Kafka topic and acks over MQTT; HA reports the new state
            gateway_topic = f"{settings.topic_prefix}.commands.device"
            stop = threading.Event()
            delivered: list[dict[str, Any]] = []
            for _ in range(100):
                delivered = [json.loads(r.value) for r in read_topic(bootstrap, gateway_topic)]
                if delivered and ha.calls:
                    break
                stop.wait(0.2)
            client = connect_client(settings.require_mqtt_url())
            ack = {
                "command_id": delivered[0]["command_id"],
                "status": "done",
                "reported": {"locked": 0},
            }
            client.publish(mqtt.ack("gw-lock-1"), json.dumps(ack).encode(), qos=1).wait_for_publish(
                10
            )
            client.publish(
                mqtt.state("porch-light"), b'{"on": 1, "brightness": 40}', qos=1
            ).wait_for_publish(10)
            client.disconnect()
            client.loop_stop()
            got = events.wait(lambda ev: {"gw-1", "ha-1"} <= set(terminal(ev)))
    finally:
        ha.close()
    assert terminal(got) == {"gw-1": ["done"], "ha-1": ["done"]}
    done = {e["command_id"]: e["detail"] for e in got if e["kind"] == "done"}
    assert done == {"gw-1": "acked done", "ha-1": "reported state shows brightness=40"}
    assert [d["name"] for d in delivered] == ["unlock"]
    assert ha.calls == [
        {
            "path": "/api/services/light/turn_on",
            "auth": f"Bearer {token}",
            "body": {"entity_id": "light.porch", "brightness": 40},
        }
    ]
    assert token not in (tmp_path / "flow.log").read_text()


@pytest.mark.parametrize(
    ("snapshot_s", "wait_s"),
    [(1, 1.5), (10, 0.0)],
    ids=["sent-in-snapshot", "killed-before-snapshot"],
)
def test_a_flow_killed_between_send_and_ack_never_makes_a_device_act_twice(
    settings: Settings, tmp_path: Path, snapshot_s: int, wait_s: float
) -> None:
    """SIGKILL after the command was sent; the ack arrives while the flow is down.

    With SENT in the snapshot the restarted flow does not send again and takes
    the ack its MQTT session kept; killed before any snapshot, it reads the
    request again and re-sends under the same command id, which the device
    answers without acting again. Either way: one action, one DONE.
    """
    (tmp_path / "orchestrator.yaml").write_text(
        yaml.safe_dump(CONFIG | {"ack_timeout": {"mqtt": "20s"}})
    )
    settings = settings.model_copy(
        update={
            "orchestrator": tmp_path / "orchestrator.yaml",
            "mqtt_client_id": f"orch-{settings.topic_prefix}",
            "recovery_dir": tmp_path / "recovery",
        }
    )
    slow = FleetConfig(
        devices={"lock": 1}, base=settings.mqtt_base, commands={"ack_latency_ms": 3000}
    )
    events = Events(settings)
    log = tmp_path / "flow.log"
    with Fleet(slow, settings.require_mqtt_url(), schedule_telemetry=False) as fleet:
        first = FlowProcess.start(
            "dataflows.orchestrator:flow", settings, log=log, snapshot_s=snapshot_s
        )
        try:
            first.wait_online()
            produce(
                settings.require_kafka_bootstrap(),
                KafkaTopics(settings.topic_prefix).command_requests,
                [encode(command("once", "lock-0001", "unlock", {}))],
            )
            events.wait(lambda ev: any(e["kind"] == "sent" for e in ev))
            threading.Event().wait(wait_s)  # > a snapshot interval: the state with SENT is stored
        finally:
            first.kill()
        with FlowProcess.start(
            "dataflows.orchestrator:flow", settings, log=log, snapshot_s=1
        ) as second:
            second.wait_online()
            got = events.wait(lambda ev: "once" in terminal(ev))
            stats = fleet.stats
    # A flow killed after it reached the end but before its snapshot reaches it again from
    # the replayed ack or retained state (at least once on events): a reader de-duplicating
    # by the natural key sees one end.
    assert terminal(list(Deduper(command_event_key).filter(got)))["once"] == ["done"]
    assert stats.commands_executed == 1
    assert stats.devices["lock-0001"].reported["locked"] == 0
