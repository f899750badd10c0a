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
  never retained, MQTT 5 message expiry = seconds until ``expires_at``), a
  Kafka topic (``{prefix}.commands.device``, or the device's ``topic``
  metadata), HTTP (``IOTFLOW_HTTP_URL``; without it, devices on ``http`` are
  rejected: no writer);
- ``{prefix}.commands.events``: every command and coordinator transition, keyed
  by command id or plan id;
- DuckDB ``command_audit``: the same transitions, upserted on their natural key;
- ``{prefix}.deadletter``: requests and device messages that could not be used.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import msgspec
import pyarrow as pa
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from commands.audit import audit_row, encode_event, record_key
from commands.coordinator import PlanEvent, coordinator_builders
from commands.orchestrator import Dropped, OrchestratorConfig, Write
from commands.validation import (
    DeviceAck,
    DeviceState,
    InvalidDeviceMessage,
    decode_device_message,
    decode_request,
)
from commands.writers import HttpWriter, KafkaCommand, KafkaWriter, MqttCommand, MqttWriter
from connectors.bridge import ingest_topic, topic_matcher, unwrap_records
from connectors.command_writers import HttpSink
from connectors.decode import dead_letter
from connectors.duckdb_store import COMMAND_AUDIT, DuckDBSink
from connectors.kafka import KafkaInput, KafkaOutput, message
from connectors.mqtt import MqttMessage, MqttSink, MqttSource
from connectors.recovery import ensure_store
from iotflow.declarations import load_file, validate
from iotflow.errors import ConfigError
from iotflow.events import CommandEvent, DeadLetter, DeviceMessage, to_ms
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from operators.steps import LogicStep
from twins.registry import Registry, load_registry

__all__ = ["CLIENT_ID", "audit_rows", "build_flow", "device_command_topic", "load_config"]

CLIENT_ID = "iotflow-orchestrator"
"""The flow's stable MQTT client id (its persistent session and its last will)."""

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


def audit_rows(events: list[Any]) -> pa.Table:
    """Command and plan events as an Arrow table in the ``command_audit`` layout."""
    return pa.Table.from_pylist([audit_row(e) for e in events], schema=COMMAND_AUDIT.schema)


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


def _request_letter(item: Dropped) -> DeadLetter:
    return dead_letter(item.source, item.reason, item.payload, to_ms(item.ts))


def _device_letter(item: InvalidDeviceMessage) -> DeadLetter:
    msg = item.message
    return dead_letter("devices", item.reason, msg.payload, msg.received_ms, msg.topic)


