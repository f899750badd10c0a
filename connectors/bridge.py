"""The ingest bridge: device MQTT topics -> one Kafka ingest topic, acknowledged only when durable.

Guarantee: at least once from the MQTT broker to Kafka. The bridge
subscribes at QoS 1 on a persistent session (a stable client id and a session
expiry, so the broker keeps what arrives while the bridge is down) with MQTT
manual acknowledgment, produces each message with an idempotent ``acks=all``
producer, and sends the PUBACK for a message only from the Kafka delivery
callback that confirmed it. A bridge that dies (even by SIGKILL) has
acknowledged nothing that Kafka does not hold; the broker redelivers the
rest to the next bridge with the same client id. Duplicates are possible (a
message Kafka took but whose PUBACK died with the process comes again): the
bridge marks every record that may repeat an earlier one (header
``redelivered``), and the flows' Kafka ingest drops the repeats before any
window sees them (``connectors.reading_dedupe``).

The record layout on ``{prefix}.ingest`` (see ``ingest_record``):

- value: the MQTT payload, byte for byte (so the flow decodes it exactly as
  the direct MQTT path does),
- key: the device id for ``{base}/devices/{device_id}/...`` topics, else the
  MQTT topic itself (both keep one device's messages in one partition, in
  order),
- headers: ``mqtt_topic`` (UTF-8) and ``received_ms`` (the bridge's receive
  time, epoch milliseconds as ASCII digits); the Kafka timestamp is the
  receive time too. ``mqtt_delivery`` on QoS 1 messages: the bridge's
  client id and the MQTT packet id (``iotflow-bridge/4711``), which a
  broker's resend of the same delivery repeats. ``redelivered`` (``b"1"``)
  only on a record that may repeat one written before: the broker resent
  the MQTT message (its DUP flag: a resumed session resends what the last
  connection did not acknowledge) or the bridge retried a Kafka delivery
  that may have landed.

A record without a usable ``mqtt_topic`` header is not valid ingest input: a
reader (``unwrap_records``) turns it into a dead letter that names the
partition, the offset and the fix, never an exception.

Back-pressure: at most ``max_in_flight`` messages are unacknowledged at once
(MQTT 5 receive maximum), so a slow or unreachable Kafka makes the broker
hold messages, not the bridge's memory. (Measured exception: Mosquitto 2
resends every unacknowledged message of a resumed session at once, past the
receive maximum; the bridge forwards them all, and those a killed bridge had
already forwarded become duplicates.) Kafka delivery errors are retried
until Kafka takes the message; a payload Kafka refuses for its size goes to
``{prefix}.deadletter`` instead, and is acknowledged once that is durable.
On SIGTERM/SIGINT the bridge stops forwarding, flushes the producer, sends
the PUBACKs of what Kafka confirmed and disconnects, keeping its session.

Example::

    bridge = IngestBridge(mqtt_url, bootstrap, prefix="iot", base="iotflow")
    bridge.start()
    bridge.run_until(stop_event)  # returns after a clean shutdown
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import msgspec
import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError, KafkaException, Producer

from connectors.decode import dead_letter
from connectors.kafka import ensure_topics, producer_config
from connectors.mqtt import MqttUrl, connect_client
from iotflow.errors import BrokerError, ConfigError
from iotflow.events import DeadLetter, DeviceMessage
from iotflow.topics import KafkaTopics, MqttTopics

__all__ = [
    "HEADER_MQTT_DELIVERY",
    "HEADER_MQTT_TOPIC",
    "HEADER_RECEIVED_MS",
    "HEADER_REDELIVERED",
    "BridgeStats",
    "IngestBatch",
    "IngestBridge",
    "bridge_status_topic",
    "default_subscriptions",
    "ingest_key",
    "ingest_record",
    "ingest_topic",
    "topic_matcher",
    "unwrap_records",
]

log = logging.getLogger("iotflow.bridge")

HEADER_MQTT_DELIVERY = "mqtt_delivery"
HEADER_MQTT_TOPIC = "mqtt_topic"
HEADER_RECEIVED_MS = "received_ms"
HEADER_REDELIVERED = "redelivered"

# Kafka errors that mean "this message can never be written as it is": dead-letter it.
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
_RETRY_DELAY_S = 0.5
_SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code


def ingest_topic(prefix: str) -> str:
    """The raw ingest topic the bridge writes: ``{prefix}.ingest``."""
    return f"{prefix}.ingest"


def bridge_status_topic(base: str, client_id: str) -> str:
    """Where a bridge publishes ``online`` (retained) once subscribed; its last will sets ``offline``."""
    return f"{base}/bridges/{client_id}/status"


def default_subscriptions(base: str, telemetry: Sequence[str] = ()) -> list[str]:
    """Telemetry (``telemetry`` filters, default ``{base}/devices/+/telemetry``), state and ack."""
    topics = MqttTopics(base)
    return [*(telemetry or [topics.telemetry()]), topics.state(), topics.ack()]


def ingest_key(mqtt_topic: str) -> bytes:
    """The Kafka key of a message: its device id for ``*/devices/{id}/...``, else the topic."""
    levels = mqtt_topic.split("/")
    if len(levels) >= 4 and levels[-3] == "devices" and levels[-2]:
        return levels[-2].encode()
    return mqtt_topic.encode()


def ingest_record(
    mqtt_topic: str,
    payload: bytes,
    received_ms: int,
    *,
    delivery: bytes = b"",
    redelivered: bool = False,
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of the ingest record for one MQTT message.

    ``delivery`` names the MQTT delivery (session and packet id, see the
    module docstring); ``redelivered`` marks a message that may already be
    on the topic. Only marked records are ever dropped as duplicates, and
    only when an earlier record has the same delivery, topic and payload.

    Example::

        >>> ingest_record("iotflow/devices/t1/telemetry", b'{"temp": 1}', 1767268800000)
        (b't1', b'{"temp": 1}', [('mqtt_topic', b'iotflow/devices/t1/telemetry'), ('received_ms', b'1767268800000')])
    """
    headers = [
        (HEADER_MQTT_TOPIC, mqtt_topic.encode()),
        (HEADER_RECEIVED_MS, str(received_ms).encode()),
    ]
    if delivery:
        headers.append((HEADER_MQTT_DELIVERY, delivery))
    if redelivered:
        headers.append((HEADER_REDELIVERED, b"1"))
    return ingest_key(mqtt_topic), payload, headers


