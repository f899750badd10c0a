"""bridge_kill: the ingest bridge killed with SIGKILL while QoS 1 readings flow; nothing acked is lost.

The bridge is a real subprocess, ``python -m iotflow.cli bridge`` (what
``iotflow bridge`` runs), on a private Mosquitto and Tansu. A paho publisher
sends ``messages`` readings at QoS 1, each with a unique ``seq``, and keeps
the ones the broker acknowledged (PUBACK). First a crash-free pass measures
the bridge's throughput: ``bridge_msgs_per_s`` is messages over the time from
the first publish (as fast as the publisher goes) to the last record on Kafka; ``publish_msgs_per_s``, to
the last PUBACK, shows when the publisher rather than the bridge is the bound. Then a second pass with a new
client id and topics: the publisher is paced at ``rate`` messages/s and the
bridge gets SIGKILL ``kills`` times spread over the publishing time, restarted each time on the same client id (the broker keeps
its persistent session and queues meanwhile).

Counted: ``acked_by_broker`` (the publisher's PUBACKs), ``missing_from_kafka``
(acknowledged to the publisher, absent from ``{prefix}.ingest``: must be 0),
``kafka_records`` and ``duplicates`` (records beyond one per seq: the price
of at least once). ``run_kill_scenario`` is what
``tests/connectors/test_bridge.py`` runs, smaller.

Then the killed pass's ingest topic, duplicates and all, goes through the
flows' Kafka ingest path (``bench.ingest_flow``: ``device_messages`` ->
decode -> count, one worker, to the topic's end), ``flow_runs`` times with
the de-duplication of redeliveries (``connectors.ingest.DedupedIngest``) and
without it, alternating. ``duplicates_after_dedupe`` (readings decoded beyond
one per seq) must be 0, else the run fails; ``duplicates_without_dedupe`` is
what the windows would have counted twice. Figures: the fastest run of each
(``ingest_flow_dedupe_msgs_per_s`` / ``ingest_flow_msgs_per_s``, input
records per second from the first counted batch to the last); the same two
inputs in process, without Kafka or decoding (``ingest_step_*``: a
``TestingSource`` of the clean pass's readings as unmarked ingest records,
best of ``step_repeats``); and ``dedupe_logic_us_per_msg``, the filter's own
work (digest and remember) per message in batches of 1,000. The in-process
figures are per CPU-second of this process (``time.process_time``), which
other processes sharing the cores disturb less than the wall clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from bench.harness import BenchError, Figure, Measured
from bench.ingest_flow import Counted, count_kafka_ingest
from bench.recovery import TopicProgress
from bench.workload import private_stack
from connectors.bridge import ingest_record, ingest_topic, topic_matcher, unwrap_records
from connectors.ingest import DedupedIngest, telemetry_filters
from connectors.kafka import read_topic
from connectors.mqtt import connect_client
from connectors.reading_dedupe import RedeliveryFilter
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

__all__ = [
    "COMPLETE_COUNTS",
    "DEFAULTS",
    "DESCRIPTION",
    "FIGURES",
    "QUICK",
    "BridgeProcess",
    "KillResult",
    "run",
    "run_kill_scenario",
]

DESCRIPTION = (
    "ingest bridge (MQTT QoS 1 -> Kafka, ack after delivery) killed with SIGKILL while "
    "readings flow: acked readings missing from Kafka, duplicates, throughput"
)
DEFAULTS: dict[str, Any] = {
    "messages": 100_000,
    "devices": 1000,
    "kills": 5,
    "max_in_flight": 1000,
    "rate": 4000.0,  # of the killed pass's publisher; the clean pass goes as fast as it can
    "timeout_s": 300.0,
    "flow_runs": 3,  # counting runs over the killed pass's ingest topic, with and without de-dup
    "step_repeats": 5,
}
QUICK: dict[str, Any] = {
    "messages": 5000,
    "devices": 100,
    "kills": 2,
    "rate": 1000.0,
    "timeout_s": 90.0,
    "flow_runs": 1,
    "step_repeats": 2,
}
FIGURES = {
    "bridge_msgs_per_s",
    "killed_pass_s",
    "ingest_flow_msgs_per_s",
    "ingest_flow_dedupe_msgs_per_s",
    "dedupe_logic_us_per_msg",
}
COMPLETE_COUNTS = ["in_kafka_clean", "in_kafka_killed", "readings_after_dedupe"]


class BridgeProcess:
    """``python -m iotflow.cli bridge`` as a subprocess; ``started`` waits for its online line."""

    def __init__(self, settings: Settings, client_id: str, log: Path, max_in_flight: int) -> None:
        env = {**os.environ, **settings.to_env()}
        argv = [
            sys.executable,
            "-m",
            "iotflow.cli",
            "bridge",
            "--client-id",
            client_id,
            "--max-in-flight",
            str(max_in_flight),
            "--stats-every",
            "1",
        ]
        self.log = log
        self._online = threading.Event()
        self._out = log.open("ab")
        self.popen = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self._out)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout or ():
            self._out.write(line)
            self._out.flush()
            if line.startswith(b"bridge online"):
                self._online.set()

    def wait_online(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._online.wait(0.1):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the bridge did not come online; see {self.log}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: a clean shutdown (flush, ack, disconnect)."""
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(
                f"the bridge ignored SIGTERM for {timeout_s}s; see {self.log}"
            ) from None


