"""The orchestrator flow: command requests + device acks and states -> device writes, events, audit.

Run it with ``python -m bytewax.run dataflows.orchestrator:flow`` (or ``iotflow
run orchestrator`` for a recovery store). Settings come from ``IOTFLOW_*``;
the device registry from ``IOTFLOW_REGISTRY`` (else the simulator's), the
orchestrator's timing from ``IOTFLOW_ORCHESTRATOR`` (a YAML/JSON
``commands.orchestrator.OrchestratorConfig``, else its defaults).

Inputs:

- ``{prefix}.commands.requests``: JSON commands, pattern actions of the
  monitoring flow, instructions, and plan/saga/rollout declarations
  (``commands.validation.decode_request``); with a recovery store its offsets
  are recovered (at least once; replays are de-duplicated by command id);
- device acks and reported states: ``{base}/devices/+/ack`` and ``.../state``
  over MQTT (``IOTFLOW_INGEST=mqtt``, a persistent session with the stable
  client id ``iotflow-orchestrator``), or the bridge's ``{prefix}.ingest``
  topic (``IOTFLOW_INGEST=kafka``).

One ``commands.orchestrator.Orchestrator`` holds every command (a single
key): per-device order, conflicts between plans and the plans, sagas and
rollouts it hosts all span devices, and a Bytewax dataflow has no cycles to
route outcomes back between shards.

Outputs:

- device writes (``commands.writers``): MQTT ``{base}/devices/{id}/cmd`` (QoS 1,
  never retained, MQTT 5 message expiry = seconds until ``expires_at``; the
  broker's acks are awaited at each epoch's end, ``connectors.mqtt.MqttEpochSink``), a
  Kafka topic (``{prefix}.commands.device``, or the device's ``topic``
  metadata), HTTP (``IOTFLOW_HTTP_URL``; without it, devices on ``http`` are
  rejected: no writer);
- ``{prefix}.commands.events``: every command and coordinator transition, keyed
  by command id or plan id (the producer is flushed at each epoch's end,
  ``connectors.kafka.KafkaEpochOutput``);
- DuckDB ``command_audit``: the same transitions, upserted on their natural key in
  batches by a writer thread of their own (within ``AUDIT_FLUSH`` of the event;
  every epoch's snapshot and the flow's end wait until its rows are in);
- ``{prefix}.deadletter``: requests and device messages that could not be used.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import msgspec
import pyarrow as pa
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from commands.audit import audit_columns, encode_event, record_key
from commands.coordinator import PlanEvent, coordinator_builders
from commands.orchestrator import Dropped, Orchestrator, OrchestratorConfig, Write
from commands.validation import (
    DeviceAck,
    DeviceState,
    InvalidDeviceMessage,
    decode_device_message,
    decode_request,
)
from commands.writers import (
    HttpCall,
    HttpWriter,
    KafkaCommand,
    KafkaWriter,
    MqttCommand,
    MqttWriter,
)
from connectors.bridge import ingest_topic, topic_matcher, unwrap_records
from connectors.command_writers import HttpSink
from connectors.decode import dead_letter
from connectors.duckdb_store import COMMAND_AUDIT, DuckDBSink
from connectors.kafka import KafkaEpochOutput, KafkaInput
from connectors.mqtt import MqttEpochSink, MqttMessage, MqttSource
from connectors.recovery import ensure_store, recovery_on
from iotflow.declarations import load_file, validate
from iotflow.errors import ConfigError
from iotflow.events import CommandEvent, DeadLetter, DeviceMessage, to_ms
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from operators.steps import LogicStep
from twins.registry import Registry, load_registry

__all__ = [
    "AUDIT_FLUSH",
    "CLIENT_ID",
    "audit_rows",
    "build_flow",
    "device_command_topic",
    "load_config",
]

CLIENT_ID = "iotflow-orchestrator"
"""The flow's stable MQTT client id (its persistent session and its last will)."""
AUDIT_FLUSH = timedelta(milliseconds=200)
"""How long an event may wait before its ``command_audit`` row is written. Each epoch's
snapshot waits for the rows still queued: a short interval keeps that wait short."""

