"""Helpers of the flows' end-to-end tests: the orchestrator flow as a subprocess, requests,
events, and the ingest bridge forwarding to Kafka.

``orchestrator_flow`` writes the orchestrator config (and a registry, if
given) next to the test, starts ``dataflows.orchestrator:flow`` on the
session brokers with this test's topics and its own MQTT client id, and
yields once the flow is online. ``Events`` reads the flow's Kafka outputs back.
``forward_through_bridge`` publishes readings over MQTT and waits until the
ingest bridge has them on ``{prefix}.ingest`` (the cloud path's first hop).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer

from commands.audit import KIND_ORDER
from connectors.bridge import IngestBridge
from connectors.kafka import producer_config, read_topic
from infra.flowproc import FlowProcess
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

ORCHESTRATOR_FLOW = "dataflows.orchestrator:flow"
TERMINAL = {"done", "failed", "expired", "rejected"}


@contextmanager
def orchestrator_flow(
    settings: Settings,
    tmp_path: Path,
    config: dict[str, Any],
    *,
    registry: dict[str, Any] | None = None,
    log_name: str = "flow.log",
) -> Iterator[tuple[Settings, FlowProcess]]:
    """The orchestrator flow with ``config`` (and ``registry``), online; (its settings, process)."""
    path = tmp_path / "orchestrator.yaml"
    path.write_text(yaml.safe_dump(config))
    update: dict[str, Any] = {
        "orchestrator": path,
        "mqtt_client_id": f"orch-{settings.topic_prefix}",
    }
    if registry is not None:
        update["registry"] = tmp_path / "registry.yaml"
        update["registry"].write_text(yaml.safe_dump(registry))
    settings = settings.model_copy(update=update)
    with FlowProcess.start(ORCHESTRATOR_FLOW, settings, log=tmp_path / log_name) as proc:
        proc.wait_online()
        yield settings, proc


def produce(bootstrap: str, topic: str, values: list[bytes], key: bytes = b"one-partition") -> None:
    """Produce ``values`` on one key (one partition: they are read in this order)."""
    producer = Producer(producer_config(bootstrap))
    for value in values:
        producer.produce(topic, value, key=key)
    assert producer.flush(10) == 0


def request(settings: Settings, docs: list[dict[str, Any]]) -> None:
    """Command requests to the flow, in this order."""
    produce(
        settings.require_kafka_bootstrap(),
        KafkaTopics(settings.topic_prefix).command_requests,
        [encode(d) for d in docs],
    )


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def command(
    command_id: str, device_id: str, name: str, params: dict[str, Any], ttl_s: float = 30.0
) -> dict[str, Any]:
    """A command request issued now that expires in ``ttl_s``."""
    now = datetime.now(UTC)
    return {
        "command_id": command_id,
        "device_id": device_id,
        "name": name,
        "params": params,
        "issued_at": iso(now),
        "expires_at": iso(now + timedelta(seconds=ttl_s)),
    }


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


class Events:
    """The flow's Kafka outputs, read back."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.require_kafka_bootstrap()
        self.topics = KafkaTopics(settings.topic_prefix)

    def commands(self) -> list[dict[str, Any]]:
        """Command events in time order (the topic is partitioned by command id)."""
        records = read_topic(self.bootstrap, self.topics.command_events)
        found = [d for r in records if "command_id" in (d := json.loads(r.value)) and "kind" in d]
        return sorted(found, key=lambda e: (datetime.fromisoformat(e["ts"]), KIND_ORDER[e["kind"]]))

    def dead(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in read_topic(self.bootstrap, self.topics.deadletter)]

    def wait(self, done: Any, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Command events once ``done(events)`` holds; AssertionError after ``timeout_s``."""
        stop = threading.Event()
        deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
        while datetime.now(UTC) < deadline:
            events = self.commands()
            if done(events):
                return events
            stop.wait(0.3)
        seen = Counter((e["command_id"], e["kind"]) for e in self.commands())
        raise AssertionError(f"events not complete within {timeout_s}s: {seen}")


def terminal(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """command_id -> its terminal kinds, in order."""
    out: dict[str, list[str]] = {}
    for e in events:
        if e["kind"] in TERMINAL:
            out.setdefault(e["command_id"], []).append(e["kind"])
    return out


def forward_through_bridge(
    settings: Settings,
    messages: list[tuple[str, bytes]],
    publish: Callable[[str, list[tuple[str, bytes]]], None],
) -> None:
    """Publish (topic, payload) ``messages`` with an ingest bridge running; return once it
    acknowledged every one (each is on ``{prefix}.ingest``)."""
    bridge = IngestBridge(
        settings.require_mqtt_url(),
        settings.require_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        base=settings.mqtt_base,
        client_id=f"bridge-{settings.topic_prefix}",
    )
    bridge.start()
    stop = threading.Event()
    runner = threading.Thread(target=bridge.run_until, args=(stop,), daemon=True)
    runner.start()
    try:
        publish(settings.require_mqtt_url(), messages)
        deadline = time.monotonic() + 30
        while bridge.stats.acked < len(messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.stats.acked == len(messages), bridge.stats.line()
    finally:
        stop.set()
        runner.join(30)
