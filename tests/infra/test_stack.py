"""The local stack starts real brokers on free ports and stops only what it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.kafka import ensure_topics, read_topic
from connectors.mqtt import connect_client
from infra.stack import LocalStack, StackInfo, wait_for_port
from iotflow.errors import StackError
from iotflow.settings import Settings


def iotflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iotflow.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_session_stack_answers_mqtt_and_kafka(stack: StackInfo, names) -> None:
    client = connect_client(stack.mqtt_url)
    client.disconnect()
    client.loop_stop()
    topic = f"{names.kafka_prefix}.probe"
    ensure_topics(stack.kafka_bootstrap, [topic])
    ensure_topics(stack.kafka_bootstrap, [topic])  # idempotent
    assert read_topic(stack.kafka_bootstrap, topic) == []


def test_cli_stack_up_status_down(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("IOTFLOW_MQTT_URL", "IOTFLOW_KAFKA_BOOTSTRAP")
    }
    env["IOTFLOW_STATE_DIR"] = str(tmp_path / "state")
    up = iotflow("stack", "up", env=env)
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "state" / "stack.json").read_text())
    try:
        names = {p["name"] for p in state["processes"]}
        assert names in ({"mosquitto", "tansu"}, {"embedded-mqtt", "tansu"})
        again = iotflow("stack", "up", env=env)
        assert "already up" in again.stdout
        status = iotflow("stack", "status", env=env)
        assert status.returncode == 0 and status.stdout.count(" up ") == 2
    finally:
        down = iotflow("stack", "down", env=env)
    assert down.returncode == 0 and all(name in down.stdout for name in names)
    for proc in state["processes"]:
        with pytest.raises(StackError):
            wait_for_port(proc["port"], 1.0)
    assert iotflow("stack", "status", env=env).returncode == 1


def test_configured_brokers_are_used_not_started(stack: StackInfo, tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None, mqtt_url=stack.mqtt_url, kafka_bootstrap=stack.kafka_bootstrap
    )
    with LocalStack.start(tmp_path, settings, write_state=False) as local:
        assert local.info.processes == []
        assert local.info.mqtt_url == stack.mqtt_url


def test_stop_recorded_leaves_foreign_processes_alone(tmp_path: Path, monkeypatch) -> None:
    """A recorded pid that now belongs to another program is not killed."""
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        info = StackInfo.from_json(
            json.dumps(
                {
                    "mqtt_url": "mqtt://127.0.0.1:1",
                    "kafka_bootstrap": "127.0.0.1:2",
                    "processes": [
                        {
                            "name": "mosquitto",
                            "pid": sleeper.pid,
                            "argv0": "/usr/sbin/mosquitto",
                            "port": 1,
                        }
                    ],
                }
            )
        )
        assert LocalStack.stop_recorded(info) == []
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