class SeqPublisher(threading.Thread):
    """Publishes ``messages`` numbered readings at QoS 1 in a thread; keeps what the broker PUBACKed.

    Reading ``seq`` (0, 1, ...) is ``{"seq": seq, "value": seq % 97}`` on the
    telemetry topic of device ``dev-{seq % devices:05d}`` under ``base``, so a
    reader can tell every reading apart and count what is missing or repeated.
    ``rate`` paces it (messages/s; 0: as fast as paho goes); at most 20,000
    PUBACKs are outstanding (MQTT packet ids are 16 bits). ``acked()`` is the
    seqs the broker acknowledged (what at-least-once delivery owes a reader);
    ``started_at``/``finished_at`` are ``time.monotonic()`` at the first
    publish and the last PUBACK. The thread never raises: a failure is kept in
    ``error`` for the caller to report after ``join()``. Used by the
    ``bridge_kill`` and ``chaos`` benchmarks.
    """

    def __init__(self, url: str, base: str, messages: int, devices: int, rate: float) -> None:
        super().__init__(daemon=True)
        topics = MqttTopics(base)
        self._topics = [topics.telemetry(f"dev-{d:05d}") for d in range(devices)]
        self._url, self._messages, self._rate = url, messages, rate
        self.infos: list[Any] = []
        self.started_at = 0.0
        self.finished_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = connect_client(self._url, f"pub-{uuid.uuid4().hex[:8]}")
            self.started_at = time.monotonic()
            devices = len(self._topics)
            for seq in range(self._messages):
                body = b'{"seq": %d, "value": %d}' % (seq, seq % 97)
                self.infos.append(client.publish(self._topics[seq % devices], body, qos=1))
                if seq >= 20_000:
                    # MQTT packet ids are 16 bits: keep well under 65,535 unacknowledged.
                    self.infos[seq - 20_000].wait_for_publish(120)
                if seq % 100 == 99:
                    # Pace to the rate, and yield either way: paho's network thread needs
                    # the GIL to keep the connection alive under a burst.
                    elapsed_s = time.monotonic() - self.started_at
                    ahead_s = (seq + 1) / self._rate - elapsed_s if self._rate else 0.0
                    time.sleep(max(0.0, ahead_s))
            for info in self.infos:
                info.wait_for_publish(120)
            self.finished_at = time.monotonic()
            client.disconnect()
            client.loop_stop()
        except BaseException as exc:  # reported by the scenario
            self.error = exc

    def acked(self) -> set[int]:
        return {seq for seq, info in enumerate(self.infos) if info.is_published()}

    def acked_count(self) -> int:
        return sum(1 for info in self.infos if info.is_published())


