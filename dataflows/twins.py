"""The twins flow: device telemetry and state, and desired changes -> digital twins.

Run it with ``python -m bytewax.run dataflows.twins:flow`` (or ``iotflow run
twins`` for a recovery store); settings come from ``IOTFLOW_*``, the device
registry (models, devices, groups, conflict policies) from the file named by
``IOTFLOW_REGISTRY``, else the built-in registry of the simulator's kinds.

Inputs:

- device messages (``IOTFLOW_INGEST``, ``connectors.ingest``): MQTT directly,
  or the bridge's Kafka ingest topic. Both telemetry and the retained
  ``state`` topic update reported state (``IOTFLOW_MQTT_TOPICS``, when set,
  replaces the default filters ``{base}/devices/+/telemetry`` and ``.../state``);
- desired changes on ``{prefix}.twins.desired`` (JSON, see ``twins.updates``).
  The flow follows that topic, except in bounded runs (``IOTFLOW_MQTT_IDLE_STOP_S``
  or ``IOTFLOW_INGEST_UNTIL_END``), where it reads what the topic held at start.

Devices are spread over ``shards`` keys of one ``stateful_batch`` step
(``twins.sync.TwinSync`` per shard, a batch at a time).

Outputs (Kafka through ``KafkaEpochOutput``: the worker never waits for the broker
within an epoch; every record is acknowledged before the epoch's snapshot):

- ``{prefix}.twins`` (created compacted): every twin change with its version, key device_id,
- ``{prefix}.commands.requests``: ``iotflow.events.Command`` JSON made from deltas, key device_id,
- ``{prefix}.detections``: ``twin_inconsistent`` detections and, with
  ``IOTFLOW_PREDICTIONS`` (a YAML/JSON list of ``twins.prediction.PredictionRule``),
  maintenance predictions from the reported values, key ``rule|device``,
- ``{prefix}.deadletter``: everything rejected, with the reason (counted per kind
  in the twin step's state),
- DuckDB ``twin_history`` (one row per version, upserted on (device_id, version),
  committed every 0.2 s by a writer thread, and before each epoch's snapshot)
  and ``detections``.

With a recovery store, a changed registry (models, policies) or shard count is
refused at start with the settings named; the twin step also refuses state
of other models (``ConfigError``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import msgspec
import pyarrow as pa
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from connectors.decode import dead_letter
from connectors.duckdb_store import DETECTIONS, TWIN_HISTORY, DuckDBSink, detection_rows
from connectors.ingest import device_messages
from connectors.kafka import COMPACTED, KafkaEpochOutput, KafkaInput
from connectors.recovery import bind_definition, ensure_store, recovery_on
from iotflow.events import Detection, DeviceMessage, to_ms
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from operators.logic_step import LogicStep, shard_of
from twins.prediction import PredictionRule, Predictor, load_prediction_rules
from twins.registry import Registry, load_registry
from twins.state import TwinChange
from twins.sync import TwinOut, TwinSync, sync_fingerprint
from twins.updates import DesiredChange, Reported, TwinRejection, UpdateDecoder, decode_desired

__all__ = [
    "DEFAULT_SHARDS",
    "build_flow",
    "history_rows",
    "predict_step",
    "twin_filters",
    "twin_step",
]

DEFAULT_SHARDS = 16
# The sink's writer thread commits twin_history this often. Short, because the worker waits
# at each epoch's snapshot until every row so far is committed (at 5,000 changes/s and 1 s,
# that wait was 0.4-2.3 s at load ~9); a commit costs 10-30 ms plus ~20 us a row, so five
# a second cost little more than one.
HISTORY_EVERY = timedelta(milliseconds=200)
_encode = msgspec.json.encode
_TS_MS = pa.timestamp("ms", tz="UTC")
_TS_US = pa.timestamp("us", tz="UTC")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def twin_filters(settings: Settings) -> list[str]:
    """MQTT filters of the messages that update twins: ``IOTFLOW_MQTT_TOPICS`` or telemetry + state."""
    topics = MqttTopics(settings.mqtt_base)
    return settings.mqtt_topics or [topics.telemetry(), topics.state()]


def history_rows(batches: list[list[TwinChange]]) -> pa.Table:
    """Batches of twin changes (one list per twin step output) as an Arrow table in the
    ``twin_history`` layout (documents as JSON)."""
    changes = [c for batch in batches for c in batch]

    def json_column(values: list[Any]) -> pa.Array:
        # bytes straight from msgspec; Arrow checks the UTF-8 in one pass
        return pa.array([_encode(v) for v in values], pa.binary()).cast(pa.string())

    def time_column(values_ms: list[int]) -> pa.Array:
        return pa.array(values_ms, pa.int64()).cast(_TS_MS).cast(_TS_US)

    columns = [
        pa.array([c.device_id for c in changes], pa.string()),
        pa.array([c.version for c in changes], pa.int64()),
        pa.array([c.model for c in changes], pa.string()),
        time_column([c.ts_ms for c in changes]),
        time_column([c.recorded_ms for c in changes]),
        pa.array([c.cause for c in changes], pa.string()),
        json_column([c.changed for c in changes]),
        json_column([c.reported for c in changes]),
        json_column([c.desired for c in changes]),
        json_column([c.delta for c in changes]),
        json_column([c.reported_ts_ms for c in changes]),
        pa.array([c.online for c in changes], pa.bool_()),
    ]
    return pa.Table.from_arrays(columns, schema=TWIN_HISTORY.schema)


def _letter(rejection: TwinRejection) -> Any:
    return dead_letter(
        rejection.source,
        rejection.reason,
        rejection.payload,
        rejection.received_ms,
        rejection.topic,
    )


def twin_step(
    step_id: str,
    updates: Stream[list[Reported | DesiredChange]],
    registry: Registry,
    shards: int = DEFAULT_SHARDS,
    now: Callable[[], datetime] = _utcnow,
    recovery: bool = True,
) -> Stream[TwinOut]:
    """The twin-update step: batches of updates sharded by device -> one ``TwinOut`` per shard batch.

    ``recovery=False`` (no recovery store records the flow) skips the copy of every twin that
    Bytewax asks for at each epoch's end and drops without a store.
    """
    keyed = op.flat_map(f"{step_id}_shard", updates, _splitter(shards))
    outs = op.stateful_batch(
        f"{step_id}_sync",
        keyed,
        lambda state: LogicStep(TwinSync(registry, state, now), recovery=recovery),
    )
    return op.key_rm(f"{step_id}_unshard", outs)


def predict_step(
    step_id: str,
    reported: Stream[list[Reported]],
    rules: list[PredictionRule],
    shards: int = DEFAULT_SHARDS,
    now: Callable[[], datetime] = _utcnow,
    recovery: bool = True,
) -> Stream[Detection]:
    """Maintenance predictions (``twins.prediction``) over reported values, sharded by device:
    one detection per episode in which a property's trend crosses its threshold within the
    rule's horizon. ``recovery`` as for ``twin_step``."""
    Predictor(rules)  # duplicate names fail here, at build time, not in a worker
    keyed = op.flat_map(f"{step_id}_shard", reported, _splitter(shards))
    found = op.stateful_batch(
        f"{step_id}_predict",
        keyed,
        lambda state: LogicStep(Predictor(rules, state, now), recovery=recovery),
    )
    return op.key_rm(f"{step_id}_unshard", found)


