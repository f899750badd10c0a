"""The gateway's uplink: the store-and-forward buffer -> ``{prefix}.edge.uplink`` on Kafka.

``Uplink`` runs a thread that sends buffered records with an idempotent,
``acks=all`` producer and removes a record from the buffer only when Kafka
confirmed it (the delivery callback). Records are keyed by the gateway id
(one partition per gateway, so Kafka keeps the gateway's order).

Guarantees and policy:

- **At least once, exactly once after de-duplication.** A record stays in
  the buffer until confirmed; after a crash or a broken producer, what was
  not confirmed is sent again. Each record carries its ``id`` (``rid``):
  consumers keep the first per id (``dedupe_uplink``).
- **Store and forward.** The producer never gives up on a message
  (``message.timeout.ms=0``: a message that timed out would make the
  idempotent producer bump its epoch, which the local broker answers with
  PRODUCER_FENCED). While the link is down (every broker down, or the oldest
  message unconfirmed for ``stall_s``) no new record is handed over: they
  wait on disk; at most ``max_in_flight`` sit in the producer and go out
  when the link is back. A gateway that starts while Kafka is unreachable
  starts anyway and buffers.
- **Bounded memory.** Records are read from the buffer 1 MiB at a time and
  the producer's queue holds 4 MiB (or twice ``message.max.bytes``) at
  most, so a backlog of large aggregate records goes out in slices instead
  of sitting in the gateway's memory whole.
- **Backlog and live data.** When the link comes (back) up, every record
  then in the buffer is *backlog* and is sent oldest first with
  ``replayed: true``; records made from then on are *live*
  (``replayed: false``). Live records always go first: each round hands the
  producer every waiting live record before any backlog record, and the
  backlog may fill at most ``max_in_flight - live_reserve`` of the window
  (and ``backfill_per_s`` records per second when set), so current
  readings are never starved by a backfill. Within the backlog and within
  live data the order is the buffer's; between the two, a consumer tells
  them apart by ``replayed`` and orders by ``seq`` (the gateway-wide
  sequence number).

The record value (``UplinkEnvelope``, JSON)::

    {"id": "...", "gateway_id": "gw1", "seq": 17, "kind": "aggregate", "key": "d1",
     "created_ms": 1767268800000, "replayed": false, "body": {...}}

confluent-kafka errors become ``iotflow.errors`` at this boundary; the
thread itself never dies of a Kafka error: it rebuilds a producer that hit a
fatal error and sends what was not confirmed again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException, Producer

from connectors.buffer import StoreAndForward, StoredRecord
from connectors.dedupe import dedupe_records
from connectors.kafka_client import KafkaRecord, producer_config, read_topic
from iotflow.errors import ConfigError
from iotflow.events import WindowResult, from_ms

__all__ = [
    "AGGREGATE_STATS",
    "LinkState",
    "Uplink",
    "UplinkEnvelope",
    "UplinkStats",
    "dedupe_uplink",
    "expand_aggregates",
    "read_uplink",
]

log = logging.getLogger("iotflow.uplink")

# what an edge aggregate record holds per device and metric (see dataflows.edge)
AGGREGATE_STATS = ["count", "sum", "min", "max"]


class LinkState(StrEnum):
    """``down`` until a metadata request answers, ``up`` until every broker is down or stalls."""

    DOWN = "down"
    UP = "up"


class UplinkEnvelope(msgspec.Struct, frozen=True):
    """One record on ``{prefix}.edge.uplink`` (``body`` is the record's own JSON)."""

    id: str
    gateway_id: str
    seq: int
    kind: str
    key: str
    created_ms: int
    replayed: bool
    body: msgspec.Raw


@dataclass(frozen=True)
class UplinkStats:
    """Counters of the uplink since it started."""

    link: LinkState
    sent_live: int
    sent_replayed: int
    confirmed: int
    rejected: int  # refused by Kafka for their size: removed, never retried
    in_flight: int
    bytes_sent: int
    link_changes: int
    producers: int  # how many producers were built (a fatal error builds a new one)
    last_error: str | None


_encode = msgspec.json.encode
_QUEUE_KB = 4096  # the producer's queue bound (see Uplink.__init__)
_FETCH_BYTES = 1 << 20  # records read from the buffer per round, at most (but always one)
_DOWN_CODES = {KafkaError._ALL_BROKERS_DOWN}
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE}


