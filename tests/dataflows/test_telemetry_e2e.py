"""The telemetry flow end to end: real MQTT in, real Kafka and DuckDB out."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from connectors.kafka import read_topic
from infra.flowproc import FlowProcess
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z, a window boundary for 10 s windows


@pytest.mark.parametrize("workers", [1, 2])
def test_known_readings_give_exact_aggregates(
    settings: Settings, tmp_path: Path, workers: int, mqtt_publish
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

    with FlowProcess.start(
        "dataflows.telemetry:flow", settings, log=tmp_path / "flow.log", workers=workers
    ) as proc:
        proc.wait_online()
        mqtt_publish(settings.require_mqtt_url(), messages)
        assert proc.wait(60) == 0, proc.log.read_text()

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


def test_bad_input_is_dead_lettered_and_valid_readings_survive(
    settings: Settings, tmp_path: Path, mqtt_publish
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

    with FlowProcess.start("dataflows.telemetry:flow", settings, log=tmp_path / "flow.log") as proc:
        proc.wait_online()
        mqtt_publish(settings.require_mqtt_url(), messages)
        assert proc.wait(60) == 0, proc.log.read_text()

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
