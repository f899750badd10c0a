"""What the command benchmarks share: the orchestrator flow on private brokers, its events,
and a wire tap that sees commands and acks pass through the broker."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml
from confluent_kafka import Producer

from bench._latency import KafkaWatch, RawMqtt, _utf8, _varint, tail_log
from bench.harness import BenchError
from connectors.kafka import ensure_topics, producer_config
from connectors.mqtt import connect_client
from infra.flowproc import FlowProcess
from infra.stack import StackInfo
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics

__all__ = [
    "CommandWatch",
    "Outcome",
    "SimulatedDevices",
    "WireTap",
    "orchestrator_flow",
    "producer",
]


@contextmanager
def orchestrator_flow(
    info: StackInfo, tmp: Path, config: dict[str, Any]
) -> Iterator[tuple[FlowProcess, Settings]]:
    """The orchestrator flow with ``config`` (an OrchestratorConfig declaration), online."""
    path = tmp / "orchestrator.yaml"
    path.write_text(yaml.safe_dump(config))
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        _env_file=None,
        mqtt_url=info.mqtt_url,
        kafka_bootstrap=info.kafka_bootstrap,
        mqtt_base=f"bench{tag}",
        topic_prefix=f"bench{tag}",
        mqtt_client_id=f"bench-orchestrator-{tag}",
        duckdb=tmp / "bench.duckdb",
        orchestrator=path,
    )
    topics = KafkaTopics(settings.topic_prefix)
    ensure_topics(
        info.kafka_bootstrap, [topics.command_requests, topics.command_events, topics.deadletter]
    )
    log = tmp / "flow.log"
    with FlowProcess.start("dataflows.orchestrator:flow", settings, log=log) as flow:
        try:
            flow.wait_online(90)
        except StackError as exc:
            raise BenchError(f"{exc}\n{tail_log(log)}") from exc
        yield flow, settings


def producer(bootstrap: str) -> Producer:
    """A low-latency producer for command requests (all on one key: one partition, in order)."""
    return Producer({**producer_config(bootstrap), "linger.ms": 0})


@dataclass(frozen=True)
class Outcome:
    """A command's events as the flow reported them."""

    requested_ts: datetime | None
    sent_ts: datetime | None
    done_ts: datetime | None
    done_seen_at: float | None  # time.time() when the DONE event was consumed
    kinds: tuple[str, ...]


