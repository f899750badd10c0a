"""MQTT source and sink against the real brokers (Mosquitto and the embedded one):
sessions, acks, wildcards, guards."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.mqtt import MqttMessage, MqttSink, MqttSource, MqttUrl, connect_client
from infra.embedded_broker import EmbeddedBroker
from infra.stack import StackInfo, free_port
from iotflow.errors import BrokerUnavailable, ConfigError, PublishRejected


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker("127.0.0.1", 0).start() as running:
        yield running


@pytest.fixture(params=["stack", "embedded"])
def mqtt_url(request: pytest.FixtureRequest, stack: StackInfo) -> str:
    """Each connector test runs against the stack's broker and the embedded fallback."""
    if request.param == "stack":
        return stack.mqtt_url
    return request.getfixturevalue("embedded").url


@pytest.fixture
def client_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_wildcard_subscription_delivers_batches_in_order(
    mqtt_url: str, names, client_id: str, mqtt_poll, mqtt_publish
) -> None:
    base = names.mqtt_base
    source = MqttSource(
        mqtt_url, [f"{base}/devices/+/telemetry"], client_id=client_id, status_base=base
    )
    part = source.build("in", 0, 1)
    try:
        mqtt_publish(
            mqtt_url, [(f"{base}/devices/d{i % 3}/telemetry", b"%d" % i) for i in range(300)]
        )
        mqtt_publish(mqtt_url, [(f"{base}/devices/d1/state", b"not subscribed")])
        got = mqtt_poll(part, 300)
        assert [int(m.payload) for m in got] == list(range(300))
        assert {m.topic for m in got} == {f"{base}/devices/d{i}/telemetry" for i in range(3)}
        time.sleep(0.2)
        assert mqtt_poll(part, 1, 0.3) == []
    finally:
        part.close()


def test_messages_of_any_size_qos_and_properties_arrive_whole_and_in_order(
    mqtt_url: str, names, client_id: str, mqtt_poll
) -> None:
    """The source reads many packets per socket read: a payload larger than one read,
    empty and tiny ones, QoS 0 and 1, MQTT 5 properties and non-ASCII topics all come
    through as sent; every QoS 1 message is acknowledged (nothing comes again)."""
    base = names.mqtt_base
    source = MqttSource(mqtt_url, [f"{base}/devices/+/telemetry"], client_id=client_id,
                        status_base=base)  # fmt: skip
    sizes = [0, 1, 300_000, 5, 70_000, 2, 127, 128, 16_383, 16_384, *range(200)]
    sent = [
        (f"{base}/devices/{'é' if i % 7 == 0 else 'd'}{i % 3}/telemetry", bytes([i % 251]) * n)
        for i, n in enumerate(sizes)
    ]
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 60
    props.UserProperty = ("origin", "test")
    part = source.build("in", 0, 1)
    publisher = connect_client(mqtt_url)
    try:
        infos = [
            publisher.publish(topic, payload, qos=i % 2, properties=props)
            for i, (topic, payload) in enumerate(sent)
        ]
        for info in infos:
            info.wait_for_publish(10)
        got = mqtt_poll(part, len(sent))
        assert [(m.topic, m.payload) for m in got] == sent
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        part.close()
    part = source.build("in", 0, 1)  # same session: an unacknowledged message would return
    try:
        assert mqtt_poll(part, 1, 0.5) == []
    finally:
        part.close()


def test_persistent_session_keeps_what_was_published_while_down(
    mqtt_url: str, names, client_id: str, mqtt_poll, mqtt_publish
) -> None:
    topic = f"{names.mqtt_base}/devices/x/telemetry"
    source = MqttSource(mqtt_url, [topic], client_id=client_id, status_base=names.mqtt_base)
    part = source.build("in", 0, 1)
    part.close()
    mqtt_publish(mqtt_url, [(topic, b"%d" % i) for i in range(50)])
    part = source.build("in", 0, 1)
    try:
        assert [int(m.payload) for m in mqtt_poll(part, 50)] == list(range(50))
    finally:
        part.close()


def test_messages_not_handed_over_are_redelivered(
    mqtt_url: str, names, client_id: str, mqtt_poll, mqtt_publish
) -> None:
    """The source acknowledges only what next_batch returned; the rest comes again."""
    topic = f"{names.mqtt_base}/devices/x/telemetry"
    source = MqttSource(
        mqtt_url, [topic], client_id=client_id, status_base=names.mqtt_base, batch_size=10
    )
    part = source.build("in", 0, 1)
    mqtt_publish(mqtt_url, [(topic, b"%d" % i) for i in range(40)])
    time.sleep(0.5)  # all 40 reached the client; only one batch of 10 is handed over
    first = part.next_batch()[0]
    part.close()
    part = source.build("in", 0, 1)
    try:
        rest = mqtt_poll(part, 30)
        assert [int(m.payload) for m in first] == list(range(10))
        assert sorted(int(m.payload) for m in rest) == list(range(10, 40))
    finally:
        part.close()