class Uplink:
    """Sends ``buffer`` to ``topic`` from a background thread (see the module docstring).

    Example::

        uplink = Uplink(buffer, "127.0.0.1:9092", "iot.edge.uplink", "gw1")
        uplink.start()
        ...
        uplink.stop()
    """

    def __init__(
        self,
        buffer: StoreAndForward,
        bootstrap: str,
        topic: str,
        gateway_id: str,
        *,
        max_in_flight: int = 1000,
        live_reserve: int = 250,
        backfill_per_s: float | None = None,
        stall_s: float = 5.0,
        probe_every_s: float = 0.5,
        commit_every_s: float = 1.0,
        extra_config: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= live_reserve < max_in_flight:
            msg = f"live_reserve {live_reserve} must be within 0..max_in_flight-1 ({max_in_flight - 1})"
            raise ConfigError(msg)
        if backfill_per_s is not None and backfill_per_s <= 0:
            raise ConfigError(
                f"backfill_per_s {backfill_per_s} must be positive or None (no limit)"
            )
        self.buffer = buffer
        self.topic = topic
        self.gateway_id = gateway_id
        self._key = gateway_id.encode()
        config: dict[str, Any] = {
            **producer_config(bootstrap),
            "message.timeout.ms": 0,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            "error_cb": self._on_error,
            **(extra_config or {}),
        }
        # librdkafka queues up to 1 GB by default: a backlog of big aggregate records would
        # sit in the gateway's memory; a full queue makes produce() refuse (BufferError) and
        # the rest waits on disk. Twice the largest record, so that one always fits.
        largest_kb = int(config.get("message.max.bytes", 1_000_000)) // 1024
        config.setdefault("queue.buffering.max.kbytes", max(_QUEUE_KB, 2 * largest_kb))
        self._config = config
        self._max_in_flight = max_in_flight
        self._backfill_window = max_in_flight - live_reserve
        self._backfill_per_s = backfill_per_s
        self._stall_s = stall_s
        self._probe_every_s = probe_every_s
        self._commit_every_s = commit_every_s
        self._clock = clock
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # link and cursors (touched by the uplink thread only, except via stats())
        self._link = LinkState.DOWN
        self._all_down = False
        self._fatal: str | None = None
        self._live_from = 0  # seq >= live_from: live; below: backlog
        self._live_cursor = 0  # last live seq handed to the producer
        self._backfill_cursor = 0  # last backlog seq handed to the producer
        self._in_flight: dict[int, tuple[float, bool]] = {}  # seq -> (sent at, replayed)
        self._confirmed: list[int] = []
        self._budget = 0.0
        self._budget_at = clock()
        self._counts = {
            "live": 0,
            "replayed": 0,
            "confirmed": 0,
            "rejected": 0,
            "bytes": 0,
            "changes": 0,
        }
        self._producers = 0
        self._last_error: str | None = None
        self._producer: Producer | None = None

    # -- lifecycle

    def start(self) -> None:
        """Start the sending thread (never blocks on Kafka: a down link just buffers)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="iotflow-uplink", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sending. With the link up, live records still waiting go out first and what
        is in flight is waited for, up to ``timeout_s`` in all; the rest stays buffered."""
        self._drain_until = self._clock() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 5)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(timeout_s)
            producer.poll(0)
        self._settle(force=True)

    def stats(self) -> UplinkStats:
        with self._lock:
            c = dict(self._counts)
            return UplinkStats(
                link=self._link,
                sent_live=c["live"],
                sent_replayed=c["replayed"],
                confirmed=c["confirmed"],
                rejected=c["rejected"],
                in_flight=len(self._in_flight),
                bytes_sent=c["bytes"],
                link_changes=c["changes"],
                producers=self._producers,
                last_error=self._last_error,
            )

    # -- the thread

    def _run(self) -> None:
        last_probe = last_commit = -1e9
        self._new_producer()
        while not self._stop.is_set() or self._draining():
            now = self._clock()
            if self._fatal is not None:
                log.warning("uplink producer failed (%s); building a new one", self._fatal)
                self._new_producer()
            if self._link is LinkState.DOWN:
                if now - last_probe >= self._probe_every_s:
                    last_probe = now
                    if self._probe():
                        self._set_link(LinkState.UP)
            elif self._all_down or self._stalled(now):
                self._set_link(LinkState.DOWN)
            handed = self._hand_over() if self._link is LinkState.UP else 0
            producer = self._producer
            if producer is not None:
                producer.poll(0.002 if handed or self._in_flight else 0)
            self._settle(force=now - last_commit >= self._commit_every_s)
            if now - last_commit >= self._commit_every_s:
                last_commit = now
            if not handed and not self._in_flight:
                self.buffer.changed.wait(0.05)
                self.buffer.changed.clear()
        self._settle(force=True)

    def _draining(self) -> bool:
        """Stopping, but live records or confirmations are still due and there is time."""
        if self._link is not LinkState.UP or self._clock() >= self._drain_until:
            return False
        return bool(self._in_flight) or bool(self.buffer.fetch(self._live_cursor, None, 1))

    def _new_producer(self) -> None:
        if self._producer is not None:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)
        with self._lock:
            self._in_flight.clear()
            self._fatal = None
            self._producers += 1
        # nothing unconfirmed is known any more: all of it is backlog, from the oldest
        self._backfill_cursor = 0
        self._link = LinkState.DOWN
        try:
            self._producer = Producer(self._config)
        except KafkaException as exc:  # a bad setting: nothing would ever be sent
            msg = f"cannot build the uplink producer: {exc}; check IOTFLOW_KAFKA_* settings"
            raise ConfigError(msg) from exc

    def _probe(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            meta = producer.list_topics(self.topic, timeout=1.0)
        except KafkaException as exc:
            self._last_error = str(exc)
            return False
        info = meta.topics.get(self.topic)
        return info is not None and info.error is None

    def _stalled(self, now: float) -> bool:
        with self._lock:
            if not self._in_flight:
                return False
            oldest = min(sent for sent, _ in self._in_flight.values())
        return now - oldest > self._stall_s

    def _set_link(self, state: LinkState) -> None:
        if state is self._link:
            return
        log.warning("uplink to %s is %s", self.topic, state.value)
        with self._lock:
            self._link = state
            self._counts["changes"] += 1
        if state is LinkState.UP:
            if self._producer is not None:
                # an "all brokers down" queued before the probe got through must not
                # take the link down again once served: a flap would turn the records
                # made in between into backlog
                self._producer.poll(0)
            self._all_down = False
            now = self._clock()
            with self._lock:  # what waited out the outage in the producer gets a fresh stall timer
                self._in_flight = {s: (now, r) for s, (_, r) in self._in_flight.items()}
            # what is in the buffer now is backlog; what comes from now on is live
            self._live_from = self.buffer.next_seq()
            self._live_cursor = self._live_from - 1

    def _hand_over(self) -> int:
        handed = 0
        room = self._max_in_flight - len(self._in_flight)
        if room > 0:  # live first, always
            live = self.buffer.fetch(
                after_seq=self._live_cursor, limit=room, max_bytes=_FETCH_BYTES
            )
            sent = self._send(live, replayed=False)
            if sent:
                self._live_cursor = live[sent - 1].seq
            handed += sent
            more_live = sent < len(live) or (
                live and self.buffer.fetch(after_seq=self._live_cursor, limit=1)
            )
            if more_live:  # the producer or the read bound held some back: no backlog now
                return handed
        backfill_room = min(
            self._backfill_window - len(self._in_flight),
            self._max_in_flight - len(self._in_flight),
            self._backfill_allowance(),
        )
        if backfill_room <= 0 or self._backfill_cursor >= self._live_from - 1:
            return handed
        fetched = self.buffer.fetch(
            after_seq=self._backfill_cursor,
            before_seq=self._live_from,
            limit=backfill_room,
            max_bytes=_FETCH_BYTES,
        )
        if not fetched:
            self._backfill_cursor = self._live_from - 1  # backlog done
            return handed
        # records the producer still holds from before an outage go out by themselves
        backlog = [r for r in fetched if r.seq not in self._in_flight]
        sent = self._send(backlog, replayed=True)
        self._budget -= sent
        if sent:
            self._backfill_cursor = backlog[sent - 1].seq
        elif not backlog:
            self._backfill_cursor = fetched[-1].seq
        return handed + sent

    def _backfill_allowance(self) -> int:
        if self._backfill_per_s is None:
            return self._max_in_flight
        now = self._clock()
        rate = self._backfill_per_s
        self._budget = min(rate, self._budget + (now - self._budget_at) * rate)
        self._budget_at = now
        return int(self._budget)

    def _send(self, records: Iterable[StoredRecord], *, replayed: bool) -> int:
        producer = self._producer
        if producer is None:
            return 0
        n = 0
        now = self._clock()
        for r in records:
            value = _encode(
                UplinkEnvelope(
                    id=r.rid,
                    gateway_id=self.gateway_id,
                    seq=r.seq,
                    kind=r.kind,
                    key=r.key,
                    created_ms=r.created_ms,
                    replayed=replayed,
                    body=msgspec.Raw(r.body),
                )
            )
            try:
                producer.produce(
                    self.topic,
                    value,
                    key=self._key,
                    on_delivery=lambda err, _msg, seq=r.seq: self._on_delivery(err, seq),
                )
            except BufferError:
                producer.poll(0.01)
                break
            except KafkaException as exc:
                self._last_error = str(exc)
                break
            with self._lock:
                self._in_flight[r.seq] = (now, replayed)
                self._counts["replayed" if replayed else "live"] += 1
                self._counts["bytes"] += len(value) + len(self._key)
            n += 1
        return n

    def _on_delivery(self, err: KafkaError | None, seq: int) -> None:
        with self._lock:
            self._in_flight.pop(seq, None)
            if err is None:
                self._confirmed.append(seq)
                self._counts["confirmed"] += 1
                return
            if err.code() in _PURGED:
                return  # a producer being replaced: its records are resent
            self._last_error = str(err)
            if err.code() in _TOO_LARGE:
                # Kafka will never take it: counted, logged and removed, never retried forever
                self._counts["rejected"] += 1
                self._confirmed.append(seq)
                log.error("uplink record seq %d refused by Kafka: %s; dropped", seq, err)
                return
        # not confirmed: the record stays in the buffer and a new producer resends it
        self._fatal = str(err)

    def _on_error(self, err: KafkaError) -> None:
        self._last_error = str(err)
        if err.code() in _DOWN_CODES:
            self._all_down = True
        if err.fatal():
            self._fatal = str(err)

    def _settle(self, *, force: bool) -> None:
        with self._lock:
            done, self._confirmed = self._confirmed, []
        if done:
            self.buffer.remove(done)
        if force:
            self.buffer.commit()


# -- the cloud side ----------------------------------------------------------------------


def read_uplink(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[KafkaRecord]:
    """Every record of the uplink topic up to its end (``connectors.kafka.read_topic``)."""
    return read_topic(bootstrap, topic, timeout_s)


def dedupe_uplink(records: Iterable[KafkaRecord]) -> list[UplinkEnvelope]:
    """The first envelope per record id, in arrival order (records that are not
    envelopes are skipped and logged)."""
    kept = dedupe_records(list(records), key=lambda doc: doc["id"]).kept
    out: list[UplinkEnvelope] = []
    decoder = msgspec.json.Decoder(UplinkEnvelope)
    for record in kept:
        try:
            out.append(decoder.decode(record.value or b""))
        except msgspec.DecodeError as exc:
            log.warning("skipping an uplink record that is not an envelope: %s", exc)
    return out


def expand_aggregates(envelope: UplinkEnvelope) -> list[WindowResult]:
    """The window results of an ``aggregate`` envelope (empty for other kinds)."""
    if envelope.kind != "aggregate":
        return []
    body = msgspec.json.decode(envelope.body)
    start, end = from_ms(body["window_start_ms"]), from_ms(body["window_end_ms"])
    metrics = body["metrics"]
    return [
        WindowResult(
            key=key,
            metric=metric,
            window_start=start,
            window_end=end,
            count=stats[0],
            sum=stats[1],
            avg=stats[1] / stats[0],
            min=stats[2],
            max=stats[3],
        )
        for key, *per_metric in body["rows"]
        for metric, stats in zip(metrics, per_metric, strict=True)
        if stats is not None
    ]