@dataclass
class KillResult:
    """What one pass found."""

    published: int
    acked_by_broker: int
    kafka_records: int
    missing_from_kafka: list[int]
    duplicates: int
    seconds: float
    publish_seconds: float
    kills: int
    clean_exit_code: int
    notes: list[str] = field(default_factory=list)


def _seqs_in_kafka(bootstrap: str, topic: str) -> tuple[Counter[int], int]:
    records = read_topic(bootstrap, topic, timeout_s=60)
    seqs: Counter[int] = Counter()
    for record in records:
        seqs[json.loads(record.value)["seq"]] += 1
    return seqs, len(records)


def run_kill_scenario(
    settings: Settings,
    workdir: Path,
    *,
    messages: int,
    devices: int = 100,
    kills: int = 5,
    max_in_flight: int = 1000,
    rate: float = 0.0,
    timeout_s: float = 300.0,
    log: Any = lambda _m: None,
) -> KillResult:
    """One pass: start the bridge, publish ``messages``, SIGKILL the bridge ``kills`` times
    (restarting it), then stop it with SIGTERM and compare Kafka with the PUBACKs.

    ``settings`` names the brokers and this pass's MQTT base and Kafka prefix.
    ``rate`` paces the publisher (messages/s; 0: as fast as it goes), and then
    the kills are spread over the publishing time, so every kill lands while
    readings flow.
    """
    deadline = time.monotonic() + timeout_s
    bootstrap = settings.require_kafka_bootstrap()
    topic = ingest_topic(settings.topic_prefix)
    client_id = f"bridge-{settings.topic_prefix}"
    notes: list[str] = []
    logs = iter(workdir / f"bridge-{settings.topic_prefix}-{i}.log" for i in range(kills + 2))
    bridge = BridgeProcess(settings, client_id, next(logs), max_in_flight)
    bridge.wait_online()
    publisher = SeqPublisher(
        settings.require_mqtt_url(), settings.mqtt_base, messages, devices, rate
    )
    publisher.start()
    progress = TopicProgress(bootstrap, topic)
    planned_s = messages / rate if rate else 0.0
    try:
        for k in range(kills):
            # Kill points spread over the publishing time (paced at ``rate``), or over the
            # bridge's progress on Kafka when unpaced. Each bridge lives a second at least:
            # its first Kafka delivery (the idempotent producer's id) takes most of one.
            earliest = time.monotonic() + 1.0
            mark = messages * (k + 1) // (kills + 1)
            at = publisher.started_at + planned_s * (k + 1) / (kills + 1)

            def due(mark: int = mark, at: float = at) -> bool:
                if rate:
                    return time.monotonic() >= at
                return progress.total() >= mark

            while not due() or time.monotonic() < earliest:
                if time.monotonic() > deadline:
                    raise BenchError(f"kill {k + 1} not reached within {timeout_s}s")
                time.sleep(0.01)
            bridge.kill()
            notes.append(
                f"kill {k + 1} with {publisher.acked_count()} PUBACKed, {progress.total()} on Kafka"
            )
            log(notes[-1])
            time.sleep(0.2)
            bridge = BridgeProcess(settings, client_id, next(logs), max_in_flight)
            bridge.wait_online()
        publisher.join(max(1.0, deadline - time.monotonic()))
        if publisher.error is not None:
            raise BenchError(f"the publisher failed: {publisher.error}")
        acked = publisher.acked()
        # Wait until Kafka holds as many records as were acknowledged (counted as they
        # arrive), then check every seq by reading it all; read again until the deadline.
        while progress.total() < len(acked) and time.monotonic() < deadline:
            time.sleep(0.01)
        seconds = time.monotonic() - publisher.started_at
        while True:
            seqs, records = _seqs_in_kafka(bootstrap, topic)
            missing = sorted(acked - set(seqs))
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        code = bridge.terminate()
    finally:
        progress.close()
        bridge.kill()
    return KillResult(
        published=messages,
        acked_by_broker=len(acked),
        kafka_records=records,
        missing_from_kafka=missing,
        duplicates=records - len(seqs),
        seconds=seconds,
        publish_seconds=publisher.finished_at - publisher.started_at,
        kills=kills,
        clean_exit_code=code,
        notes=notes,
    )


