"""The ingest bridge against the real brokers: what lands on Kafka, when it is acknowledged,
what happens to bad input and unreachable brokers, and SIGKILL while readings flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.bridge_kill import run_kill_scenario
from connectors.bridge import (
    HEADER_MQTT_DELIVERY,
    HEADER_MQTT_TOPIC,
    HEADER_RECEIVED_MS,
    HEADER_REDELIVERED,
    IngestBridge,
    ingest_key,
    ingest_record,
    ingest_topic,
    topic_matcher,
    unwrap_records,
)
from connectors.kafka import read_topic
from connectors.mqtt import connect_client
from infra.stack import StackInfo, free_port
from iotflow.errors import BrokerUnavailable, ConfigError
from iotflow.events import DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics


def ingest_records(bootstrap: str, topic: str, want: int, timeout_s: float = 20.0) -> list:
    """Raw confluent messages (with headers) of ``topic``, once ``want`` arrived."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:8]}"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: list = []
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            got.extend(m for m in consumer.consume(1000, 0.2) if m.error() is None)
        return got
    finally:
        consumer.close()


class _Running:
    def __init__(self, bridge: IngestBridge) -> None:
        self.bridge = bridge
        self.stop = threading.Event()
        self.thread = threading.Thread(target=bridge.run_until, args=(self.stop,), daemon=True)

    def wait_acked(self, n: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.bridge.stats.acked < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.bridge.stats.acked >= n, self.bridge.stats.line()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def make_bridge(settings: Settings) -> Iterator:
    running: list[_Running] = []

    def make(client_id: str = "", **kwargs: object) -> _Running:
        bridge = IngestBridge(
            settings.require_mqtt_url(),
            settings.require_kafka_bootstrap(),
            prefix=settings.topic_prefix,
            base=settings.mqtt_base,
            client_id=client_id or f"bridge-{settings.topic_prefix}",
            **kwargs,  # type: ignore[arg-type]
        )
        bridge.start()
        run = _Running(bridge)
        run.thread.start()
        running.append(run)
        return run

    yield make
    for run in running:
        run.close()


# -- the record layout ---------------------------------------------------------------------


def test_ingest_record_round_trips_to_the_same_device_message() -> None:
    key, value, headers = ingest_record("iotflow/devices/t-1/telemetry", b'{"t": 1}', 123)

    class Rec:
        pass

    rec = Rec()
    rec.value, rec.headers, rec.timestamp = value, headers, (1, 999)  # type: ignore[attr-defined]
    out = unwrap_records([rec])
    assert key == b"t-1"
    assert out.messages == [DeviceMessage("iotflow/devices/t-1/telemetry", b'{"t": 1}', 123)]
    assert out.dead == [] and out.skipped == 0 and out.redelivered == []
    # Other layouts are keyed by their topic, which keeps one device in one partition.
    assert ingest_key("zigbee2mqtt/kitchen") == b"zigbee2mqtt/kitchen"
    # The delivery and a possible repeat are headers too, and the reader reports them.
    *_, marked = ingest_record(
        "iotflow/devices/t-1/telemetry", b"{}", 124, delivery=b"br/7", redelivered=True
    )
    assert marked[-2:] == [(HEADER_MQTT_DELIVERY, b"br/7"), (HEADER_REDELIVERED, b"1")]
    rec.headers = marked  # type: ignore[attr-defined]
    again = unwrap_records([rec, rec])
    assert again.redelivered == [0, 1] and again.deliveries == [b"br/7", b"br/7"]


def test_topic_filters_match_like_the_broker_and_bad_ones_are_refused() -> None:
    match = topic_matcher(["b/devices/+/telemetry", "$share/g/z2m/#"])
    assert match("b/devices/x/telemetry") and match("z2m") and match("z2m/a/b")
    assert not match("b/devices/x/state") and not match("b/devices/x/telemetry/extra")
    for bad in ["a/#/b", "a/b+", ""]:
        with pytest.raises(ConfigError, match="invalid"):
            topic_matcher([bad])


# -- against the brokers -------------------------------------------------------------------


def test_bridge_forwards_raw_bytes_with_topic_receive_time_and_device_key(
    settings: Settings, make_bridge, mqtt_publish
) -> None:
    t = MqttTopics(settings.mqtt_base)
    messages = [
        (t.telemetry("d1"), b'{"ts": 1767268800000, "temperature": 21.5}'),
        (t.telemetry("d2"), b"\x00\xffnot json at all"),
        (t.state("d1"), b'{"mode": "eco"}'),
        (t.ack("d2"), b'{"command_id": "c1", "status": "done"}'),
        (t.cmd("d1"), b'{"command_id": "c2"}'),  # not subscribed: commands go the other way
    ]
    run = make_bridge()
    before_ms = time.time_ns() // 1_000_000
    mqtt_publish(settings.require_mqtt_url(), messages)
    run.wait_acked(4)
    got = ingest_records(settings.require_kafka_bootstrap(), ingest_topic(settings.topic_prefix), 4)
    after_ms = time.time_ns() // 1_000_000

    assert len(got) == 4
    seen = {}
    for msg in got:
        headers = dict(msg.headers())
        received_ms = int(headers[HEADER_RECEIVED_MS])
        assert before_ms <= received_ms <= after_ms
        assert msg.timestamp()[1] == received_ms
        seen[headers[HEADER_MQTT_TOPIC].decode()] = (msg.key(), msg.value())
    assert seen == {
        topic: (topic.split("/")[2].encode(), payload) for topic, payload in messages[:4]
    }
    assert run.bridge.stats.forwarded == run.bridge.stats.acked == 4


def test_everything_forwarded_is_acknowledged_so_a_restart_gets_nothing_again(
    settings: Settings, make_bridge, mqtt_publish
) -> None:
    t = MqttTopics(settings.mqtt_base)
    first = make_bridge("same-id-" + settings.topic_prefix)
    mqtt_publish(
        settings.require_mqtt_url(),
        [(t.telemetry(f"d{i % 7}"), b'{"v": %d}' % i) for i in range(500)],
    )
    first.wait_acked(500)
    first.close()
    # While the bridge is down the broker keeps its session: these wait for the next one.
    mqtt_publish(settings.require_mqtt_url(), [(t.telemetry("late"), b'{"v": -1}')])
    second = make_bridge("same-id-" + settings.topic_prefix)
    second.wait_acked(1)
    time.sleep(1.0)
    assert second.bridge.stats.received == 1, second.bridge.stats.line()
    values = sorted(
        json.loads(r.value)["v"]
        for r in read_topic(settings.require_kafka_bootstrap(), ingest_topic(settings.topic_prefix))
    )
    assert values == [-1, *range(500)]


def test_what_the_broker_resends_on_the_bridges_session_is_marked_redelivered(
    settings: Settings, make_bridge, mqtt_publish
) -> None:
    """Messages delivered on the session but never acknowledged (as by a bridge killed
    after Kafka took them) come again with the MQTT DUP flag: the bridge marks exactly
    those, not the ones the broker queued meanwhile."""
    t = MqttTopics(settings.mqtt_base)
    client_id = f"bridge-{settings.topic_prefix}"
    url = settings.require_mqtt_url()
    got: list[bytes] = []
    killed = connect_client(
        url,
        client_id,
        clean_start=False,
        session_expiry_s=600,
        manual_ack=True,  # and it never acknowledges
        on_connect=lambda c: c.subscribe([(t.telemetry(), 1)]),
        on_message=lambda _c, _u, msg: got.append(msg.payload),
    )
    try:
        time.sleep(0.5)
        mqtt_publish(url, [(t.telemetry("d1"), b'{"n": %d}' % i) for i in range(5)])
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(got) == 5
    finally:
        killed.disconnect()
        killed.loop_stop()
    mqtt_publish(url, [(t.telemetry("d2"), b'{"queued": 1}')])  # waits in the session

    run = make_bridge(client_id)
    run.wait_acked(6)
    records = ingest_records(
        settings.require_kafka_bootstrap(), ingest_topic(settings.topic_prefix), 6
    )
    marked = {r.value(): dict(r.headers()).get(HEADER_REDELIVERED) for r in records}
    assert marked == {**{b'{"n": %d}' % i: b"1" for i in range(5)}, b'{"queued": 1}': None}
    # Each names its delivery: this session and the packet id the broker resent it with.
    deliveries = {dict(r.headers())[HEADER_MQTT_DELIVERY] for r in records}
    assert len(deliveries) == 6 and all(d.startswith(f"{client_id}/".encode()) for d in deliveries)
    assert run.bridge.stats.redelivered == 5 and run.bridge.stats.received == 6


def test_a_payload_kafka_refuses_becomes_a_dead_letter_and_is_acknowledged(
    settings: Settings, make_bridge, mqtt_publish
) -> None:
    t = MqttTopics(settings.mqtt_base)
    huge = b'{"pad": "' + b"x" * 2_050_000 + b'"}'  # over the producer's message.max.bytes
    run = make_bridge()
    mqtt_publish(
        settings.require_mqtt_url(), [(t.telemetry("big"), huge), (t.telemetry("ok"), b"{}")]
    )
    run.wait_acked(2)
    assert run.bridge.stats.dead_lettered == 1 and run.bridge.stats.forwarded == 1
    bootstrap = settings.require_kafka_bootstrap()
    (letter,) = [
        json.loads(r.value)
        for r in read_topic(bootstrap, KafkaTopics(settings.topic_prefix).deadletter)
    ]
    assert letter["source"] == "bridge" and letter["topic"] == t.telemetry("big")
    assert "Kafka refused the payload" in letter["reason"] and letter["truncated"]
    assert letter["payload_bytes"] == len(huge)
    (forwarded,) = read_topic(bootstrap, ingest_topic(settings.topic_prefix))
    assert forwarded.key == b"ok"


def test_unreachable_brokers_and_bad_options_are_clear_errors(
    stack: StackInfo, settings: Settings
) -> None:
    closed = free_port()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{closed}"):
        IngestBridge(stack.mqtt_url, f"127.0.0.1:{closed}", prefix=settings.topic_prefix).start()
    with pytest.raises(BrokerUnavailable, match=r"cannot reach MQTT broker|refused"):
        IngestBridge(
            f"mqtt://u:secret@127.0.0.1:{closed}",
            stack.kafka_bootstrap,
            prefix=settings.topic_prefix,
            connect_timeout_s=2,
        ).start()
    with pytest.raises(ConfigError, match="65535"):
        IngestBridge(stack.mqtt_url, stack.kafka_bootstrap, max_in_flight=0)
    assert "secret" not in repr(
        IngestBridge(f"mqtt://u:secret@127.0.0.1:{closed}", stack.kafka_bootstrap)
    )

    env = {
        **os.environ,
        "IOTFLOW_MQTT_URL": f"mqtt://u:secret@127.0.0.1:{closed}",
        "IOTFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "IOTFLOW_TOPIC_PREFIX": settings.topic_prefix,
    }
    done = subprocess.run(
        [sys.executable, "-m", "iotflow.cli", "bridge"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "iotflow: " in done.stderr and f"127.0.0.1:{closed}" in done.stderr
    assert "secret" not in done.stderr + done.stdout


# SLOW: about 30 s (the only slow test in this module).
def test_sigkill_while_readings_flow_loses_nothing_acknowledged(
    settings: Settings, tmp_path: Path
) -> None:
    """SLOW (~30 s): `iotflow bridge` as a real process, SIGKILL five times while a QoS 1
    publisher sends 30,000 readings (100,000 in `python -m bench bridge_kill`)."""
    result = run_kill_scenario(
        settings, tmp_path, messages=30_000, devices=1000, kills=5, rate=1500.0, timeout_s=150
    )
    print(
        f"bridge kill test: {result.acked_by_broker} PUBACKed, {result.kafka_records} on Kafka, "
        f"{result.duplicates} duplicates, {result.seconds:.1f}s; {result.notes}"
    )
    assert result.acked_by_broker == result.published
    assert result.missing_from_kafka == []
    assert result.clean_exit_code == 0  # SIGTERM: flush, ack, disconnect
    assert len(result.notes) == 5
    # Every repeat of a reading is marked, so the flows can drop it (connectors.reading_dedupe),
    # one device's copies share a partition, so they come in the order written...
    records = ingest_records(
        settings.require_kafka_bootstrap(),
        ingest_topic(settings.topic_prefix),
        result.kafka_records,
        timeout_s=60,
    )
    # ...and names the same delivery (session, packet id) as a copy before it.
    seen: dict[int, set[bytes]] = {}
    unmarked_repeats = other_delivery_repeats = 0
    for record in records:
        seq = json.loads(record.value())["seq"]
        headers = dict(record.headers() or [])
        delivery = headers[HEADER_MQTT_DELIVERY]
        if seq in seen:
            unmarked_repeats += HEADER_REDELIVERED not in headers
            other_delivery_repeats += delivery not in seen[seq]
        seen.setdefault(seq, set()).add(delivery)
    assert len(records) == result.kafka_records
    assert unmarked_repeats == other_delivery_repeats == 0
