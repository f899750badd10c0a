"""The edge gateway flow: local decisions, pre-aggregation, store-and-forward uplink, live definitions.

Run it on a gateway with ``python -m bytewax.run dataflows.edge:flow`` (one
worker). Settings: the usual ``IOTFLOW_*`` (``IOTFLOW_MQTT_URL`` is the
gateway's *local* broker, ``IOTFLOW_KAFKA_BOOTSTRAP`` the cloud's Kafka,
``IOTFLOW_MQTT_BASE``, ``IOTFLOW_TOPIC_PREFIX``, ``IOTFLOW_MQTT_TOPICS``,
``IOTFLOW_SOURCE_MAPPING``, ``IOTFLOW_MAX_PAYLOAD_BYTES``,
``IOTFLOW_MAX_FUTURE_SKEW_S``) and ``IOTFLOW_EDGE_*`` (``EdgeSettings``: the
gateway id, the workflow and gateway profile files, the buffer file and its
bound, checkpointing).

What it does, per batch of device messages:

1. decode and validate (``connectors.decode``; rejects become dead letters);
2. drop a reading older than its device's latest (out of order: a dead
   letter says so) and a repeat of one the device sent at the same time
   (a redelivery after a restart: counted as ``duplicates``);
3. run the edge part of the workflow (``iotflow.placement.plan`` for this
   gateway's profile): filters, local rules (``operators.cep_rows``, the
   per-reading path of the CEP patterns) whose command actions and command
   sequences go straight to the devices through the local broker, tumbling
   pre-aggregation (``operators.windows``), raw readings forwarded where the
   workflow asks;
4. write local commands to MQTT, and aggregates (one record per window and
   component, one compact row per device), detections, commands, dead letters and raw
   readings to the store-and-forward buffer (``connectors.buffer``), which
   ``connectors.uplink`` sends to ``{prefix}.edge.uplink``;
5. every ``checkpoint_ms`` (100) or ``checkpoint_messages`` (800) commit the
   buffer with the logic's state, then acknowledge the messages to the
   broker (``connectors.gateway``).

Guarantee (devices publishing at QoS 1): every valid reading's effects
(aggregates, detections, commands, forwarded raw readings) reach Kafka at
least once, and exactly once after de-duplication by record id
(``connectors.uplink.dedupe_uplink``), across SIGKILLs, restarts and uplink
outages, as long as the buffer's bound is not reached (then the drop policy
applies, counted). Local commands may repeat after a crash under the same
``command_id`` (devices execute a command id once). Readings must come in
time order per device.

Definition sync (``connectors.definitions``): new workflow versions from
``{prefix}.edge.definitions`` apply without a restart; see there.

Memory (``bench edge_memory``: 1,000 devices at 1 Hz, 10 s windows, a local
rule): ~51 MiB peak resident, of which ~24 MiB is mapped library code (Bytewax,
librdkafka, libpython, libcrypto). pydantic stays out (~10 MiB): settings, the
workflow, the profile and the per-reading patterns are read through msgspec
mirrors of the pydantic models (``iotflow.env``, ``iotflow.edge_settings``,
``iotflow.workflow_lean``, ``operators.cep_lean``), which hand what they refuse
to pydantic for the verdict. Install the gateway with compiled bytecode (pip
does; ``uv sync --compile-bytecode``): a process that compiles its ~320 modules
at every start (``PYTHONDONTWRITEBYTECODE``, a read-only checkout) holds ~1-4 MiB
more. Declarations as JSON (or the default workflow) keep PyYAML out.

An aggregate record's body (a row per device: its key, then ``[count, sum,
min, max]`` per metric of ``metrics``, null where it had none)::

    {"component": "stats", "window_start_ms": ..., "window_end_ms": ...,
     "stats": ["count", "sum", "min", "max"], "metrics": ["humidity", "temperature"],
     "rows": [["d1", [10, 401.5, 39.0, 41.2], [10, 225.0, 22.0, 23.1]], ...]}

(``connectors.uplink.expand_aggregates`` turns it back into ``WindowResult``s.)
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow

from connectors.buffer import StoreAndForward, UplinkRecord
from connectors.decode import TelemetryDecoder, dead_letter
from connectors.definitions import DefinitionAck, DefinitionOffer, DefinitionSource, consider
from connectors.gateway import (
    AckChannel,
    Checkpoint,
    GatewaySink,
    GatewaySource,
    GatewayStatus,
    Inbound,
    release_memory,
)
from connectors.mqtt import MqttMessage
from connectors.uplink import AGGREGATE_STATS, Uplink
from iotflow.edge_settings import EdgeSettings
from iotflow.env import LeanSettings, lean_settings
from iotflow.errors import ConfigError
from iotflow.events import Command, DeadLetter, Detection, Reading, from_ms, to_ms
from iotflow.placement import Plan, plan
from iotflow.topics import KafkaTopics, MqttTopics, check_device_id
from iotflow.workflow_lean import dump, load_profile, load_workflow
from operators.cep_actions import CommandRequest, TwinUpdate
from operators.cep_lean import load_patterns
from operators.cep_rows import RejectedEvent, RowEngine
from operators.expr import Expr
from operators.logic_step import LogicStep
from operators.windows import LateReading, TumblingAggregator, TumblingWindow

if TYPE_CHECKING:  # the edge holds their msgspec mirrors (iotflow.workflow_lean, cep_lean)
    from iotflow.settings import Settings
    from iotflow.workflow import CommandSequenceComponent, GatewayProfile, Workflow
    from operators.cep_patterns import PatternSet

__all__ = [
    "DEFAULT_WORKFLOW",
    "EdgeLogic",
    "EdgeProgram",
    "EdgeSettings",
    "build_flow",
    "compile_edge",
    "default_profile",
]

log = logging.getLogger("iotflow.edge")
_encode = msgspec.json.encode
_AGGREGATE_DEVICES_PER_RECORD = 2000

DEFAULT_WORKFLOW = load_workflow(
    {
        "name": "edge-default",
        "components": [
            {"name": "stats", "kind": "aggregate", "window": "10s", "placement": "edge"}
        ],
    }
)


def default_profile(gateway_id: str) -> GatewayProfile:
    """A mid-range gateway (1 GB, 1.2 GHz, 1 Mbit/s uplink at 100 ms, up 99%)."""
    return load_profile(
        {
            "name": gateway_id,
            "memory_mb": 1024,
            "cpu_ghz": 1.2,
            "connectivity": {"uplink_kbps": 1000, "rtt": "100ms", "availability": 0.99},
        }
    )


# -- the compiled edge part of a workflow -----------------------------------------------


@dataclass(frozen=True)
class _Filter:
    input: str
    test: Callable[[Any], Any]
    names: tuple[str, ...]


@dataclass(frozen=True)
class EdgeProgram:
    """The edge part of a workflow, checked and ready to run (``compile_edge``)."""

    workflow: Workflow
    plan: Plan
    filters: dict[str, _Filter]
    windows: dict[str, tuple[str, TumblingWindow]]
    patterns: dict[str, tuple[str, PatternSet]]
    sequences: dict[str, CommandSequenceComponent]
    order: tuple[str, ...]

    @property
    def version(self) -> int:
        return self.workflow.version


def compile_edge(workflow: Workflow, profile: GatewayProfile) -> EdgeProgram:
    """Plan ``workflow`` for ``profile`` and check its edge part; ``ConfigError``
    (``PlacementError``) naming the component and what is wrong otherwise."""
    chosen = plan(workflow, profile)
    filters: dict[str, _Filter] = {}
    windows: dict[str, tuple[str, TumblingWindow]] = {}
    patterns: dict[str, tuple[str, PatternSet]] = {}
    sequences: dict[str, CommandSequenceComponent] = {}
    for c in chosen.edge:
        try:
            if c.kind == "filter":
                expr = Expr.parse(c.where)
                if not expr.is_condition:
                    msg = f"where {c.where!r} is not a condition; compare it, e.g. 't > 0'"
                    raise ConfigError(msg)
                filters[c.name] = _Filter(c.input, expr.function(), tuple(sorted(expr.names)))
            elif c.kind == "aggregate":
                windows[c.name] = (
                    c.input,
                    TumblingWindow(length=c.window, allowed_lateness=c.allowed_lateness),
                )
            elif c.kind == "patterns":
                ps = load_patterns(c.pattern_set("readings"))
                RowEngine(ps)  # refuses what the per-reading engine cannot run
                patterns[c.name] = (c.input, ps)
            elif c.kind == "command_sequence":
                sequences[c.name] = c
        except ConfigError as exc:
            raise ConfigError(f"workflow {workflow.name!r} component {c.name!r}: {exc}") from None
    order = tuple(c.name for c in chosen.edge)
    return EdgeProgram(workflow, chosen, filters, windows, patterns, sequences, order)


# -- the logic ---------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _State(msgspec.Struct):
    definition: dict[str, Any] | None = None
    # device -> [latest reading time, digests of the readings at that time]
    last: dict[str, list[int]] = msgspec.field(default_factory=dict)
    windows: dict[str, Any] = msgspec.field(default_factory=dict)
    patterns: dict[str, Any] = msgspec.field(default_factory=dict)
    counters: dict[str, int] = msgspec.field(default_factory=dict)


def _definition_state(program: EdgeProgram) -> dict[str, Any]:
    return {"version": program.version, "workflow": dump(program.workflow)}


# state as MessagePack: window starts stay integer keys
_STATE_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(_State)

_COUNTERS = (
    "messages",
    "readings",
    "dead_letters",
    "stale",
    "duplicates",
    "late",
    "detections",
    "commands",
    "aggregate_rows",
    "forwarded",
    "definitions_applied",
    "definitions_rejected",
)


class EdgeLogic:
    """The gateway's logic (no Bytewax import): ``on_batch(Inbound | DefinitionOffer)``,
    ``on_timer``, ``next_timer``, ``on_eof``, ``snapshot``. Outputs are
    ``MqttMessage`` (local commands, definition status), ``UplinkRecord``,
    ``GatewayStatus`` and ``Checkpoint`` (see the module docstring).

    ``resume_state`` is what a ``Checkpoint`` carried (bytes): the running
    definition, each device's last time, window and pattern state. A stored
    definition wins over ``workflow`` unless ``workflow`` has a higher version.
    """

    def __init__(
        self,
        gateway_id: str,
        profile: GatewayProfile,
        workflow: Workflow,
        decoder: TelemetryDecoder,
        *,
        base: str = "iotflow",
        resume_state: bytes | None = None,
        now: Callable[[], datetime] = _utcnow,
        checkpoint_ms: int = 50,
        checkpoint_messages: int = 800,
        status_s: float = 30.0,
    ) -> None:
        self.gateway_id = gateway_id
        self.profile = profile
        self.decoder = decoder
        self.topics = MqttTopics(base)
        self._now = now
        self._checkpoint_ms = checkpoint_ms
        self._checkpoint_messages = checkpoint_messages
        self._status_ms = round(status_s * 1000)
        state = _STATE_DECODER.decode(resume_state) if resume_state else _State()
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.counters.update(state.counters)
        self.last = state.last
        program = compile_edge(workflow, profile)
        stored = state.definition
        if stored is not None and stored["version"] >= workflow.version:
            try:
                program = compile_edge(load_workflow(stored["workflow"]), profile)
            except ConfigError as exc:  # the profile changed under it: say so, run the file's
                log.warning("stored definition v%s no longer fits: %s", stored["version"], exc)
        self.program = program
        self._running = _definition_state(program)
        self.windows: dict[str, TumblingAggregator] = {}
        self.engines: dict[str, RowEngine] = {}
        now_ms = to_ms(now())
        # the time the gateway was down is not a quiet stream: its watermarks restart their
        # idle clock now, so readings the broker kept for it are not late on arrival
        for resumed in (*state.windows.values(), *state.patterns.values()):
            if isinstance(resumed, dict) and "max_seen_at_ms" in resumed:
                resumed["max_seen_at_ms"] = now_ms
        self._build_operators(state.windows, state.patterns)
        self._pending: list[int] = []
        self._pending_messages = 0
        self._dirty = False
        self._last_checkpoint_ms = now_ms
        self._next_status_ms = now_ms + self._status_ms

    # -- the vocabulary

    def on_batch(self, item: Inbound | DefinitionOffer) -> list[Any]:
        if isinstance(item, DefinitionOffer):
            return self._definition(item)
        out: list[Any] = []
        self.counters["messages"] += len(item.messages)
        decoded = self.decoder.decode(item.messages)
        for dead in decoded.dead:
            out.append(self._dead(dead))
        fresh: list[Reading] = []
        last = self.last
        for r in decoded.ok:
            seen = last.get(r.device_id)
            if seen is None or r.ts_ms > seen[0]:
                last[r.device_id] = [r.ts_ms, zlib.crc32(_encode(r.metrics))]
            elif r.ts_ms < seen[0]:
                self.counters["stale"] += 1
                out.append(self._stale(r, seen[0]))
                continue
            else:  # the same time as the device's latest: a redelivery, or another message
                digest = zlib.crc32(_encode(r.metrics))
                if digest in seen[1:]:
                    self.counters["duplicates"] += 1
                    continue
                seen.append(digest)
            fresh.append(r)
        self.counters["readings"] += len(fresh)
        out.extend(self._run(fresh))
        self._pending.append(item.token)
        self._pending_messages += len(item.messages)
        self._dirty = True
        out.extend(self._checkpoint_if_due())
        return out

    def on_timer(self) -> list[Any]:
        out: list[Any] = []
        for name, agg in self.windows.items():
            out.extend(self._window_out(name, agg, agg.on_timer()))
        for name, engine in self.engines.items():
            out.extend(self._pattern_out(name, engine.on_timer()))
        if out:
            self._dirty = True
        now_ms = to_ms(self._now())
        if now_ms >= self._next_status_ms:
            self._next_status_ms = now_ms + self._status_ms
            out.append(self.status())
        out.extend(self._checkpoint_if_due())
        return out

    def next_timer(self) -> datetime | None:
        times = [t for a in self.windows.values() if (t := a.next_timer()) is not None]
        times += [t for e in self.engines.values() if (t := e.next_timer()) is not None]
        times.append(from_ms(self._next_status_ms))
        if self._dirty:
            times.append(from_ms(self._last_checkpoint_ms + self._checkpoint_ms))
        return min(times)

    def on_eof(self) -> list[Any]:
        """End of input: every open window closes, every pending silence fires, final checkpoint."""
        out: list[Any] = []
        for name, agg in self.windows.items():
            out.extend(self._window_out(name, agg, agg.on_eof()))
        for name, engine in self.engines.items():
            out.extend(self._pattern_out(name, engine.on_eof()))
        out.append(self.status())
        self._dirty = True
        out.append(self._checkpoint())
        return out

    def snapshot(self) -> bytes:
        """The state a ``Checkpoint`` carries (MessagePack: window starts stay integer keys)."""
        return _STATE_ENCODER.encode(
            _State(
                definition=self._running,
                last=self.last,
                windows={n: a.snapshot() for n, a in self.windows.items()},
                patterns={n: e.snapshot() for n, e in self.engines.items()},
                counters=self.counters,
            )
        )

    def status(self) -> GatewayStatus:
        counters: dict[str, Any] = dict(self.counters)
        counters["running_version"] = self.program.version
        counters["workflow"] = self.program.workflow.name
        counters["devices"] = len(self.last)
        return GatewayStatus(self.gateway_id, to_ms(self._now()), counters)

    # -- running the program

    def _run(self, readings: list[Reading]) -> list[Any]:
        out: list[Any] = []
        streams: dict[str, list[Reading]] = {"readings": readings}
        program = self.program
        for name in program.order:
            f = program.filters.get(name)
            if f is not None:
                streams[name] = [
                    r for r in streams[f.input] if f.test({n: r.metrics.get(n) for n in f.names})
                ]
            elif name in self.windows:
                source, agg = program.windows[name][0], self.windows[name]
                out.extend(self._window_out(name, agg, agg.on_batch(streams[source])))
            elif name in self.engines:
                source = program.patterns[name][0]
                out.extend(self._pattern_out(name, self.engines[name].on_readings(streams[source])))
        for stream, patterns in program.plan.forward.items():
            out.extend(self._forward(streams[stream], patterns))
        return out

    def _window_out(self, name: str, agg: TumblingAggregator, emits: Iterable[Any]) -> list[Any]:
        out: list[Any] = []
        by_window: dict[tuple[int, int], list[list[Any]]] = {}
        for e in emits:
            if isinstance(e, LateReading):
                self.counters["late"] += 1
                reason = (
                    f"late reading: ts {e.reading.ts_ms} falls in a window of {name!r} already "
                    f"closed at watermark {e.watermark_ms} (allowed_lateness allows more)"
                )
                out.append(
                    self._dead(
                        dead_letter("edge-window", reason, _encode(e.reading), e.reading.ts_ms)
                    )
                )
                continue
            devices = by_window.setdefault((to_ms(e.window_start), to_ms(e.window_end)), {})
            devices.setdefault(e.key, {})[e.metric] = [e.count, e.sum, e.min, e.max]
            self.counters["aggregate_rows"] += 1
        fingerprint = agg.window.fingerprint
        created = to_ms(self._now())
        for (start, end), devices in by_window.items():
            keys = list(devices)
            for chunk, first in enumerate(range(0, len(keys), _AGGREGATE_DEVICES_PER_RECORD)):
                part = keys[first : first + _AGGREGATE_DEVICES_PER_RECORD]
                metrics = sorted({m for k in part for m in devices[k]})
                body = {
                    "component": name,
                    "window_start_ms": start,
                    "window_end_ms": end,
                    "stats": AGGREGATE_STATS,
                    "metrics": metrics,
                    "rows": [[k, *(devices[k].get(m) for m in metrics)] for k in part],
                }
                rid = f"{self.gateway_id}|a|{name}|{fingerprint}|{start}|{chunk}"
                out.append(UplinkRecord(rid, "aggregate", name, _encode(body), created))
        return out

    def _pattern_out(self, name: str, emits: Iterable[Any]) -> list[Any]:
        out: list[Any] = []
        created = to_ms(self._now())
        for e in emits:
            if isinstance(e, Detection):
                self.counters["detections"] += 1
                rid = f"{self.gateway_id}|d|{e.rule}|{e.key}|{to_ms(e.ts)}"
                out.append(UplinkRecord(rid, "detection", e.key, _encode(e), created))
                out.extend(self._sequences(name, e))
            elif isinstance(e, CommandRequest):
                out.extend(
                    self._command(
                        e.request_id, e.device_id, e.name, e.params, e.ttl_s, e.pattern, e.key
                    )
                )
            elif isinstance(e, TwinUpdate):
                rid = f"{self.gateway_id}|t|{e.request_id}"
                out.append(UplinkRecord(rid, "twin_update", e.device_id, _encode(e), created))
            elif isinstance(e, RejectedEvent):
                reason = (
                    f"pattern input {e.reason} (edge patterns {name!r}, boundary {e.boundary_ms})"
                )
                row = _encode(e.row)
                out.append(self._dead(dead_letter("edge-patterns", reason, row, created)))
        return out

    def _sequences(self, patterns: str, d: Detection) -> list[Any]:
        out: list[Any] = []
        for name, seq in self.program.sequences.items():
            if seq.input != patterns or d.rule not in seq.on:
                continue
            for i, step in enumerate(seq.steps):
                device = step.device.replace("{key}", d.key)
                command_id = f"{name}|{d.key}|{to_ms(d.ts)}|{i}"
                out.extend(
                    self._command(
                        command_id,
                        device,
                        step.name,
                        step.params,
                        step.ttl.total_seconds(),
                        name,
                        d.key,
                    )
                )
        return out

    def _command(
        self,
        command_id: str,
        device: str,
        name: str,
        params: dict[str, Any],
        ttl_s: float,
        origin: str,
        key: str,
    ) -> list[Any]:
        now = self._now()
        problem = check_device_id(device)
        if problem is not None:
            reason = f"command {name!r} of {origin!r} for key {key!r} not sent: {problem}"
            return [
                self._dead(dead_letter("edge-commands", reason, command_id.encode(), to_ms(now)))
            ]
        self.counters["commands"] += 1
        cmd = Command(
            command_id=command_id,
            device_id=device,
            name=name,
            params=params,
            issued_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        payload = _encode(cmd)
        body = _encode(
            {"command": cmd, "origin": origin, "key": key, "gateway_id": self.gateway_id}
        )
        return [
            MqttMessage(self.topics.cmd(device), payload, qos=1, expiry_s=max(1, round(ttl_s))),
            UplinkRecord(f"{self.gateway_id}|c|{command_id}", "command", device, body, to_ms(now)),
        ]

    def _forward(self, readings: list[Reading], patterns: list[str]) -> list[Any]:
        out: list[Any] = []
        every = "*" in patterns
        created = to_ms(self._now())
        for r in readings:
            if every or any(fnmatch.fnmatchcase(r.device_id, p) for p in patterns):
                self.counters["forwarded"] += 1
                rid = f"{self.gateway_id}|r|{r.device_id}|{r.ts_ms}"
                out.append(UplinkRecord(rid, "reading", r.device_id, _encode(r), created))
        return out

    def _dead(self, dead: DeadLetter) -> UplinkRecord:
        self.counters["dead_letters"] += 1
        body = _encode(dead)
        key = dead.topic or dead.source
        rid = f"{self.gateway_id}|x|{dead.source}|{dead.received_ms}|{zlib.crc32(body):08x}"
        return UplinkRecord(rid, "deadletter", key, body, to_ms(self._now()))

    def _stale(self, r: Reading, before: int) -> UplinkRecord:
        reason = (
            f"reading at ts {r.ts_ms} is older than device {r.device_id!r}'s latest at {before}; "
            "the edge takes each device's readings in time order"
        )
        dead = dead_letter("edge", reason, _encode(r), r.ts_ms)
        self.counters["dead_letters"] += 1
        rid = f"{self.gateway_id}|stale|{r.device_id}|{r.ts_ms}"
        return UplinkRecord(rid, "deadletter", r.device_id, _encode(dead), to_ms(self._now()))

    # -- checkpoints

    def _checkpoint_if_due(self) -> list[Any]:
        if not self._dirty:
            return []
        now_ms = to_ms(self._now())
        due = now_ms - self._last_checkpoint_ms >= self._checkpoint_ms
        if due or self._pending_messages >= self._checkpoint_messages:
            return [self._checkpoint()]
        return []

    def _checkpoint(self) -> Checkpoint:
        tokens, self._pending, self._pending_messages = self._pending, [], 0
        self._dirty = False
        self._last_checkpoint_ms = to_ms(self._now())
        return Checkpoint(self.snapshot(), tokens)

    # -- definitions

    def _definition(self, offer: DefinitionOffer) -> list[Any]:
        verdict = consider(
            offer.value, self.program.version, lambda wf: compile_edge(wf, self.profile)
        )
        if verdict.status == "ignore":
            log.debug("definition v%s ignored: %s", verdict.version, verdict.reason)
            return []
        out: list[Any] = []
        if verdict.status == "apply" and verdict.built is not None:
            out.extend(self._switch(verdict.built))
            self.counters["definitions_applied"] += 1
            log.warning("applied definition v%s (%s)", verdict.version, verdict.built.workflow.name)
        else:
            self.counters["definitions_rejected"] += 1
            log.warning("rejected definition v%s: %s", verdict.version, verdict.reason)
        ack = DefinitionAck(
            gateway_id=self.gateway_id,
            version=verdict.version,
            status="applied" if verdict.status == "apply" else "rejected",
            running_version=self.program.version,
            ts_ms=to_ms(self._now()),
            reason=verdict.reason,
        )
        body = _encode(ack)
        rid = (
            f"{self.gateway_id}|def|{verdict.version}|{ack.status}|{offer.partition}:{offer.offset}"
        )
        out.append(UplinkRecord(rid, "definition", self.gateway_id, body, ack.ts_ms))
        topic = f"{self.topics.base}/gateways/{self.gateway_id}/definition"
        out.append(MqttMessage(topic, body, qos=1, retain=True))
        self._dirty = True
        out.append(self._checkpoint())  # the running version is durable before it is acknowledged
        return out

    def _switch(self, program: EdgeProgram) -> list[Any]:
        """Run ``program`` from now on; operators whose definition did not change keep their state."""
        out: list[Any] = []
        old_windows, old_engines = self.windows, self.engines
        self.program = program
        self._running = _definition_state(program)
        self.windows, self.engines = {}, {}
        for name, (_, window) in program.windows.items():
            kept = old_windows.get(name)
            if kept is not None and kept.window.fingerprint == window.fingerprint:
                self.windows[name] = kept
        for name, (_, ps) in program.patterns.items():
            kept_engine = old_engines.get(name)
            if kept_engine is not None and kept_engine.fingerprint == "rows:" + ps.fingerprint(
                "readings"
            ):
                self.engines[name] = kept_engine
        self._build_operators({}, {})
        # windows of a changed or removed aggregate close now, with what they hold
        for name, agg in old_windows.items():
            if self.windows.get(name) is not agg:
                out.extend(self._window_out(name, agg, agg.on_eof()))
        return out

    def _build_operators(self, windows: dict[str, Any], patterns: dict[str, Any]) -> None:
        for name, (_, window) in self.program.windows.items():
            if name in self.windows:
                continue
            try:
                self.windows[name] = window.build(windows.get(name), now=self._now)
            except ConfigError as exc:  # state of another definition: start afresh, say so
                log.warning("window state of %r not resumed: %s", name, exc)
                self.windows[name] = window.build(None, now=self._now)
        for name, (_, ps) in self.program.patterns.items():
            if name in self.engines:
                continue
            try:
                self.engines[name] = RowEngine(ps, patterns.get(name), now=self._now)
            except ConfigError as exc:
                log.warning("pattern state of %r not resumed: %s", name, exc)
                self.engines[name] = RowEngine(ps, None, now=self._now)


# -- wiring ------------------------------------------------------------------------------


def _load_profile(edge: EdgeSettings) -> GatewayProfile:
    return default_profile(edge.gateway_id) if edge.profile is None else load_profile(edge.profile)


def _source_mapping(mapping: dict[str, str]) -> Any:
    # a declared mapping is validated by its pydantic model (~9 MiB more on a gateway)
    from connectors.mapping import SourceMapping

    return SourceMapping.model_validate(mapping)


def build_flow(
    settings: Settings | LeanSettings | None = None, edge: EdgeSettings | None = None
) -> Dataflow:
    """Wire the edge flow for one gateway. Raises ``ConfigError`` for a missing broker, a
    workflow the gateway cannot host, or a buffer file it cannot open."""
    settings = settings or lean_settings()
    edge = edge or EdgeSettings.from_env()
    workflow = DEFAULT_WORKFLOW if edge.workflow is None else load_workflow(edge.workflow)
    profile = _load_profile(edge)
    compile_edge(workflow, profile)  # refuse a workflow the gateway cannot host, before starting
    mqtt_url = settings.require_mqtt_url()
    bootstrap = settings.require_kafka_bootstrap()
    kafka = KafkaTopics(settings.topic_prefix)
    mapping = settings.source_mapping
    decoder = TelemetryDecoder(
        None if mapping is None else _source_mapping(mapping),
        max_payload_bytes=settings.max_payload_bytes,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
        source="edge",
    )
    buffer = StoreAndForward(edge.buffer, edge.buffer_max_bytes, synchronous=edge.durability)
    uplink = Uplink(
        buffer, bootstrap, kafka.edge_uplink, edge.gateway_id, backfill_per_s=edge.backfill_per_s
    )
    acks = AckChannel()
    topics = settings.mqtt_topics or [MqttTopics(settings.mqtt_base).telemetry()]

    def logic(_resume: Any) -> LogicStep:
        # the gateway's state lives in its buffer, committed with the records it caused
        return LogicStep(
            EdgeLogic(
                edge.gateway_id,
                profile,
                workflow,
                decoder,
                base=settings.mqtt_base,
                resume_state=buffer.load_state(),
                checkpoint_ms=edge.checkpoint_ms,
                checkpoint_messages=edge.checkpoint_messages,
                status_s=edge.status_s,
            )
        )

    flow = Dataflow("edge")
    idle = None if edge.idle_stop_s is None else timedelta(seconds=edge.idle_stop_s)
    ended = threading.Event()  # the device input ended (idle_stop): the definitions end too
    source = GatewaySource(
        mqtt_url,
        edge.gateway_id,
        topics,
        acks,
        base=settings.mqtt_base,
        batch_size=edge.batch_size,
        idle_stop=idle,
        ended=ended,
    )
    inputs = [op.input("mqtt", flow, source)]
    if edge.definitions:
        definitions = DefinitionSource(bootstrap, kafka.edge_definitions, edge.gateway_id, ended)
        inputs.append(op.input("definitions", flow, definitions))
    merged = op.merge("inputs", *inputs) if len(inputs) > 1 else inputs[0]
    keyed = op.key_on("key", merged, lambda _item: "gateway")
    out = op.key_rm("outputs", op.stateful_batch("edge", keyed, logic))
    op.output("gateway", out, GatewaySink(mqtt_url, edge.gateway_id, buffer, uplink, acks))
    release_memory()  # what start-up freed
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        return build_flow()
    raise AttributeError(name)