def topic_matcher(filters: Sequence[str]) -> Callable[[str], bool]:
    """A predicate: does an MQTT topic match any of these filters (``+``, ``#``, ``$share/...``)?

    Answers are cached per topic (device topics repeat), at most 100,000 of them.

    Example::

        >>> m = topic_matcher(["iotflow/devices/+/telemetry", "z2m/#"])
        >>> m("iotflow/devices/t1/telemetry"), m("iotflow/devices/t1/state"), m("z2m/a/b")
        (True, False, True)
    """
    compiled = [_unshare(f).split("/") for f in filters]
    for f, levels in zip(filters, compiled, strict=True):
        bad_hash = any(level == "#" and i != len(levels) - 1 for i, level in enumerate(levels))
        bad_mix = any(("+" in level or "#" in level) and len(level) > 1 for level in levels)
        if not f or bad_hash or bad_mix or levels == [""]:
            msg = (
                f"MQTT topic filter {f!r} is invalid: '+' and '#' stand alone in a level, "
                "'#' only as the last level"
            )
            raise ConfigError(msg)
    cache: dict[str, bool] = {}

    def matches(topic: str) -> bool:
        hit = cache.get(topic)
        if hit is None:
            levels = topic.split("/")
            hit = any(_match(f, levels) for f in compiled)
            if len(cache) >= 100_000:
                cache.clear()
            cache[topic] = hit
        return hit

    return matches


def _match(pattern: list[str], levels: list[str]) -> bool:
    if levels[0].startswith("$") and pattern[0] in ("+", "#"):
        return False  # wildcards never match $SYS-style topics (MQTT 4.7.2)
    for i, want in enumerate(pattern):
        if want == "#":
            return True
        if i >= len(levels):
            return False
        if want != "+" and want != levels[i]:
            return False
    return len(levels) == len(pattern)