_encode = msgspec.json.encode


def _utcnow() -> datetime:
    return datetime.now(UTC)


def load_config(settings: Settings) -> OrchestratorConfig:
    """``IOTFLOW_ORCHESTRATOR``'s declaration, or the defaults."""
    if settings.orchestrator is None:
        return OrchestratorConfig()
    data = load_file(settings.orchestrator, "orchestrator")
    return validate(OrchestratorConfig, data, f"orchestrator file {settings.orchestrator}")


def device_command_topic(prefix: str) -> str:
    """The default Kafka topic of the Kafka device writer."""
    return f"{prefix}.commands.device"


def audit_rows(batches: list[list[Any]]) -> pa.Table:
    """Lists of command and plan events as an Arrow table (``command_audit``)."""
    columns = audit_columns(e for batch in batches for e in batch)
    return pa.table(columns, schema=COMMAND_AUDIT.schema)


def _device_input(
    flow: Dataflow, settings: Settings, base: MqttTopics, source: Source | None
) -> tuple[Stream[list[DeviceMessage]], Stream[DeadLetter] | None]:
    filters = [base.ack(), base.state()]
    if source is not None:
        return op.input("devices", flow, source), None
    if settings.ingest == "mqtt":
        client_id = (
            settings.mqtt_client_id if "mqtt_client_id" in settings.model_fields_set else CLIENT_ID
        )
        idle = settings.mqtt_idle_stop_s
        mqtt = MqttSource(
            settings.require_mqtt_url(),
            filters,
            client_id=client_id,
            status_base=settings.mqtt_base,
            idle_stop=None if idle is None else timedelta(seconds=idle),
        )
        return op.input("devices", flow, mqtt), None
    if settings.ingest != "kafka":
        msg = f"IOTFLOW_INGEST={settings.ingest!r} is not understood; use 'mqtt' or 'kafka'"
        raise ConfigError(msg)
    accept = topic_matcher(filters)
    records = op.input(
        "devices",
        flow,
        KafkaInput(
            settings.require_kafka_bootstrap(),
            [ingest_topic(settings.topic_prefix)],
            tail=not settings.ingest_until_end,
        ),
    )
    unwrapped = op.flat_map_batch("unwrap", records, lambda batch: [unwrap_records(batch, accept)])
    return (
        op.map("device_messages", unwrapped, lambda b: b.messages),
        op.flat_map("ingest_dead", unwrapped, lambda b: b.dead),
    )


class _Batched:
    """The orchestrator fed a list of inputs at a time; one list of outputs per list.

    Bytewax's per-item cost dominates at hundreds of commands per second, so
    items travel the flow in the lists its sources already deliver.
    """

    def __init__(self, logic: Orchestrator) -> None:
        self.logic = logic

    def on_batch(self, items: list[Any]) -> list[list[Any]]:
        out: list[Any] = []
        for item in items:
            out.extend(self.logic.on_batch(item))
        return [out] if out else []

    def on_timer(self) -> list[list[Any]]:
        out = self.logic.on_timer()
        return [out] if out else []

    def next_timer(self) -> datetime | None:
        return self.logic.next_timer()

    def snapshot(self) -> dict[str, Any]:
        return self.logic.snapshot()


@dataclass
class _Routed:
    """One orchestrator output list, sorted for the sinks."""

    mqtt: list[MqttMessage] = field(default_factory=list)
    http: list[HttpCall] = field(default_factory=list)
    kafka: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic, key, value)
    events: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class _Writers:
    """The orchestrator's ``deliver`` hook: a write encoded by its protocol's writer, which
    checks ``expires_at`` on a fresh clock read right before the command leaves."""

    writers: dict[str, Any]
    now: Callable[[], datetime]

    def __call__(self, write: Write) -> Any:
        return self.writers[write.protocol].encode(write, self.now())


