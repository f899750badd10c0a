"""chaos: a seeded random mix of delivery faults for a set time; nothing lost, nothing run twice.

On a private Mosquitto and Tansu, two paths run side by side, each with the
real processes:

- telemetry: a paho publisher sends ``readings_per_s`` QoS 1 readings (each
  with a unique ``seq``) -> the ingest bridge (``python -m iotflow.cli
  bridge``) -> ``{prefix}.ingest`` -> the telemetry flow on Kafka ingest with
  a recovery store -> ``window_s`` windows (``lateness_s`` allowed lateness)
  on Kafka and DuckDB;
- commands: ``commands_per_s`` requests on ``{prefix}.commands.requests`` ->
  the orchestrator flow with a recovery store -> MQTT -> simulated devices
  with persistent sessions (``infra.simulator.Fleet``), in three fleets: HVAC
  units for the steady load, locks for forced redeliveries, lights that go
  offline.

For ``duration`` seconds, faults are injected at times drawn from ``seed``
(one per ``interval`` seconds on average, the kinds in a seeded shuffle, each
kind once before any repeats), so the same seed, duration, interval and
kinds give the same schedule, printed in ``params.schedule``:

==================  ============================================================
fault               what happens
==================  ============================================================
bridge_kill         SIGKILL of the ingest bridge, restarted on its session
flow_kill           SIGKILL of the telemetry flow, restarted on its recovery store
orchestrator_kill   SIGKILL of the orchestrator flow, restarted on its store
duplicate_request   one command request produced three times
redelivery          a lock takes a command and loses its link before the PUBACK:
                    the broker delivers it again (DUP)
link_drop           the HVAC fleet's TCP connection dies without a DISCONNECT
device_offline      the lights disconnect; one gets three commands, one of them
                    expiring 2 s later, during the outage; back after it expired
==================  ============================================================

Then everything settles: every command reaches a terminal state, the bridge
forwards all it was acknowledged, and the telemetry flow drains its input to
the end (closing every window). ``counts`` holds, per fault kind
(``{kind}.injected``, ...): readings lost (acknowledged to the publisher and
missing from Kafka ingest, or in ingest and missing from the DuckDB
aggregates), duplicates before de-duplication (ingest records, replayed
aggregate records, extra command requests and deliveries) and after it
(readings counted twice in the aggregates, aggregate windows beyond one per
key, commands run twice), commands executed twice and expired commands
executed, with totals (``readings_lost``, ``commands_executed_twice``,
``expired_executed``). The run fails (BenchError) unless lost, executed
twice and expired executed are all 0.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import yaml

from bench._commands import CommandWatch, producer
from bench._latency import tail_log
from bench.bridge_kill import BridgeProcess, SeqPublisher
from bench.harness import BenchError, Figure, Measured
from bench.recovery import TopicProgress
from bench.workload import private_stack
from connectors.bridge import ingest_topic
from connectors.dedupe import aggregate_key, dedupe_records
from connectors.kafka import ensure_topics, read_topic
from infra.flowproc import FlowProcess
from infra.simulator import Fleet, FleetConfig, FleetStats
from infra.stack import StackInfo
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

__all__ = [
    "COMPLETE_COUNTS",
    "DEFAULTS",
    "DESCRIPTION",
    "FAULTS",
    "FIGURES",
    "QUICK",
    "Fault",
    "fault_schedule",
    "run",
]

DESCRIPTION = (
    "a seeded random mix of faults (bridge/flow/orchestrator SIGKILL, duplicate requests, "
    "MQTT redelivery, dropped links, offline devices with expiring commands) for a set "
    "duration: readings lost, duplicates before/after de-dup, commands run twice"
)
FAULTS = (
    "bridge_kill",
    "flow_kill",
    "orchestrator_kill",
    "duplicate_request",
    "redelivery",
    "link_drop",
    "device_offline",
)
DEFAULTS: dict[str, Any] = {
    "duration": 60.0,  # seconds of fault injection
    "seed": 0,
    "interval": 6.0,  # mean seconds between faults
    "faults": ",".join(FAULTS),
    "readings_per_s": 200.0,
    "commands_per_s": 4.0,
    "window_s": 5.0,
    # A restarted telemetry flow replays readings seconds old while its watermark moved on
    # with the wall clock (Bytewax's event clock): the lateness must cover a restart.
    "lateness_s": 20.0,
    "settle_timeout_s": 180.0,
}
QUICK: dict[str, Any] = {"duration": 21.0, "interval": 3.0, "settle_timeout_s": 120.0}
FIGURES = {"chaos_s", "faults_injected", "settle_s"}
COMPLETE_COUNTS = ["readings_acked", "readings_in_ingest_deduped"]

TELEMETRY_FLOW = "dataflows.telemetry:flow"
ORCHESTRATOR_FLOW = "dataflows.orchestrator:flow"
# An in-flight command to an offline device is re-sent every ~2.2 s, up to 15 sends: it
# outlives an outage and an orchestrator restart together.
ORCHESTRATOR = {"ack_timeout": {"mqtt": "2s"}, "max_attempts": 15, "backoff": "200ms"}
SESSION_S = 600
DEVICES = {"hvac": 10, "lock": 2, "light": 3}
# the fleet whose device a fault picks (the HVAC units carry the steady load)
_TARGET = {"duplicate_request": "hvac", "redelivery": "lock", "device_offline": "light"}
TELEMETRY_DEVICES = 100
VALID_TTL_S = 120.0
EXPIRING_TTL_S = 2.0
# The broker rounds a message expiry up to whole seconds: lights stay away past that.
OFFLINE_PAST_EXPIRY_S = 2.0
COPIES = 3
_TERMINAL = ("done", "failed", "expired", "rejected")


@dataclass(frozen=True)
class Fault:
    """One planned fault: when (seconds into the chaos), which kind, its seeded choices."""

    at_s: float
    kind: str
    args: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> list[Any]:
        return [round(self.at_s, 3), self.kind, self.args]


def fault_schedule(
    seed: int, duration_s: float, interval_s: float, kinds: list[str]
) -> list[Fault]:
    """The faults of a run: ``duration_s // interval_s`` of them, the i-th at a seeded
    moment of the i-th interval, the kinds in seeded shuffles of ``kinds`` (each kind
    once before any repeats). Pure: the same arguments give the same schedule.

    Example::

        >>> [f.kind for f in fault_schedule(1, 9, 3, ["a", "b"])]
        ['b', 'a', 'b']
        >>> fault_schedule(1, 9, 3, ["a", "b"]) == fault_schedule(1, 9, 3, ["a", "b"])
        True
    """
    rng = random.Random(seed)
    count = int(duration_s // interval_s)
    order: list[str] = []
    while len(order) < count:
        block = list(kinds)
        rng.shuffle(block)
        order += block
    faults = []
    for i, kind in enumerate(order[:count]):
        at_s = (i + rng.uniform(0.1, 0.9)) * interval_s
        args: dict[str, int] = {}
        if kind in _TARGET:
            args["device"] = rng.randrange(DEVICES[_TARGET[kind]]) + 1
        if kind == "device_offline":
            args["expiring_position"] = rng.randrange(COPIES)
        faults.append(Fault(at_s, kind, args))
    return faults


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown or not kinds:
        what = f"unknown {', '.join(unknown)}" if unknown else "no fault named"
        msg = f"--faults {text!r}: {what}; give a comma list of {', '.join(FAULTS)}"
        raise BenchError(msg)
    return kinds


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


class _Telemetry:
    """Publisher -> bridge -> Kafka ingest -> telemetry flow (recovery store) -> DuckDB/Kafka."""

    def __init__(
        self,
        info: StackInfo,
        workdir: Path,
        readings: int,
        rate: float,
        window_s: float,
        lateness_s: float,
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.settings = Settings(
            _env_file=None,
            mqtt_url=info.mqtt_url,
            kafka_bootstrap=info.kafka_bootstrap,
            mqtt_base=f"ct{tag}",
            topic_prefix=f"ct{tag}",
            ingest="kafka",
            recovery_dir=workdir / "telemetry-store",
            duckdb=workdir / "telemetry.duckdb",
            window_s=window_s,
            lateness_s=lateness_s,
        )
        self.workdir = workdir
        self.bootstrap = info.kafka_bootstrap
        self.topics = KafkaTopics(self.settings.topic_prefix)
        self.ingest = ingest_topic(self.settings.topic_prefix)
        ensure_topics(self.bootstrap, [self.ingest, self.topics.aggregates, self.topics.deadletter])
        self._client_id = f"chaos-bridge-{tag}"
        self._logs = (workdir / f"telemetry-{i}.log" for i in itertools.count())
        self.bridge = self._start_bridge()
        self.flow = FlowProcess.start(
            TELEMETRY_FLOW, self.settings, log=next(self._logs), snapshot_s=1
        )
        self.progress = TopicProgress(self.bootstrap, self.ingest)
        self.publisher = SeqPublisher(
            info.mqtt_url, self.settings.mqtt_base, readings, TELEMETRY_DEVICES, rate
        )

    def _start_bridge(self) -> BridgeProcess:
        bridge = BridgeProcess(self.settings, self._client_id, next(self._logs), 1000)
        bridge.wait_online()
        return bridge

    def kill_bridge(self) -> None:
        self.bridge.kill()
        self.bridge = self._start_bridge()

    def kill_flow(self) -> None:
        if self.flow.popen.poll() is not None:
            msg = f"the telemetry flow had died by itself: {self.flow.error()}\n{tail_log(self.flow.log)}"
            raise BenchError(msg)
        self.flow.kill()
        self.flow = FlowProcess.start(
            TELEMETRY_FLOW, self.settings, log=next(self._logs), snapshot_s=1
        )

    def finish(self, deadline: float) -> dict[str, int]:
        """Let the bridge forward everything, drain the flow to the end; count what arrived."""
        self.publisher.join(max(1.0, deadline - time.monotonic()))
        if self.publisher.is_alive() or self.publisher.error is not None:
            raise BenchError(f"the reading publisher did not finish: {self.publisher.error}")
        acked = self.publisher.acked()
        while self.progress.total() < len(acked) and time.monotonic() < deadline:
            time.sleep(0.05)
        while True:
            seqs = Counter(
                json.loads(r.value)["seq"] for r in read_topic(self.bootstrap, self.ingest)
            )
            if acked <= set(seqs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if self.bridge.terminate() != 0:
            raise BenchError(f"the bridge did not stop cleanly; see {self.bridge.log}")
        # The live flow tails its input; a last run from the same store reads to the end,
        # closes every window and exits.
        self.flow.kill()
        drain = FlowProcess.start(
            TELEMETRY_FLOW,
            self.settings.model_copy(update={"ingest_until_end": True}),
            log=next(self._logs),
            snapshot_s=1,
        )
        code = drain.popen.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            raise BenchError(f"the draining telemetry flow exited {code}: {drain.error()}")
        con = duckdb.connect(str(self.settings.duckdb), read_only=True)
        try:
            counted, rows = con.execute(
                """SELECT coalesce(sum("count"), 0), count(*) FROM aggregates WHERE metric = 'seq'"""
            ).fetchone() or (0, 0)
        finally:
            con.close()
        records = read_topic(self.bootstrap, self.topics.aggregates, timeout_s=60)
        kept = dedupe_records(records, aggregate_key).kept
        windows = {aggregate_key(json.loads(r.value)) for r in kept}
        seq_windows = sum(1 for key in windows if key[1] == "seq")
        ingest_records = sum(seqs.values())
        return {
            "readings_acked": len(acked),
            "readings_in_ingest_deduped": len(acked & set(seqs)),
            "bridge_kill.readings_lost": len(acked - set(seqs)),
            "bridge_kill.duplicates_before_dedup": ingest_records - len(seqs),
            "bridge_kill.duplicates_after_dedup": max(0, int(counted) - len(seqs)),
            "flow_kill.readings_lost": max(0, ingest_records - int(counted)),
            "flow_kill.duplicates_before_dedup": len(records) - len(kept),
            "flow_kill.duplicates_after_dedup": len(kept) - len(windows),
            "flow_kill.windows_missing_on_kafka": max(0, int(rows) - seq_windows),
            "telemetry_deadletters": len(read_topic(self.bootstrap, self.topics.deadletter)),
        }

    def close(self) -> None:
        self.progress.close()
        self.bridge.kill()
        self.flow.kill()


class _Commands:
    """Requests -> orchestrator flow (recovery store) -> MQTT -> fleets with persistent sessions."""

    def __init__(self, info: StackInfo, workdir: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        config = workdir / "orchestrator.yaml"
        config.write_text(yaml.safe_dump(ORCHESTRATOR))
        self.settings = Settings(
            _env_file=None,
            mqtt_url=info.mqtt_url,
            kafka_bootstrap=info.kafka_bootstrap,
            mqtt_base=f"cc{tag}",
            topic_prefix=f"cc{tag}",
            mqtt_client_id=f"chaos-orchestrator-{tag}",
            recovery_dir=workdir / "orchestrator-store",
            duckdb=workdir / "orchestrator.duckdb",
            orchestrator=config,
        )
        topics = KafkaTopics(self.settings.topic_prefix)
        self.requests = topics.command_requests
        ensure_topics(
            info.kafka_bootstrap, [self.requests, topics.command_events, topics.deadletter]
        )
        self._logs = (workdir / f"orchestrator-{i}.log" for i in itertools.count())
        self.flow = self._start_flow()
        self.fleets = {
            kind: Fleet(
                FleetConfig(devices={kind: count}, base=self.settings.mqtt_base),
                info.mqtt_url,
                schedule_telemetry=False,
                session_expiry_s=SESSION_S,
                client_id=f"chaos-{kind}-{tag}",
            )
            for kind, count in DEVICES.items()
        }
        for fleet in self.fleets.values():
            fleet.start()
        self.watch = CommandWatch(self.settings)
        self._producer = producer(info.kafka_bootstrap)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.requested: set[str] = set()
        self.expiring: set[str] = set()
        self.affected: dict[str, set[str]] = {}
        self.extra_requests = 0
        self.reconnects = 0
        self.online_at: float | None = None
        self._stop = threading.Event()
        self._load: threading.Thread | None = None

    def _start_flow(self) -> FlowProcess:
        flow = FlowProcess.start(
            ORCHESTRATOR_FLOW, self.settings, log=next(self._logs), snapshot_s=1
        )
        try:
            flow.wait_online(90)
        except StackError as exc:
            flow.kill()
            raise BenchError(f"{exc}\n{tail_log(flow.log)}") from exc
        return flow

    def _command(self, device: str, name: str, params: dict[str, Any], ttl_s: float) -> dict:
        now = datetime.now(UTC)
        return {
            "command_id": f"chaos-{next(self._seq)}",
            "device_id": device,
            "name": name,
            "params": params,
            "issued_at": _iso(now),
            "expires_at": _iso(now + timedelta(seconds=ttl_s)),
        }

    def request(self, doc: dict[str, Any], copies: int = 1) -> str:
        value = json.dumps(doc).encode()
        with self._lock:
            self.requested.add(doc["command_id"])
            for _ in range(copies):
                self._producer.produce(self.requests, value, key=b"chaos")
            self._producer.flush(10)
        return doc["command_id"]

    def start_load(self, rate: float) -> None:
        def load() -> None:
            started = time.monotonic()
            for n in itertools.count():
                if self._stop.wait(max(0.0, started + n / rate - time.monotonic())):
                    return
                device = f"hvac-{n % DEVICES['hvac'] + 1:04d}"
                setpoint = 18.0 + n % 9
                self.request(
                    self._command(device, "set_temperature", {"setpoint": setpoint}, VALID_TTL_S)
                )

        self._load = threading.Thread(target=load, name="chaos-commands", daemon=True)
        self._load.start()

    def _live(self) -> set[str]:
        live = set()
        for command_id in self.watch.command_ids():
            if not any(k in _TERMINAL for k in self.watch.outcome(command_id).kinds):
                live.add(command_id)
        return live

    def _affect(self, kind: str, ids: set[str]) -> None:
        self.affected.setdefault(kind, set()).update(ids)

    def duplicate_request(self, device: int) -> None:
        doc = self._command(
            f"hvac-{device:04d}", "set_fan_speed", {"speed": device % 4}, VALID_TTL_S
        )
        self._affect("duplicate_request", {self.request(doc, copies=COPIES)})
        self.extra_requests += COPIES - 1

    def redelivery(self, device: int) -> None:
        self.fleets["lock"].drop_before_puback()
        name = ("unlock", "lock")[len(self.affected.get("redelivery", ())) % 2]
        self._affect(
            "redelivery", {self.request(self._command(f"lock-{device:04d}", name, {}, VALID_TTL_S))}
        )

    def link_drop(self) -> None:
        hvac = self.fleets["hvac"]
        self._affect("link_drop", {c for c in self._live() if c not in self.expiring})
        before = hvac.connections
        hvac.drop_link()
        deadline = time.monotonic() + 10
        while hvac.connections == before and time.monotonic() < deadline:
            time.sleep(0.02)
        self.reconnects += hvac.connections - before

    def orchestrator_kill(self) -> None:
        self._affect("orchestrator_kill", self._live())
        self.flow.kill()
        self.flow = self._start_flow()

    def device_offline(self, device: int, expiring_position: int) -> float:
        """Lights offline, three commands for one of them; returns when they may come back."""
        lights = self.fleets["light"]
        lights.go_offline()
        target = f"light-{device:04d}"
        docs = [
            self._command(target, "set_brightness", {"brightness": 10 + device}, VALID_TTL_S),
            self._command(target, "turn_on", {}, VALID_TTL_S),
        ]
        stale = self._command(target, "set_brightness", {"brightness": 90}, EXPIRING_TTL_S)
        docs.insert(expiring_position, stale)
        ids = {self.request(doc) for doc in docs}
        self.expiring.add(stale["command_id"])
        self._affect("device_offline", ids)
        back = time.monotonic() + EXPIRING_TTL_S + OFFLINE_PAST_EXPIRY_S
        self.online_at = max(self.online_at or back, back)
        return self.online_at

    def lights_back(self) -> None:
        if self.online_at is not None and time.monotonic() >= self.online_at:
            self.fleets["light"].go_online()
            self.online_at = None

    def finish(self, deadline: float) -> dict[str, int]:
        """Stop the load, wait for every command's end; count deliveries, runs and outcomes."""
        self._stop.set()
        if self._load is not None:
            self._load.join()
        while self.online_at is not None and time.monotonic() < deadline:
            self.lights_back()
            time.sleep(0.05)
        while True:
            ends = {c: self._end(c) for c in self.requested}
            unfinished = sorted(c for c, end in ends.items() if end is None)
            if not unfinished:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{len(unfinished)} commands never finished: {unfinished[:10]}")
            time.sleep(0.2)
        stats = [fleet.stop() for fleet in self.fleets.values()]
        self.flow.stop()
        return self._counts(ends, stats)

    def _end(self, command_id: str) -> str | None:
        return next((k for k in self.watch.outcome(command_id).kinds if k in _TERMINAL), None)

    def _counts(self, ends: dict[str, str | None], stats: list[FleetStats]) -> dict[str, int]:
        runs: Counter[str] = Counter()
        deliveries: Counter[str] = Counter()
        for fleet in stats:
            for device in fleet.devices.values():
                runs.update(device.runs)
                deliveries.update(device.deliveries)

        def twice(ids: set[str]) -> int:
            return sum(max(0, runs[c] - 1) for c in ids)

        def extra_deliveries(ids: set[str]) -> int:
            return sum(max(0, deliveries[c] - 1) for c in ids)

        expired = {c for c, end in ends.items() if end == "expired"}
        offline = self.affected.get("device_offline", set())
        valid_offline = offline - self.expiring
        outcomes = Counter(end for end in ends.values())
        counts = {
            "commands_requested": len(self.requested),
            "commands_done": outcomes["done"],
            "commands_failed": outcomes["failed"],
            "commands_expired": outcomes["expired"],
            "commands_rejected": outcomes["rejected"],
            "commands_executed_twice": sum(n - 1 for n in runs.values() if n > 1),
            "expired_executed": sum(1 for c in expired if runs[c]),
            "redeliveries": sum(fleet.redeliveries for fleet in stats),
            "duplicate_request.duplicates_before_dedup": self.extra_requests,
            "redelivery.duplicates_before_dedup": extra_deliveries(
                self.affected.get("redelivery", set())
            ),
            "link_drop.reconnects": self.reconnects,
            "device_offline.commands_expiring": len(self.expiring),
            "device_offline.expiring_audited_expired": len(self.expiring & expired),
            "device_offline.expiring_delivered": sum(1 for c in self.expiring if deliveries[c]),
            "device_offline.expired_executed": sum(1 for c in self.expiring if runs[c]),
            "device_offline.valid_executed": sum(1 for c in valid_offline if runs[c]),
            "device_offline.duplicates_before_dedup": extra_deliveries(valid_offline),
        }
        for kind in ("link_drop", "orchestrator_kill"):
            counts[f"{kind}.duplicates_before_dedup"] = extra_deliveries(
                self.affected.get(kind, set())
            )
        for kind in (
            "duplicate_request",
            "redelivery",
            "link_drop",
            "orchestrator_kill",
            "device_offline",
        ):
            counts[f"{kind}.commands_affected"] = len(self.affected.get(kind, set()))
            counts[f"{kind}.executed_twice"] = twice(self.affected.get(kind, set()))
            counts[f"{kind}.duplicates_after_dedup"] = counts[f"{kind}.executed_twice"]
        return counts

    def close(self) -> None:
        self._stop.set()
        for fleet in self.fleets.values():
            fleet.stop()
        self.watch.close()
        self.flow.kill()


