"""recovery: the telemetry flow killed with SIGKILL and resumed from its recovery store.

The workload: ``readings`` readings from ``devices`` devices, each device
counting its own readings in a metric ``seq`` (0, 1, 2, ...) and sending a
second metric ``value``, one reading per device per second of event time,
written straight to the Kafka ingest topic in the layout the ingest bridge
writes (``connectors.bridge.ingest_record``). The same records go to two
prefixes: one for a crash-free run, one for the run that gets killed.

Both runs are the real flow, ``python -m bytewax.run dataflows.telemetry:flow``
with ``IOTFLOW_INGEST=kafka``, ``IOTFLOW_INGEST_UNTIL_END=1`` and a recovery
store (``-r DIR -s snapshot_s -b 0``), one worker. The killed run gets
SIGKILL ``kills`` times: the first within a second of its start, one once
the aggregates topic shows closed windows while later windows still wait to
close, the rest as its output grows; after each kill it restarts on the same
store. The last start runs to the end of the input.

Checked, and reported in ``counts``: readings lost (``seq`` readings the
final DuckDB ``aggregates`` do not count: must be 0), DuckDB of the killed
run equal row for row to the crash-free one (``duckdb_rows_differing``: must
be 0), the Kafka aggregates topic of the killed run before de-duplication
(``kafka_aggregates_raw``) and after (``kafka_aggregates_deduped``, by
``connectors.dedupe.aggregate_key``) equal to the crash-free topic
(``kafka_aggregates_differing``: must be 0), and no late or rejected reading.
Figures: the recovery time of each restart (from starting the process to its
first new output on Kafka), mean and max, and the wall time of both runs.
``run_scenario`` is what ``tests/dataflows/test_recovery.py`` runs, smaller.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from bench.harness import BenchError, Figure, Measured
from bench.workload import T0_MS, private_stack
from connectors.bridge import ingest_record, ingest_topic
from connectors.dedupe import aggregate_key, dedupe_records
from connectors.kafka import ensure_topics, producer_config, read_topic
from infra.flowproc import FlowProcess
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics

__all__ = [
    "COMPLETE_COUNTS",
    "DEFAULTS",
    "DESCRIPTION",
    "FIGURES",
    "QUICK",
    "ScenarioResult",
    "TopicProgress",
    "run",
    "run_scenario",
    "write_readings",
]

DESCRIPTION = (
    "telemetry flow on Kafka ingest killed with SIGKILL and resumed from its recovery "
    "store: readings lost, duplicates before/after de-dup, recovery time"
)
DEFAULTS: dict[str, Any] = {
    "devices": 1000,
    "readings": 200_000,
    "kills": 5,
    "window_s": 10.0,
    # Generous on purpose: the watermark is per shard of devices, and right after a (re)start
    # one Kafka partition can run a few thousand records ahead of the others.
    "lateness_s": 60.0,
    "snapshot_s": 1,
    "timeout_s": 300.0,
}
QUICK: dict[str, Any] = {
    "readings": 50_000,
    "kills": 2,
    "window_s": 5.0,
    "lateness_s": 25.0,
    "timeout_s": 100.0,
}
FIGURES = {"recovery_s_mean", "recovery_s_max", "clean_run_s", "killed_run_s"}
COMPLETE_COUNTS = [
    "duckdb_readings_clean",
    "duckdb_readings_recovered",
    "kafka_readings_recovered_deduped",
]

RECEIVE_DELAY_MS = 20
FLOW = "dataflows.telemetry:flow"


def reading_payload(device: int, seq: int) -> tuple[int, bytes]:
    """(ts_ms, payload) of a device's ``seq``-th reading."""
    ts_ms = T0_MS + seq * 1000 + device % 1000
    value = (device * 31 + seq * 7) % 1000 / 7
    return ts_ms, b'{"ts": %d, "seq": %d, "value": %.6f}' % (ts_ms, seq, value)


def write_readings(
    bootstrap: str, prefixes: list[str], devices: int, readings: int, base: str = "iotflow"
) -> None:
    """``readings`` readings of ``devices`` devices (MQTT topics under ``base``) onto
    ``{prefix}.ingest`` of each prefix, in event-time order."""
    topics = [ingest_topic(p) for p in prefixes]
    ensure_topics(bootstrap, topics)
    producer = Producer({**producer_config(bootstrap), "linger.ms": 50})
    mqtt = MqttTopics(base)
    names = [mqtt.telemetry(f"dev-{d:05d}") for d in range(devices)]
    for k in range(readings):
        device, seq = k % devices, k // devices
        ts_ms, body = reading_payload(device, seq)
        key, value, headers = ingest_record(names[device], body, ts_ms + RECEIVE_DELAY_MS)
        for topic in topics:
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.05)
    if producer.flush(60):
        raise BenchError("the workload was not all written to Kafka within 60 s")