@dataclass(frozen=True)
class _Router:
    """Sorts the writers' messages by transport; events and dead letters as Kafka records."""

    topics: KafkaTopics

    def route(self, batch: list[Any]) -> _Routed:
        routed = _Routed()
        for item in batch:
            if isinstance(item, CommandEvent | PlanEvent):
                routed.events.append(item)
                key = record_key(item).encode()
                routed.kafka.append((self.topics.command_events, key, encode_event(item)))
            elif isinstance(item, Dropped):
                letter = dead_letter(item.source, item.reason, item.payload, to_ms(item.ts))
                routed.kafka.append(self.dead(letter))
            elif isinstance(item, MqttCommand):
                routed.mqtt.append(
                    MqttMessage(item.topic, item.payload, item.qos, item.retain, item.expiry_s)
                )
            elif isinstance(item, KafkaCommand):
                routed.kafka.append((item.topic, item.key.encode(), item.value))
            elif isinstance(item, HttpCall):
                routed.http.append(item)
        return routed

    def dead(self, letter: DeadLetter) -> tuple[str, bytes, bytes]:
        """A dead letter as a (topic, key, value) record."""
        key = (letter.topic or letter.source).encode()
        return (self.topics.deadletter, key, _encode(letter))


def _decode_devices(batch: list[DeviceMessage], base: MqttTopics) -> tuple[list[Any], list[Any]]:
    ok: list[Any] = []
    bad: list[Any] = []
    for msg in batch:
        item = decode_device_message(msg, base)
        if isinstance(item, DeviceAck | DeviceState):
            ok.append(item)
        elif isinstance(item, InvalidDeviceMessage):
            bad.append(dead_letter("devices", item.reason, msg.payload, msg.received_ms, msg.topic))
    return ok, bad


