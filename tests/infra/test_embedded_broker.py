"""The embedded MQTT 5 broker against real paho clients and the project's own connector.

Each test uses its own topic base and client ids; brokers with special
settings (a manual clock, a small queue limit) are started for the one test.
"""

from __future__ import annotations

import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.mqtt import MqttSource, connect_client
from infra.embedded_broker import EmbeddedBroker
from infra.embedded_broker.topics import SubOptions, SubscriptionTree, filter_matches
from infra.stack import BrokerProcess, LocalStack, StackInfo, wait_for_port
from iotflow.errors import StackError
from iotflow.settings import Settings


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker("127.0.0.1", 0).start() as running:
        yield running


@pytest.fixture
def base() -> str:
    return f"eb{uuid.uuid4().hex[:10]}"


def wait_until(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Client:
    """A paho MQTT 5 client that records what it receives; no automatic reconnect."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        will: tuple[str, bytes] | None = None,
        protocol: int = mqtt.MQTTv5,
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.gone = threading.Event()
        self.session_present: bool | None = None
        self.disconnect_reason: int | None = None
        self.assigned_id: str | None = None
        self._subacks: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self.v5 = protocol == mqtt.MQTTv5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            manual_ack=manual_ack,
            clean_session=None if protocol == mqtt.MQTTv5 else clean_start,
        )
        self.client.max_inflight_messages_set(1000)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        self.client.on_subscribe = lambda _c, _u, _m, codes, _p: self._subacks.put(
            [c.value for c in codes]
        )
        self.client.on_disconnect = self._on_disconnect
        props = None
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
            kwargs = {"clean_start": clean_start, "properties": props}
        self.client.connect("127.0.0.1", port, keepalive=30, **kwargs)
        self.client.loop_start()
        if not self.connected.wait(5):
            raise TimeoutError(f"no CONNACK for {client_id!r}")

    def _on_connect(self, c: mqtt.Client, _u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.session_present = flags.session_present
        self.assigned_id = getattr(props, "AssignedClientIdentifier", None)
        self.connected.set()

    def _on_disconnect(self, c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnect_reason = reason.value
        self.gone.set()
        c.disconnect()  # no reconnect

    def subscribe(self, *filters: str, qos: int = 1, **options: Any) -> list[int]:
        if self.v5:
            opts = mqtt.SubscribeOptions(qos=qos, **options)
            self.client.subscribe([(f, opts) for f in filters])
        else:
            self.client.subscribe([(f, qos) for f in filters])
        return self._subacks.get(timeout=5)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int = 0
    ) -> None:
        props = None
        if expiry_s:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry_s
        info = self.client.publish(topic, payload, qos, retain, props)
        info.wait_for_publish(5)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged")

    def payloads(self) -> list[bytes]:
        return [m.payload for m in list(self.messages)]

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[bytes]:
        wait_until(lambda: len(self.messages) >= n, timeout_s)
        return self.payloads()

    def close(self) -> None:
        """A normal DISCONNECT (no will)."""
        self.client.disconnect()
        self.client.loop_stop()

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crashed client would."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


# --- raw packets, for what paho refuses to send -------------------------------


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    size, length = len(body), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            return bytes((first,)) + bytes(length) + body


def raw_connect(port: int, client_id: str, keepalive_s: int, will_topic: str = "") -> socket.socket:
    flags = 0x02 | (0x04 | 0x08 | 0x20 if will_topic else 0)  # clean; will QoS 1 retained
    body = _str("MQTT") + bytes((5, flags)) + struct.pack(">H", keepalive_s) + b"\x00"
    body += _str(client_id)
    if will_topic:
        body += b"\x00" + _str(will_topic) + _str("offline")
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.sendall(_packet(0x10, body))
    assert read_packet(sock)[0] >> 4 == 2  # CONNACK
    return sock


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = sock.recv(1)
    if not first:
        raise ConnectionError("closed")
    size, shift = 0, 0
    while True:
        byte = sock.recv(1)[0]
        size |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
    return first[0], body


# --- topic matching ----------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "topic", "matches"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a//c", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "/x", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$SYS/+", "$SYS/x", True),
        ("a/b", "a/b/", False),
    ],
)
def test_filter_matching_per_spec(flt: str, topic: str, matches: bool) -> None:
    assert filter_matches(flt, topic) is matches
    tree = SubscriptionTree()
    tree.add(None, flt, "c", SubOptions(1))
    assert bool(tree.match(topic)[0]) is matches


_levels = st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=4)


@given(
    st.lists(
        st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=4).map(
            lambda levels: "/".join(levels)
        )
        | _levels.map(lambda levels: "/".join([*levels, "#"])),
        min_size=1,
        max_size=6,
    ),
    _levels.map("/".join),
)
def test_subscription_tree_agrees_with_filter_matching(filters: list[str], topic: str) -> None:
    tree = SubscriptionTree()
    for i, flt in enumerate(filters):
        tree.add(None, flt, f"c{i}", SubOptions(1))
    got = {client_id for client_id, _ in tree.match(topic)[0]}
    assert got == {f"c{i}" for i, flt in enumerate(filters) if filter_matches(flt, topic)}
    for i, flt in enumerate(filters):
        tree.remove(None, flt, f"c{i}")
    assert tree.match(topic) == ([], [])


# --- the broker over the network ---------------------------------------------


def test_wildcards_and_dollar_topics(broker: EmbeddedBroker, base: str) -> None:
    plus = Client(broker.port)
    hash_ = Client(broker.port)
    dollar = Client(broker.port)
    try:
        assert plus.subscribe(f"{base}/+/t") == [1]
        assert hash_.subscribe(f"{base}/#", "+/x", "#") == [1, 1, 1]
        assert dollar.subscribe(f"${base}/#", qos=0) == [0]
        for topic in [f"{base}/d1/t", f"{base}/d1/t/x", f"{base}", f"{base}//t", f"${base}/x"]:
            plus.publish(topic, topic.encode())
        assert plus.wait_for(2) == [f"{base}/d1/t".encode(), f"{base}//t".encode()]
        mine = [p for p in hash_.wait_for(4) if base.encode() in p]
        assert mine == [p.encode() for p in [f"{base}/d1/t", f"{base}/d1/t/x", base, f"{base}//t"]]
        assert dollar.wait_for(1) == [f"${base}/x".encode()]
        time.sleep(0.1)
        assert len(plus.messages) == 2 and len(dollar.messages) == 1
        assert all(m.qos == 1 for m in hash_.messages) and dollar.messages[0].qos == 0
        # Overlapping filters deliver one copy.
        assert hash_.payloads().count(f"{base}/d1/t".encode()) == 1
    finally:
        for c in (plus, hash_, dollar):
            c.close()


def test_invalid_filters_are_refused_per_filter(broker: EmbeddedBroker, base: str) -> None:
    filters = [f"{base}/a#", f"{base}/+x", f"{base}/#/b", "$share/g", f"{base}/ok"]
    sock = raw_connect(broker.port, f"{base}-raw", 30)
    try:
        body = struct.pack(">H", 7) + b"\x00" + b"".join(_str(f) + b"\x01" for f in filters)
        sock.sendall(_packet(0x82, body))
        first, body = read_packet(sock)
        assert first >> 4 == 9 and body == struct.pack(">H", 7) + bytes(
            (0, 0x8F, 0x8F, 0x8F, 0x8F, 1)
        )
    finally:
        sock.close()


def test_qos2_is_granted_as_qos1_and_accepted_exactly_once(
    broker: EmbeddedBroker, base: str
) -> None:
    sub = Client(broker.port)
    try:
        assert sub.subscribe(f"{base}/t", qos=2) == [1]
        sub.publish(f"{base}/t", b"exactly", qos=2)
        assert sub.wait_for(1) == [b"exactly"] and sub.messages[0].qos == 1
    finally:
        sub.close()


def test_publish_to_a_wildcard_topic_disconnects_with_reason(
    broker: EmbeddedBroker, base: str
) -> None:
    sock = raw_connect(broker.port, f"{base}-raw", 30)
    try:
        sock.sendall(_packet(0x30, _str(f"{base}/+/x") + b"\x00" + b"payload"))
        first, body = read_packet(sock)
        assert first >> 4 == 14 and body[0] == 0x90  # DISCONNECT, Topic Name invalid
        assert b"wildcard" in body
        assert sock.recv(1) == b""
    finally:
        sock.close()


def test_retained_message_is_sent_on_subscribe_and_cleared_by_empty_payload(
    broker: EmbeddedBroker, base: str
) -> None:
    pub = Client(broker.port)
    first = Client(broker.port)
    second = Client(broker.port)
    try:
        pub.publish(f"{base}/state", b"on", retain=True)
        pub.publish(f"{base}/state", b"off", retain=True)
        first.subscribe(f"{base}/+")
        assert first.wait_for(1) == [b"off"] and first.messages[0].retain
        pub.publish(f"{base}/state", b"", retain=True)
        assert first.wait_for(2) == [b"off", b""]  # the clear reaches current subscribers
        second.subscribe(f"{base}/#")
        time.sleep(0.2)
        assert second.messages == []
    finally:
        for c in (pub, first, second):
            c.close()


def test_will_on_abrupt_close_not_on_disconnect(broker: EmbeddedBroker, base: str) -> None:
    watcher = Client(broker.port)
    watcher.subscribe(f"{base}/+/status")
    crashed = Client(broker.port, f"{base}-a", will=(f"{base}/a/status", b"offline"))
    polite = Client(broker.port, f"{base}-b", will=(f"{base}/b/status", b"offline"))
    try:
        polite.close()
        crashed.kill()
        assert watcher.wait_for(1) == [b"offline"]
        assert watcher.messages[0].topic == f"{base}/a/status"
        time.sleep(0.2)
        assert len(watcher.messages) == 1
    finally:
        watcher.close()


def test_keepalive_timeout_publishes_the_will(broker: EmbeddedBroker, base: str) -> None:
    watcher = Client(broker.port)
    watcher.subscribe(f"{base}/status")
    sock = raw_connect(broker.port, f"{base}-silent", 1, will_topic=f"{base}/status")
    try:
        started = time.monotonic()
        first, body = read_packet(sock)  # waits, sending nothing
        assert first >> 4 == 14 and body[0] == 0x8D  # DISCONNECT, Keep Alive timeout
        assert 1.4 <= time.monotonic() - started < 3
        assert watcher.wait_for(1) == [b"offline"]
    finally:
        sock.close()
        watcher.close()


def test_persistent_session_queues_while_offline_and_resends_unacked(
    broker: EmbeddedBroker, base: str
) -> None:
    cid = f"{base}-p"
    pub = Client(broker.port)
    client = Client(broker.port, cid, clean_start=False, session_expiry_s=60, manual_ack=True)
    try:
        assert client.session_present is False
        client.subscribe(f"{base}/t")
        for i in range(3):
            pub.publish(f"{base}/t", b"%d" % i)
        assert client.wait_for(3) == [b"0", b"1", b"2"]
        client.client.ack(client.messages[0].mid, 1)
        time.sleep(0.1)  # let the PUBACK reach the broker
        connected = broker.stats().connections
        client.kill()  # 1 and 2 stay unacknowledged
        # 3-5 must find the session offline: a publish the broker handles before it reads
        # the dead socket's EOF goes to that socket and is rightly resent with DUP
        deadline = time.monotonic() + 10
        while broker.stats().connections >= connected and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(3, 6):
            pub.publish(f"{base}/t", b"%d" % i)
        again = Client(broker.port, cid, clean_start=False, session_expiry_s=60)
        try:
            assert again.session_present is True
            assert again.wait_for(5) == [b"1", b"2", b"3", b"4", b"5"]
            assert [m.dup for m in again.messages] == [True, True, False, False, False]
        finally:
            again.close()
        fresh = Client(broker.port, cid, clean_start=True)
        assert fresh.session_present is False
        fresh.close()
    finally:
        pub.close()


def test_session_expires_after_its_interval(broker: EmbeddedBroker, base: str) -> None:
    cid = f"{base}-e"
    client = Client(broker.port, cid, clean_start=False, session_expiry_s=1)
    client.subscribe(f"{base}/t")
    client.close()
    time.sleep(1.3)
    again = Client(broker.port, cid, clean_start=False, session_expiry_s=1)
    try:
        assert again.session_present is False
    finally:
        again.close()


def test_receive_maximum_bounds_unacknowledged_messages(broker: EmbeddedBroker, base: str) -> None:
    pub = Client(broker.port)
    client = Client(broker.port, f"{base}-rm", receive_maximum=5, manual_ack=True)
    try:
        client.subscribe(f"{base}/t")
        for i in range(20):
            pub.publish(f"{base}/t", b"%d" % i)
        acked = 0
        while acked < 20:
            time.sleep(0.15)
            assert len(client.messages) - acked <= 5
            assert len(client.messages) - acked == min(5, 20 - acked)
            for msg in client.messages[acked:]:
                client.client.ack(msg.mid, 1)
            acked = len(client.messages)
        assert client.payloads() == [b"%d" % i for i in range(20)]
    finally:
        pub.close()
        client.close()


def test_shared_subscription_splits_messages_without_loss_or_duplicates(
    broker: EmbeddedBroker, base: str
) -> None:
    members = [Client(broker.port, f"{base}-m{i}") for i in range(2)]
    pub = Client(broker.port)
    try:
        for member in members:
            assert member.subscribe(f"$share/g{base}/{base}/+/t") == [1]
        sent = [b"%d" % i for i in range(200)]
        for i, payload in enumerate(sent):
            pub.publish(f"{base}/d{i % 7}/t", payload)
        wait_until(lambda: sum(len(m.messages) for m in members) >= 200)
        got = [m.payloads() for m in members]
        assert sorted(got[0] + got[1], key=int) == sent
        assert len(got[0]) == len(got[1]) == 100  # round robin
        for part in got:
            assert part == sorted(part, key=int)  # each member in publish order
    finally:
        pub.close()
        for member in members:
            member.close()


def test_message_expiry_drops_stale_queued_commands(base: str) -> None:
    now = [1000.0]
    with EmbeddedBroker(clock=lambda: now[0]).start() as local:
        cid = f"{base}-dev"
        device = Client(local.port, cid, clean_start=False, session_expiry_s=60)
        device.subscribe(f"{base}/cmd")
        device.close()
        pub = Client(local.port)
        pub.publish(f"{base}/cmd", b"stale", expiry_s=5)
        pub.publish(f"{base}/cmd", b"fresh", expiry_s=60)
        pub.publish(f"{base}/cmd", b"forever")
        pub.close()
        now[0] += 10
        device = Client(local.port, cid, clean_start=False, session_expiry_s=60)
        try:
            assert device.wait_for(2) == [b"fresh", b"forever"]
            assert device.messages[0].properties.MessageExpiryInterval == 50
            assert not hasattr(device.messages[1].properties, "MessageExpiryInterval")
            assert local.stats().expired == 1
        finally:
            device.close()


def test_queue_limit_drops_and_counts(base: str) -> None:
    with EmbeddedBroker(max_queued_messages=10).start() as local:
        cid = f"{base}-slow"
        client = Client(local.port, cid, clean_start=False, session_expiry_s=60)
        client.subscribe(f"{base}/t")
        client.close()
        pub = Client(local.port)
        for i in range(25):
            pub.publish(f"{base}/t", b"%d" % i)
        pub.close()
        client = Client(local.port, cid, clean_start=False, session_expiry_s=60)
        try:
            assert client.wait_for(10) == [b"%d" % i for i in range(10)]
            assert local.stats().dropped_queue_full == 15
        finally:
            client.close()


def test_client_takeover_disconnects_the_old_connection(broker: EmbeddedBroker, base: str) -> None:
    cid = f"{base}-dup"
    old = Client(broker.port, cid, clean_start=False, session_expiry_s=60)
    old.subscribe(f"{base}/t")
    new = Client(broker.port, cid, clean_start=False, session_expiry_s=60)
    pub = Client(broker.port)
    try:
        assert old.gone.wait(5) and old.disconnect_reason == 0x8E
        assert new.session_present is True  # the subscription moved over
        pub.publish(f"{base}/t", b"x")
        assert new.wait_for(1) == [b"x"]
        assert old.messages == []
    finally:
        for c in (old, new, pub):
            c.close()


def test_empty_client_id_is_assigned(broker: EmbeddedBroker) -> None:
    client = Client(broker.port, "")
    try:
        assert client.assigned_id and client.assigned_id.startswith("auto-")
    finally:
        client.close()


def test_mqtt_311_clients_publish_and_subscribe(broker: EmbeddedBroker, base: str) -> None:
    sub = Client(broker.port, f"{base}-old", protocol=mqtt.MQTTv311)
    pub = Client(broker.port, protocol=mqtt.MQTTv5)
    try:
        assert sub.subscribe(f"{base}/#") == [1]
        pub.publish(f"{base}/x", b"hello", expiry_s=30)
        assert sub.wait_for(1) == [b"hello"]
    finally:
        sub.close()
        pub.close()


# --- the project's connector (its other tests run here too: tests/connectors/test_mqtt.py)


def test_mqtt_source_status_is_retained_and_will_says_offline(
    broker: EmbeddedBroker, base: str
) -> None:
    source = MqttSource(broker.url, [f"{base}/t"], client_id=f"{base}-src", status_base=base)
    part = source.build("in", 0, 1)
    watcher = Client(broker.port)
    try:
        watcher.subscribe(source.status_topic(0))
        assert watcher.wait_for(1) == [b"online"] and watcher.messages[0].retain
        part._client.loop_stop()  # a crash: no offline publish, no DISCONNECT
        part._client.socket().close()
        assert watcher.wait_for(2) == [b"online", b"offline"]
    finally:
        watcher.close()


# --- as a process, and in the local stack --------------------------------------


def test_module_prints_ready_line_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.embedded_broker", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("embedded MQTT broker listening on mqtt://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        client = Client(port)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_stack_starts_the_embedded_broker_on_request(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("IOTFLOW_EMBEDDED_MQTT", "1")
    settings = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap="127.0.0.1:1")
    with LocalStack.start(tmp_path, settings, write_state=False) as local:
        (proc,) = local.info.processes
        assert (proc.name, proc.argv0) == ("embedded-mqtt", sys.executable)
        client = connect_client(local.info.mqtt_url)
        client.disconnect()
        client.loop_stop()
        info = StackInfo.from_json(local.info.to_json())
        assert LocalStack.stop_recorded(info) == ["embedded-mqtt"]
        with pytest.raises(StackError):
            wait_for_port(proc.port, 0.5)


def test_stack_falls_back_to_the_embedded_broker_without_mosquitto(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("IOTFLOW_EMBEDDED_MQTT", raising=False)
    monkeypatch.setattr("infra.stack.find_mosquitto", lambda: None)
    settings = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap="127.0.0.1:1")
    with LocalStack.start(tmp_path, settings, write_state=False) as local:
        assert [p.name for p in local.info.processes] == ["embedded-mqtt"]
        client = connect_client(local.info.mqtt_url)
        client.disconnect()
        client.loop_stop()


def test_stop_recorded_leaves_other_python_programs_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        info = StackInfo(
            "mqtt://127.0.0.1:1",
            "127.0.0.1:2",
            [BrokerProcess("embedded-mqtt", other.pid, sys.executable, 1)],
        )
        assert LocalStack.stop_recorded(info) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_stack_refuses_a_bad_embedded_setting(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IOTFLOW_EMBEDDED_MQTT", "maybe")
    settings = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap="127.0.0.1:1")
    with pytest.raises(StackError, match="IOTFLOW_EMBEDDED_MQTT='maybe'"):
        LocalStack.start(tmp_path, settings, write_state=False)