def _as_ingest_records(settings: Settings, messages: int, devices: int) -> list[Any]:
    """The publisher's readings as the bridge writes them (unmarked, with a delivery), as
    Bytewax hands Kafka records to a flow."""
    topics = MqttTopics(settings.mqtt_base)
    names = [topics.telemetry(f"dev-{d:05d}") for d in range(devices)]
    out = []
    for seq in range(messages):
        body = b'{"seq": %d, "value": %d}' % (seq, seq % 97)
        key, value, headers = ingest_record(
            names[seq % devices],
            body,
            1_767_225_600_000 + seq,
            delivery=b"bench-bridge/%d" % (seq % 65535 + 1),
        )
        out.append(KafkaSourceMessage(key, value, headers=headers, timestamp=(1, 0)))
    return out


def _step_seconds(records: list[Any], settings: Settings, dedupe: bool) -> float:
    """CPU seconds for a Bytewax flow (one worker, in process) to turn ``records`` into
    device message batches, read through the de-duplicating input or unwrapped plainly."""
    accept = topic_matcher(telemetry_filters(settings))
    flow = Dataflow("bench_ingest_step")
    source = TestingSource(records, batch_size=1000)
    if dedupe:
        deduped = DedupedIngest(source, accept, settings.ingest_dedupe_records)
        batches = op.input("in", flow, deduped)
    else:
        stream = op.input("in", flow, source)
        batches = op.flat_map_batch("unwrap", stream, lambda b: [unwrap_records(b, accept)])
    out: list[Any] = []
    op.output("out", op.map("count", batches, lambda b: len(b.messages)), TestingSink(out))
    started = time.process_time()
    run_main(flow)
    seconds = time.process_time() - started
    if sum(out) != len(records):
        raise BenchError(f"the ingest step passed {sum(out)} of {len(records)} unique readings")
    return seconds


def _logic_us_per_msg(records: list[Any], settings: Settings, repeats: int) -> float:
    """The filter's own work per message (digest, remember), batches of 1,000; best run,
    in CPU time."""
    accept = topic_matcher(telemetry_filters(settings))
    batches = [unwrap_records(records[i : i + 1000], accept) for i in range(0, len(records), 1000)]
    best = float("inf")
    for _ in range(repeats):
        f = RedeliveryFilter(settings.ingest_dedupe_records)
        started = time.process_time()
        for batch in batches:
            f.keep(batch.messages, batch.redelivered)
        best = min(best, time.process_time() - started)
    return best / len(records) * 1e6


def _through_ingest(
    settings: Settings, workdir: Path, runs: int, timeout_s: float
) -> tuple[Counted, Counted]:
    """The ingest topic of ``settings`` counted through the Kafka ingest path with the
    de-duplication and without, ``runs`` times each, alternating: the fastest of each."""
    best: dict[str, Counted] = {}
    for i in range(runs):
        for name, remembered in (("dedupe", settings.ingest_dedupe_records), ("plain", 0)):
            variant = settings.model_copy(update={"ingest_dedupe_records": remembered})
            try:
                counted = count_kafka_ingest(variant, workdir / f"count-{name}-{i}.log", timeout_s)
            except StackError as exc:
                raise BenchError(str(exc)) from exc
            if name not in best or counted.seconds < best[name].seconds:
                best[name] = counted
    return best["dedupe"], best["plain"]


