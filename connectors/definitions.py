"""Definition sync: the cloud publishes versioned workflows; gateways apply them without a restart.

Transport: the Kafka topic ``{prefix}.edge.definitions``. Each record is one
version for one target: key = a gateway id, or ``*`` for every gateway;
value = ``{"version": 3, "target": "gw1", "workflow": {...}, "published_ms": ...}``.

Why Kafka rather than retained MQTT: the gateway already holds one link to
the cloud, its Kafka uplink, so definitions use the same link, credentials and
failure mode (cut it and the gateway is offline for both); the topic is a log,
so every version stays auditable in order, and a gateway that was offline or
is new reads it from the beginning and lands on the newest version for it. A
retained MQTT message would live on the gateway's *local* broker, which the
cloud does not reach without a broker bridge, and it keeps only the last
version. Acknowledgments go up the uplink (kind ``definition``, through the
store-and-forward buffer, so one made offline still arrives) and, for local
tools, as a retained message on ``{base}/gateways/{id}/definition``.

Rules a gateway follows (``consider``):

- a version not newer than the one it runs is ignored (a restart re-reads
  the log: nothing old is applied or acknowledged again);
- a newer version is parsed, planned for the gateway's profile and built;
  when that works it is applied at once (no restart) and acknowledged
  ``applied``; when it does not (malformed, invalid, not hostable) the gateway
  keeps its last good version and acknowledges ``rejected`` with the reason;
- offline, nothing new arrives: the gateway runs its last good version,
  which survives a restart (it is part of the state committed with the
  store-and-forward buffer).

Example::

    >>> doc = {"version": 2, "target": "*", "workflow": {"name": "w", "components": [
    ...     {"name": "stats", "kind": "aggregate", "window": "10s"}]}}
    >>> v = consider(msgspec.json.encode(doc), running_version=1, build=lambda wf: wf.name)
    >>> (v.status, v.version, v.built)
    ('apply', 2, 'w')
    >>> consider(b'{"version": 3, "target": "*", "workflow": {"name": "w"}}', 2, lambda wf: wf).reason
    'workflow declaration is invalid: components: Field required'
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from connectors.kafka_client import ensure_topics, producer_config, security_config
from iotflow.errors import BrokerUnavailable, ConfigError
from iotflow.workflow_lean import load_workflow

if TYPE_CHECKING:  # gateways hold its msgspec mirror (iotflow.workflow_lean)
    from iotflow.workflow import Workflow

__all__ = [
    "ALL_GATEWAYS",
    "DefinitionAck",
    "DefinitionOffer",
    "DefinitionSource",
    "Verdict",
    "consider",
    "publish_definition",
]

log = logging.getLogger("iotflow.definitions")

ALL_GATEWAYS = "*"
T = TypeVar("T")


class _Envelope(msgspec.Struct):
    version: int
    target: str
    workflow: dict[str, Any]
    published_ms: int | None = None


class DefinitionAck(msgspec.Struct, frozen=True):
    """What a gateway says about a version: ``applied`` or ``rejected`` (with ``reason``),
    and the version it runs now."""

    gateway_id: str
    version: int | None
    status: Literal["applied", "rejected"]
    running_version: int
    ts_ms: int
    reason: str | None = None


@dataclass(frozen=True)
class DefinitionOffer:
    """A definition record as read from Kafka (not yet parsed)."""

    target: str
    value: bytes
    partition: int
    offset: int


@dataclass(frozen=True)
class Verdict(Generic[T]):
    """``apply`` (with what ``build`` made), ``ignore`` (not newer) or ``reject`` (with why)."""

    status: Literal["apply", "ignore", "reject"]
    version: int | None
    reason: str | None = None
    workflow: Workflow | None = None
    built: T | None = None


def consider(value: bytes, running_version: int, build: Callable[[Workflow], T]) -> Verdict[T]:
    """Decide about one definition record (see the module docstring); never raises."""
    try:
        doc = msgspec.json.decode(value, type=_Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Verdict("reject", _version_of(value), f"not a definition record: {exc}")
    if doc.version <= running_version:
        return Verdict("ignore", doc.version, f"not newer than the running v{running_version}")
    try:
        # the record's version is the workflow's version, whatever the body says
        workflow = load_workflow({**doc.workflow, "version": doc.version})
        built = build(workflow)
    except ConfigError as exc:
        return Verdict("reject", doc.version, str(exc))
    return Verdict("apply", doc.version, None, workflow, built)


def _version_of(value: bytes) -> int | None:
    with contextlib.suppress(Exception):
        version = msgspec.json.decode(value).get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            return version
    return None


def publish_definition(
    bootstrap: str,
    topic: str,
    workflow: Workflow | dict[str, Any],
    version: int,
    target: str = ALL_GATEWAYS,
    timeout_s: float = 10.0,
) -> None:
    """Publish one version of a workflow for ``target`` (a gateway id, or ``*`` for all).

    The workflow is validated first (``ConfigError`` naming the field); the
    call returns once Kafka confirmed the record (``BrokerUnavailable`` if it
    did not within ``timeout_s``).
    """
    if version < 1:
        raise ConfigError(f"definition version {version} must be 1 or more")
    if not target or set(target) & set("/+#"):
        raise ConfigError(f"definition target {target!r} must be a gateway id or '*'")
    from iotflow.workflow import Workflow  # publishers validate with the pydantic authority

    wf = workflow if isinstance(workflow, Workflow) else Workflow.from_dict(workflow)
    wf = wf.model_copy(update={"version": version})
    doc = _Envelope(
        version=version,
        target=target,
        workflow=wf.model_dump(mode="json"),
        published_ms=time.time_ns() // 1_000_000,
    )
    ensure_topics(bootstrap, [topic])
    producer = Producer(producer_config(bootstrap))
    failed: list[str] = []
    producer.produce(
        topic,
        msgspec.json.encode(doc),
        key=target.encode(),
        on_delivery=lambda err, _m: failed.append(str(err)) if err else None,
    )
    left = producer.flush(timeout_s)
    if left or failed:
        why = failed[0] if failed else f"no confirmation within {timeout_s}s"
        raise BrokerUnavailable(f"cannot publish definition v{version} to {topic!r}: {why}")


def _now() -> datetime:
    return datetime.now(UTC)


_WAITING_OFFERS = 8  # definitions read but not yet taken by the dataflow, at most


class _DefinitionPartition(StatelessSourcePartition[DefinitionOffer]):
    """A consumer thread reads the topic from the beginning; polls never block the flow.

    Memory stays bounded however long the history: the consumer prefetches 2 MB at
    most, and at most ``_WAITING_OFFERS`` definitions wait for the dataflow (the
    thread waits for room)."""

    def __init__(
        self, bootstrap: str, topic: str, gateway_id: str, until: threading.Event | None
    ) -> None:
        self._until = until
        self._topic = topic
        self._wanted = {gateway_id, ALL_GATEWAYS}
        # bounded, like the consumer's prefetch below: a long history of large definitions
        # is read a slice at a time, never held whole in the gateway's memory
        self._queue: queue.Queue[DefinitionOffer] = queue.Queue(maxsize=_WAITING_OFFERS)
        self._stop = threading.Event()
        self._awake: datetime | None = None
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"iotflow-edge-definitions-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,
                "fetch.max.bytes": 2_000_000,  # one definition may be as large (producer_config)
                "queued.max.messages.kbytes": 2048,  # prefetch; librdkafka's default is 64 MB
                "fetch.queue.backoff.ms": 20,  # fetch again soon once the prefetch drained
                "reconnect.backoff.max.ms": 1000,
                "log_level": 3,
                **security_config(),
            }
        )
        self._thread = threading.Thread(target=self._run, name="iotflow-definitions", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assigned = False
        while not self._stop.is_set():
            try:
                if not assigned:
                    meta = self._consumer.list_topics(self._topic, timeout=1.0)
                    info = meta.topics.get(self._topic)
                    if info is None or info.error is not None or not info.partitions:
                        self._stop.wait(1.0)  # not published yet (or offline): look again
                        continue
                    self._consumer.assign(
                        [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in info.partitions]
                    )
                    assigned = True
                for msg in self._consumer.consume(_WAITING_OFFERS, 0.5):
                    if msg.error() is not None:
                        continue
                    target = (msg.key() or b"").decode(errors="replace")
                    if target in self._wanted:
                        self._offer(
                            DefinitionOffer(
                                target, msg.value() or b"", msg.partition(), msg.offset()
                            )
                        )
            except KafkaException as exc:  # offline: keep the last good version, try again
                log.debug("definitions not readable now: %s", exc)
                self._stop.wait(1.0)

    def _offer(self, offer: DefinitionOffer) -> None:
        """Queue ``offer`` for the dataflow, waiting while the queue is full (or until close)."""
        while not self._stop.is_set():
            try:
                self._queue.put(offer, timeout=0.2)
                return
            except queue.Full:
                continue

    def next_batch(self) -> list[DefinitionOffer]:
        if self._until is not None and self._until.is_set():
            raise StopIteration
        out: list[DefinitionOffer] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._queue.get_nowait())
        self._awake = None if out else _now() + timedelta(milliseconds=200)
        return out

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


class DefinitionSource(DynamicSource[DefinitionOffer]):
    """The definition records for ``gateway_id`` (and for ``*``), from the beginning of
    the topic, then as they come; a topic that does not exist yet, or an
    unreachable Kafka, is waited for in the background (the gateway runs on).
    The input ends once ``until`` is set (the device input ended: tests, demos)."""

    def __init__(
        self, bootstrap: str, topic: str, gateway_id: str, until: threading.Event | None = None
    ) -> None:
        self._args = (bootstrap, topic, gateway_id, until)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DefinitionPartition:
        return _DefinitionPartition(*self._args)
