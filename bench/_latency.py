"""Shared machinery of the latency benchmarks (``detection_latency``, ``window_latency``).

- ``LoadSpec`` / ``Load``: publisher processes that send device telemetry to MQTT at a
  steady rate, stamped with the wall clock (event time = wall time, so watermarks
  advance in real time). They speak MQTT 3.1.1 QoS 0 over a plain socket with
  prebuilt PUBLISH packets: paho-mqtt tops out near 12k msgs/s per process and
  ``mosquitto_pub -l`` publishes to one topic only, while the load here spreads over
  thousands of device topics. The broker does the same work either way.
- ``RawMqtt``: the same client, for triggers sent one at a time from the benchmark.
- ``KafkaWatch``: a low-latency confluent-kafka consumer on assigned partitions
  (no group join: Tansu's take ~20 s) that stamps each record with ``time.time()``
  when it arrives.
- ``monitoring_flow``: the real monitoring flow (``python -m bytewax.run``) on a
  declaration written to a temp dir, its settings and its log.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from bench.harness import BenchError
from connectors.kafka import ensure_topics
from connectors.mqtt import MqttUrl
from infra.flowproc import FlowProcess
from infra.stack import StackInfo
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

__all__ = [
    "KafkaWatch",
    "Load",
    "LoadSpec",
    "Publishers",
    "RawMqtt",
    "monitoring_flow",
    "percentile",
    "tail_log",
]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT PUBLISH packet, QoS 0, not retained."""
    body = _utf8(topic) + payload
    return b"\x30" + _varint(len(body)) + body


