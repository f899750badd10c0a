"""The monitoring flow: telemetry -> windows per device and group -> anomaly rules and CEP
patterns -> aggregates and detections.

Run it with ``python -m bytewax.run dataflows.monitoring:flow`` (or ``iotflow run
monitoring`` for a recovery store); settings come from ``IOTFLOW_*``, the
deployment (windows, statistics, rules, patterns, device dimensions) from the
YAML or JSON file named by ``IOTFLOW_MONITORING``, else ``operators.monitoring.DEFAULT``.
Input is MQTT directly or the bridge's Kafka ingest topic (``IOTFLOW_INGEST``).

Device groups (the group statistics' grouping sets, peer rules, CEP correlation)
come from the device registry named by ``IOTFLOW_REGISTRY`` (each device's
metadata such as building, floor and zone, and its model), with the
deployment's ``dimensions`` added on top (``device_dimensions``).

Outputs:

- ``{prefix}.aggregates``: one record per window result row, keyed
  ``group_by|key|metric|window_start|window_end`` (times ISO 8601, UTC),
- ``{prefix}.detections``: anomaly and pattern detections, keyed ``rule|key``,
- ``{prefix}.commands.requests``: command and twin-update requests of pattern actions,
- ``{prefix}.deadletter``: rejected payloads and late readings, with the reason,
- DuckDB ``aggregates`` and ``detections``, upserted on their natural keys.

Kafka records go through ``KafkaEpochOutput`` (the worker never waits for the broker
per batch; each epoch's end waits for every acknowledgment) and DuckDB rows through a
background writer, so neither holds up the readings behind them.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import msgspec
import polars as pl
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from connectors.decode import TelemetryDecoder, dead_letter
from connectors.duckdb_store import AGGREGATES, DETECTIONS, DuckDBSink, detection_rows, stats_rows
from connectors.ingest import device_messages
from connectors.kafka import KafkaEpochOutput, Record
from connectors.mapping import SourceMapping
from connectors.recovery import recovery_on
from iotflow.events import Detection, DeviceMessage
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics
from operators.aggregation import LateFrame
from operators.anomaly_step import detect_anomalies, detect_peer_anomalies
from operators.cep import RejectedRows
from operators.cep_step import cep
from operators.monitoring import DEFAULT, Monitoring, to_wide
from operators.steps import window_stats
from twins.registry import Registry, load_registry

__all__ = ["aggregate_messages", "build_flow", "device_dimensions", "load_monitoring"]

_encode = msgspec.json.encode


def load_monitoring(settings: Settings) -> Monitoring:
    """The deployment named by ``IOTFLOW_MONITORING``, or the embedded default."""
    return Monitoring.load(settings.monitoring) if settings.monitoring else DEFAULT


def device_dimensions(
    registry: Registry, declared: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, dict[str, str]]:
    """Each device's grouping dimensions: its registry metadata, then ``declared`` on top.

    From the registry, every device listed by id gives its ``model`` (the device
    type) and each metadata value that is a string or an integer, as text
    (``floor: 2`` -> ``"2"``); coordinates and other floats group nothing.
    Devices known only by an id pattern carry no metadata. ``declared`` (the
    deployment's ``dimensions``) adds entries or overrides the registry's.

        >>> reg = Registry()
        >>> _ = reg.define_model("temp", {"properties": {"temperature": {"type": "float"}}})
        >>> _ = reg.add_device("t1", "temp", building="A", floor=2, x=1.5)
        >>> device_dimensions(reg, {"t1": {"zone": "z9"}, "t2": {"zone": "z9"}})
        {'t1': {'model': 'temp', 'building': 'A', 'floor': '2', 'zone': 'z9'}, 't2': {'zone': 'z9'}}
    """
    dims: dict[str, dict[str, str]] = {}
    for device_id, device in registry.devices.items():
        entry = {"model": device.model}
        for name, value in device.metadata.items():
            if isinstance(value, str | int):
                entry[name] = str(value)
        dims[device_id] = entry
    for device_id, extra in (declared or {}).items():
        dims[device_id] = {**dims.get(device_id, {}), **extra}
    return dims


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _iso_expr(column: str) -> pl.Expr:
    """``_iso`` of an epoch-ms column, in polars (microseconds only when not whole seconds)."""
    at = pl.from_epoch(column, time_unit="ms")
    whole = at.dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        pl.when(pl.col(column) % 1000 == 0)
        .then(whole)
        .otherwise(at.dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
    )


def aggregate_messages(topic: str, results: pl.DataFrame) -> list[Record]:
    """One Kafka record (topic, key, value) per result row, its fields as JSON with ISO 8601
    window times; the key is the row's natural key. Encoded by polars: a window close of 10,000 devices
    makes 20,000 records, and a Python dict and JSON encode per row took 3x longer. The
    few distinct window bounds of a close are formatted once, not once per row (33 -> 24 ms
    CPU for 20,000 rows)."""
    if results.height == 0:
        return []
    fields = [c for c in results.columns if c not in ("window_start_ms", "window_end_ms")]
    bounds = ["window_start_ms", "window_end_ms"]
    iso = (
        results.select(bounds)
        .unique()
        .with_columns(
            _iso_expr("window_start_ms").alias("window_start"),
            _iso_expr("window_end_ms").alias("window_end"),
        )
    )
    rows = results.join(iso, on=bounds, how="left", maintain_order="left")
    key = pl.concat_str(["group_by", "key", "metric", "window_start", "window_end"], separator="|")
    value = pl.struct(*fields, "window_start", "window_end")
    table = rows.select(
        key.cast(pl.Binary).alias("k"), value.struct.json_encode().cast(pl.Binary).alias("v")
    )
    keys, values = table.to_series(0).to_list(), table.to_series(1).to_list()
    return [(topic, k, v) for k, v in zip(keys, values, strict=True)]


def _record(topic: str, key: str, value: Any) -> tuple[str, list[Record]]:
    """One Kafka record as a ``KafkaEpochOutput`` item (one producer: every item one key)."""
    return ("kafka", [(topic, key.encode(), _encode(value))])


def _late_letters(late: LateFrame) -> list[Any]:
    reason = (
        f"late reading: every window holding it closed at watermark {_iso(late.watermark_ms)} "
        "(allowed_lateness in the monitoring declaration allows more)"
    )
    return [
        dead_letter("window", reason, _encode(row), row["ts_ms"])
        for row in late.readings.iter_rows(named=True)
    ]


def _rejected_letters(rejected: RejectedRows) -> list[Any]:
    """Rows a pattern engine did not process (late, future, incomplete), as dead letters."""
    boundary = (
        "" if rejected.boundary_ms is None else f" (processed up to {_iso(rejected.boundary_ms)})"
    )
    reason = f"pattern input {rejected.reason}{boundary}"
    return [
        dead_letter(
            "patterns", reason, _encode(row), row.get("ts_ms") or row.get("window_end_ms") or 0
        )
        for row in rejected.rows.iter_rows(named=True)
    ]


def _detection_key(d: Detection) -> str:
    return f"{d.rule}|{d.key}"


def build_flow(
    settings: Settings | None = None,
    source: Source[list[DeviceMessage]] | None = None,
    monitoring: Monitoring | None = None,
    registry: Registry | None = None,
    recovery: bool | None = None,
) -> Dataflow:
    """Wire the monitoring flow; ``source`` replaces the input (tests use ``TestingSource``),
    ``registry`` the one named by ``IOTFLOW_REGISTRY``.

    ``recovery`` says whether a recovery store records this flow's snapshots (default:
    ``connectors.recovery.recovery_on``, from ``IOTFLOW_RECOVERY_DIR`` or ``bytewax.run -r``);
    only then do the Kafka and DuckDB sinks hold each epoch's end until their writes
    landed. A caller of ``bytewax.testing.run_main(recovery_config=...)`` passes ``True``.
    """
    settings = settings or Settings()
    durable = recovery_on(settings.recovery_dir) if recovery is None else recovery
    spec = monitoring or load_monitoring(settings)
    dims = device_dimensions(registry or load_registry(settings.registry), spec.dimensions)
    topics = KafkaTopics(settings.topic_prefix)
    bootstrap = settings.require_kafka_bootstrap()
    mapping = settings.source_mapping
    decoder = TelemetryDecoder(
        SourceMapping.model_validate(mapping) if mapping is not None else None,
        max_payload_bytes=settings.max_payload_bytes,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
    )

    flow = Dataflow("monitoring")
    ingest = device_messages(
        flow, settings, source, client_id="iotflow-monitoring", linger=spec.ingest_linger
    )
    decoded = op.map("decode", ingest.messages, decoder.decode_frame)
    frames = op.filter(
        "nonempty", op.map("frames", decoded, lambda out: out.ok), lambda f: f.height > 0
    )
    dead: Stream[Any] = op.flat_map("rejected", decoded, lambda out: out.dead)
    if ingest.dead is not None:
        dead = op.merge("rejected_all", dead, ingest.dead)

    stats = window_stats(
        "windows", frames, spec.aggregation, dims, shards=spec.shards, recovery=durable
    )
    dead = op.merge("dead", dead, op.flat_map("late_letters", stats.late, _late_letters))
    detections: list[Stream[Detection]] = []
    actions: list[Stream[Any]] = []
    if spec.reading_rules:
        found = detect_anomalies(
            "anomalies", frames, spec.reading_rules, shards=spec.shards, recovery=durable
        )
        detections.append(found.detections)
    # the wide layout only where a peer rule or a windows pattern reads it: converting
    # every close for nobody cost the window path ~10-40 ms per close under load
    reads_windows = spec.patterns is not None and any(
        p.input == "windows" for p in spec.patterns.patterns
    )
    wide = op.map("wide", stats.down, to_wide) if spec.peer_rules or reads_windows else None
    if spec.peer_rules:
        device_wide = op.map(
            "device_wide", wide, lambda f: f.filter(pl.col("group_by") == "device")
        )
    for rule in spec.peer_rules:
        found = detect_peer_anomalies(
            f"peers-{rule.name}", device_wide, rule, dims, shards=spec.shards, recovery=durable
        )
        detections.append(found.detections)
    if spec.patterns is not None:
        inputs = sorted({p.input for p in spec.patterns.patterns})
        for name in inputs:
            if name == "readings":
                up = frames
            elif name == "windows" and wide is not None:
                up = wide
            else:
                continue  # other inputs (commands) are fed by the orchestration flow
            out = cep(
                f"cep-{name}", up, spec.patterns, name, dims, shards=spec.shards, recovery=durable
            )
            detections.append(out.detections)
            actions.append(out.actions)
            dead = op.merge(
                f"dead-{name}",
                dead,
                op.flat_map(f"rejected-{name}", out.rejected, _rejected_letters),
            )
    found_all = op.merge("detections", *detections) if detections else None

    # a window close's records travel as one item: no dataflow item per record
    kafka_streams = [
        op.filter_map(
            "aggregate_records",
            stats.down,
            lambda f: ("kafka", aggregate_messages(topics.aggregates, f)) if f.height else None,
        ),
        op.map("dead_msgs", dead, lambda d: _record(topics.deadletter, d.topic or d.source, d)),
    ]
    if found_all is not None:
        kafka_streams.append(
            op.map(
                "detection_msgs",
                found_all,
                lambda d: _record(topics.detections, _detection_key(d), d),
            )
        )
    if actions:
        kafka_streams.append(
            op.map(
                "action_msgs",
                op.merge("actions", *actions),
                lambda a: _record(topics.command_requests, a.device_id, a),
            )
        )
    # the worker hands records to the producer and moves on; each epoch's end waits for
    # the broker's acknowledgments (not every batch: a round trip behind every reading)
    op.output(
        "kafka",
        op.merge("to_kafka", *kafka_streams),
        KafkaEpochOutput(
            bootstrap,
            [topics.aggregates, topics.deadletter, topics.detections, topics.command_requests],
            recovery=durable,
        ),
    )
    to_duckdb = [op.map("aggregate_rows", stats.down, lambda f: (AGGREGATES.name, f))]
    if found_all is not None:
        to_duckdb.append(op.map("detection_rows", found_all, lambda d: (DETECTIONS.name, d)))
    op.output(
        "duckdb",
        op.merge("to_duckdb", *to_duckdb),
        # upserts commit on a thread of their own: a window close's rows would hold the
        # worker (and every reading behind it) for tens of milliseconds
        DuckDBSink(
            settings.duckdb,
            AGGREGATES,
            stats_rows,
            also={DETECTIONS: detection_rows},
            background=timedelta(seconds=1),
            recovery=durable,
        ),
    )
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        built = build_flow()
        # What is loaded by now (Bytewax, Arrow, DuckDB, polars) lives as long as the
        # process: keep the collector's full passes, which walk all of it, off it (as the
        # twins flow does; they stalled flows for 20-500 ms under load).
        gc.freeze()
        return built
    raise AttributeError(name)