def _splitter(shards: int) -> Callable[[list[Any]], list[tuple[str, list[Any]]]]:
    """Splits a batch of per-device items into per-shard batches, in shard order (the shard
    of each device id computed once)."""
    cache: dict[str, int] = {}
    names = [str(index) for index in range(shards)]

    def split(batch: list[Any]) -> list[tuple[str, list[Any]]]:
        if shards == 1:
            return [("0", batch)]
        parts: list[list[Any]] = [[] for _ in names]
        appends = [part.append for part in parts]
        for update in batch:
            device_id = update.device_id
            index = cache.get(device_id)
            if index is None:
                index = cache[device_id] = int(shard_of(device_id, shards))
            appends[index](update)
        return [(name, part) for name, part in zip(names, parts, strict=True) if part]

    return split


def _check_recovery(settings: Settings, registry: Registry, shards: int) -> None:
    if settings.recovery_dir is None:
        return
    ensure_store(settings.recovery_dir)
    definition = {
        "IOTFLOW_REGISTRY": None if settings.registry is None else str(settings.registry),
        "registry models and policies": sync_fingerprint(registry),
        "shards": shards,
    }
    bind_definition(settings.recovery_dir, "twins", definition)


def _records(twins_topic: str, requests_topic: str) -> Callable[[TwinOut], list[Any]]:
    """A twin step output's changes and command requests as one item of Kafka records for
    ``KafkaEpochOutput`` (a list: no dataflow item per record)."""

    def records(out: TwinOut) -> list[Any]:
        found = [(twins_topic, c.device_id.encode(), _encode(c)) for c in out.changes]
        found += [(requests_topic, c.device_id.encode(), _encode(c)) for c in out.commands]
        return [("kafka", found)] if found else []

    return records


def _record(topic: str, key: str, value: Any) -> tuple[str, Any]:
    """One Kafka record for ``KafkaEpochOutput`` (one producer: every record under one key)."""
    return ("kafka", [(topic, key.encode(), _encode(value))])


