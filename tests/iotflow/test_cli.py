"""The ``iotflow`` command's argument handling and ``iotflow tail`` on the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from confluent_kafka import Producer

from connectors.kafka import ensure_topics, producer_config
from infra.stack import StackInfo


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iotflow.cli", *args],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tail_prints_records_as_json_lines(stack: StackInfo, names) -> None:
    topic = f"{names.kafka_prefix}.aggregates"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=1)
    producer = Producer(producer_config(stack.kafka_bootstrap))
    producer.produce(topic, key=b"k1", value=b'{"count": 3}')
    producer.produce(topic, key=b"k2", value=b"not json")
    producer.flush(10)
    env = {
        **os.environ,
        "IOTFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "IOTFLOW_TOPIC_PREFIX": names.kafka_prefix,
    }
    out = run_cli("tail", "aggregates", "--idle", "2", "--max", "2", env=env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(x["key"], x["value"]) for x in lines] == [("k1", {"count": 3}), ("k2", "not json")]
    assert all(x["topic"] == topic for x in lines)


def test_bad_arguments_are_refused_with_the_reason() -> None:
    out = run_cli("demo", "--duration", "-5")
    assert out.returncode == 2 and "must be greater than 0" in out.stderr
    out = run_cli("stack", "sideways")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_missing_broker_is_a_clear_error(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLOW_")}
    env["IOTFLOW_STATE_DIR"] = str(tmp_path)
    out = run_cli("tail", "aggregates", "--idle", "1", env=env)
    assert out.returncode == 2
    assert "no Kafka broker" in out.stderr and "iotflow stack up" in out.stderr


def test_simulate_publishes_to_the_configured_broker(stack: StackInfo, names) -> None:
    from connectors.mqtt import MqttSource

    source = MqttSource(
        stack.mqtt_url,
        [f"{names.mqtt_base}/devices/+/telemetry"],
        client_id=f"sim-{names.mqtt_base}",
        status_base=names.mqtt_base,
    )
    part = source.build("in", 0, 1)
    try:
        env = {
            **os.environ,
            "IOTFLOW_MQTT_URL": stack.mqtt_url,
            "IOTFLOW_MQTT_BASE": names.mqtt_base,
        }
        out = run_cli("simulate", "--devices", "5", "--rate", "4", "--duration", "1.5", env=env)
        assert out.returncode == 0, out.stderr
        sent = int(out.stdout.split("sent ")[1].split()[0])
        got = []
        for _ in range(200):
            for batch in part.next_batch():
                got.extend(batch)
            if len(got) >= sent:
                break
            time.sleep(0.01)
        assert sent > 0 and len(got) == sent
        assert {m.topic.split("/")[2] for m in got} == {
            "temp-0001",
            "power-0001",
            "hvac-0001",
            "lock-0001",
            "light-0001",
        }
    finally:
        part.close()


def test_tail_dedupe_shows_each_window_once(stack: StackInfo, names) -> None:
    topic = f"{names.kafka_prefix}.aggregates"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=1)
    producer = Producer(producer_config(stack.kafka_bootstrap))
    row = {"key": "d1", "metric": "t", "window_start": "2026-01-01T00:00:00Z", "count": 2}
    for doc in [row, row, {**row, "window_start": "2026-01-01T00:01:00Z", "count": 1}]:
        producer.produce(topic, key=b"d1", value=json.dumps(doc).encode())
    producer.flush(10)
    env = {
        **os.environ,
        "IOTFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "IOTFLOW_TOPIC_PREFIX": names.kafka_prefix,
    }
    out = run_cli("tail", "aggregates", "--dedupe", "--idle", "2", env=env)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["value"]["count"] for line in out.stdout.splitlines()] == [2, 1]
    out = run_cli("tail", "deadletter", "--dedupe", "--idle", "1", env=env)
    assert out.returncode == 2 and "no natural key" in out.stderr


def test_run_and_bridge_refuse_bad_settings_and_arguments(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLOW_")}
    env["IOTFLOW_STATE_DIR"] = str(tmp_path)
    out = run_cli("run", "telemetry", env={**env, "IOTFLOW_INGEST": "kafak"})
    assert out.returncode == 2
    assert "IOTFLOW_INGEST='kafak'" in out.stderr and "'mqtt' or 'kafka'" in out.stderr
    out = run_cli("run", "no_such_flow", env=env)
    assert out.returncode == 2 and "no flow named 'no_such_flow'" in out.stderr
    out = run_cli("run", "telemetry", "-s", "0", env=env)
    assert out.returncode == 2 and "must be greater than 0" in out.stderr
    out = run_cli("bridge", "--max-in-flight", "0", env=env)
    assert out.returncode == 2 and "within 1..65535" in out.stderr
    out = run_cli("bridge", "--max-in-flight", "70000", env=env)
    assert out.returncode == 2 and "65535" in out.stderr
    out = run_cli("bridge", env=env)  # nothing configured, no local stack
    assert out.returncode == 2 and "no MQTT broker" in out.stderr