def build_flow(
    settings: Settings | None = None,
    *,
    requests: Source | None = None,
    devices: Source[list[DeviceMessage]] | None = None,
    registry: Registry | None = None,
    config: OrchestratorConfig | None = None,
    now: Callable[[], datetime] = _utcnow,
    recovery: bool | None = None,
) -> Dataflow:
    """Wire the orchestrator flow; ``requests``/``devices`` replace its inputs (tests).

    ``recovery`` says whether a recovery store records this flow's snapshots (default:
    ``connectors.recovery.recovery_on``, from ``IOTFLOW_RECOVERY_DIR`` or ``bytewax.run -r``);
    only then do the Kafka and DuckDB sinks hold each epoch's end until their writes
    landed. A caller of ``bytewax.testing.run_main(recovery_config=...)`` passes ``True``.

    ``requests`` yields records with a ``value`` (bytes), as Bytewax's Kafka
    source does. Raises ``ConfigError`` for a missing broker or a bad
    registry or orchestrator declaration.
    """
    settings = settings or Settings()
    durable = recovery_on(settings.recovery_dir) if recovery is None else recovery
    if settings.recovery_dir is not None:
        ensure_store(settings.recovery_dir)  # bytewax.run opens it after building the flow
    registry = registry or load_registry(settings.registry)
    config = config or load_config(settings)
    if settings.http_url is None and "http" in config.ack_timeout:
        # no HTTP writer configured: devices on http are rejected with "no writer" instead
        timeouts = {p: t for p, t in config.ack_timeout.items() if p != "http"}
        config = config.model_copy(update={"ack_timeout": timeouts})
    topics = KafkaTopics(settings.topic_prefix)
    base = MqttTopics(settings.mqtt_base)
    bootstrap = settings.require_kafka_bootstrap()
    builders = coordinator_builders()
    known = {
        "mqtt": MqttWriter(settings.mqtt_base),
        "kafka": KafkaWriter(device_command_topic(settings.topic_prefix)),
        "http": HttpWriter(settings.http_style),
    }
    unknown = sorted(set(config.ack_timeout) - set(known))
    if unknown:
        msg = (
            f"orchestrator ack_timeout names protocols without a writer: {', '.join(unknown)}; "
            f"writers: {', '.join(known)}"
        )
        raise ConfigError(msg)
    router = _Router(topics)
    deliver = _Writers({p: known[p] for p in config.ack_timeout}, now)

    flow = Dataflow("orchestrator")
    raw = op.input("requests", flow, requests or KafkaInput(bootstrap, [topics.command_requests]))
    decoded_requests = op.flat_map_batch(
        "decode_requests",
        raw,
        lambda recs: [[d for rec in recs if (d := decode_request(rec.value)) is not None]],
    )
    batches, ingest_dead = _device_input(flow, settings, base, devices)
    decoded_devices = op.map("decode_devices", batches, lambda b: _decode_devices(b, base))
    inputs = op.filter(
        "nonempty",
        op.merge(
            "inputs", decoded_requests, op.map("device_items", decoded_devices, lambda d: d[0])
        ),
        bool,
    )
    keyed = op.key_on("one_orchestrator", inputs, lambda _items: "orchestrator")
    decided = op.stateful_batch(
        "orchestrate",
        keyed,
        lambda state: LogicStep(
            _Batched(config.build(state, registry, now, builders=builders, deliver=deliver))
        ),
    )
    routed = op.map("route", op.key_rm("unkey", decided), router.route)

    # The broker's acks are awaited once per epoch, not per batch: a round trip to the
    # broker per batch held up every ack and request queued behind it.
    op.output(
        "mqtt_commands",
        op.flat_map("mqtt_items", routed, lambda r: [("mqtt", m) for m in r.mqtt]),
        MqttEpochSink(settings.require_mqtt_url(), client_id=f"{CLIENT_ID}-cmd"),
    )
    if "http" in config.ack_timeout:
        op.output(
            "http_commands",
            op.flat_map("http_items", routed, lambda r: r.http),
            HttpSink.from_settings(settings, now=now),
        )
    device_dead = op.flat_map("device_dead", decoded_devices, lambda d: d[1])
    if ingest_dead is not None:
        device_dead = op.merge("device_dead_all", device_dead, ingest_dead)
    # Events, dead letters and Kafka device commands: the producer is flushed once per
    # epoch, not per batch (a broker round trip per batch held up the acks behind it).
    # one dataflow item per batch: a list of (topic, key, value) records
    to_kafka = op.merge(
        "to_kafka",
        op.filter_map("kafka_records", routed, lambda r: r.kafka or None),
        op.map("device_letters", device_dead, lambda letter: [router.dead(letter)]),
    )
    op.output(
        "kafka",
        op.key_on("one_producer", to_kafka, lambda _record: "kafka"),
        KafkaEpochOutput(
            bootstrap,
            [
                topics.command_events,
                topics.deadletter,
                topics.command_requests,
                device_command_topic(settings.topic_prefix),
            ],
            recovery=durable,
        ),
    )
    # A DuckDB upsert costs ~10 ms however small (its commit): off the worker that handles
    # acks, in batches at least every AUDIT_FLUSH.
    audit = op.filter_map(
        "audit_events", routed, lambda r: (COMMAND_AUDIT.name, r.events) if r.events else None
    )
    op.output(
        "duckdb",
        audit,
        DuckDBSink(
            settings.duckdb, COMMAND_AUDIT, audit_rows, background=AUDIT_FLUSH, recovery=durable
        ),
    )
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        flow = build_flow()
        # What exists now (modules of pyarrow, polars, duckdb, pydantic...) lives as long as
        # the process: keep it out of the collector's full passes, which otherwise walk it all
        # and stall the worker (and every command waiting on it) for tens of milliseconds.
        gc.freeze()
        return flow
    raise AttributeError(name)