def build_flow(
    settings: Settings | None = None,
    source: Source[list[DeviceMessage]] | None = None,
    desired_source: Source[Any] | None = None,
    registry: Registry | None = None,
    shards: int = DEFAULT_SHARDS,
    now: Callable[[], datetime] = _utcnow,
    recovery: bool | None = None,
) -> Dataflow:
    """Wire the twins flow; ``source``/``desired_source`` replace the inputs (tests).

    ``recovery`` says whether a recovery store records this flow's snapshots (default:
    ``connectors.recovery.recovery_on``, from ``IOTFLOW_RECOVERY_DIR`` or ``bytewax.run -r``);
    only then do the Kafka and DuckDB sinks hold each epoch's end until their writes
    landed. A caller of ``bytewax.testing.run_main(recovery_config=...)`` passes ``True``.

    ``desired_source`` yields raw JSON desired changes (bytes) or Kafka source
    messages carrying them.
    """
    settings = settings or Settings()
    durable = recovery_on(settings.recovery_dir) if recovery is None else recovery
    registry = registry or load_registry(settings.registry)
    rules = [] if settings.predictions is None else load_prediction_rules(settings.predictions)
    _check_recovery(settings, registry, shards)
    topics = KafkaTopics(settings.topic_prefix)
    bootstrap = settings.require_kafka_bootstrap()
    decoder = UpdateDecoder(settings.mqtt_base, settings.max_payload_bytes)

    flow = Dataflow("twins")
    ingest_settings = settings.model_copy(update={"mqtt_topics": twin_filters(settings)})
    ingest = device_messages(flow, ingest_settings, source, client_id="iotflow-twins")
    decoded = op.map("decode", ingest.messages, decoder.decode)
    reported = op.map("reported", decoded, lambda pair: pair[0])
    rejected: Stream[Any] = op.flat_map("undecodable", decoded, lambda pair: pair[1])

    bounded = settings.mqtt_idle_stop_s is not None or settings.ingest_until_end
    desired_in = op.input(
        "desired",
        flow,
        desired_source or KafkaInput(bootstrap, [topics.twins_desired], tail=not bounded),
    )

    def decode_one(item: Any) -> DesiredChange | TwinRejection:
        value = item if isinstance(item, bytes) else item.value
        return decode_desired(value or b"", to_ms(now()))

    desired_all = op.map("decode_desired", desired_in, decode_one)
    desired_split = op.branch("desired_ok", desired_all, lambda d: isinstance(d, DesiredChange))
    rejected = op.merge("rejected_desired", rejected, desired_split.falses)
    updates = op.merge(
        "updates", reported, op.map("desired_batches", desired_split.trues, lambda d: [d])
    )
    outs = twin_step("twins", updates, registry, shards, now, durable)

    dead = op.map(
        "dead_letters",
        op.merge(
            "rejected_all", rejected, op.flat_map("twin_rejections", outs, lambda o: o.rejections)
        ),
        _letter,
    )
    if ingest.dead is not None:
        dead = op.merge("dead_all", dead, ingest.dead)
    detections = op.flat_map("detections", outs, lambda o: o.detections)
    if rules:
        predicted = predict_step("maintenance", reported, rules, shards, now, durable)
        detections = op.merge("all_detections", detections, predicted)
    to_kafka = op.merge(
        "to_kafka",
        op.flat_map("twin_records", outs, _records(topics.twins, topics.command_requests)),
        op.map(
            "detection_msgs",
            detections,
            lambda d: _record(topics.detections, f"{d.rule}|{d.key}", d),
        ),
        op.map("dead_msgs", dead, lambda d: _record(topics.deadletter, d.topic or d.source, d)),
    )
    op.output(
        "kafka",
        to_kafka,
        KafkaEpochOutput(
            bootstrap,
            [
                topics.twins,
                topics.command_requests,
                topics.detections,
                topics.deadletter,
                topics.twins_desired,
            ],
            configs={topics.twins: COMPACTED},
            recovery=durable,
        ),
    )
    # DuckDB commits take 10-30 ms: the sink's writer thread makes them, off the worker's thread
    op.output(
        "duckdb",
        op.merge(
            "to_duckdb",
            op.filter_map(
                "history_rows",
                outs,
                lambda o: (TWIN_HISTORY.name, o.changes) if o.changes else None,
            ),
            op.map("detection_rows", detections, lambda d: (DETECTIONS.name, d)),
        ),
        DuckDBSink(
            settings.duckdb,
            TWIN_HISTORY,
            history_rows,
            also={DETECTIONS: detection_rows},
            background=HISTORY_EVERY,
            recovery=durable,
        ),
    )
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        built = build_flow()
        # What is loaded by now (Bytewax, Arrow, DuckDB, polars: ~80k objects) lives as long as
        # the process: keep the collector's full passes off it. They came every few seconds
        # (twin state promotes objects steadily) and each walked it all: 20-500 ms pauses.
        gc.freeze()
        return built
    raise AttributeError(name)