def _inject(
    schedule: list[Fault],
    duration_s: float,
    telemetry: _Telemetry,
    commands: _Commands,
    log: Callable[[str], None],
) -> tuple[Counter[str], float]:
    """Run the schedule from now, for ``duration_s`` at least; (faults per kind, seconds taken)."""
    actions: dict[str, Callable[..., Any]] = {
        "bridge_kill": telemetry.kill_bridge,
        "flow_kill": telemetry.kill_flow,
        "orchestrator_kill": commands.orchestrator_kill,
        "duplicate_request": commands.duplicate_request,
        "redelivery": commands.redelivery,
        "link_drop": commands.link_drop,
        "device_offline": commands.device_offline,
    }
    injected: Counter[str] = Counter()
    started = time.monotonic()
    queue = [(started + f.at_s, i, f) for i, f in enumerate(schedule)]
    heapq.heapify(queue)
    # a fault that blocks (a flow restarting) delays the next ones; the order stays
    while queue or time.monotonic() < started + duration_s:
        commands.lights_back()
        due = queue[0][0] if queue else started + duration_s
        if time.monotonic() < due:
            time.sleep(min(0.05, due - time.monotonic()))
            continue
        if not queue:
            break
        _, _, fault = heapq.heappop(queue)
        log(
            f"{time.monotonic() - started:6.1f}s (planned {fault.at_s:.1f}s) {fault.kind} {fault.args}"
        )
        actions[fault.kind](**fault.args)
        injected[fault.kind] += 1
    return injected, time.monotonic() - started


