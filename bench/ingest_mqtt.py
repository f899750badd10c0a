"""ingest_mqtt: messages per second from MQTT publish to decoded reading.

A private Mosquitto; the consumer is ``bench.ingest_flow`` (``MqttSource``
with QoS 1 subscriptions and manual ack -> ``TelemetryDecoder.decode`` -> a
counting sink) run as ``python -m bytewax.run`` in a subprocess, as users
run flows. Several publisher processes send the load at QoS 1: by default
``mosquitto_pub -l`` (C, one device topic per process), else paho-mqtt in
``multiprocessing`` processes (``--publisher paho``). Payloads are built
before the clock starts and every publisher is connected before it starts.

``msgs_per_s`` is N over the time from releasing the publishers to the
consumer counting the last decoded reading. ``publish_msgs_per_s`` is N over
the time until the last publisher finished; when it is close to
``msgs_per_s`` the publishers, not the consumer, set the figure. Publishers,
Mosquitto and the flow share this machine's cores.

The run fails, rather than reporting a rate, unless the consumer decoded
exactly N readings and no dead letters.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Figure, Measured
from bench.ingest_flow import RESULT_DIR_ENV
from bench.workload import payload, private_stack
from connectors.mqtt import MqttUrl, connect_client
from infra.flowproc import FlowProcess
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

__all__ = ["DEFAULTS", "DESCRIPTION", "QUICK", "run"]

DESCRIPTION = (
    "msgs/s from MQTT publish (QoS 1, several publisher processes) to decoded reading "
    "in a Bytewax flow on a private Mosquitto"
)
DEFAULTS: dict[str, Any] = {
    "messages": 200_000,
    "publishers": 4,
    "publisher": "auto",  # auto (mosquitto_pub when installed), mosquitto_pub or paho
    "qos": 1,
    "workers": 1,
    "idle_stop_s": 2.0,
    "timeout_s": 300.0,
}
QUICK: dict[str, Any] = {"messages": 2000, "publishers": 2, "idle_stop_s": 1.0, "timeout_s": 60.0}
# figures every run reports; counts that must equal counts["sent"]
FIGURES = {"msgs_per_s", "publish_msgs_per_s"}
COMPLETE_COUNTS = ["decoded"]

PUBLISHERS = ("auto", "mosquitto_pub", "paho")


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _payloads(count: int, first: int, base_ms: int) -> list[bytes]:
    # Timestamps in the recent past, one ms apart: valid for the decoder at any size.
    return [payload(base_ms + k, k) for k in range(first, first + count)]


def _check_params(params: dict[str, Any]) -> str:
    for name in ("messages", "publishers", "workers"):
        if int(params[name]) < 1:
            raise BenchError(f"{name}={params[name]} must be at least 1")
    if int(params["qos"]) not in (0, 1):
        raise BenchError(f"qos={params['qos']} must be 0 or 1")
    kind = str(params["publisher"])
    if kind not in PUBLISHERS:
        raise BenchError(f"publisher={kind!r} must be one of {', '.join(PUBLISHERS)}")
    if kind == "auto":
        kind = "mosquitto_pub" if shutil.which("mosquitto_pub") else "paho"
    elif kind == "mosquitto_pub" and not shutil.which("mosquitto_pub"):
        msg = "publisher=mosquitto_pub but it is not installed (apt-get install mosquitto-clients)"
        raise BenchError(msg)
    return kind


class _MosquittoPub:
    """``mosquitto_pub -l`` processes, started and connected; ``go`` feeds their stdin."""

    def __init__(self, url: str, topics: list[str], blobs: list[bytes], qos: int) -> None:
        parsed = MqttUrl.parse(url)
        auth = ["-u", parsed.username, "-P", parsed.password or ""] if parsed.username else []
        self._blobs = blobs
        self._procs = [
            subprocess.Popen(
                [
                    "mosquitto_pub",
                    "-h",
                    parsed.host,
                    "-p",
                    str(parsed.port),
                    *auth,
                    "-i",
                    f"bench-pub-{uuid.uuid4().hex[:8]}",
                    "-t",
                    topic,
                    "-l",
                    "-q",
                    str(qos),
                    "-M",
                    "1000",
                ],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for topic in topics
        ]
        time.sleep(0.3)  # let them connect; a late connect counts against the publishers

    def go(self, timeout_s: float) -> None:
        def feed(proc: subprocess.Popen, blob: bytes) -> None:
            if proc.stdin is not None:  # always: stdin=PIPE
                proc.stdin.write(blob)
                proc.stdin.close()

        feeders = [
            threading.Thread(target=feed, args=(p, b))
            for p, b in zip(self._procs, self._blobs, strict=True)
        ]
        for t in feeders:
            t.start()
        for t in feeders:
            t.join(timeout_s)
        for proc in self._procs:
            try:
                code = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise BenchError(f"mosquitto_pub did not finish within {timeout_s}s") from None
            if code != 0:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"mosquitto_pub exited with code {code}: {err.strip()}")

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _paho_publisher(
    url: str, topic: str, count: int, first: int, base_ms: int, qos: int, ready: Any, start: Event
) -> None:
    payloads = _payloads(count, first, base_ms)
    client = connect_client(url, f"bench-pub-{uuid.uuid4().hex[:8]}")
    try:
        ready.put("ready")
        start.wait()
        infos = [client.publish(topic, body, qos) for body in payloads]
        for info in infos:
            info.wait_for_publish(120)
    finally:
        client.disconnect()
        client.loop_stop()


class _PahoPub:
    """paho-mqtt publishers in ``multiprocessing`` processes; each connects, then waits for ``go``."""

    def __init__(
        self, url: str, topics: list[str], shares: list[int], base_ms: int, qos: int
    ) -> None:
        ctx = mp.get_context("spawn")
        self._start = ctx.Event()
        ready = ctx.Queue()
        self._procs = []
        first = 0
        for topic, count in zip(topics, shares, strict=True):
            args = (url, topic, count, first, base_ms, qos, ready, self._start)
            self._procs.append(ctx.Process(target=_paho_publisher, args=args, daemon=True))
            first += count
        for proc in self._procs:
            proc.start()
        for _ in self._procs:
            ready.get(timeout=60)

    def go(self, timeout_s: float) -> None:
        self._start.set()
        for proc in self._procs:
            proc.join(timeout_s)
            if proc.exitcode != 0:
                raise BenchError(f"a paho publisher failed (exit code {proc.exitcode})")

    def stop(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


def run(params: dict[str, Any]) -> Measured:
    kind = _check_params(params)
    total, qos = int(params["messages"]), int(params["qos"])
    timeout_s = float(params["timeout_s"])
    shares = _shares(total, int(params["publishers"]))
    base_ms = time.time_ns() // 1_000_000 - total - 60_000

    with private_stack() as info, tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp:
        settings = Settings(
            _env_file=None,
            mqtt_url=info.mqtt_url,
            kafka_bootstrap=info.kafka_bootstrap,
            mqtt_base=f"bench{uuid.uuid4().hex[:8]}",
            mqtt_client_id="bench-ingest",
            mqtt_idle_stop_s=float(params["idle_stop_s"]),
        )
        topics = MqttTopics(settings.mqtt_base)
        device_topics = [topics.telemetry(f"dev-{i:03d}") for i in range(len(shares))]
        log = Path(tmp) / "flow.log"
        with FlowProcess.start(
            "bench.ingest_flow:flow",
            settings,
            log=log,
            workers=int(params["workers"]),
            extra_env={RESULT_DIR_ENV: tmp},
        ) as flow:
            flow.wait_online(60)
            if kind == "mosquitto_pub":
                blobs, first = [], 0
                for count in shares:
                    blobs.append(b"".join(b + b"\n" for b in _payloads(count, first, base_ms)))
                    first += count
                publishers: _MosquittoPub | _PahoPub = _MosquittoPub(
                    settings.require_mqtt_url(), device_topics, blobs, qos
                )
            else:
                publishers = _PahoPub(
                    settings.require_mqtt_url(), device_topics, shares, base_ms, qos
                )
            try:
                started = time.time()
                publishers.go(timeout_s)
                published = time.time()
            finally:
                publishers.stop()
            try:
                code = flow.wait(timeout_s)
            except StackError as exc:
                raise BenchError(f"{exc}\n{_tail(log)}") from exc
            if code != 0:
                raise BenchError(f"the consumer flow exited with code {code}:\n{_tail(log)}")
        results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("worker-*.json"))]
        if len(results) != int(params["workers"]):
            raise BenchError(
                f"{len(results)} of {params['workers']} workers reported:\n{_tail(log)}"
            )

    ok = sum(r["ok"] for r in results)
    dead = sum(r["dead"] for r in results)
    counts = {"sent": total, "decoded": ok, "dead_letters": dead}
    if ok != total or dead:
        raise BenchError(f"the consumer decoded {ok} of {total} readings ({dead} dead letters)")
    done = max(r["last_at"] for r in results)
    return Measured(
        figures={
            "msgs_per_s": Figure(round(total / (done - started), 1), "msgs/s"),
            "publish_msgs_per_s": Figure(round(total / (published - started), 1), "msgs/s"),
            "seconds": Figure(round(done - started, 3), "s"),
        },
        counts={**counts, "publisher_processes": len(shares)},
        resolved={"publisher": kind},
    )


def _tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {log})"
    return "\n".join(text[-lines:])