def test_idle_stop_ends_input_after_quiet_period(
    mqtt_url: str, names, client_id: str, mqtt_poll, mqtt_publish
) -> None:
    topic = f"{names.mqtt_base}/devices/x/telemetry"
    source = MqttSource(
        mqtt_url,
        [topic],
        client_id=client_id,
        status_base=names.mqtt_base,
        idle_stop=timedelta(seconds=0.3),
    )
    part = source.build("in", 0, 1)
    try:
        assert part.next_batch() == []  # never stops before the first message
        time.sleep(0.4)
        assert part.next_batch() == []
        mqtt_publish(mqtt_url, [(topic, b"1")])
        assert len(mqtt_poll(part, 1)) == 1
        time.sleep(0.4)
        with pytest.raises(StopIteration):
            part.next_batch()
    finally:
        part.close()


def test_sink_publishes_and_refuses_retained_commands(mqtt_url: str, names, mqtt_poll) -> None:
    base = names.mqtt_base
    sink = MqttSink(mqtt_url, client_id=f"sink-{uuid.uuid4().hex[:6]}").build("out", 0, 1)
    source = MqttSource(
        mqtt_url,
        [f"{base}/#"],
        client_id=f"s-{uuid.uuid4().hex[:6]}",
        status_base="elsewhere",
    )
    part = source.build("in", 0, 1)
    try:
        sink.write_batch([MqttMessage(f"{base}/devices/d/cmd", b"go", expiry_s=30)])
        assert [m.payload for m in mqtt_poll(part, 1)] == [b"go"]
        with pytest.raises(PublishRejected, match="never retained"):
            sink.write_batch([MqttMessage(f"{base}/devices/d/cmd", b"x", retain=True)])
    finally:
        sink.close()
        part.close()


def test_url_parsing_hides_password_and_rejects_bad_urls() -> None:
    url = MqttUrl.parse("mqtts://user:s3cret@broker.example:8884")
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "broker.example",
        8884,
        True,
        "user",
        "s3cret",
    )
    assert "s3cret" not in repr(url) and "s3cret" not in str(url)
    assert MqttUrl.parse("mqtt://h").port == 1883
    for bad in ["http://h:1", "mqtt://", "h:1883", "mqtt://h:notaport", "mqtts://h:1/x?ca=f"]:
        with pytest.raises(ConfigError):
            MqttUrl.parse(bad)


def test_unreachable_broker_is_translated() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}") as err:
        connect_client(f"mqtt://u:pw@127.0.0.1:{port}", timeout_s=2)
    assert "pw" not in str(err.value)


def test_source_refuses_bad_configuration(stack: StackInfo) -> None:
    with pytest.raises(ConfigError, match="at least one topic"):
        MqttSource(stack.mqtt_url, [])
    with pytest.raises(ConfigError, match="receive_maximum"):
        MqttSource(stack.mqtt_url, ["a/#"], receive_maximum=0)


