"""Definition sync: versions apply live, are acknowledged, and the last good one survives
invalid versions, an offline uplink and a restart (real brokers, the edge as a subprocess)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import Producer

from connectors.definitions import ALL_GATEWAYS, DefinitionSource, consider, publish_definition
from connectors.kafka_client import ensure_topics, producer_config
from connectors.mqtt import connect_client
from connectors.uplink import dedupe_uplink, read_uplink
from infra.flowproc import FlowProcess
from infra.proxy import TcpProxy
from iotflow.errors import ConfigError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from iotflow.workflow import Workflow

GATEWAY = "gw-defs"


def workflow(
    version: int, command: str | None = None, condition: str = "smoke > 0"
) -> dict[str, Any]:
    components: list[dict[str, Any]] = [
        {"name": "stats", "kind": "aggregate", "window": "10s", "placement": "edge"}
    ]
    if command is not None:
        rule = {
            "name": "smoke",
            "kind": "threshold",
            "condition": condition,
            "actions": [{"type": "command", "device": "valve-{key}", "name": command}],
        }
        components.append({"name": "gas", "kind": "patterns", "offline": True, "patterns": [rule]})
    return {"name": "safety", "version": version, "components": components}


def doc(version: Any, wf: dict[str, Any], target: str = ALL_GATEWAYS) -> bytes:
    return msgspec.json.encode({"version": version, "target": target, "workflow": wf})


# -- the rules, without brokers ----------------------------------------------------------


def test_newer_versions_apply_older_ones_are_ignored_broken_ones_say_why() -> None:
    built: list[str] = []

    def build(wf: Workflow) -> str:
        built.append(wf.name)
        return f"program v{wf.version}"

    v = consider(doc(2, workflow(2)), 1, build)
    assert (v.status, v.version, v.built, v.reason) == ("apply", 2, "program v2", None)
    assert v.workflow is not None and v.workflow.version == 2
    assert consider(doc(2, workflow(2)), 2, build).status == "ignore"
    assert consider(doc(1, workflow(1)), 2, build).reason == "not newer than the running v2"
    assert built == ["safety"]  # nothing old is built again

    broken = consider(b"{not json", 2, build)
    assert broken.status == "reject" and broken.version is None
    assert broken.reason is not None and broken.reason.startswith("not a definition record")
    wrong_type = consider(doc("three", workflow(3)), 2, build)
    assert (wrong_type.status, wrong_type.version) == ("reject", None)
    invalid = consider(
        doc(3, {"name": "x", "components": [{"name": "a", "kind": "nope"}]}), 2, build
    )
    assert invalid.status == "reject" and invalid.version == 3
    assert "workflow declaration is invalid: components[0]" in str(invalid.reason)

    def refuse(_wf: Workflow) -> str:
        raise ConfigError("component 'gas' is placed on the edge, but gateway 'g' cannot host it")

    refused = consider(doc(4, workflow(4)), 2, refuse)
    assert refused.status == "reject" and "cannot host it" in str(refused.reason)


def test_publishing_checks_the_definition_first() -> None:
    with pytest.raises(ConfigError, match="version 0 must be 1 or more"):
        publish_definition("127.0.0.1:1", "t", workflow(0), 0)
    with pytest.raises(ConfigError, match="target 'a/b' must be a gateway id"):
        publish_definition("127.0.0.1:1", "t", workflow(1), 1, target="a/b")
    with pytest.raises(ConfigError, match="workflow declaration is invalid"):
        publish_definition("127.0.0.1:1", "t", {"name": "x"}, 1)


# -- with the real edge ------------------------------------------------------------------


class Local:
    """The gateway's retained definition status and the commands it sends, on local MQTT."""

    def __init__(self, url: str, base: str) -> None:
        self.acks: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.status: list[bytes] = []
        self._cv = threading.Condition()
        topics = MqttTopics(base)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self._cv:
                if msg.topic.endswith("/definition"):
                    self.acks.append(json.loads(msg.payload))
                elif msg.topic.endswith("/status"):
                    self.status.append(msg.payload)
                else:
                    self.commands.append(json.loads(msg.payload))
                self._cv.notify_all()

        subs = [
            (f"{base}/gateways/{GATEWAY}/definition", 1),
            (topics.gateway_status(GATEWAY), 1),
            (topics.cmd(), 1),
        ]
        self._client = connect_client(
            url, on_connect=lambda c: c.subscribe(subs), on_message=on_message
        )
        self._publisher = connect_client(url)
        self._base = base

    def wait(self, check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not check():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self._cv.wait(min(left, 0.2))

    def smoke(self, device: str) -> str:
        """Publish a smoke reading; returns the command name the gateway answers with."""
        seen = len(self.commands)
        body = json.dumps({"ts": int(time.time() * 1000), "smoke": 1.0})
        topic = MqttTopics(self._base).telemetry(device)
        self._publisher.publish(topic, body, qos=1).wait_for_publish(10)
        self.wait(lambda: len(self.commands) > seen, f"a command for {device}")
        return str(self.commands[-1]["name"])

    def close(self) -> None:
        for c in (self._client, self._publisher):
            c.disconnect()
            c.loop_stop()


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    with TcpProxy.for_kafka(settings.require_kafka_bootstrap()) as p:
        yield p


# SLOW: about 30 s.
def test_a_gateway_applies_versions_live_and_keeps_the_last_good_one(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    bootstrap = settings.require_kafka_bootstrap()
    topics = KafkaTopics(settings.topic_prefix)
    initial = tmp_path / "workflow.json"
    initial.write_text(json.dumps(workflow(1)))
    env = {
        "IOTFLOW_EDGE_GATEWAY_ID": GATEWAY,
        "IOTFLOW_EDGE_WORKFLOW": str(initial),
        "IOTFLOW_EDGE_BUFFER": str(tmp_path / "buffer.db"),
    }
    edge_settings = settings.model_copy(update={"kafka_bootstrap": proxy.address})
    local = Local(settings.require_mqtt_url(), settings.mqtt_base)
    log = tmp_path / "edge.log"

    def start() -> FlowProcess:
        n = local.status.count(b"online")
        proc = FlowProcess.start("dataflows.edge:flow", edge_settings, log=log, extra_env=env)
        local.wait(lambda: local.status.count(b"online") > n, f"the gateway online ({log})", 60)
        return proc

    def publish(version: int, wf: dict[str, Any], target: str = ALL_GATEWAYS) -> None:
        publish_definition(bootstrap, topics.edge_definitions, wf, version, target=target)

    edge = start()
    try:
        pid = edge.popen.pid
        publish(2, workflow(2, command="close"))
        local.wait(lambda: any(a["version"] == 2 for a in local.acks), "the ack of v2")
        assert local.acks[-1] == {**local.acks[-1], "status": "applied", "running_version": 2}
        assert local.smoke("kitchen") == "close"  # the new rule acts, no restart
        assert edge.popen.pid == pid and edge.popen.poll() is None

        publish(3, workflow(3, command="close", condition="smoke >"))  # breaks at build
        local.wait(lambda: any(a["version"] == 3 for a in local.acks), "the ack of v3")
        rejected = local.acks[-1]
        assert rejected["status"] == "rejected" and rejected["running_version"] == 2
        assert "component 'gas'" in rejected["reason"] and "syntax error" in rejected["reason"]
        publish(9, workflow(9, command="other"), target="another-gateway")  # not for us
        publish(1, workflow(1, command="stale"))  # older: ignored, not acknowledged
        assert local.smoke("hall") == "close"  # still v2

        proxy.cut()  # offline: v4 cannot arrive
        publish(4, workflow(4, command="shut"))
        time.sleep(2)
        assert local.smoke("attic") == "close"
        edge.kill()
        edge = start()  # a restart while offline runs the last good version
        assert local.smoke("cellar") == "close"
        assert not any(a["version"] == 4 for a in local.acks)

        proxy.restore()
        local.wait(lambda: any(a["version"] == 4 for a in local.acks), "the ack of v4", 60)
        assert local.acks[-1]["status"] == "applied" and local.acks[-1]["running_version"] == 4
        assert local.smoke("garage") == "shut"
        deadline = time.monotonic() + 30
        while True:  # the acknowledgements also went up, through the buffer
            got = dedupe_uplink(read_uplink(bootstrap, topics.edge_uplink))
            acks = [json.loads(bytes(e.body)) for e in got if e.kind == "definition"]
            if {(a["version"], a["status"]) for a in acks} >= {
                (2, "applied"),
                (3, "rejected"),
                (4, "applied"),
            }:
                break
            assert time.monotonic() < deadline, acks
            time.sleep(0.5)
        assert not any(a["version"] in (1, 9) for a in acks)
    finally:
        edge.kill()
        local.close()


def test_a_long_history_of_large_definitions_is_offered_in_order_a_slice_at_a_time(
    settings: Settings,
) -> None:
    bootstrap = settings.require_kafka_bootstrap()
    topic = KafkaTopics(settings.topic_prefix).edge_definitions
    ensure_topics(bootstrap, [topic])
    producer = Producer(producer_config(bootstrap))
    padding = "x" * 60_000  # a large declaration: 40 of them are 2.4 MB
    for version in range(1, 41):
        value = msgspec.json.encode({"version": version, "target": "*", "padding": padding})
        producer.produce(topic, value, key=b"*")
        producer.produce(topic, doc(version, workflow(version), "other"), key=b"other")
    assert producer.flush(10) == 0
    partition = DefinitionSource(bootstrap, topic, GATEWAY).build("definitions", 0, 1)
    try:
        versions: list[int] = []
        deadline = time.monotonic() + 30
        while len(versions) < 40 and time.monotonic() < deadline:
            offers = partition.next_batch()
            assert len(offers) <= 8  # the rest waits in Kafka, not in the gateway's memory
            versions += [msgspec.json.decode(o.value)["version"] for o in offers]
            time.sleep(0.05)
    finally:
        partition.close()
    assert versions == list(range(1, 41))
