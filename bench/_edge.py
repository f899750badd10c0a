"""Shared machinery of the edge benchmarks (``edge_decision_latency``, ``edge_bandwidth``,
``edge_memory``, ``edge_throughput``).

- ``FleetSpec`` / ``Fleet``: publisher processes sending flat readings for many
  devices at a steady rate over raw MQTT 3.1.1 (QoS 0, prebuilt PUBLISH
  packets, as ``bench._latency``), each device's timestamps strictly
  increasing (the edge drops a repeat of a device's reading at the same
  millisecond as a redelivery). They count the bytes they publish (topic +
  payload).
- ``edge_flow``: the real edge flow (``python -m bytewax.run dataflows.edge:flow``)
  on a workflow written to a temp dir, optionally pinned to one CPU, online. It
  runs from compiled bytecode, as an installed gateway does (pip compiles a
  package's modules at install): ``edge_bytecode`` compiles what the flow imports
  into a cache (``PYTHONPYCACHEPREFIX``) first. Without it, where
  ``PYTHONDONTWRITEBYTECODE`` is set (this project's machines) or a checkout is
  read-only, every start compiles ~330 modules from source, and the compiler's
  freed memory stays in the process: ~3.7 MiB more resident.
- ``peak_rss_mb`` / ``rss_mb``: the process's ``VmHWM`` / ``VmRSS``.
- ``uplink_records``: what the gateway sent, read back from Kafka.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._latency import Publishers, RawMqtt, _utf8, _varint, tail_log
from bench.harness import BenchError
from connectors.kafka import KafkaRecord, ensure_topics, read_topic
from connectors.mqtt import connect_client
from infra.stack import StackInfo
from iotflow.topics import KafkaTopics, MqttTopics

__all__ = [
    "EdgeRun",
    "Fleet",
    "FleetSpec",
    "edge_bytecode",
    "edge_flow",
    "peak_rss_mb",
    "rss_mb",
    "uplink_records",
]


def _proc_status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} for process {pid}")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (``VmHWM``), MiB."""
    return _proc_status(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    return _proc_status(pid, "VmRSS")


@dataclass(frozen=True)
class FleetSpec:
    """One publisher process: ``devices`` publish in turn, ``msgs_per_s`` in all, from
    ``start_at`` to ``stop_at`` (``time.time()``); ``extra`` fields go in every reading.

    A process that gets going after ``start_at`` (spawning is slow on a loaded machine)
    shifts its whole schedule by its delay instead of sending the missed seconds in one
    burst: the load stays the stated rate for the stated time."""

    url: str
    base: str
    devices: tuple[str, ...]
    msgs_per_s: float
    start_at: float
    stop_at: float
    qos: int = 0  # 1: the broker keeps what a disconnected persistent session misses
    limit: int | None = None  # stop after this many messages
    cpus: tuple[int, ...] | None = None  # run on these CPUs only


def _fleet_process(spec: FleetSpec, results: Any) -> None:
    if spec.cpus:
        os.sched_setaffinity(0, set(spec.cpus))
    topics = [MqttTopics(spec.base).telemetry(d).encode() for d in spec.devices]
    heads = [_utf8(t) for t in topics]
    last = [0] * len(topics)
    client = RawMqtt(spec.url, f"bench-fleet-{uuid.uuid4().hex[:8]}")
    sent = sent_bytes = 0
    limit = spec.limit if spec.limit is not None else 2**62
    first = 0x32 if spec.qos else 0x30
    try:
        while time.time() < spec.start_at:
            time.sleep(0.005)
        start_at = max(spec.start_at, time.time())
        stop_at = spec.stop_at + (start_at - spec.start_at)
        while (now := time.time()) < stop_at and sent < limit:
            due = min(int((now - start_at) * spec.msgs_per_s), limit)
            n = min(due - sent, 2000)
            if n <= 0:
                time.sleep(0.002)
                continue
            now_ms = int(now * 1000)
            out = bytearray()
            for i in range(sent, sent + n):
                d = i % len(topics)
                ts = last[d] = max(now_ms, last[d] + 1)
                payload = b'{"ts": %d, "temperature": %.1f, "humidity": %.1f}' % (
                    ts,
                    18.0 + (i * 7) % 80 / 10,
                    35.0 + (i * 13) % 200 / 10,
                )
                packet_id = struct.pack("!H", i % 65535 + 1) if spec.qos else b""
                body = heads[d] + packet_id + payload
                out += bytes([first]) + _varint(len(body)) + body
                sent_bytes += len(topics[d]) + len(payload)
            client.send(bytes(out))
            sent += n
    finally:
        client.close()
    results.put({"msgs": sent, "bytes": sent_bytes, "late_start_s": start_at - spec.start_at})


class Fleet(Publishers):
    """Publisher processes each running one ``FleetSpec``; ``join`` sums what they sent."""

    def __init__(self, specs: list[FleetSpec]) -> None:
        super().__init__(_fleet_process, specs)

    def join(self, timeout_s: float) -> dict[str, float]:
        """Messages and bytes sent in all, and the latest start after ``start_at`` (s)."""
        got = self.reports(timeout_s)
        return {
            "msgs": sum(r["msgs"] for r in got),
            "bytes": sum(r["bytes"] for r in got),
            "late_start_s": max(r["late_start_s"] for r in got),
        }


@dataclass
class EdgeRun:
    """A running edge flow: its process, names and log."""

    popen: subprocess.Popen
    base: str
    prefix: str
    gateway_id: str
    log: Path
    bootstrap: str

    def wait(self, timeout_s: float) -> None:
        try:
            code = self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise BenchError(
                f"the edge flow did not end within {timeout_s}s:\n{tail_log(self.log)}"
            ) from None
        if code != 0:
            raise BenchError(f"the edge flow exited with code {code}:\n{tail_log(self.log)}")


def _wait_online(url: str, topic: str, popen: subprocess.Popen, log: Path, since: float) -> None:
    online = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.payload == b"online":
            online.set()

    client = connect_client(url, on_connect=lambda c: c.subscribe(topic, 1), on_message=on_message)
    try:
        deadline = time.monotonic() + 90
        while not online.wait(0.1):
            if popen.poll() is not None:
                raise BenchError(f"the edge flow exited with {popen.returncode}:\n{tail_log(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"the edge flow was not online within 90s:\n{tail_log(log)}")
    finally:
        client.disconnect()
        client.loop_stop()


# what the edge process imports, at start and once running (metrics, Kafka admin, SQLite)
_EDGE_IMPORTS = (
    "import bytewax.run, bytewax._metrics, confluent_kafka.admin, sqlite3, dataflows.edge"
)


def edge_bytecode(env: dict[str, str]) -> dict[str, str]:
    """``env`` for an edge process that loads compiled bytecode from a cache under the temp
    dir (written now for every module the flow imports, kept across runs; Python checks
    each file against its source)."""
    cache = Path(tempfile.gettempdir()) / "iotflow-pycache"
    out = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out["PYTHONPYCACHEPREFIX"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-c", _EDGE_IMPORTS], env=out, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise BenchError(f"compiling the edge flow's modules failed:\n{done.stderr[-2000:]}")
    return out


@contextmanager
def edge_flow(
    info: StackInfo,
    tmp: Path,
    workflow: dict[str, Any],
    *,
    cpu: int | None = None,
    env: dict[str, str] | None = None,
    name: str = "edge",
    names: tuple[str, str] | None = None,
    wait_online: bool = True,
) -> Iterator[EdgeRun]:
    """The edge flow on ``workflow``, online (its uplink topic created); killed on exit.

    ``cpu`` pins it to that CPU (one core); ``names`` reuses an MQTT base and Kafka
    prefix (a second run of the same gateway)."""
    tag = uuid.uuid4().hex[:8]
    base, prefix = names or (f"bench{tag}", f"bench{tag}")
    path = tmp / f"{name}-workflow.json"
    path.write_text(json.dumps(workflow))
    gateway_id = "bench-gw"
    ensure_topics(info.kafka_bootstrap, [KafkaTopics(prefix).edge_uplink])
    full_env = {
        **edge_bytecode(dict(os.environ)),
        "IOTFLOW_MQTT_URL": info.mqtt_url,
        "IOTFLOW_KAFKA_BOOTSTRAP": info.kafka_bootstrap,
        "IOTFLOW_MQTT_BASE": base,
        "IOTFLOW_TOPIC_PREFIX": prefix,
        "IOTFLOW_EDGE_GATEWAY_ID": gateway_id,
        "IOTFLOW_EDGE_WORKFLOW": str(path),
        "IOTFLOW_EDGE_BUFFER": str(tmp / "edge-buffer.db"),
        "IOTFLOW_EDGE_DEFINITIONS": "0",
        **(env or {}),
    }
    log = tmp / f"{name}.log"
    argv = [sys.executable, "-m", "bytewax.run", "dataflows.edge:flow"]

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    since = time.time()
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin
        )
    run = EdgeRun(popen, base, prefix, gateway_id, log, info.kafka_bootstrap)
    try:
        if wait_online:
            topic = MqttTopics(base).gateway_status(gateway_id)
            _wait_online(info.mqtt_url, topic, popen, log, since)
        yield run
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def uplink_records(run: EdgeRun) -> list[KafkaRecord]:
    """Every record the gateway sent (the whole uplink topic)."""
    return read_topic(run.bootstrap, KafkaTopics(run.prefix).edge_uplink, timeout_s=30)


def pick_cpu() -> int | None:
    """The last CPU this process may use (the edge gets it to itself as far as we can)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) > 1 else None


def keep_off(cpu: int | None, info: StackInfo) -> tuple[int, ...] | None:
    """Move this process and the brokers off ``cpu``; the CPUs left for the load."""
    if cpu is None:
        return None
    others = tuple(sorted(set(os.sched_getaffinity(0)) - {cpu}))
    for pid in [0, *(p.pid for p in info.processes)]:
        with contextlib.suppress(OSError):  # a broker that is not ours to move
            os.sched_setaffinity(pid, set(others))
    return others


def cpu_seconds(pid: int) -> tuple[float, float]:
    """Seconds the process's threads ran on a CPU, and waited runnable for one
    (``/proc/PID/task/*/schedstat``), so far."""
    ran = waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            run_ns, wait_ns, _ = f.read().split()
            ran += int(run_ns)
            waited += int(wait_ns)
    return ran / 1e9, waited / 1e9


class CpuSampler:
    """Samples ``cpu_seconds`` of a process every 0.1 s in a thread: ``at(t)`` interpolates."""

    def __init__(self, pid: int) -> None:
        self.samples: list[tuple[float, tuple[float, float]]] = []
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append((time.time(), cpu_seconds(self._pid)))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def at(self, t: float) -> tuple[float, float]:
        """(ran, waited) seconds at time ``t``."""
        before = [s for s in self.samples if s[0] <= t]
        after = [s for s in self.samples if s[0] >= t]
        if not before or not after:
            raise BenchError("the CPU samples do not cover the busy time")
        (t0, c0), (t1, c1) = before[-1], after[0]
        share = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
        return tuple(a + (b - a) * share for a, b in zip(c0, c1, strict=True))  # type: ignore[return-value]


FLEET_WORKFLOW: dict[str, Any] = {
    "name": "bench-edge",
    "version": 1,
    "components": [
        {
            "name": "safety",
            "kind": "patterns",
            "placement": "edge",
            "patterns": [
                {
                    "name": "overheat",
                    "kind": "threshold",
                    "condition": "temperature > 200",
                    "actions": [{"type": "command", "device": "valve-{key}", "name": "close"}],
                }
            ],
        },
        {
            "name": "stats",
            "kind": "aggregate",
            "window": "10s",
            "allowed_lateness": "2s",
            "placement": "edge",
        },
    ],
}


@dataclass(frozen=True)
class FleetResult:
    sent: int
    bytes_received: int
    bytes_uplinked: int
    records_uplinked: int
    aggregated: int
    idle_rss_mb: float
    peak_rss_mb: float
    buffered_after: int


def fleet_run(
    info: StackInfo,
    tmp: Path,
    *,
    devices: int,
    rate_hz: float,
    duration_s: float,
    publishers: int,
    definitions: bool = True,
) -> FleetResult:
    """``devices`` at ``rate_hz`` for ``duration_s`` through the edge (10 s windows and a
    local rule); what came in, what went up, and the edge's resident memory."""
    from connectors.uplink import dedupe_uplink, expand_aggregates

    env = {
        "IOTFLOW_EDGE_IDLE_STOP_S": "3",
        "IOTFLOW_EDGE_STATUS_S": "3600",
        "IOTFLOW_EDGE_DEFINITIONS": "1" if definitions else "0",
    }
    with edge_flow(info, tmp, FLEET_WORKFLOW, env=env) as run:
        idle = rss_mb(run.popen.pid)
        names = [f"dev{i:05d}" for i in range(devices)]
        start = time.time() + 1.0
        fleet = Fleet(
            [
                FleetSpec(
                    info.mqtt_url,
                    run.base,
                    tuple(names[p::publishers]),
                    devices * rate_hz / publishers,
                    start,
                    start + duration_s,
                )
                for p in range(publishers)
            ]
        )
        peak = idle
        deadline = time.monotonic() + duration_s + 120
        while run.popen.poll() is None:
            try:
                peak = max(peak, peak_rss_mb(run.popen.pid))
            except (OSError, BenchError):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the edge flow did not end:\n{tail_log(run.log)}")
            time.sleep(0.2)
        sent = fleet.join(30)
        run.wait(30)
        records = uplink_records(run)
    import sqlite3

    with sqlite3.connect(tmp / "edge-buffer.db") as db:
        left = int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    aggregated = sum(
        w.count
        for e in dedupe_uplink(records)
        for w in expand_aggregates(e)
        if w.metric == "temperature"
    )
    return FleetResult(
        sent=sent["msgs"],
        bytes_received=sent["bytes"],
        bytes_uplinked=sum(len(r.key or b"") + len(r.value or b"") for r in records),
        records_uplinked=len(records),
        aggregated=aggregated,
        idle_rss_mb=round(idle, 1),
        peak_rss_mb=round(peak, 1),
        buffered_after=left,
    )