_HOLDER = """
import sys, time
from connectors.mqtt import MqttSource
url, topic, client_id, base = sys.argv[1:5]
part = MqttSource(url, [topic], client_id=client_id, status_base=base).build("in", 0, 1)
print("online", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("old_connection", ["hung", "killed"])
def test_fast_reconnect_with_the_stable_client_id_keeps_status_online(
    mqtt_url: str, names, client_id: str, old_connection: str
) -> None:
    """A flow worker whose process hangs (SIGSTOP: its TCP connection stays open) or
    dies (SIGKILL) is replaced at once by one with the same stable client id. The
    broker publishes the old connection's will (``offline``) when the new one takes
    the session over or when it sees the old socket close, always before the new
    worker's ``online``: while the new worker is connected, the retained status is
    ``online`` and stays so."""
    import os
    import queue
    import signal
    import subprocess
    import sys

    base = names.mqtt_base
    topic = f"{base}/devices/+/telemetry"
    source = MqttSource(mqtt_url, [topic], client_id=client_id, status_base=base)
    status_topic = source.status_topic(0)
    seen: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    observer = connect_client(
        mqtt_url,
        on_connect=lambda c: c.subscribe(status_topic, qos=1),
        on_message=lambda _c, _u, m: seen.put(m.payload),
    )

    def next_status(timeout_s: float) -> bytes | None:
        try:
            return seen.get(timeout=timeout_s)
        except queue.Empty:
            return None

    old = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, mqtt_url, topic, client_id, base],
        stdout=subprocess.PIPE,
        text=True,
    )
    part = None
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "online"
        while next_status(5) not in (b"online", None):
            pass  # the old worker's online (or a retained leftover before it)
        os.kill(old.pid, signal.SIGSTOP if old_connection == "hung" else signal.SIGKILL)
        part = source.build("in", 0, 1)  # the replacement: same client id, at once
        after: list[bytes] = []
        while (payload := next_status(1.0)) is not None:
            after.append(payload)
        # The will may or may not show (its timing is the broker's), but never last.
        assert after and after[-1] == b"online", after
        os.kill(old.pid, signal.SIGKILL)  # the hung process finally dies: nothing follows
        old.wait(10)
        assert next_status(1.5) is None
        fresh: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        reader = connect_client(
            mqtt_url,
            on_connect=lambda c: c.subscribe(status_topic, qos=1),
            on_message=lambda _c, _u, m: fresh.put(m.payload),
        )
        try:
            assert fresh.get(timeout=5) == b"online"  # the retained status
        finally:
            reader.disconnect()
            reader.loop_stop()
    finally:
        if old.poll() is None:
            old.kill()
            old.wait(10)
        if part is not None:
            part.close()
        observer.disconnect()
        observer.loop_stop()


def test_sink_refuses_retained_commands_before_publishing_any(mqtt_url: str, names) -> None:
    """A batch with one retained command is refused whole: nothing of it is published."""
    base = names.mqtt_base
    seen: list[bytes] = []
    observer = connect_client(
        mqtt_url,
        on_connect=lambda c: c.subscribe(f"{base}/#", qos=1),
        on_message=lambda _c, _u, m: seen.append(m.payload),
    )
    sink = MqttSink(mqtt_url, client_id=f"sink-{uuid.uuid4().hex[:6]}").build("out", 0, 1)
    try:
        with pytest.raises(PublishRejected, match="commands are never retained"):
            sink.write_batch(
                [
                    MqttMessage(f"{base}/devices/a/cmd", b"first"),
                    MqttMessage(f"{base}/devices/b/cmd", b"retained", retain=True),
                ]
            )
        sink.write_batch([MqttMessage(f"{base}/devices/a/telemetry", b"fence")])
        deadline = time.monotonic() + 5
        while b"fence" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [b"fence"]
    finally:
        sink.close()
        observer.disconnect()
        observer.loop_stop()


def test_linger_gathers_a_batch_until_it_is_full_or_has_waited(
    mqtt_url: str, names, client_id: str, mqtt_poll, mqtt_publish
) -> None:
    """With linger, waiting messages are handed over together: once batch_size wait, or
    once the first was seen linger ago; in order, nothing lost."""
    topic = f"{names.mqtt_base}/devices/x/telemetry"
    source = MqttSource(
        mqtt_url,
        [topic],
        client_id=client_id,
        status_base=names.mqtt_base,
        batch_size=100,
        linger=timedelta(hours=1),
    )
    part = source.build("in", 0, 1)
    try:
        mqtt_publish(mqtt_url, [(topic, b"%d" % i) for i in range(99)])
        assert mqtt_poll(part, 1, 0.5) == []  # 99 of 100: still gathering
        awake = part.next_awake()
        assert awake is not None and awake > datetime.now(UTC) + timedelta(minutes=50)
        mqtt_publish(mqtt_url, [(topic, b"99"), (topic, b"100")])
        batches: list[list] = []
        deadline = time.monotonic() + 10
        while sum(map(len, batches)) < 100 and time.monotonic() < deadline:
            batches += part.next_batch()
            time.sleep(0.01)
        assert [int(m.payload) for m in batches[0]] == list(range(100))  # full: at once
    finally:
        part.close()
    short = MqttSource(
        mqtt_url,
        [topic],
        client_id=f"{client_id}-b",
        status_base=names.mqtt_base,
        linger=timedelta(seconds=2),
    )
    part = short.build("in", 0, 1)
    try:
        mqtt_publish(mqtt_url, [(topic, b"%d" % i) for i in range(5)])
        batches = []
        deadline = time.monotonic() + 10
        while sum(map(len, batches)) < 5 and time.monotonic() < deadline:
            batches += part.next_batch()
            time.sleep(0.01)
        assert [[int(m.payload) for m in b] for b in batches] == [[0, 1, 2, 3, 4]]
    finally:
        part.close()


def test_negative_linger_is_refused(stack: StackInfo) -> None:
    with pytest.raises(ConfigError, match="linger"):
        MqttSource(stack.mqtt_url, ["t/#"], linger=timedelta(seconds=-1))