class TopicProgress:
    """Counts a topic's records as they arrive, by reading it in a background thread.

    Not from high watermarks: Tansu reports the start of a topic's last record batch
    as its end, which lags by a whole producer batch.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"progress-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
            }
        )
        self._topic = topic
        self._count = 0
        self.error: KafkaException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assigned = False
        while not self._stop.is_set():
            try:
                if not assigned:
                    topics = self._consumer.list_topics(self._topic, timeout=5).topics
                    meta = topics.get(self._topic)
                    if meta is None or meta.error is not None or not meta.partitions:
                        time.sleep(0.1)
                        continue
                    self._consumer.assign(
                        [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in meta.partitions]
                    )
                    assigned = True
                batch = self._consumer.consume(10_000, 0.05)
            except KafkaException as exc:  # a busy broker: keep counting once it answers
                self.error = exc
                time.sleep(0.1)
                continue
            self._count += sum(1 for m in batch if not m.error())

    def total(self) -> int:
        """Records seen so far (a moment behind the broker)."""
        return self._count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


@dataclass
class ScenarioResult:
    """What a kill-and-resume scenario measured and found."""

    sent: int
    clean_run_s: float
    killed_run_s: float
    recovery_s: list[float]
    kill_notes: list[str]
    kills_with_open_windows: int
    duckdb_clean: dict[tuple, tuple]
    duckdb_recovered: dict[tuple, tuple]
    kafka_clean: dict[tuple, dict]
    kafka_recovered: dict[tuple, dict]
    kafka_aggregates_raw: int
    kafka_aggregates_deduped: int
    kafka_duplicates_clean: int
    deadletters_clean: int
    deadletters_recovered: int
    logs: list[Path] = field(default_factory=list)

    def readings(self, rows: dict[tuple, tuple]) -> int:
        """``seq`` readings counted by aggregates rows (values: window_end, count, ...)."""
        return sum(v[1] for k, v in rows.items() if k[1] == "seq")

    def kafka_readings(self, rows: dict[tuple, dict]) -> int:
        return sum(v["count"] for k, v in rows.items() if k[1] == "seq")

    def counts(self) -> dict[str, int]:
        differing_db = set(self.duckdb_clean.items()) ^ set(self.duckdb_recovered.items())
        differing_kafka = {
            k
            for k in set(self.kafka_clean) | set(self.kafka_recovered)
            if self.kafka_clean.get(k) != self.kafka_recovered.get(k)
        }
        recovered = self.readings(self.duckdb_recovered)
        return {
            "sent": self.sent,
            "kills": len(self.kill_notes),
            "kills_with_open_windows": self.kills_with_open_windows,
            "duckdb_readings_clean": self.readings(self.duckdb_clean),
            "duckdb_readings_recovered": recovered,
            "readings_lost": self.sent - recovered,
            "duckdb_rows": len(self.duckdb_recovered),
            "duckdb_rows_differing": len(differing_db),
            "kafka_aggregates_raw": self.kafka_aggregates_raw,
            "kafka_aggregates_deduped": self.kafka_aggregates_deduped,
            "kafka_duplicates_dropped": self.kafka_aggregates_raw - self.kafka_aggregates_deduped,
            "kafka_duplicates_clean_run": self.kafka_duplicates_clean,
            "kafka_aggregates_differing": len(differing_kafka),
            "kafka_readings_recovered_deduped": self.kafka_readings(self.kafka_recovered),
            "deadletters_clean": self.deadletters_clean,
            "deadletters_recovered": self.deadletters_recovered,
        }


def _duckdb_rows(path: Path) -> dict[tuple, tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT key, metric, epoch_ms(window_start), epoch_ms(window_end), "
            "count, sum, avg, min, max FROM aggregates"
        ).fetchall()
    finally:
        con.close()
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in rows}


def _kafka_aggregates(bootstrap: str, topic: str) -> tuple[dict[tuple, dict], int, int]:
    """(first record per natural key, raw record count, deduped count)."""
    records = read_topic(bootstrap, topic, timeout_s=60)
    result = dedupe_records(records, aggregate_key)
    if result.unkeyed:
        raise BenchError(f"{result.unkeyed} records on {topic} have no natural key")
    by_key: dict[tuple, dict] = {}
    for record in result.kept:
        doc = json.loads(record.value)
        by_key[aggregate_key(doc)] = doc
    return by_key, len(records), len(result.kept)


def _wait_exit(proc: FlowProcess, deadline: float) -> None:
    code = proc.popen.wait(max(1.0, deadline - time.monotonic()))
    if code != 0:
        raise BenchError(f"flow exited with {code}: {proc.error() or ''} (see {proc.log})")


def run_scenario(
    settings: Settings,
    workdir: Path,
    *,
    devices: int,
    readings: int,
    kills: int = 5,
    snapshot_s: int = 1,
    timeout_s: float = 300.0,
    log: Callable[[str], None] = lambda _m: None,
) -> ScenarioResult:
    """Write the workload, run it crash-free, then killed ``kills`` times; compare.

    ``settings`` names the brokers and the window; prefixes, DuckDB files and
    recovery stores are made under ``workdir``. Raises ``BenchError`` when a
    run fails or times out; the comparison itself is returned, not judged.
    """
    if devices < 1 or readings < devices or kills < 1 or snapshot_s < 1:
        raise BenchError("need devices >= 1, readings >= devices, kills >= 1, snapshot_s >= 1")
    deadline = time.monotonic() + timeout_s
    bootstrap = settings.require_kafka_bootstrap()
    tag = uuid.uuid4().hex[:8]
    clean_prefix, killed_prefix = f"rc{tag}", f"rk{tag}"

    def flow_settings(prefix: str) -> Settings:
        return settings.model_copy(
            update={
                "topic_prefix": prefix,
                "ingest": "kafka",
                "ingest_until_end": True,
                "recovery_dir": workdir / f"{prefix}-store",
                "duckdb": workdir / f"{prefix}.duckdb",
                "max_future_skew_s": 1e10,
            }
        )

    started = time.monotonic()
    write_readings(bootstrap, [clean_prefix, killed_prefix], devices, readings, settings.mqtt_base)
    log(f"wrote {readings} readings twice in {time.monotonic() - started:.1f}s")
    logs: list[Path] = []

    clean = flow_settings(clean_prefix)
    started = time.monotonic()
    logs.append(workdir / "clean.log")
    proc = FlowProcess.start(FLOW, clean, log=logs[-1], snapshot_s=snapshot_s)
    try:
        _wait_exit(proc, deadline)
    finally:
        proc.kill()
    clean_run_s = time.monotonic() - started
    log(f"crash-free run: {clean_run_s:.1f}s")

    killed = flow_settings(killed_prefix)
    topics = KafkaTopics(killed_prefix)
    output = TopicProgress(bootstrap, topics.telemetry)
    closed = TopicProgress(bootstrap, topics.aggregates)
    recovery_s: list[float] = []
    notes: list[str] = []
    open_window_kills = 0
    # Kill points: 0.7 s after the first start; then at growing shares of the killed run's
    # output so far (telemetry records, duplicates included); the last once the aggregates
    # topic shows closed windows while later windows still wait to close.
    middle = max(0, kills - 2)
    marks = [0.2 + 0.4 * i / max(1, middle - 1) for i in range(middle)]
    started = time.monotonic()
    try:
        for attempt in range(kills + 1):
            before = output.total()
            logs.append(workdir / f"killed-{attempt}.log")
            run_started = time.monotonic()
            proc = FlowProcess.start(FLOW, killed, log=logs[-1], snapshot_s=snapshot_s)
            try:
                if attempt > 0:
                    first_output = _watch(proc, output, before, deadline)
                    if first_output is not None:
                        recovery_s.append(first_output - run_started)
                if attempt == kills:
                    _wait_exit(proc, deadline)
                    break
                if attempt == 0:
                    target: Callable[[], bool] = lambda t0=run_started: time.monotonic() - t0 >= 0.7  # noqa: E731
                elif attempt == kills - 1:
                    target = lambda: closed.total() > 0  # noqa: E731
                else:
                    mark = int(marks[attempt - 1] * readings)
                    target = lambda m=mark: output.total() >= m  # noqa: E731
                while not target():
                    if proc.popen.poll() is not None:
                        raise BenchError(
                            f"the flow ended before kill {attempt + 1} "
                            f"(exit {proc.popen.returncode}, output seen {output.total()}, "
                            f"last counting error {output.error}); make the workload larger"
                        )
                    if time.monotonic() > deadline:
                        raise BenchError(f"kill {attempt + 1} not reached within {timeout_s}s")
                    time.sleep(0.02)
                proc.kill()
                windows_closed = closed.total()
                if windows_closed > 0:
                    open_window_kills += 1
                notes.append(
                    f"kill {attempt + 1} at {time.monotonic() - run_started:.2f}s into its run, "
                    f"telemetry out {output.total()}, aggregates out {windows_closed}"
                )
                log(notes[-1])
            finally:
                proc.kill()
    finally:
        output.close()
        closed.close()
    killed_run_s = time.monotonic() - started
    log(f"killed run: {killed_run_s:.1f}s, recovery times {[round(r, 2) for r in recovery_s]}")

    kafka_clean, clean_raw, clean_deduped = _kafka_aggregates(
        bootstrap, KafkaTopics(clean_prefix).aggregates
    )
    kafka_killed, raw, deduped = _kafka_aggregates(bootstrap, topics.aggregates)
    return ScenarioResult(
        sent=readings,
        clean_run_s=clean_run_s,
        killed_run_s=killed_run_s,
        recovery_s=recovery_s,
        kill_notes=notes,
        kills_with_open_windows=open_window_kills,
        duckdb_clean=_duckdb_rows(clean.duckdb),
        duckdb_recovered=_duckdb_rows(killed.duckdb),
        kafka_clean=kafka_clean,
        kafka_recovered=kafka_killed,
        kafka_aggregates_raw=raw,
        kafka_aggregates_deduped=deduped,
        kafka_duplicates_clean=clean_raw - clean_deduped,
        deadletters_clean=len(read_topic(bootstrap, KafkaTopics(clean_prefix).deadletter)),
        deadletters_recovered=len(read_topic(bootstrap, topics.deadletter)),
        logs=logs,
    )


def _watch(proc: FlowProcess, output: TopicProgress, before: int, deadline: float) -> float | None:
    """Wait for the first output past ``before``; its time, or None if the flow ended first."""
    while time.monotonic() < deadline:
        if output.total() > before:
            return time.monotonic()
        if proc.popen.poll() is not None:
            return None
        time.sleep(0.02)
    raise BenchError(f"no output from the restarted flow (see {proc.log})")


def _check_params(params: dict[str, Any]) -> None:
    for name in ("devices", "readings", "kills", "snapshot_s"):
        if int(params[name]) < 1:
            raise BenchError(f"{name}={params[name]} must be at least 1")
    if int(params["readings"]) < int(params["devices"]):
        raise BenchError("readings must be at least devices (one reading per device)")


def run(params: dict[str, Any]) -> Measured:
    _check_params(params)
    with private_stack() as info:
        workdir = Path(tempfile.mkdtemp(prefix="iotflow-recovery-"))
        # Kept when the run fails: its flow logs are what explains it.
        settings = Settings(
            _env_file=None,
            mqtt_url=info.mqtt_url,
            kafka_bootstrap=info.kafka_bootstrap,
            window_s=float(params["window_s"]),
            lateness_s=float(params["lateness_s"]),
        )
        result = run_scenario(
            settings,
            workdir,
            devices=int(params["devices"]),
            readings=int(params["readings"]),
            kills=int(params["kills"]),
            snapshot_s=int(params["snapshot_s"]),
            timeout_s=float(params["timeout_s"]),
        )
    counts = result.counts()
    wrong = {
        k: counts[k]
        for k in (
            "readings_lost",
            "duckdb_rows_differing",
            "kafka_aggregates_differing",
            "deadletters_recovered",
        )
        if counts[k] != 0
    }
    if not wrong:
        shutil.rmtree(workdir, ignore_errors=True)
    if wrong:
        raise BenchError(f"recovery was not exact: {wrong}; notes: {result.kill_notes}")
    if not result.recovery_s:
        raise BenchError("no restart produced output: no recovery time measured")
    return Measured(
        figures={
            "recovery_s_mean": Figure(round(statistics.mean(result.recovery_s), 3), "s"),
            "recovery_s_max": Figure(round(max(result.recovery_s), 3), "s"),
            "clean_run_s": Figure(round(result.clean_run_s, 3), "s"),
            "killed_run_s": Figure(round(result.killed_run_s, 3), "s"),
        },
        counts=counts,
    )