def build_flow(
    settings: Settings | None = None,
    *,
    requests: Source | None = None,
    devices: Source[list[DeviceMessage]] | None = None,
    registry: Registry | None = None,
    config: OrchestratorConfig | None = None,
    now: Callable[[], datetime] = _utcnow,
) -> Dataflow:
    """Wire the orchestrator flow; ``requests``/``devices`` replace its inputs (tests).

    ``requests`` yields records with a ``value`` (bytes), as Bytewax's Kafka
    source does. Raises ``ConfigError`` for a missing broker or a bad
    registry or orchestrator declaration.
    """
    settings = settings or Settings()
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

    flow = Dataflow("orchestrator")
    raw = op.input("requests", flow, requests or KafkaInput(bootstrap, [topics.command_requests]))
    decoded_requests = op.filter_map("decode_requests", raw, lambda rec: decode_request(rec.value))
    batches, ingest_dead = _device_input(flow, settings, base, devices)
    decoded_devices = op.flat_map(
        "decode_devices",
        batches,
        lambda batch: [d for m in batch if (d := decode_device_message(m, base)) is not None],
    )
    device_split = op.branch(
        "device_ok", decoded_devices, lambda d: isinstance(d, DeviceAck | DeviceState)
    )
    inputs = op.merge("inputs", decoded_requests, device_split.trues)
    keyed = op.key_on("one_orchestrator", inputs, lambda _item: "orchestrator")
    decided = op.stateful_batch(
        "orchestrate",
        keyed,
        lambda state: LogicStep(config.build(state, registry, now, builders=builders)),
    )
    items = op.key_rm("unkey", decided)
    writes = op.filter("writes", items, lambda i: isinstance(i, Write))
    events = op.filter("events", items, lambda i: isinstance(i, CommandEvent | PlanEvent))
    dropped: Stream[Any] = op.filter("dropped", items, lambda i: isinstance(i, Dropped))

    kafka_out: list[Stream[Any]] = []
    mqtt_writer = MqttWriter(settings.mqtt_base)
    mqtt_encoded = op.map(
        "mqtt_encode",
        op.filter("mqtt_writes", writes, lambda w: w.protocol == mqtt_writer.protocol),
        lambda w: mqtt_writer.encode(w, now()),
    )
    op.output(
        "mqtt_commands",
        op.filter_map(
            "mqtt_messages",
            mqtt_encoded,
            lambda m: (
                MqttMessage(m.topic, m.payload, m.qos, m.retain, m.expiry_s)
                if isinstance(m, MqttCommand)
                else None
            ),
        ),
        MqttSink(settings.require_mqtt_url(), client_id=f"{CLIENT_ID}-cmd"),
    )
    dropped = op.merge(
        "dropped_mqtt",
        dropped,
        op.filter("mqtt_late", mqtt_encoded, lambda m: isinstance(m, Dropped)),
    )
    if "kafka" in config.ack_timeout:
        kafka_writer = KafkaWriter(device_command_topic(settings.topic_prefix))
        kafka_encoded = op.map(
            "kafka_encode",
            op.filter("kafka_writes", writes, lambda w: w.protocol == kafka_writer.protocol),
            lambda w: kafka_writer.encode(w, now()),
        )
        kafka_out.append(
            op.filter_map(
                "kafka_commands",
                kafka_encoded,
                lambda m: message(m.topic, m.key, m.value) if isinstance(m, KafkaCommand) else None,
            )
        )
        dropped = op.merge(
            "dropped_kafka",
            dropped,
            op.filter("kafka_late", kafka_encoded, lambda m: isinstance(m, Dropped)),
        )
    if "http" in config.ack_timeout:
        http_writer = HttpWriter(settings.http_style)
        http_encoded = op.map(
            "http_encode",
            op.filter("http_writes", writes, lambda w: w.protocol == http_writer.protocol),
            lambda w: http_writer.encode(w, now()),
        )
        op.output(
            "http_commands",
            op.filter("http_calls", http_encoded, lambda m: not isinstance(m, Dropped)),
            HttpSink.from_settings(settings, now=now),
        )
        dropped = op.merge(
            "dropped_http",
            dropped,
            op.filter("http_late", http_encoded, lambda m: isinstance(m, Dropped)),
        )

    letters = op.merge(
        "letters",
        op.map("request_letters", dropped, _request_letter),
        op.map("device_letters", device_split.falses, _device_letter),
    )
    if ingest_dead is not None:
        letters = op.merge("letters_all", letters, ingest_dead)
    kafka_out.append(
        op.map(
            "event_msgs",
            events,
            lambda e: message(topics.command_events, record_key(e), encode_event(e)),
        )
    )
    kafka_out.append(
        op.map(
            "dead_msgs",
            letters,
            lambda d: message(topics.deadletter, d.topic or d.source, _encode(d)),
        )
    )
    op.output(
        "kafka",
        op.merge("to_kafka", *kafka_out),
        KafkaOutput(
            bootstrap,
            [
                topics.command_events,
                topics.deadletter,
                topics.command_requests,
                device_command_topic(settings.topic_prefix),
            ],
        ),
    )
    op.output(
        "duckdb",
        op.map("audit", events, lambda e: (COMMAND_AUDIT.name, e)),
        DuckDBSink(settings.duckdb, COMMAND_AUDIT, audit_rows),
    )
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        return build_flow()
    raise AttributeError(name)