class CommandWatch:
    """Follows ``{prefix}.commands.events`` and gathers each command's events.

    Its fetches may wait up to 50 ms for data (a few ms more on when a DONE event
    is seen): Tansu's fetch costs grow with the topic, and a consumer fetching
    every 5 ms took ~0.3 of a core from the brokers the measured flow needs.
    """

    def __init__(self, settings: Settings) -> None:
        self._watch = KafkaWatch(
            settings.require_kafka_bootstrap(),
            [KafkaTopics(settings.topic_prefix).command_events],
            fetch_wait_ms=50,
        )
        self._read = 0
        self._events: dict[str, list[tuple[float, dict[str, Any]]]] = {}

    def _drain(self) -> None:
        seen = self._watch.seen
        end = len(seen)
        for item in seen[self._read : end]:
            event = json.loads(item.value)
            if "command_id" in event:
                self._events.setdefault(event["command_id"], []).append((item.at, event))
        self._read = end

    def count(self, kind: str) -> int:
        """Commands with at least one event of ``kind`` so far."""
        self._drain()
        return sum(any(e["kind"] == kind for _, e in evs) for evs in self._events.values())

    def wait(self, kind: str, count: int, timeout_s: float) -> None:
        """Until ``count`` commands have a ``kind`` event; BenchError with the tally otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.count(kind) >= count:
                return
            time.sleep(0.005)
        tally: dict[str, int] = {}
        for evs in self._events.values():
            last = evs[-1][1]["kind"]
            tally[last] = tally.get(last, 0) + 1
        msg = f"{self.count(kind)} of {count} commands reached {kind} within {timeout_s}s; last kinds {tally}"
        raise BenchError(msg)

    def outcome(self, command_id: str) -> Outcome:
        self._drain()
        evs = self._events.get(command_id, [])
        requested = next((e for _, e in evs if e["kind"] == "requested"), None)
        sent = next((e for _, e in evs if e["kind"] == "sent"), None)
        done = next(((at, e) for at, e in evs if e["kind"] == "done"), None)
        return Outcome(
            None if requested is None else datetime.fromisoformat(requested["ts"]),
            None if sent is None else datetime.fromisoformat(sent["ts"]),
            None if done is None else datetime.fromisoformat(done[1]["ts"]),
            None if done is None else done[0],
            tuple(e["kind"] for _, e in evs),
        )

    def command_ids(self) -> list[str]:
        self._drain()
        return list(self._events)

    def close(self) -> None:
        self._watch.close()


class _Ids(msgspec.Struct):
    command_id: str
    status: str | None = None


@dataclass(frozen=True)
class _TapSpec:
    url: str
    base: str
    expect: int  # done acks to wait for
    timeout_s: float


def _tap_process(spec: _TapSpec, results: Any) -> None:
    """Record when each command and each ``done`` ack passed the broker (time.time())."""
    topics = MqttTopics(spec.base)
    decode = msgspec.json.Decoder(_Ids).decode
    cmd_at: dict[str, float] = {}
    ack_at: dict[str, float] = {}
    lock = threading.Lock()
    all_acked = threading.Event()

    def on_publishes(batch: list[tuple[str, bytes, int, int]]) -> None:
        at = time.time()
        with lock:
            for topic, payload, _qos, _mid in batch:
                try:
                    ids = decode(payload)
                except msgspec.DecodeError:
                    continue
                if topic.endswith("/cmd"):
                    cmd_at.setdefault(ids.command_id, at)
                elif ids.status == "done" and ids.command_id not in ack_at:
                    ack_at[ids.command_id] = at
            if len(ack_at) >= spec.expect:
                all_acked.set()

    subscribed = threading.Event()
    client = connect_client(
        spec.url,
        on_connect=lambda c: c.subscribe([(topics.cmd(), 0), (topics.ack(), 0)]),
        on_subscribe=lambda *_a: subscribed.set(),
        on_publishes=on_publishes,
    )
    subscribed.wait(10)
    results.put({"ready": True})
    all_acked.wait(spec.timeout_s)
    client.disconnect()
    client.loop_stop()
    with lock:
        results.put({"cmd_at": cmd_at, "ack_at": ack_at})


class WireTap:
    """A separate process subscribed to every device's ``cmd`` and ``ack`` topic (QoS 0).

    It stamps when each command and each ``done`` ack went through the broker,
    as a device or the flow would see it, without sharing a process (and its
    GIL) with the flow or the simulated devices. ``result`` waits until
    ``expect`` commands were acked done (or ``timeout_s``) and returns
    ``(cmd_at, ack_at)``: command id -> ``time.time()`` of the first sighting.
    """

    def __init__(self, url: str, base: str, expect: int, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        spec = _TapSpec(url, base, expect, timeout_s)
        self._proc = ctx.Process(target=_tap_process, args=(spec, self._results), daemon=True)
        self._proc.start()
        self._timeout_s = timeout_s
        self._get(30, "did not subscribe")

    def _get(self, timeout_s: float, what: str) -> dict[str, Any]:
        try:
            return self._results.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise BenchError(f"the wire tap {what} within {timeout_s}s") from None

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        got = self._get(self._timeout_s + 10, "did not report")
        self._proc.join(5)
        return got["cmd_at"], got["ack_at"]

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


class _Command(msgspec.Struct):
    command_id: str
    params: dict[str, Any]
    expires_at: datetime


@dataclass(frozen=True)
class _DevicesSpec:
    url: str
    base: str
    expect: int  # commands to run before reporting
    timeout_s: float


def _devices_process(spec: _DevicesSpec, results: Any) -> None:
    topics = MqttTopics(spec.base)
    decode = msgspec.json.Decoder(_Command).decode
    encode = msgspec.json.encode
    raw = RawMqtt(spec.url, f"bench-devices-{uuid.uuid4().hex[:8]}")
    mids = itertools.cycle(range(1, 65536))
    reported: dict[str, dict[str, Any]] = {}
    ran: set[str] = set()
    counts = {"executed": 0, "duplicates": 0, "expired": 0, "undecodable": 0}
    all_ran, subscribed = threading.Event(), threading.Event()

    def publish(topic: str, payload: bytes, retain: bool) -> bytes:
        body = _utf8(topic.encode()) + next(mids).to_bytes(2, "big") + payload
        return bytes([0x33 if retain else 0x32]) + _varint(len(body)) + body  # QoS 1

    def on_publishes(batch: list[tuple[str, bytes, int, int]]) -> None:
        out = bytearray()
        now = datetime.now(UTC)
        for topic, payload, _qos, _mid in batch:
            device = topic.split("/")[-2]
            try:
                command = decode(payload)
            except msgspec.DecodeError:
                counts["undecodable"] += 1
                continue
            state = reported.setdefault(device, {})
            status = "done"
            if command.command_id in ran:  # run once per id; answer again
                counts["duplicates"] += 1
            elif now >= command.expires_at:
                counts["expired"] += 1
                status = "failed"
            else:
                ran.add(command.command_id)
                counts["executed"] += 1
                state.update(command.params)
            ack = {"command_id": command.command_id, "status": status, "reported": state}
            out += publish(topics.ack(device), encode(ack), False)
            if status == "done":
                out += publish(topics.state(device), encode(state), True)
        if out:
            raw.send(bytes(out))  # one write for the whole batch
        if counts["executed"] >= spec.expect:
            all_ran.set()

    client = connect_client(
        spec.url,
        on_connect=lambda c: c.subscribe(topics.cmd(), qos=1),
        on_subscribe=lambda *_a: subscribed.set(),
        on_publishes=on_publishes,
    )
    try:
        subscribed.wait(10)
        results.put({"ready": subscribed.is_set()})
        all_ran.wait(spec.timeout_s)
        time.sleep(0.5)  # a redelivered command would come right after
    finally:
        client.disconnect()
        client.loop_stop()
        raw.close()
    results.put(dict(counts))


class SimulatedDevices:
    """Devices that run each command they get on ``{base}/devices/+/cmd`` (QoS 1) once per
    command id, in a process of their own, over real MQTT.

    A command is answered at once: a QoS 1 ``done`` ack on ``{base}/devices/{id}/ack``
    with the device's reported state (the command's params applied), then that state,
    retained, on ``.../state``, as ``infra.simulator`` devices do; a command
    received at or after ``expires_at`` is answered ``failed`` and not run; a
    repeated command id is answered again and not run. Unlike ``infra.simulator``'s
    ``Fleet`` (one paho message, a scheduler hand-off and two tracked publishes
    per command: about half a millisecond of CPU, a quarter of a core at 500
    commands/s, and seconds of queueing on a loaded machine) they read the
    commands in bulk and write the answers of a read in one write on a raw socket,
    so the benchmark measures the system, not the simulator. ``result()`` waits
    until ``expect`` commands ran (or ``timeout_s``) and returns the counts:
    executed, duplicates, expired, undecodable.
    """

    def __init__(self, url: str, base: str, expect: int, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        spec = _DevicesSpec(url, base, expect, timeout_s)
        self._proc = ctx.Process(target=_devices_process, args=(spec, self._results), daemon=True)
        self._proc.start()
        self._timeout_s = timeout_s
        if not self._get(30, "subscribe").get("ready"):
            self.stop()
            raise BenchError("the simulated devices' subscription was not confirmed")

    def _get(self, timeout_s: float, what: str) -> dict[str, Any]:
        try:
            return self._results.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise BenchError(f"the simulated devices did not {what} within {timeout_s}s") from None

    def result(self) -> dict[str, int]:
        got = self._get(self._timeout_s + 10, "report")
        self._proc.join(5)
        return got

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