def _stderr(line: str) -> None:
    print(f"chaos: {line}", file=sys.stderr, flush=True)


def run(params: dict[str, Any], log: Callable[[str], None] = _stderr) -> Measured:
    duration_s, interval_s = float(params["duration"]), float(params["interval"])
    if duration_s <= 0 or interval_s <= 0 or interval_s > duration_s:
        raise BenchError("need 0 < interval <= duration")
    kinds = _kinds(str(params["faults"]))
    schedule = fault_schedule(int(params["seed"]), duration_s, interval_s, kinds)
    readings = int(float(params["readings_per_s"]) * duration_s)
    with private_stack() as info, tempfile.TemporaryDirectory(prefix="iotflow-chaos-") as tmp:
        workdir = Path(tmp)
        telemetry = _Telemetry(
            info,
            workdir,
            readings,
            float(params["readings_per_s"]),
            float(params["window_s"]),
            float(params["lateness_s"]),
        )
        commands = _Commands(info, workdir)
        try:
            telemetry.publisher.start()
            commands.start_load(float(params["commands_per_s"]))
            injected, chaos_s = _inject(schedule, duration_s, telemetry, commands, log)
            settle_started = time.monotonic()
            deadline = settle_started + float(params["settle_timeout_s"])
            counts = {"sent": readings}
            counts |= commands.finish(deadline)
            counts |= telemetry.finish(deadline)
            settle_s = time.monotonic() - settle_started
        finally:
            commands.close()
            telemetry.close()
    for kind in FAULTS:
        counts[f"{kind}.injected"] = injected[kind]
    counts["readings_lost"] = (
        counts["bridge_kill.readings_lost"] + counts["flow_kill.readings_lost"]
    )
    counts["faults_injected"] = sum(injected.values())
    unsafe = {
        k: counts[k]
        for k in ("readings_lost", "commands_executed_twice", "expired_executed")
        if counts[k]
    }
    if unsafe:
        raise BenchError(f"chaos broke a guarantee: {unsafe}; counts {counts}")
    return Measured(
        figures={
            "chaos_s": Figure(round(chaos_s, 3), "s"),
            "faults_injected": Figure(sum(injected.values()), "faults"),
            "settle_s": Figure(round(settle_s, 3), "s"),
        },
        counts=dict(sorted(counts.items())),
        resolved={"schedule": [f.to_json() for f in schedule]},
    )
