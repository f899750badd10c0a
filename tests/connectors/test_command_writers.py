"""The device writers' transports: HttpSink against a real HTTP server standing in for a
device API (the device is the mock); the orchestrator's MQTT and Kafka sinks (broker acks
awaited once per epoch) against the real brokers."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from commands.writers import HttpCall
from connectors.command_writers import HttpSink
from connectors.kafka import KafkaEpochOutput, message, read_topic
from connectors.mqtt import MqttEpochSink, MqttMessage, connect_client
from infra.stack import StackInfo
from iotflow.errors import ConfigError, PublishRejected
from iotflow.settings import Settings

TOKEN = "s3cret-token-value"


class DeviceApi:
    """A device REST API on a loopback port: records calls, answers with a chosen status."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                api.calls.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                self.send_response(api.status)
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[DeviceApi]:
    server = DeviceApi()
    yield server
    server.close()


def call(command_id: str, ttl_s: float = 30.0) -> HttpCall:
    return HttpCall(
        "POST",
        "/devices/lock-1/commands",
        {"command_id": command_id, "name": "unlock", "params": {}},
        command_id,
        "lock-1",
        datetime.now(UTC) + timedelta(seconds=ttl_s),
    )


def test_calls_reach_the_api_with_the_token_and_expired_ones_do_not(
    api: DeviceApi, caplog: pytest.LogCaptureFixture
) -> None:
    sink = HttpSink(api.url, token=TOKEN)
    part = sink.build("http", 0, 1)
    caplog.set_level(logging.DEBUG)
    try:
        part.write_batch([call("c1"), call("stale", ttl_s=-1), call("c2")])
        api.status = 500
        part.write_batch([call("c3")])
    finally:
        part.close()
    assert [c["body"]["command_id"] for c in api.calls] == ["c1", "c2", "c3"]
    assert {c["path"] for c in api.calls} == {"/api/devices/lock-1/commands"}
    assert {c["auth"] for c in api.calls} == {f"Bearer {TOKEN}"}
    stats = sink.partitions_stats[0]
    assert (stats.sent, stats.failed, stats.expired, stats.statuses) == (2, 1, 1, {200: 2, 500: 1})
    assert "stale" in caplog.text and "expired" in caplog.text
    assert "answered 500" in caplog.text
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(sink)


def test_an_unreachable_api_is_logged_and_does_not_stop_the_flow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = HttpSink("http://127.0.0.1:9/", token=TOKEN, timeout_s=1.0)
    part = sink.build("http", 0, 1)
    try:
        part.write_batch([call("c1")])
    finally:
        part.close()
    assert sink.partitions_stats[0].failed == 1
    assert "ConnectError" in caplog.text
    assert TOKEN not in caplog.text


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="IOTFLOW_HTTP_URL is not set"):
        HttpSink.from_settings(Settings(_env_file=None))
    with pytest.raises(ConfigError, match="must look like http"):
        HttpSink("ftp://x")
    with pytest.raises(ConfigError, match="timeout"):
        HttpSink("http://x", timeout_s=0)
    sink = HttpSink.from_settings(
        Settings(_env_file=None, http_url="http://u:pw@ha.local:8123", http_token=TOKEN)
    )
    assert repr(sink) == "HttpSink('http://u:***@ha.local:8123', token=***)"


def test_the_command_sink_publishes_without_waiting_and_settles_at_each_epoch(
    stack: StackInfo,
) -> None:
    base = f"t{uuid.uuid4().hex[:10]}"
    got: list[tuple[str, bytes]] = []
    arrived, subscribed = threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.append((msg.topic, msg.payload))
        if len(got) == 3:
            arrived.set()

    device = connect_client(
        stack.mqtt_url,
        on_connect=lambda c: c.subscribe(f"{base}/devices/+/cmd", qos=1),
        on_subscribe=lambda *_a: subscribed.set(),
        on_message=on_message,
    )
    part = MqttEpochSink(stack.mqtt_url, client_id=f"cmd-{base}").build_part("out", "mqtt", None)
    try:
        assert subscribed.wait(10)
        cmd = [MqttMessage(f"{base}/devices/d{n}/cmd", b"go%d" % n, expiry_s=30) for n in range(3)]
        part.write_batch(cmd[:2])
        part.snapshot()  # the epoch ends: both were acknowledged by the broker
        part.write_batch(cmd[2:])
        with pytest.raises(PublishRejected, match="never retained"):
            part.write_batch([MqttMessage(f"{base}/devices/d0/cmd", b"x", retain=True)])
        part.close()  # waits for the last one too
        assert arrived.wait(10)
        assert sorted(got) == [(m.topic, m.payload) for m in cmd]
    finally:
        device.disconnect()
        device.loop_stop()


def test_the_events_sink_has_every_record_acknowledged_at_each_epoch(stack: StackInfo) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.commands.events"
    sink = KafkaEpochOutput(stack.kafka_bootstrap, [topic])
    part = sink.build_part("kafka", "kafka", None)
    part.write_batch([message(topic, f"c{n}", b"e%d" % n) for n in range(3)])
    part.snapshot()  # the epoch ends: all three are in the topic now
    assert sorted(r.value for r in read_topic(stack.kafka_bootstrap, topic)) == [
        b"e0",
        b"e1",
        b"e2",
    ]
    part.write_batch([message(topic, "c3", b"e3")])
    part.close()
    assert len(read_topic(stack.kafka_bootstrap, topic)) == 4
