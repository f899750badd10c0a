"""Nothing lost and nothing duplicated end to end: the ingest bridge killed with SIGKILL
while readings flow into a live telemetry flow on Kafka ingest, itself killed once and
resumed from its recovery store; its DuckDB aggregates count every reading exactly once
although the ingest topic holds the bridge's redelivered duplicates."""

from __future__ import annotations

from pathlib import Path

import duckdb

from bench.bridge_kill import run_kill_scenario
from connectors.bridge import ingest_topic
from connectors.kafka import ensure_topics, read_topic
from infra.flowproc import FlowProcess
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

FLOW = "dataflows.telemetry:flow"
READINGS, DEVICES = 20_000, 200


# SLOW: about 40-60 s.
def test_bridge_sigkills_under_a_live_flow_leave_every_reading_counted_exactly_once(
    settings: Settings, tmp_path: Path
) -> None:
    """20,000 QoS 1 readings (a per-message ``seq``) from 200 devices; the bridge gets
    SIGKILL 4 times, the flow once (after the second bridge kill, while redeliveries are
    on their way); a last flow run from the same store reads to the end."""
    ensure_topics(settings.require_kafka_bootstrap(), [ingest_topic(settings.topic_prefix)])
    live = settings.model_copy(
        update={
            "ingest": "kafka",
            "recovery_dir": tmp_path / "store",
            "window_s": 5.0,
            # The readings carry no ts: the bridge's receive time stands in, and the whole
            # run spans well under this.
            "lateness_s": 120.0,
        }
    )
    logs = iter(tmp_path / f"flow-{i}.log" for i in range(3))
    flows = [FlowProcess.start(FLOW, live, log=next(logs), snapshot_s=1)]

    def after_bridge_kill(note: str) -> None:
        if note.startswith("kill 2 "):
            flows[-1].kill()
            flows.append(FlowProcess.start(FLOW, live, log=next(logs), snapshot_s=1))

    try:
        result = run_kill_scenario(
            settings,
            tmp_path,
            messages=READINGS,
            devices=DEVICES,
            kills=4,
            # fast enough that every kill finds the bridge mid-batch: at 1,500/s a quiet
            # machine's bridge had confirmed everything at each kill (no redelivery to test)
            rate=4000.0,
            timeout_s=150,
            log=after_bridge_kill,
        )
        flows[-1].kill()
        drain = FlowProcess.start(
            FLOW, live.model_copy(update={"ingest_until_end": True}), log=next(logs), snapshot_s=1
        )
        flows.append(drain)
        assert drain.wait(120) == 0, drain.log.read_text()[-3000:]
    finally:
        for proc in flows:
            proc.kill()

    dropped_by = [p.log.name for p in flows if "redelivered duplicate" in p.log.read_text()]
    print(
        f"ingest de-dup e2e: {result.kafka_records} ingest records, {result.duplicates} "
        f"duplicates; flows that dropped some: {dropped_by}; {result.notes}"
    )
    assert result.acked_by_broker == READINGS and result.missing_from_kafka == []
    assert result.duplicates > 0  # the ingest topic did hold redelivered duplicates

    con = duckdb.connect(str(settings.duckdb), read_only=True)
    try:
        per_device = con.execute(
            "SELECT key, sum(count), sum(sum) FROM aggregates WHERE metric = 'seq' GROUP BY key"
        ).fetchall()
        values = con.execute("SELECT sum(count) FROM aggregates WHERE metric = 'value'").fetchone()
    finally:
        con.close()
    # Device d gets seq d, d + 200, d + 400, ...: 100 readings each, every one counted once.
    expected = {
        f"dev-{d:05d}": (READINGS // DEVICES, float(sum(range(d, READINGS, DEVICES))))
        for d in range(DEVICES)
    }
    assert {key: (n, total) for key, n, total in per_device} == expected
    assert values == (READINGS,)
    assert (
        read_topic(settings.require_kafka_bootstrap(), KafkaTopics(live.topic_prefix).deadletter)
        == []
    )
