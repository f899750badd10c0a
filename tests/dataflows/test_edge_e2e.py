"""The edge gateway end to end: real Mosquitto and Tansu, the link to Kafka cut by a proxy
(never by killing the broker), the edge flow a real ``python -m bytewax.run`` subprocess,
SIGKILLed during the outage and during the backfill."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from connectors.mqtt import connect_client
from connectors.uplink import UplinkEnvelope, dedupe_uplink, expand_aggregates, read_uplink
from infra.flowproc import FlowProcess
from infra.proxy import TcpProxy
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics

FLOW = "dataflows.edge:flow"
GATEWAY = "gw-e2e"
DEVICES = 100
RATE_HZ = 2.0

WORKFLOW = {
    "name": "home-safety",
    "version": 1,
    "components": [
        {
            "name": "gas",
            "kind": "patterns",
            "latency_budget": "50ms",
            "patterns": [
                {
                    "name": "smoke",
                    "kind": "threshold",
                    "condition": "smoke > 0",
                    "actions": [
                        {"type": "detect"},
                        {"type": "command", "device": "valve-{key}", "name": "close"},
                    ],
                }
            ],
        },
        {
            "name": "stats",
            "kind": "aggregate",
            "window": "5s",
            "allowed_lateness": "1s",
            "placement": "edge",
        },
        {"name": "raw", "kind": "forward"},
    ],
}


@dataclass
class Devices:
    """100 devices publishing QoS 1 readings (per-device ``seq``) from one paho client."""

    url: str
    base: str
    published: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    smoke: list[tuple[str, int, float]] = field(default_factory=list)  # device, ts, at
    _stop: threading.Event = field(default_factory=threading.Event)
    _smoke_next: list[str] = field(default_factory=list)
    _pending: list[mqtt.MQTTMessageInfo] = field(default_factory=list)

    def start(self) -> None:
        self._client = connect_client(self.url, "e2e-devices")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def trigger_smoke(self, device: str) -> None:
        self._smoke_next.append(device)

    def _run(self) -> None:
        topics = MqttTopics(self.base)
        seq: dict[str, int] = defaultdict(int)
        last_ts = 0
        period = 1 / RATE_HZ
        next_round = time.monotonic()
        while not self._stop.is_set():
            for i in range(DEVICES):
                device = f"dev{i:03d}"
                ts = max(int(time.time() * 1000), last_ts + 1)  # strictly increasing
                last_ts = ts
                smoke = 1.0 if self._smoke_next and self._smoke_next[0] == device else 0.0
                if smoke:
                    self._smoke_next.pop(0)
                    self.smoke.append((device, ts, time.time()))
                k = seq[device]
                seq[device] += 1
                body = {"ts": ts, "seq": k, "t": 20 + (k % 7), "smoke": smoke}
                info = self._client.publish(topics.telemetry(device), json.dumps(body), qos=1)
                self._pending.append(info)
                self.published[device].append((k, ts))
            next_round += period
            time.sleep(max(0.0, next_round - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for info in self._pending:
            info.wait_for_publish(30)
        assert all(info.is_published() for info in self._pending)
        self._client.disconnect()
        self._client.loop_stop()


class Watch:
    """Local MQTT: the gateway's status (retained, last will) and the commands it issues."""

    def __init__(self, url: str, base: str) -> None:
        topics = MqttTopics(base)
        self.status: list[tuple[float, bytes]] = []
        self.commands: list[tuple[float, dict[str, Any]]] = []
        self._changed = threading.Condition()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self._changed:
                if msg.topic.endswith("/status"):
                    self.status.append((time.time(), msg.payload))
                else:
                    self.commands.append((time.time(), json.loads(msg.payload)))
                self._changed.notify_all()

        subs = [(topics.gateway_status(GATEWAY), 1), (topics.cmd(), 1)]
        self._client = connect_client(
            url, on_connect=lambda c: c.subscribe(subs), on_message=on_message
        )

    def wait_for(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not check():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self._changed.wait(min(left, 0.2))

    def online_since(self, t: float) -> bool:
        return any(at >= t and p == b"online" for at, p in self.status)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def backlog(buffer: Path) -> int:
    """Records the gateway still holds (read-only look at its SQLite buffer)."""
    try:
        with sqlite3.connect(f"file:{buffer}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return -1


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    with TcpProxy.for_kafka(settings.require_kafka_bootstrap()) as p:
        yield p


# SLOW: about 70 s (a 30 s outage is the point).
def test_outage_with_two_sigkills_loses_nothing_and_local_rules_keep_acting(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(WORKFLOW))
    buffer = tmp_path / "edge-buffer.db"
    edge_settings = settings.model_copy(update={"kafka_bootstrap": proxy.address})
    env = {
        "IOTFLOW_EDGE_GATEWAY_ID": GATEWAY,
        "IOTFLOW_EDGE_WORKFLOW": str(workflow),
        "IOTFLOW_EDGE_BUFFER": str(buffer),
        "IOTFLOW_EDGE_BACKFILL_PER_S": "400",  # a backfill slow enough to be killed in
        "IOTFLOW_EDGE_STATUS_S": "5",
    }
    log = tmp_path / "edge.log"
    watch = Watch(settings.require_mqtt_url(), settings.mqtt_base)
    devices = Devices(settings.require_mqtt_url(), settings.mqtt_base)
    bootstrap = settings.require_kafka_bootstrap()
    topic = KafkaTopics(settings.topic_prefix).edge_uplink

    def start() -> FlowProcess:
        since = time.time()
        proc = FlowProcess.start(FLOW, edge_settings, log=log, extra_env=env)
        watch.wait_for(lambda: watch.online_since(since), 60, f"the gateway online ({log})")
        return proc

    edge = start()
    try:
        devices.start()
        time.sleep(5)  # live, link up

        proxy.cut()
        cut_at = time.time()
        time.sleep(3)
        devices.trigger_smoke("dev007")
        time.sleep(3)
        killed_at = time.time()
        edge.kill()  # SIGKILL during the outage
        watch.wait_for(
            lambda: any(at >= killed_at and p == b"offline" for at, p in watch.status),
            30,
            "the last will",
        )
        edge = start()  # starts with the uplink down, and buffers
        devices.trigger_smoke("dev042")
        time.sleep(max(0.0, cut_at + 30 - time.time()))
        restored_at = time.time()
        commands_in_outage = [c for at, c in watch.commands if cut_at <= at < restored_at]
        proxy.restore()

        # SIGKILL during the backfill: once some backlog went up and much is still held
        deadline = time.monotonic() + 60
        while True:
            replayed = [e for e in dedupe_uplink(read_uplink(bootstrap, topic)) if e.replayed]
            if replayed and backlog(buffer) > 1000:
                break
            assert edge.popen.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the backfill did not start"
            time.sleep(0.5)
        edge.kill()
        edge = start()
        time.sleep(3)
        devices.stop()
        sent = {d: list(v) for d, v in devices.published.items()}
        total = sum(len(v) for v in sent.values())
        deadline = time.monotonic() + 90
        while True:  # the last windows close on the quiet watermark, then all has gone up
            got = dedupe_uplink(read_uplink(bootstrap, topic))
            aggregated = sum(
                w.count for e in got for w in expand_aggregates(e) if w.metric == "seq"
            )
            if backlog(buffer) == 0 and aggregated >= total:
                break
            assert edge.popen.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not all up: {aggregated} of {total} aggregated"
            time.sleep(1)
        edge.stop()
    finally:
        edge.kill()
        watch.close()

    got = dedupe_uplink(read_uplink(bootstrap, topic, timeout_s=30))
    readings: dict[str, list[UplinkEnvelope]] = defaultdict(list)
    for e in got:
        if e.kind == "reading":
            readings[e.key].append(e)

    # every reading once (after de-duplication by record id), none invented
    assert total >= DEVICES * RATE_HZ * 40
    for device, published in sent.items():
        seqs = [int(json.loads(bytes(e.body))["metrics"]["seq"]) for e in readings[device]]
        assert sorted(seqs) == [k for k, _ in published], device
    # in order per device: what the outage held went up oldest first
    outage = [(cut_at * 1000, restored_at * 1000)]
    for device, records in readings.items():
        held = [
            json.loads(bytes(e.body))["ts_ms"]
            for e in records
            if any(lo <= json.loads(bytes(e.body))["ts_ms"] < hi for lo, hi in outage)
        ]
        assert held == sorted(held), device
        assert held, device
    assert any(e.replayed for e in got) and any(not e.replayed for e in got)

    # every reading counted once in the aggregates (their per-device seq sums match)
    counted: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    replayed_starts: dict[str, list[int]] = defaultdict(list)
    for e in got:
        for w in expand_aggregates(e):
            if w.metric == "seq":
                counted[w.key][0] += w.count
                counted[w.key][1] += w.sum
                if e.replayed:
                    replayed_starts[w.key].append(int(w.window_start.timestamp() * 1000))
    for device, published in sent.items():
        assert counted[device] == [len(published), float(sum(k for k, _ in published))], device
        # the outage's windows went up in order as the backlog; a window that closed only
        # after the link came back (the edge catching up after its restart) is live and may
        # overtake the backlog, so the order is checked on the replayed ones
        held = [t for t in replayed_starts[device] if cut_at * 1000 <= t < restored_at * 1000]
        assert held == sorted(held) and len(held) >= 3, device

    # local rules kept acting while the cloud was unreachable, across the SIGKILL
    valves = {c["device_id"] for c in commands_in_outage}
    assert valves == {"valve-dev007", "valve-dev042"}
    assert all(c["name"] == "close" for c in commands_in_outage)
    detections = {(e.key, e.kind) for e in got if e.kind in ("detection", "command")}
    assert {("dev007", "detection"), ("dev042", "detection")} <= detections
    assert {("valve-dev007", "command"), ("valve-dev042", "command")} <= detections
    # the gateway said so on its retained status topic
    statuses = [p for _, p in watch.status]
    assert statuses.count(b"offline") >= 2 and statuses[-1] == b"offline"  # two kills, a stop
    status = [json.loads(bytes(e.body)) for e in got if e.kind == "status"]
    assert status and status[-1]["buffer"]["dropped"] == {}
