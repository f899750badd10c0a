"""The local stack starts real brokers on free ports and stops only what it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.kafka import ensure_topics, read_topic
from connectors.mqtt import MqttTls, MqttUrl, connect_client
from infra.stack import LocalStack, StackInfo, find_mosquitto, wait_for_port
from iotflow.errors import NotAuthorized, StackError
from iotflow.settings import Settings, stack_state_path


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
        assert names - {"tansu", "embedded-kafka"} in ({"mosquitto"}, {"embedded-mqtt"}) and len(names) == 2
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


@pytest.mark.skipif(
    find_mosquitto() is None,
    reason="the secure profile runs Mosquitto (not installed); the embedded broker has no authentication",
)
def test_secure_stack_logs_in_the_flow_user_and_refuses_anonymous(
    stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path / "state"))
    settings = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap=stack.kafka_bootstrap)
    with LocalStack.start(tmp_path / "run", settings, secure=True) as local:
        info = local.info
        url = MqttUrl.parse(info.mqtt_url)
        assert [p.name for p in info.processes] == ["mosquitto"] and info.secure is not None
        assert (url.username, url.host, url.tls) == ("flow", "127.0.0.1", False)
        # The state file holds the flow user's password: owner-only.
        assert stack_state_path().stat().st_mode & 0o777 == 0o600
        assert LocalStack.read_state() == info
        client = connect_client(info.mqtt_url, "secure-stack-flow")
        client.disconnect()
        client.loop_stop()
        with pytest.raises(NotAuthorized):
            connect_client(f"mqtt://127.0.0.1:{url.port}", "secure-stack-anon", timeout_s=5)
        tls = MqttTls(ca_file=Path(info.secure["ca_file"]))
        tls_url = f"mqtts://flow:{url.password}@localhost:{info.secure['tls_port']}"
        client = connect_client(tls_url, "secure-stack-tls", tls=tls)
        client.disconnect()
        client.loop_stop()
    assert not stack_state_path().exists()
    with pytest.raises(StackError):
        wait_for_port(info.processes[0].port, 1.0)
