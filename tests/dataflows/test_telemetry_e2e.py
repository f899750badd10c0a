"""The telemetry flow end to end: real MQTT in, real Kafka and DuckDB out.

Each scenario runs both ways in: the flow subscribing to MQTT itself
(``IOTFLOW_INGEST=mqtt``), and the cloud path, MQTT -> ingest bridge ->
``{prefix}.ingest`` -> the flow reading Kafka (``IOTFLOW_INGEST=kafka``); both
must give the same outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from confluent_kafka import Producer

from connectors.bridge import ingest_record, ingest_topic
from connectors.kafka import ensure_topics, producer_config, read_topic
from infra.flowproc import FlowProcess
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics
from tests.dataflows.flowkit import forward_through_bridge

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z, a window boundary for 10 s windows


def run_flow(
    settings: Settings,
    ingest: str,
    messages: list[tuple[str, bytes]],
    publish: Callable[[str, list[tuple[str, bytes]]], None],
    log: Path,
    workers: int = 1,
) -> None:
    """Publish ``messages`` over MQTT and run the flow over them until its input ends."""
    if ingest == "mqtt":
        with FlowProcess.start(
            "dataflows.telemetry:flow", settings, log=log, workers=workers
        ) as proc:
            proc.wait_online()
            publish(settings.require_mqtt_url(), messages)
            assert proc.wait(60) == 0, proc.log.read_text()
        return
    # The cloud path: the bridge forwards everything, then the flow reads the ingest
    # topic to its end.
    forward_through_bridge(settings, messages, publish)
    kafka = settings.model_copy(update={"ingest": "kafka", "ingest_until_end": True})
    with FlowProcess.start("dataflows.telemetry:flow", kafka, log=log, workers=workers) as proc:
        assert proc.wait(60) == 0, proc.log.read_text()


@pytest.mark.parametrize(("ingest", "workers"), [("mqtt", 1), ("mqtt", 2), ("kafka", 1)])
def test_known_readings_give_exact_aggregates(
    settings: Settings, tmp_path: Path, ingest: str, workers: int, mqtt_publish
) -> None:
    settings = settings.model_copy(
        update={
            "window_s": 10.0,
            "lateness_s": 30.0,
            "mqtt_idle_stop_s": 1.5,
            "max_future_skew_s": 1e9,
        }
    )
    mqtt_topics = MqttTopics(settings.mqtt_base)
    readings = {
        "dev-a": [(T0 + 1_000, 20.0), (T0 + 5_000, 22.0), (T0 + 9_999, 24.0), (T0 + 10_000, 30.0)],
        "dev-b": [(T0 + 2_000, 1.5), (T0 + 12_000, 2.5), (T0 + 13_000, 3.5)],
    }
    messages = [
        (
            mqtt_topics.telemetry(dev),
            json.dumps({"ts": ts, "temperature": v, "status": "ok"}).encode(),
        )
        for dev, rows in readings.items()
        for ts, v in rows
    ]
    messages.append((mqtt_topics.telemetry("dev-a"), b"{not json"))
    # Not telemetry: the bridge forwards them, the telemetry flow leaves them to others.
    messages.append((mqtt_topics.state("dev-a"), b'{"temperature": 99.0}'))
    messages.append((mqtt_topics.ack("dev-b"), b'{"command_id": "c1", "status": "done"}'))

    run_flow(settings, ingest, messages, mqtt_publish, tmp_path / "flow.log", workers)

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")

    expected = {
        ("dev-a", iso(T0)): (3, 20.0, 24.0, 22.0),
        ("dev-a", iso(T0 + 10_000)): (1, 30.0, 30.0, 30.0),
        ("dev-b", iso(T0)): (1, 1.5, 1.5, 1.5),
        ("dev-b", iso(T0 + 10_000)): (2, 2.5, 3.5, 3.0),
    }
    topics = KafkaTopics(settings.topic_prefix)
    bootstrap = settings.require_kafka_bootstrap()
    aggregates = [json.loads(r.value) for r in read_topic(bootstrap, topics.aggregates)]
    got = {
        (a["key"], a["window_start"]): (a["count"], a["min"], a["max"], a["avg"])
        for a in aggregates
    }
    assert got == expected
    assert all(a["metric"] == "temperature" for a in aggregates)
    assert len(aggregates) == len(expected)

    telemetry = read_topic(bootstrap, topics.telemetry)
    assert len(telemetry) == 7
    dead = [json.loads(r.value) for r in read_topic(bootstrap, topics.deadletter)]
    assert len(dead) == 1 and dead[0]["reason"].startswith("invalid JSON")

    con = duckdb.connect(str(settings.duckdb), read_only=True)
    rows = con.execute(
        "SELECT key, strftime(window_start AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ'), count, min, max, avg FROM aggregates"
    ).fetchall()
    assert {(k, ws): (c, lo, hi, avg) for k, ws, c, lo, hi, avg in rows} == expected


@pytest.mark.parametrize("ingest", ["mqtt", "kafka"])
def test_bad_input_is_dead_lettered_and_valid_readings_survive(
    settings: Settings, tmp_path: Path, ingest: str, mqtt_publish
) -> None:
    settings = settings.model_copy(
        update={"window_s": 10.0, "lateness_s": 3600.0, "mqtt_idle_stop_s": 1.5}
    )
    t = MqttTopics(settings.mqtt_base)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    now_ms -= now_ms % 10_000  # the valid readings share one 10 s window
    valid = [
        (t.telemetry("ok-1"), json.dumps({"ts": now_ms, "temperature": 20.0}).encode()),
        (
            t.telemetry("ok-2"),
            json.dumps(
                [{"ts": now_ms, "power_w": 5.0}, {"ts": "bad"}, {"ts": now_ms, "power_w": 7.0}]
            ).encode(),
        ),
        (
            t.telemetry("ok-1"),
            json.dumps({"ts": now_ms + 1, "temperature": 22.0, "label": "kitchen"}).encode(),
        ),
    ]
    bad = {
        "invalid JSON": (t.telemetry("b1"), b'{"ts": 1, "temperature": '),
        "wrong type": (t.telemetry("b2"), json.dumps({"ts": True, "temperature": 1.0}).encode()),
        "no metric": (t.telemetry("b3"), json.dumps({"ts": now_ms, "temperature": "hot"}).encode()),
        "missing device": (
            f"{settings.mqtt_base}/devices//telemetry",
            json.dumps({"temperature": 1.0}).encode(),
        ),
        "huge": (t.telemetry("b4"), b'{"temperature": 1.0, "pad": "' + b"x" * 1_000_000 + b'"}'),
        "NaN": (t.telemetry("b5"), b'{"temperature": NaN}'),
        "infinity": (t.telemetry("b6"), b'{"temperature": 1e999}'),
        "future": (
            t.telemetry("b7"),
            json.dumps({"ts": now_ms + 10 * 365 * 86_400_000, "temperature": 1.0}).encode(),
        ),
        "not an object": (t.telemetry("b8"), b'"oops"'),
        "unicode device": (
            t.telemetry("b\u00e9\u4e2d"),
            json.dumps({"ts": now_ms, "temperature": 3.0}).encode(),
        ),
    }
    messages = [valid[0], *[m for k, m in bad.items() if k != "unicode device"], valid[1], valid[2]]
    messages.append(bad["unicode device"])  # printable non-ASCII ids are valid: counted below

    run_flow(settings, ingest, messages, mqtt_publish, tmp_path / "flow.log")

    bootstrap = settings.require_kafka_bootstrap()
    topics = KafkaTopics(settings.topic_prefix)
    dead = [json.loads(r.value) for r in read_topic(bootstrap, topics.deadletter)]
    reasons = sorted(d["reason"] for d in dead)
    # nine bad messages, plus the bad element inside ok-2's list
    assert len(dead) == 10, reasons
    assert any(r.startswith("item 1:") for r in reasons)
    huge = next(d for d in dead if d["payload_bytes"] > 1_000_000)
    assert huge["truncated"] and "limit" in huge["reason"]
    assert all(d["topic"] for d in dead if d["source"] == "mqtt")

    readings = [json.loads(r.value) for r in read_topic(bootstrap, topics.telemetry)]
    assert sorted((r["device_id"], next(iter(r["metrics"].values()))) for r in readings) == sorted(
        [("ok-1", 20.0), ("ok-1", 22.0), ("ok-2", 5.0), ("ok-2", 7.0), ("b\u00e9\u4e2d", 3.0)]
    )
    aggregates = {
        (a["key"], a["metric"]): a
        for a in (json.loads(r.value) for r in read_topic(bootstrap, topics.aggregates))
    }
    assert aggregates[("ok-1", "temperature")]["count"] == 2
    assert aggregates[("ok-2", "power_w")]["sum"] == 12.0


def test_malformed_ingest_records_are_dead_letters_not_a_crash(
    settings: Settings, tmp_path: Path
) -> None:
    """Records on the ingest topic that the bridge did not write: each a dead letter with
    the reason; the valid records around them are aggregated."""
    bootstrap = settings.require_kafka_bootstrap()
    topic = ingest_topic(settings.topic_prefix)
    ensure_topics(bootstrap, [topic], partitions=1)
    telemetry = MqttTopics(settings.mqtt_base).telemetry
    producer = Producer(producer_config(bootstrap))

    def good(device: str, ts: int, value: float) -> None:
        key, val, headers = ingest_record(
            telemetry(device), json.dumps({"ts": ts, "t": value}).encode(), ts + 5
        )
        producer.produce(topic, val, key, headers=headers)

    good("ok-1", T0 + 1_000, 1.0)
    producer.produce(topic, b'{"ts": 1, "t": 1}', b"x")  # no headers at all
    producer.produce(topic, b'{"t": 1}', b"x", headers=[("mqtt_topic", b"\xff\xfe")])
    producer.produce(
        topic,
        b'{"t": 1}',
        b"x",
        headers=[("mqtt_topic", telemetry("ok-1").encode()), ("received_ms", b"soon")],
    )
    producer.produce(topic, None, b"x", headers=[("mqtt_topic", telemetry("ok-1").encode())])
    good("ok-1", T0 + 2_000, 3.0)
    producer.flush(10)

    kafka = settings.model_copy(
        update={
            "ingest": "kafka",
            "ingest_until_end": True,
            "window_s": 10.0,
            "lateness_s": 60.0,
            "max_future_skew_s": 1e9,
        }
    )
    with FlowProcess.start("dataflows.telemetry:flow", kafka, log=tmp_path / "flow.log") as proc:
        assert proc.wait(60) == 0, proc.log.read_text()

    topics = KafkaTopics(settings.topic_prefix)
    dead = [json.loads(r.value) for r in read_topic(bootstrap, topics.deadletter)]
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 4, reasons
    assert all(d["source"] == "ingest" and f"{topic}[0]@" in d["reason"] for d in dead)
    assert sum("no 'mqtt_topic' header" in r for r in reasons) == 1
    assert sum("is not UTF-8" in r for r in reasons) == 1
    assert sum("'soon'" in r and "not epoch milliseconds" in r for r in reasons) == 1
    assert sum("no value" in r for r in reasons) == 1
    (aggregate,) = [json.loads(r.value) for r in read_topic(bootstrap, topics.aggregates)]
    assert (aggregate["key"], aggregate["count"], aggregate["sum"]) == ("ok-1", 2, 4.0)