def _unshare(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


@dataclass
class IngestBatch:
    """What a batch of ingest records became: device messages for the decoder, and dead letters."""

    messages: list[DeviceMessage] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    skipped: int = 0  # valid records for other MQTT topics (state, ack): not this flow's input
    redelivered: list[int] = field(default_factory=list)  # indices into messages: marked records
    deliveries: list[bytes] = field(default_factory=list)  # per message: its mqtt_delivery or b""
    duplicates: int = 0  # redelivered duplicates dropped (connectors.reading_dedupe)


class _Rejected(NamedTuple):
    """Why an ingest record cannot be a device message, and its MQTT topic when known."""

    reason: str
    topic: str | None


def unwrap_records(
    records: Iterable[Any], accept: Callable[[str], bool] | None = None
) -> IngestBatch:
    """Turn ingest records (Bytewax ``KafkaSourceMessage`` or anything with ``value``,
    ``headers``, ``partition``, ``offset``, ``timestamp``) back into ``DeviceMessage``.

    Records whose MQTT topic ``accept`` refuses are skipped (counted): they are
    another flow's input. A record with no ``mqtt_topic`` header, a topic that
    is not UTF-8, a ``received_ms`` that is not digits, or no value becomes a
    dead letter with the reason; nothing raises. The indices of the messages
    whose record carried the ``redelivered`` header are in ``redelivered``, and
    each message's ``mqtt_delivery`` header (``b""`` without one) in ``deliveries``.
    """
    out = IngestBatch()
    for rec in records:
        value = getattr(rec, "value", None)
        ts = getattr(rec, "timestamp", None)
        kafka_ms = ts[1] if isinstance(ts, tuple) and len(ts) == 2 and ts[1] > 0 else 0
        result = _unwrap_one(getattr(rec, "headers", None), value, kafka_ms, accept)
        if result is None:
            out.skipped += 1
        elif isinstance(result, _Rejected):
            where = (
                f"ingest record {getattr(rec, 'topic', '?')}"
                f"[{getattr(rec, 'partition', '?')}]@{getattr(rec, 'offset', '?')}"
            )
            payload = value if isinstance(value, bytes) else b""
            out.dead.append(
                dead_letter("ingest", f"{where}: {result.reason}", payload, kafka_ms, result.topic)
            )
        else:
            message, redelivered, delivery = result
            if redelivered:
                out.redelivered.append(len(out.messages))
            out.messages.append(message)
            out.deliveries.append(delivery)
    return out


def _unwrap_one(
    headers: Any, value: Any, kafka_ms: int, accept: Callable[[str], bool] | None
) -> tuple[DeviceMessage, bool, bytes] | _Rejected | None:
    """(device message, redelivered, delivery), None to skip, or why to dead-letter it."""
    raw_topic = raw_ms = None
    redelivered = False
    delivery = b""
    for name, header in headers or ():  # one pass: this runs for every record
        if name == HEADER_MQTT_TOPIC:
            raw_topic = header
        elif name == HEADER_RECEIVED_MS:
            raw_ms = header
        elif name == HEADER_MQTT_DELIVERY:
            delivery = header or b""
        elif name == HEADER_REDELIVERED:
            redelivered = True
    if raw_topic is None:
        return _Rejected(
            f"no {HEADER_MQTT_TOPIC!r} header; ingest records carry the MQTT topic there "
            "(write them with `iotflow bridge` or connectors.bridge.ingest_record)",
            None,
        )
    try:
        topic = raw_topic.decode("utf-8")
    except UnicodeDecodeError:
        return _Rejected(f"the {HEADER_MQTT_TOPIC!r} header is not UTF-8", None)
    if not topic:
        return _Rejected(f"the {HEADER_MQTT_TOPIC!r} header is empty", None)
    if accept is not None and not accept(topic):
        return None
    received_ms = kafka_ms
    if raw_ms is not None:
        if not raw_ms.isdigit() or len(raw_ms) > 15:
            return _Rejected(
                f"the {HEADER_RECEIVED_MS!r} header {raw_ms[:20]!r} is not epoch milliseconds",
                topic,
            )
        received_ms = int(raw_ms)
    if not isinstance(value, bytes):
        return _Rejected("the record has no value (a tombstone is not a device message)", topic)
    return DeviceMessage(topic, value, received_ms), redelivered, delivery


@dataclass
class BridgeStats:
    """Counters of a running bridge (read them from any thread; they only grow)."""

    received: int = 0
    redelivered: int = 0  # received with the MQTT DUP flag: marked as possible repeats
    forwarded: int = 0  # confirmed by Kafka
    acked: int = 0  # PUBACKs sent to the MQTT broker
    dead_lettered: int = 0
    retried: int = 0
    stale_acks_skipped: int = 0  # confirmed after a reconnect: the broker redelivers those
    reconnects: int = 0

    def line(self) -> str:
        return (
            f"received {self.received} (redelivered {self.redelivered}) "
            f"forwarded {self.forwarded} acked {self.acked} "
            f"dead-lettered {self.dead_lettered} retried {self.retried} "
            f"reconnects {self.reconnects}"
        )


@dataclass
class _Pending:
    """One MQTT message on its way to Kafka, and how to acknowledge it."""

    epoch: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_ms: int
    redelivered: bool = False  # may already be on Kafka (MQTT DUP flag, or a retried delivery)
    dead_reason: str | None = None  # set when it travels as a dead letter instead


class IngestBridge:
    """Forward device MQTT messages to the Kafka ingest topic; see the module docstring.

    ``subscriptions`` defaults to ``default_subscriptions(base)`` (telemetry,
    state, ack). ``max_in_flight`` is the MQTT 5 receive maximum (1..65535).
    ``start`` raises ``BrokerUnavailable`` when either broker cannot be reached
    and ``BrokerError`` when the broker refuses a subscription.
    """

    def __init__(
        self,
        mqtt_url: str,
        bootstrap: str,
        *,
        prefix: str = "iot",
        base: str = "iotflow",
        subscriptions: Sequence[str] | None = None,
        client_id: str = "iotflow-bridge",
        session_expiry: timedelta = timedelta(days=1),
        max_in_flight: int = 1000,
        connect_timeout_s: float = 10.0,
    ) -> None:
        MqttUrl.parse(mqtt_url)  # fail now, naming the redacted URL
        if not 0 < max_in_flight <= 65535:
            msg = f"max_in_flight {max_in_flight} must be within 1..65535 (MQTT 5 receive maximum)"
            raise ConfigError(msg)
        if not client_id:
            raise ConfigError("the bridge needs a stable, non-empty MQTT client id")
        self._url = mqtt_url
        self._bootstrap = bootstrap
        self.topic = ingest_topic(prefix)
        self.deadletter_topic = KafkaTopics(prefix).deadletter
        self.subscriptions = list(subscriptions or default_subscriptions(base))
        topic_matcher(self.subscriptions)  # validates the filters
        self.client_id = client_id
        self._delivery_prefix = f"{client_id}/".encode()
        self.status_topic = bridge_status_topic(base, client_id)
        self._session_expiry_s = int(session_expiry.total_seconds())
        self.max_in_flight = max_in_flight
        self._timeout_s = connect_timeout_s
        self.stats = BridgeStats()
        self._lock = threading.Lock()
        self._epoch = 0  # bumped on every connect and disconnect
        self._forwarding = False
        self._retry: deque[tuple[float, _Pending]] = deque()
        self._fatal: BaseException | None = None
        self._producer: Producer | None = None
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._refused: list[str] = []

    def __repr__(self) -> str:
        return (
            f"IngestBridge({MqttUrl.parse(self._url)!r} -> {self._bootstrap} {self.topic!r}, "
            f"client_id={self.client_id!r})"
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to Kafka (creating the topics), then subscribe on MQTT and start forwarding."""
        ensure_topics(self._bootstrap, [self.topic, self.deadletter_topic])
        config = {
            **producer_config(self._bootstrap),
            # A delivery that cannot finish in 30 s is reported and retried by the bridge,
            # so an outage shows in the log instead of hiding in librdkafka for 5 minutes.
            "message.timeout.ms": 30_000,
        }
        self._producer = Producer(config, error_cb=self._on_kafka_error)
        self._forwarding = True
        try:
            self._client = connect_client(
                self._url,
                self.client_id,
                clean_start=False,
                session_expiry_s=self._session_expiry_s,
                receive_maximum=self.max_in_flight,
                manual_ack=True,
                will=(self.status_topic, b"offline"),
                on_connect=self._on_connect,
                on_subscribe=self._on_subscribe,
                on_message=self._on_message,
                timeout_s=self._timeout_s,
            )
        except BaseException:
            self._forwarding = False
            raise
        self._client.on_disconnect = self._on_disconnect
        # Generous: on a resumed session the broker may send its whole backlog of
        # unacknowledged messages before the SUBACK (Mosquitto 2 does).
        if not self._subscribed.wait(max(self._timeout_s, 60.0)) or self._refused:
            self.close(flush_timeout_s=0)
            why = ", ".join(self._refused) if self._refused else "no SUBACK within 60s"
            msg = f"MQTT broker {MqttUrl.parse(self._url)} refused the bridge's subscription: {why}"
            raise BrokerError(msg)
        log.info("bridge %r online, subscribed to %s", self, ", ".join(self.subscriptions))

    def run_until(self, stop: threading.Event, *, stats_every_s: float | None = 10.0) -> None:
        """Serve delivery callbacks and retries until ``stop`` is set, then ``close()``.

        Raises ``BrokerError`` (after closing) when the Kafka producer hit a fatal error.
        """
        producer = self._require_producer()
        next_stats = time.monotonic() + (stats_every_s or 0)
        try:
            while not stop.is_set() and self._fatal is None:
                producer.poll(0.05)
                self._retry_due()
                if stats_every_s and time.monotonic() >= next_stats:
                    log.info("bridge: %s", self.stats.line())
                    next_stats = time.monotonic() + stats_every_s
        finally:
            self.close()
        if isinstance(self._fatal, BrokerError):
            raise self._fatal
        if self._fatal is not None:
            raise BrokerError(f"Kafka producer failed: {self._fatal}") from self._fatal

    def close(self, flush_timeout_s: float = 30.0) -> None:
        """Stop forwarding, flush Kafka, send the PUBACKs it earned, then disconnect.

        What was received but not confirmed by Kafka is not acknowledged: the
        broker keeps it in the session for the next bridge.
        """
        self._forwarding = False
        producer, client = self._producer, self._client
        if producer is not None:
            remaining = producer.flush(flush_timeout_s) if flush_timeout_s > 0 else len(producer)
            if remaining:
                log.warning(
                    "bridge: %d messages unconfirmed by Kafka at close (not acked)", remaining
                )
            self._producer = None
        if client is not None:
            self._client = None
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)  # PUBACKs queued before it are on the wire too
            client.disconnect()
            client.loop_stop()
        log.info("bridge closed: %s", self.stats.line())

    # -- MQTT side (network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client) -> None:
        with self._lock:
            # Set here, not from connect_client's return: a resumed session delivers
            # (and Kafka may confirm) messages before that returns.
            self._client = client
            self._epoch += 1
            if self._epoch > 1:
                self.stats.reconnects += 1
        client.subscribe([(t, 1) for t in self.subscriptions])

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._lock:
            # Packet ids of the old connection mean nothing on the next one.
            self._epoch += 1
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            # Another bridge with this client id connected: reconnecting would kick it off
            # in turn, forever. Stop; the other one carries on with the session.
            self._fatal = BrokerError(
                f"another client connected with the bridge's client id {self.client_id!r} "
                "and took over its session; run one bridge per client id"
            )
            client.disconnect()

    def _on_subscribe(self, client: mqtt.Client, _u: Any, _mid: int, codes: list, _p: Any) -> None:
        self._refused.extend(
            f"{topic} ({code})"
            for topic, code in zip(self.subscriptions, codes, strict=False)
            if code.is_failure
        )
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._forwarding:
            return  # closing: not acknowledged, so the broker keeps it for the next bridge
        with self._lock:
            epoch = self._epoch
        self.stats.received += 1
        if msg.dup:
            self.stats.redelivered += 1
        pending = _Pending(
            epoch,
            msg.mid,
            msg.qos,
            msg.topic,
            msg.payload,
            time.time_ns() // 1_000_000,
            # The broker sets DUP when it resends what an earlier connection of this session
            # did not acknowledge: that connection's bridge may have written it already.
            redelivered=bool(msg.dup),
        )
        self._produce(pending)

    # -- Kafka side ------------------------------------------------------------------------

    def _require_producer(self) -> Producer:
        if self._producer is None:
            raise BrokerError("the bridge is not started (call start() first)")
        return self._producer

    def _produce(self, pending: _Pending) -> None:
        producer = self._producer
        if producer is None:
            return
        if pending.dead_reason is not None:
            letter = dead_letter(
                "bridge", pending.dead_reason, pending.payload, pending.received_ms, pending.topic
            )
            topic, key, value, headers = (
                self.deadletter_topic,
                pending.topic.encode(),
                msgspec.json.encode(letter),
                None,
            )
        else:
            key, value, headers = ingest_record(
                pending.topic,
                pending.payload,
                pending.received_ms,
                # A resend of this delivery by the broker carries the same packet id.
                delivery=b"%s%d" % (self._delivery_prefix, pending.mid) if pending.qos else b"",
                redelivered=pending.redelivered,
            )
            topic = self.topic
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    key,
                    headers=headers,
                    timestamp=pending.received_ms,
                    on_delivery=lambda err, _m, p=pending: self._on_delivery(err, p),
                )
                return
            except BufferError:
                producer.poll(0.05)  # the local queue is full: serve callbacks, try again
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                too_large = isinstance(err, KafkaError) and err.code() in _TOO_LARGE
                if too_large and pending.dead_reason is None:
                    self._to_dead_letter(pending, f"Kafka refused the payload: {err.str()}")
                    return
                self._fatal = exc
                return

    def _to_dead_letter(self, pending: _Pending, reason: str) -> None:
        pending.dead_reason = (
            f"{reason} ({len(pending.payload)} bytes); the ingest topic takes at most "
            "message.max.bytes"
        )
        self._produce(pending)

    def _on_delivery(self, err: KafkaError | None, pending: _Pending) -> None:
        if err is None:
            if pending.dead_reason is not None:
                self.stats.dead_lettered += 1
            else:
                self.stats.forwarded += 1
            self._ack(pending)
            return
        if err.code() in _TOO_LARGE and pending.dead_reason is None:
            self._to_dead_letter(pending, f"Kafka refused the payload: {err.str()}")
        elif err.fatal():
            self._fatal = KafkaException(err)
        else:
            self.stats.retried += 1
            # A delivery that failed (a timeout, say) may still have landed, and the idempotent
            # producer does not cover a new produce call: mark the retry as a possible repeat.
            pending.redelivered = True
            log.warning("bridge: Kafka delivery failed (%s); retrying", err.str())
            self._retry.append((time.monotonic() + _RETRY_DELAY_S, pending))

    def _retry_due(self) -> None:
        now = time.monotonic()
        while self._retry and self._retry[0][0] <= now:
            _, pending = self._retry.popleft()
            self._produce(pending)

    def _ack(self, pending: _Pending) -> None:
        if pending.qos == 0:
            return
        client = self._client
        with self._lock:
            if client is None or pending.epoch != self._epoch:
                # Received on a connection that is gone: the broker redelivers it on the
                # session's next connection, and that copy gets the PUBACK.
                self.stats.stale_acks_skipped += 1
                return
            rc = client.ack(pending.mid, pending.qos)
        if rc == mqtt.MQTT_ERR_SUCCESS:
            self.stats.acked += 1
        else:
            self.stats.stale_acks_skipped += 1

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = KafkaException(err)
        else:
            log.warning("bridge: Kafka: %s", err.str())