class RawMqtt:
    """A minimal MQTT 3.1.1 client: connect, publish packets, ping, disconnect.

    ``close`` first makes sure the broker has read everything sent: it sends a
    PINGREQ and waits for its PINGRESP. The broker handles a connection's
    packets in order, so that answer comes after every earlier PUBLISH was
    taken. Closing without it lost 1-17 % of a loaded run's last messages: the
    publisher closed its socket while the broker's receive buffer still held
    them, and a close with unread data resets the connection, dropping them.
    """

    KEEPALIVE_S = 60

    def __init__(self, url: str, client_id: str) -> None:
        parsed = MqttUrl.parse(url)
        if parsed.tls:
            raise BenchError(f"the load generator speaks plain MQTT only, not {parsed}")
        flags = 0x02  # clean session
        payload = _utf8(client_id.encode())
        if parsed.username:
            flags |= 0x80
            payload += _utf8(parsed.username.encode())
            if parsed.password is not None:
                flags |= 0x40
                payload += _utf8(parsed.password.encode())
        variable = _utf8(b"MQTT") + bytes([4, flags]) + struct.pack("!H", self.KEEPALIVE_S)
        body = variable + payload
        self.sock = socket.create_connection((parsed.host, parsed.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self.sock.recv(4)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            raise BenchError(f"MQTT broker {parsed} refused the load generator: {connack!r}")
        self.sock.settimeout(None)  # the reader thread blocks; sends never time out
        self._last_ping = time.monotonic()
        self._pongs = threading.Condition()
        self._pings_sent = 0
        self._pongs_got = 0
        # Read what the broker sends (PINGRESP, PUBACK) so its socket buffer never fills.
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        buf = bytearray()
        try:
            while chunk := self.sock.recv(65536):
                buf += chunk
                pongs, used = _count_pingresp(buf)
                del buf[:used]
                if pongs:
                    with self._pongs:
                        self._pongs_got += pongs
                        self._pongs.notify_all()
        except OSError:
            pass

    def _ping(self) -> int:
        with self._pongs:
            self._pings_sent += 1
            target = self._pings_sent
        self.sock.sendall(b"\xc0\x00")
        self._last_ping = time.monotonic()
        return target

    def send(self, packets: bytes) -> None:
        self.sock.sendall(packets)
        if time.monotonic() - self._last_ping > self.KEEPALIVE_S / 3:
            self._ping()

    def sync(self, timeout_s: float = 60.0) -> bool:
        """True once the broker has read every packet sent before this call (a PINGREQ
        answered); False when no answer came within ``timeout_s``."""
        try:
            target = self._ping()
        except OSError:
            return False
        with self._pongs:
            return self._pongs.wait_for(lambda: self._pongs_got >= target, timeout_s)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Disconnect once the broker has read everything (``sync``); returns whether it
        confirmed that within ``timeout_s`` (the socket closes either way)."""
        confirmed = self.sync(timeout_s)
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._drain.join(2)
        self.sock.close()
        return confirmed


def _count_pingresp(buf: bytearray) -> tuple[int, int]:
    """PINGRESP packets among the whole packets at the start of ``buf``, and the bytes
    those whole packets take."""
    pongs = pos = 0
    while pos + 2 <= len(buf):
        length, shift, i = 0, 0, pos + 1
        while i < len(buf):
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        else:
            break  # the length is not whole yet
        if i + length > len(buf):
            break
        if buf[pos] == 0xD0:
            pongs += 1
        pos = i + length
    return pongs, pos


@dataclass(frozen=True)
class LoadSpec:
    """One publisher process: ``devices`` publish in turn, ``msgs_per_s`` in all.

    Each message holds ``readings_per_msg`` readings (a JSON list when more than
    one) spread evenly over the device's publish period and ending now: a device
    that buffers its readings and sends them together. Temperatures stay below 30.
    """

    url: str
    base: str
    devices: tuple[str, ...]
    msgs_per_s: float
    readings_per_msg: int
    start_at: float  # time.time() to begin
    stop_at: float  # time.time() to end


def _reading(ts_ms: int, k: int) -> bytes:
    return b'{"ts": %d, "temperature": %.1f, "humidity": %.1f}' % (
        ts_ms,
        18.0 + (k * 7) % 80 / 10,
        35.0 + (k * 13) % 200 / 10,
    )


def _load_process(spec: LoadSpec, results: Any) -> None:
    topics = [f"{spec.base}/devices/{d}/telemetry".encode() for d in spec.devices]
    heads = [_utf8(t) for t in topics]
    client = RawMqtt(spec.url, f"bench-load-{uuid.uuid4().hex[:8]}")
    per = spec.readings_per_msg
    period_ms = len(topics) / spec.msgs_per_s * 1000  # each device publishes this often
    offsets = [round(period_ms * (per - 1 - i) / per) for i in range(per)]
    sent = 0
    behind_max = 0.0
    try:
        while time.time() < spec.start_at:
            time.sleep(min(0.01, max(0.0, spec.start_at - time.time())))
        begin = spec.start_at
        while True:
            now = time.time()
            if now >= spec.stop_at:
                break
            due = int((now - begin) * spec.msgs_per_s)
            n = min(due - sent, 2000)
            if n <= 0:
                time.sleep(0.002)
                continue
            behind_max = max(behind_max, (due - sent) / spec.msgs_per_s)
            now_ms = int(now * 1000)
            out = bytearray()
            for i in range(sent, sent + n):
                d = i % len(topics)
                if per == 1:
                    body = heads[d] + _reading(now_ms, i)
                else:
                    body = (
                        heads[d]
                        + b"["
                        + b",".join(_reading(now_ms - off, i) for off in offsets)
                        + b"]"
                    )
                out += b"\x30" + _varint(len(body)) + body
            client.send(bytes(out))
            sent += n
    finally:
        confirmed = client.close()
    results.put(
        {"msgs": sent, "readings": sent * per, "behind_max_s": behind_max, "confirmed": confirmed}
    )


class Publishers:
    """Publisher processes (``spawn``), ``target(spec, results)`` each; ``reports`` waits for
    every one's result dict."""

    def __init__(self, target: Callable[[Any, Any], None], specs: list[Any]) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=target, args=(s, self._results), daemon=True) for s in specs
        ]
        for proc in self._procs:
            proc.start()

    def reports(self, timeout_s: float) -> list[dict[str, Any]]:
        got = []
        deadline = time.monotonic() + timeout_s
        for _ in self._procs:
            try:
                got.append(self._results.get(timeout=max(0.1, deadline - time.monotonic())))
            except Exception:  # queue.Empty: a publisher died or hangs
                raise BenchError(
                    f"{len(self._procs) - len(got)} publishers did not report"
                ) from None
        for proc in self._procs:
            proc.join(5)
        return got

    def stop(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


class Load(Publishers):
    """Publisher processes each running one ``LoadSpec``; ``join`` sums them."""

    def __init__(self, specs: list[LoadSpec]) -> None:
        super().__init__(_load_process, specs)

    def join(self, timeout_s: float) -> dict[str, float]:
        got = self.reports(timeout_s)
        unconfirmed = [r for r in got if not r["confirmed"]]
        if unconfirmed:
            sent = sum(r["msgs"] for r in unconfirmed)
            raise BenchError(
                f"{len(unconfirmed)} publishers sent {sent} messages but the MQTT broker did "
                "not confirm reading them (no PINGRESP within 60 s); the run is not measured"
            )
        return {
            "msgs": sum(r["msgs"] for r in got),
            "readings": sum(r["readings"] for r in got),
            "behind_max_s": max(r["behind_max_s"] for r in got),
        }


def split_devices(devices: list[str], parts: int) -> list[tuple[str, ...]]:
    return [tuple(devices[i::parts]) for i in range(parts)]


class Seen(NamedTuple):  # a tuple: made thousands of times a second on the consumer's thread
    at: float  # time.time() when the consumer got it
    produced_ms: int  # the record's CreateTime: when the flow's producer took it
    topic: str
    key: bytes | None
    value: bytes


class KafkaWatch:
    """Follows topics from their beginning on assigned partitions, in a thread."""

    def __init__(self, bootstrap: str, topics: list[str], fetch_wait_ms: int = 5) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"iotflow-bench-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": fetch_wait_ms,
                "fetch.min.bytes": 1,
                "fetch.error.backoff.ms": 10,
                "socket.nagle.disable": True,
            }
        )
        parts: list[TopicPartition] = []
        try:
            meta = self._consumer.list_topics(timeout=10)
        except KafkaException as exc:
            raise BenchError(f"cannot list Kafka topics at {bootstrap}: {exc}") from exc
        for topic in topics:
            info = meta.topics.get(topic)
            if info is None or info.error is not None:
                raise BenchError(f"Kafka topic {topic!r} does not exist")
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions]
        self._consumer.assign(parts)
        # the consumer's thread only keeps what it consumed; ``seen`` unpacks it on the
        # caller's thread, after the measured part: ~2 us of Python per record taken from
        # the flow under test, 20,000 records at each window close of window_latency
        self._raw: deque[tuple[float, list[Message]]] = deque()
        self._seen: list[Seen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def seen(self) -> list[Seen]:
        """Every record consumed so far, in order, with when it was consumed."""
        raw, keep = self._raw, self._seen.append
        while raw:
            at, msgs = raw.popleft()
            for msg in msgs:
                if msg.error() is None:
                    keep(Seen(at, msg.timestamp()[1], msg.topic(), msg.key(), msg.value()))
        return self._seen

    def _run(self) -> None:
        consumer, keep = self._consumer, self._raw.append
        while not self._stop.is_set():
            # poll returns with the first record; consume(n, timeout) would wait out its
            # whole timeout unless n records came, adding up to 50 ms to every latency
            first = consumer.poll(0.05)
            if first is None:
                continue
            at = time.time()
            keep((at, [first, *consumer.consume(10_000, 0)]))

    def settle(self, idle_s: float = 1.0, timeout_s: float = 60.0) -> None:
        """Return once nothing new came for ``idle_s``."""
        deadline = time.monotonic() + timeout_s
        count, since = len(self.seen), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if len(self.seen) != count:
                count, since = len(self.seen), time.monotonic()
            elif time.monotonic() - since >= idle_s:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def percentile(values: list[float], q: float) -> float:
    """The lower sample quantile (``q`` in 0..100) of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def tail_log(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {log})"
    return "\n".join(text[-lines:])


@contextmanager
def monitoring_flow(
    info: StackInfo, tmp: Path, deployment: dict[str, Any], *, idle_stop_s: float
) -> Iterator[tuple[FlowProcess, Settings]]:
    """The monitoring flow on ``deployment``, online, its output topics created."""
    path = tmp / "monitoring.yaml"
    path.write_text(yaml.safe_dump(deployment))
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        _env_file=None,
        mqtt_url=info.mqtt_url,
        kafka_bootstrap=info.kafka_bootstrap,
        mqtt_base=f"bench{tag}",
        topic_prefix=f"bench{tag}",
        mqtt_client_id=f"bench-monitoring-{tag}",
        mqtt_idle_stop_s=idle_stop_s,
        duckdb=tmp / "bench.duckdb",
        monitoring=path,
    )
    topics = KafkaTopics(settings.topic_prefix)
    ensure_topics(
        info.kafka_bootstrap,
        [topics.aggregates, topics.deadletter, topics.detections, topics.command_requests],
    )
    log = tmp / "flow.log"
    with FlowProcess.start("dataflows.monitoring:flow", settings, log=log) as flow:
        try:
            flow.wait_online(90)
        except StackError as exc:
            raise BenchError(f"{exc}\n{tail_log(log)}") from exc
        yield flow, settings


def wait_flow(flow: FlowProcess, timeout_s: float) -> None:
    try:
        code = flow.wait(timeout_s)
    except StackError as exc:
        raise BenchError(f"{exc}\n{tail_log(flow.log)}") from exc
    if code != 0:
        raise BenchError(f"the monitoring flow exited with code {code}:\n{tail_log(flow.log)}")