def run(params: dict[str, Any]) -> Measured:
    for name in ("messages", "devices", "max_in_flight", "flow_runs", "step_repeats"):
        if int(params[name]) < 1:
            raise BenchError(f"{name}={params[name]} must be at least 1")
    if int(params["kills"]) < 0:
        raise BenchError("kills must be 0 or more")
    import tempfile

    with private_stack() as info, tempfile.TemporaryDirectory(prefix="iotflow-bridge-") as tmp:
        base = Settings(
            _env_file=None, mqtt_url=info.mqtt_url, kafka_bootstrap=info.kafka_bootstrap
        )
        passes = {}
        for name, kills in (("clean", 0), ("killed", int(params["kills"]))):
            tag = f"b{name[0]}{uuid.uuid4().hex[:8]}"
            pass_settings = base.model_copy(update={"topic_prefix": tag, "mqtt_base": tag})
            passes[name] = run_kill_scenario(
                pass_settings,
                Path(tmp),
                messages=int(params["messages"]),
                devices=int(params["devices"]),
                kills=kills,
                max_in_flight=int(params["max_in_flight"]),
                rate=float(params["rate"]) if kills else 0.0,
                timeout_s=float(params["timeout_s"]),
            )
        # pass_settings is the killed pass's now: its ingest topic holds the duplicates.
        deduped, plain = _through_ingest(
            pass_settings, Path(tmp), int(params["flow_runs"]), float(params["timeout_s"])
        )
    records = _as_ingest_records(base, int(params["messages"]), int(params["devices"]))
    step_s = {"dedupe": float("inf"), "plain": float("inf")}
    for _ in range(int(params["step_repeats"])):
        for name in step_s:
            step_s[name] = min(step_s[name], _step_seconds(records, base, name == "dedupe"))
    logic_us = _logic_us_per_msg(records, base, int(params["step_repeats"]))
    clean, killed = passes["clean"], passes["killed"]
    unique_killed = killed.kafka_records - killed.duplicates
    counts = {
        "sent": int(params["messages"]),
        "acked_by_broker_clean": clean.acked_by_broker,
        "in_kafka_clean": clean.acked_by_broker - len(clean.missing_from_kafka),
        "acked_by_broker_killed": killed.acked_by_broker,
        "in_kafka_killed": killed.acked_by_broker - len(killed.missing_from_kafka),
        "missing_from_kafka": len(killed.missing_from_kafka) + len(clean.missing_from_kafka),
        "kafka_records_killed": killed.kafka_records,
        "duplicates_killed": killed.duplicates,
        "duplicates_clean": clean.duplicates,
        "kills": killed.kills,
        # Through the flows' Kafka ingest path; readings_after_dedupe must equal sent.
        "readings_after_dedupe": deduped.readings,
        "duplicates_after_dedupe": deduped.readings - unique_killed,
        "duplicates_without_dedupe": plain.readings - unique_killed,
        "dead_letters_through_ingest": deduped.dead + plain.dead,
    }
    if counts["missing_from_kafka"]:
        raise BenchError(f"acknowledged readings missing from Kafka: {counts}")
    if counts["duplicates_after_dedupe"] or counts["dead_letters_through_ingest"]:
        raise BenchError(f"the Kafka ingest path let duplicates or dead letters through: {counts}")
    for p in passes.values():
        if p.clean_exit_code != 0:
            raise BenchError(f"the bridge exited {p.clean_exit_code} on SIGTERM")
    return Measured(
        figures={
            "bridge_msgs_per_s": Figure(round(clean.acked_by_broker / clean.seconds, 1), "msgs/s"),
            "publish_msgs_per_s": Figure(
                round(clean.acked_by_broker / clean.publish_seconds, 1), "msgs/s"
            ),
            "clean_pass_s": Figure(round(clean.seconds, 3), "s"),
            "killed_pass_s": Figure(round(killed.seconds, 3), "s"),
            "ingest_flow_msgs_per_s": Figure(round(plain.rate(killed.kafka_records), 1), "msgs/s"),
            "ingest_flow_dedupe_msgs_per_s": Figure(
                round(deduped.rate(killed.kafka_records), 1), "msgs/s"
            ),
            "ingest_step_msgs_per_cpu_s": Figure(
                round(len(records) / step_s["plain"], 1), "msgs/cpu-s"
            ),
            "ingest_step_dedupe_msgs_per_cpu_s": Figure(
                round(len(records) / step_s["dedupe"], 1), "msgs/cpu-s"
            ),
            "dedupe_logic_us_per_msg": Figure(round(logic_us, 3), "us/msg (CPU)"),
        },
        counts=counts,
    )
