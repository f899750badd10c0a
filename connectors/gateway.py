"""The edge gateway's MQTT side and its output: device messages in, acknowledged only once durable.

``GatewaySource`` subscribes to device telemetry on the gateway's local MQTT
broker with a stable client id (``iotflow-edge-{gateway_id}``), a persistent
session (QoS 1, ``session_expiry``) and manual acknowledgment. It announces
the gateway on ``{base}/gateways/{gateway_id}/status``: ``online``
(retained, once the broker confirmed the subscription), with a last will of
``offline`` (retained), and ``offline`` on a clean close.

Each poll hands the dataflow an ``Inbound(token, messages)``; the messages
are **not** acknowledged then. QoS 0 and 1 messages are read in bulk (the
``on_publishes`` path of ``connectors.mqtt.connect_client``: no paho message
object per message, MQTT 5 publish properties are not read). ``GatewaySink`` writes what the edge logic
produced in order: local commands to the MQTT broker (QoS 1, waiting for the
broker's PUBACK), uplink records into the store-and-forward buffer, and on a
``Checkpoint`` it commits the buffer with the logic's state and only then
acknowledges the checkpoint's tokens to the broker (``AckChannel``). So a
QoS 1 device message is acknowledged only after everything it caused is on
disk, and a gateway killed at any point loses nothing: the broker redelivers
what was not acknowledged, and the restarted logic resumes from the state
committed with the buffer (at least once; duplicates carry the same record
ids and the cloud drops them). Messages published at QoS 0 get no such
guarantee (the broker never redelivers them). A connection lost between a
message and its acknowledgment drops the acknowledgment (the broker
redelivers on the next connection).

Broker setting: acknowledgments come per checkpoint (every 100 ms or 800
messages by default), so the broker must allow that many unacknowledged QoS 1
messages towards the gateway: Mosquitto's ``max_inflight_messages`` defaults
to 20, which would pace the gateway to 20 messages per checkpoint; the
project's ``infra/mosquitto-local.conf`` sets 1000.

The gateway runs one Bytewax worker: its buffer is one SQLite file and the
acknowledgments travel between its source and its sink inside the process.
``build`` with more workers raises ``ConfigError``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.buffer import StoreAndForward, UplinkRecord
from connectors.mqtt import MqttMessage, MqttSink, RawPublish, connect_client
from connectors.uplink import Uplink
from iotflow.errors import BrokerError, ConfigError
from iotflow.events import DeviceMessage
from iotflow.topics import MqttTopics

__all__ = [
    "AckChannel",
    "ByteBoundedQueue",
    "Checkpoint",
    "GatewaySink",
    "GatewaySource",
    "GatewayStatus",
    "Inbound",
    "gateway_client_id",
    "release_memory",
]


def gateway_client_id(gateway_id: str) -> str:
    """The stable MQTT client id of a gateway (its session and last will hang on it)."""
    return f"iotflow-edge-{gateway_id}"


@dataclass(frozen=True)
class Inbound:
    """Device messages of one poll; ``token`` acknowledges them (``AckChannel.ack``)."""

    token: int
    messages: list[DeviceMessage]


@dataclass(frozen=True)
class Checkpoint:
    """Commit the buffer with ``state`` (the edge logic's snapshot), then acknowledge ``tokens``."""

    state: bytes
    tokens: list[int]


@dataclass(frozen=True)
class GatewayStatus:
    """The edge logic's counters; the sink adds the buffer's and the uplink's and sends it up."""

    gateway_id: str
    ts_ms: int
    counters: dict[str, Any] = field(default_factory=dict)


class AckChannel:
    """Carries acknowledgments from the sink (after a commit) to the source's MQTT client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ack: Callable[[list[int]], None] | None = None

    def attach(self, ack: Callable[[list[int]], None]) -> None:
        with self._lock:
            self._ack = ack

    def ack(self, tokens: list[int]) -> None:
        with self._lock:
            ack = self._ack
        if ack is not None and tokens:
            ack(tokens)


def _now() -> datetime:
    return datetime.now(UTC)


class _GatewayPartition(StatelessSourcePartition[Inbound]):
    def __init__(
        self,
        url: str,
        gateway_id: str,
        topics: list[str],
        base: str,
        batch_size: int,
        receive_maximum: int,
        session_expiry_s: int,
        acks: AckChannel,
        idle_stop: timedelta | None,
        ended: threading.Event | None,
    ) -> None:
        self._ended = ended
        # (messages, connection generation, received at ms) as the client's thread read them
        self._queue: queue.SimpleQueue[tuple[list[RawPublish], int, int]] = queue.SimpleQueue()
        self._carry: tuple[list[RawPublish], int, int] | None = None  # the rest of a long read
        self._batch_size = batch_size
        # messages read but not yet handed to the dataflow; see on_publishes
        self._room = threading.Condition()
        self._waiting = 0
        self._closing = False
        self._status_topic = MqttTopics(base).gateway_status(gateway_id)
        self._generation = 0  # bumped on every (re)connect: older acknowledgments are void
        self._pending: dict[int, list[tuple[int, int, int]]] = {}
        self._next_token = 0
        self._lock = threading.Lock()
        self._idle_stop = idle_stop
        self._last_message: float | None = None
        self._awake: datetime | None = None
        subscribed = threading.Event()
        refused: list[str] = []

        def on_connect(client: mqtt.Client) -> None:
            with self._lock:
                self._generation += 1
            client.subscribe([(t, 1) for t in topics])

        def on_subscribe(client: mqtt.Client, _u: Any, _mid: int, codes: list, _p: Any) -> None:
            refused.extend(
                f"{t} ({c})" for t, c in zip(topics, codes, strict=False) if c.is_failure
            )
            client.publish(self._status_topic, b"online", qos=1, retain=True)
            subscribed.set()

        def on_publishes(publishes: list[RawPublish]) -> None:
            # A batch already waits: the client's thread stops reading until the dataflow
            # takes it, so a burst stays with the broker (and the socket), not in our memory.
            with self._room:
                while self._waiting >= batch_size and not self._closing:
                    self._room.wait()
                self._waiting += len(publishes)
            self._queue.put((publishes, self._generation, time.time_ns() // 1_000_000))

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:  # QoS 2 only
            on_publishes([(msg.topic, msg.payload, msg.qos, msg.mid)])

        self._client = connect_client(
            url,
            gateway_client_id(gateway_id),
            clean_start=False,
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            manual_ack=True,
            will=(self._status_topic, b"offline"),
            on_connect=on_connect,
            on_subscribe=on_subscribe,
            on_message=on_message,
            on_publishes=on_publishes,
        )
        if not subscribed.wait(60) or refused:
            self.close()
            why = ", ".join(refused) if refused else "no SUBACK within 60s"
            raise BrokerError(f"the gateway's MQTT broker refused the subscription: {why}")
        acks.attach(self.ack)

    def next_batch(self) -> list[Inbound]:
        messages: list[DeviceMessage] = []
        tags: list[tuple[int, int, int]] = []
        room = self._batch_size
        while room > 0:
            if self._carry is None:
                try:
                    self._carry = self._queue.get_nowait()
                except queue.Empty:
                    break
            publishes, generation, received_ms = self._carry
            if len(publishes) > room:  # the rest goes in the next batch
                publishes, rest = publishes[:room], publishes[room:]
                self._carry = (rest, generation, received_ms)
            else:
                self._carry = None
            for topic, payload, qos, mid in publishes:
                messages.append(DeviceMessage(topic, payload, received_ms))
                if qos:
                    tags.append((mid, qos, generation))
            room -= len(publishes)
        if messages:
            with self._room:
                self._waiting -= len(messages)
                self._room.notify()
            self._last_message = time.monotonic()
            self._awake = None
            with self._lock:
                self._next_token += 1
                token = self._next_token
                if tags:
                    self._pending[token] = tags
            return [Inbound(token, messages)]
        if (
            self._idle_stop is not None
            and self._last_message is not None
            and time.monotonic() - self._last_message >= self._idle_stop.total_seconds()
        ):
            if self._ended is not None:
                self._ended.set()
            raise StopIteration
        self._awake = _now() + timedelta(milliseconds=1)
        return []

    def next_awake(self) -> datetime | None:
        return self._awake

    @property
    def waiting(self) -> int:
        """Messages read from the broker and not yet handed to the dataflow."""
        with self._room:
            return self._waiting

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge the messages of ``tokens`` (those of an older connection: never)."""
        with self._lock:
            current = self._generation
            tags = [t for token in tokens for t in self._pending.pop(token, [])]
        acks = [(mid, qos) for mid, qos, generation in tags if generation == current]
        if acks:  # the client reads in bulk (on_publishes), so it has ack_all: one write
            self._client.ack_all(acks)  # type: ignore[attr-defined]

    def close(self) -> None:
        with self._room:  # a client's thread waiting for room goes on, to disconnect
            self._closing = True
            self._room.notify_all()
        info = self._client.publish(self._status_topic, b"offline", qos=1, retain=True)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()


class GatewaySource(DynamicSource[Inbound]):
    """Device telemetry from the gateway's local broker, acknowledged after the checkpoint
    that covers it (see the module docstring).

    Memory stays bounded under bursts: once a ``batch_size`` of received
    messages waits for the dataflow, the client stops reading the socket
    until the dataflow takes them; the broker holds the rest (QoS 1 within
    ``receive_maximum``, QoS 0 in its queue for the session).

    ``idle_stop`` ends the input once no message came for that long after the
    first (windows then flush and the flow exits: tests, demos); it then sets
    ``ended``, so other inputs of the flow can end too.
    """

    def __init__(
        self,
        url: str,
        gateway_id: str,
        topics: list[str],
        acks: AckChannel,
        *,
        base: str = "iotflow",
        batch_size: int = 1000,
        receive_maximum: int = 1000,
        session_expiry: timedelta = timedelta(days=1),
        idle_stop: timedelta | None = None,
        ended: threading.Event | None = None,
    ) -> None:
        if not topics:
            raise ConfigError("GatewaySource needs at least one topic filter")
        if not 0 < receive_maximum <= 65535:
            raise ConfigError(f"receive_maximum {receive_maximum} must be within 1..65535 (MQTT 5)")
        self._args = (url, gateway_id, topics, base, batch_size, receive_maximum)
        self._session_expiry_s = int(session_expiry.total_seconds())
        self._acks = acks
        self._idle_stop = idle_stop
        self._ended = ended

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GatewayPartition:
        if worker_count > 1:
            msg = (
                f"the edge flow runs one worker (its buffer is one SQLite file); "
                f"run it without -w/-p (got {worker_count} workers)"
            )
            raise ConfigError(msg)
        url, gateway_id, topics, base, batch_size, receive_maximum = self._args
        return _GatewayPartition(
            url,
            gateway_id,
            topics,
            base,
            batch_size,
            receive_maximum,
            self._session_expiry_s,
            self._acks,
            self._idle_stop,
            self._ended,
        )


_encode = msgspec.json.encode
# what waits between the dataflow and the disk writer, in bytes (an item counts its payload
# plus _ITEM_OVERHEAD): a checkpoint of 1,000 devices is ~0.2 MB, a record a few hundred bytes
_DISK_QUEUE_BYTES = 4 * 1024 * 1024
_ITEM_OVERHEAD = 200
_TRIM_EVERY_S = 5.0


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A gateway's memory budget is small, and glibc keeps what Python and the
    libraries freed (about 5 MB after start-up alone) unless asked.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _queued_bytes(item: Any) -> int:
    if isinstance(item, UplinkRecord):
        return item.size + _ITEM_OVERHEAD
    if isinstance(item, Checkpoint):
        return len(item.state) + 8 * len(item.tokens) + _ITEM_OVERHEAD
    return _ITEM_OVERHEAD


class ByteBoundedQueue:
    """A FIFO between two threads bounded in bytes: ``put`` waits while the items
    waiting and the new one would pass ``max_bytes``; an item larger than the bound
    alone goes in once the queue is empty (nothing is ever refused, order is kept).

    Example::

        >>> q = ByteBoundedQueue(100)
        >>> q.put("a", 60), q.put("b", 500, timeout_s=0)  # "b" waits for room
        (True, False)
        >>> q.get(), q.put("b", 500, timeout_s=0), q.get(), q.waiting_bytes
        ('a', True, 'b', 0)
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.waiting_bytes = 0
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._changed = threading.Condition()

    def put(self, item: Any, size: int, timeout_s: float | None = None) -> bool:
        """Queue ``item`` counted as ``size`` bytes; False if there was no room within
        ``timeout_s`` (None: wait as long as it takes)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._items and self.waiting_bytes + size > self.max_bytes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
            self._items.append((item, size))
            self.waiting_bytes += size
            self._changed.notify_all()
            return True

    def get(self, timeout_s: float | None = None) -> Any:
        """The oldest item; ``queue.Empty`` if none came within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while not self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._changed.wait(left)
            item, size = self._items.popleft()
            self.waiting_bytes -= size
            self._changed.notify_all()
            return item

    def empty(self) -> bool:
        with self._changed:
            return not self._items


class _GatewaySinkPartition(StatelessSinkPartition[Any]):
    """Commands go out from the dataflow's thread; disk work happens on a writer thread
    (a commit's fsync must not hold up the next local decision), in order."""

    def __init__(
        self,
        commands: StatelessSinkPartition[MqttMessage],
        buffer: StoreAndForward,
        uplink: Uplink,
        acks: AckChannel,
    ) -> None:
        self._commands = commands
        self._buffer = buffer
        self._uplink = uplink
        self._acks = acks
        # bounded in bytes: a disk slower than the flow holds the flow back, never fills memory
        self._disk = ByteBoundedQueue(_DISK_QUEUE_BYTES)
        self._failed: BaseException | None = None
        self._writer = threading.Thread(target=self._write, name="iotflow-edge-disk", daemon=True)
        self._writer.start()
        uplink.start()

    def write_batch(self, items: list[Any]) -> None:
        if self._failed is not None:
            msg = f"the gateway's buffer {self._buffer.path} failed: {self._failed}"
            raise BrokerError(msg) from self._failed
        commands = [i for i in items if isinstance(i, MqttMessage)]
        if commands:  # a decision acts locally before anything else happens
            self._commands.write_batch(commands)
        for item in items:
            if isinstance(item, UplinkRecord | GatewayStatus | Checkpoint):
                self._disk.put(item, _queued_bytes(item))
            elif not isinstance(item, MqttMessage):
                raise TypeError(f"the gateway sink got a {type(item).__name__}: {item!r}")

    def _write(self) -> None:
        records: list[UplinkRecord] = []
        trimmed = time.monotonic()
        while True:
            if time.monotonic() - trimmed >= _TRIM_EVERY_S:
                release_memory()
                trimmed = time.monotonic()
            try:
                item = self._disk.get(timeout_s=_TRIM_EVERY_S)
            except queue.Empty:
                continue
            try:
                if item is None:
                    if records:
                        self._buffer.put(records)
                    return
                if isinstance(item, UplinkRecord):
                    records.append(item)
                elif isinstance(item, GatewayStatus):
                    records.append(self._status(item))
                flush = isinstance(item, Checkpoint) or self._disk.empty() or len(records) >= 1000
                if flush and records:
                    self._buffer.put(records)
                    records = []
                if isinstance(item, Checkpoint):
                    self._buffer.checkpoint(item.state)
                    self._acks.ack(item.tokens)  # only now: what they caused is on disk
            except Exception as exc:  # disk full, file gone: the flow stops at its next batch
                self._failed = exc
                return

    def _status(self, status: GatewayStatus) -> UplinkRecord:
        buffer, uplink = self._buffer.stats(), self._uplink.stats()
        body = {
            **status.counters,
            "buffer": {
                "records": buffer.records,
                "bytes": buffer.bytes,
                "max_bytes": buffer.max_bytes,
                "dropped": buffer.dropped,
            },
            "uplink": {
                "link": uplink.link.value,
                "sent_live": uplink.sent_live,
                "sent_replayed": uplink.sent_replayed,
                "confirmed": uplink.confirmed,
                "rejected": uplink.rejected,
                "link_changes": uplink.link_changes,
            },
        }
        rid = f"{status.gateway_id}|status|{status.ts_ms}"
        return UplinkRecord(rid, "status", status.gateway_id, _encode(body), status.ts_ms)

    def close(self) -> None:
        self._disk.put(None, 0)
        self._writer.join()
        self._uplink.stop()
        self._commands.close()
        self._buffer.close()


class GatewaySink(DynamicSink[Any]):
    """Writes the edge logic's outputs in order: ``MqttMessage`` (local commands, QoS 1),
    ``UplinkRecord`` and ``GatewayStatus`` (into the buffer), ``Checkpoint`` (commit,
    then acknowledge), the disk work on a thread of its own, in order. Starts
    ``uplink`` (buffer -> Kafka) and stops it on close."""

    def __init__(
        self,
        url: str,
        gateway_id: str,
        buffer: StoreAndForward,
        uplink: Uplink,
        acks: AckChannel,
    ) -> None:
        self._commands = MqttSink(url, client_id=f"{gateway_client_id(gateway_id)}-cmd")
        self._buffer = buffer
        self._uplink = uplink
        self._acks = acks

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GatewaySinkPartition:
        return _GatewaySinkPartition(
            self._commands.build(step_id, worker_index, worker_count),
            self._buffer,
            self._uplink,
            self._acks,
        )
