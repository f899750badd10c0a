"""Broker security against a real Mosquitto in the secure profile (infra.security).

The ACL matrix logs in as devices, a gateway and the service users over real
TLS and checks every case two ways: the MQTT 5 reason code the broker sends
(CONNACK, PUBACK) and what a second, privileged subscriber actually receives.
Whether a message was delivered is decided without sleeping: after the case,
the observer publishes a fence message that the receiver also gets; the
broker delivers in order, so once the fence arrived anything the case let
through would have arrived before it.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka import redact_config, security_config
from connectors.mqtt import MqttMessage, MqttSink, MqttSource, MqttTls, MqttUrl, connect_client
from infra.security import (
    AclUser,
    CertificateAuthority,
    SecureMosquitto,
    SecurityDir,
    hash_password,
    main,
    render_acl,
)
from infra.stack import find_mosquitto
from iotflow.errors import BrokerUnavailable, ConfigError, NotAuthorized, PublishRejected
from iotflow.settings import Settings
from iotflow.topics import MqttTopics

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None,
    reason="the secure profile runs Mosquitto (not installed); the embedded broker has no authentication",
)

BASE = f"sec{uuid.uuid4().hex[:6]}"
T = MqttTopics(BASE)


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> SecurityDir:
    sec = SecurityDir.init(tmp_path_factory.mktemp("security") / "sec", base=BASE)
    for device in ("dev-a", "dev-b", "dev-g"):
        sec.add_device(device)
    sec.add_device("dev-c", password=False, cert=True)  # certificate login only
    sec.add_gateway("gw-1", ["dev-g"])
    sec.add_gateway("gw-2")
    # A test-only account that sees everything and publishes the fences.
    sec.add_service(AclUser("observer", read=("#",), write=(f"{BASE}/#",)))
    return sec


@pytest.fixture(scope="module")
def broker(sec: SecurityDir) -> Iterator[SecureMosquitto]:
    with SecureMosquitto(sec, plain_listener=True).start() as running:
        yield running


def tls_for(sec: SecurityDir, cert_user: str | None = None) -> MqttTls:
    if cert_user is None:
        return MqttTls(ca_file=sec.ca_file)
    pair = sec.client_cert(cert_user)
    return MqttTls(ca_file=sec.ca_file, cert_file=pair.cert, key_file=pair.key)


class Probe:
    """A connected client (through connectors.mqtt.connect_client) that records what it gets."""

    def __init__(self, url: str, tls: MqttTls | None, fence_topic: str) -> None:
        self.inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self.seen: list[tuple[str, bytes]] = []
        self._pubacks: dict[int, int] = {}
        self._subacks: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self.fence_topic = fence_topic
        self.client = connect_client(
            url,
            f"probe-{uuid.uuid4().hex[:8]}",
            tls=tls,
            on_message=lambda _c, _u, m: self.inbox.put((m.topic, m.payload)),
            on_subscribe=lambda _c, _u, _mid, codes, _p: self._subacks.put(
                [c.value for c in codes]
            ),
        )
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self._pubacks.__setitem__(
            mid, rc.value
        )
        self.subscribe(fence_topic)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        return self._pubacks.pop(info.mid)

    def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        return self._subacks.get(timeout=5)[0]

    def wait_for(self, payload: bytes, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                return False
            self.seen.append(item)
            if item[1] == payload:
                return True
        return False

    def got(self, payload: bytes) -> bool:
        return any(p == payload for _t, p in self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Tally:
    tried: int = 0
    unexpected_allows: list[str] = field(default_factory=list)
    unexpected_denies: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def record(self, case: str, expect_allowed: bool, allowed: bool, detail: str) -> None:
        self.tried += 1
        verdict = "allowed" if allowed else "denied"
        self.lines.append(
            f"{'ok ' if allowed == expect_allowed else 'BAD'} {case}: {verdict} ({detail})"
        )
        if allowed and not expect_allowed:
            self.unexpected_allows.append(f"{case}: {detail}")
        if expect_allowed and not allowed:
            self.unexpected_denies.append(f"{case}: {detail}")


@pytest.fixture(scope="module")
def world(sec: SecurityDir, broker: SecureMosquitto) -> Iterator[dict[str, Probe]]:
    """The principals of the matrix, connected over TLS (dev-c by client certificate)."""
    tls = tls_for(sec)
    fences = {
        "dev-a": T.cmd("dev-a"),
        "dev-b": T.cmd("dev-b"),
        "dev-c": T.cmd("dev-c"),
        "gw-1": T.cmd("dev-g"),
        "flow": T.telemetry("fence"),
        "bridge": T.ack("fence"),
        "orchestrator": T.ack("fence"),
        "observer": f"{BASE}/fence",
    }
    probes = {}
    for user, fence in fences.items():
        if user == "dev-c":
            probes[user] = Probe(broker.url(user, listener="mtls"), tls_for(sec, "dev-c"), fence)
        else:
            probes[user] = Probe(broker.url(user), tls, fence)
    probes["observer"].subscribe("#")
    yield probes
    for probe in probes.values():
        probe.close()


def _fence(world: dict[str, Probe], receiver: Probe) -> None:
    """Return once everything the broker delivers to ``receiver`` before now has arrived."""
    token = f"fence-{uuid.uuid4().hex}".encode()
    if world["observer"].publish(receiver.fence_topic, token) >= 0x80:
        raise RuntimeError(f"observer could not publish the fence on {receiver.fence_topic}")
    if not receiver.wait_for(token, 10):
        raise RuntimeError(f"fence on {receiver.fence_topic} did not arrive")


def check_publish(world: dict[str, Probe], user: str, topic: str) -> tuple[bool, str]:
    """Allowed when the PUBACK says success or the observer received the message."""
    payload = f"{user}->{topic}:{uuid.uuid4().hex}".encode()
    code = world[user].publish(topic, payload)
    observer = world["observer"]
    accepted = code < 0x80  # 0x00 success, 0x10 no matching subscribers
    if accepted:
        delivered = observer.wait_for(payload, 5)
    else:
        _fence(world, observer)
        delivered = observer.got(payload)
    verdict = "got" if delivered else "did not get"
    return accepted or delivered, f"PUBACK 0x{code:02X}, observer {verdict} it"


def check_read(
    world: dict[str, Probe], user: str, topic_filter: str, publisher: str, topic: str
) -> tuple[bool, str]:
    """Allowed when ``user`` subscribed to ``topic_filter`` receives what ``publisher`` sends on ``topic``."""
    reader = world[user]
    suback = reader.subscribe(topic_filter)
    payload = f"{publisher}->{topic}:{uuid.uuid4().hex}".encode()
    code = world[publisher].publish(topic, payload)
    if code >= 0x80:
        raise RuntimeError(f"{publisher} may not publish {topic} (0x{code:02X}): the case is void")
    _fence(world, reader)
    delivered = reader.got(payload)
    if topic_filter != reader.fence_topic:
        reader.client.unsubscribe(topic_filter)
    return delivered, f"SUBACK 0x{suback:02X}, {'delivered' if delivered else 'not delivered'}"


def check_login(url: str, tls: MqttTls) -> tuple[bool, str]:
    try:
        client = connect_client(url, f"login-{uuid.uuid4().hex[:8]}", tls=tls, timeout_s=5)
    except BrokerUnavailable as exc:  # NotAuthorized is one
        return False, f"{type(exc).__name__}: {exc}"
    client.disconnect()
    client.loop_stop()
    return True, "connected"


def test_acl_matrix(
    sec: SecurityDir, broker: SecureMosquitto, world: dict[str, Probe], tmp_path: Path
) -> None:
    tally = Tally()
    tls = tls_for(sec)
    foreign_ca = CertificateAuthority.create(tmp_path / "foreign")
    foreign = foreign_ca.issue(tmp_path / "foreign", "dev-a", "dev-a")
    plain_tls_port = f"mqtt://dev-a:{sec.password('dev-a')}@127.0.0.1:{broker.tls_port}"

    logins: list[tuple[str, bool, str, MqttTls]] = [
        ("anonymous over TLS", False, broker.url(None), tls),
        ("anonymous on the loopback plaintext listener", False, broker.url(None, listener="plain"), MqttTls()),
        ("dev-a with a wrong password", False, broker.url("dev-a", password="wrong"), tls),
        ("dev-b with dev-a's password", False, broker.url("dev-b", password=sec.password("dev-a")), tls),
        ("an unknown user", False, broker.url("mallory", password="x"), tls),
        ("mutual TLS without a client certificate", False, broker.url("dev-c", listener="mtls"), tls),
        (
            "mutual TLS with a certificate from another CA",
            False,
            broker.url("dev-a", listener="mtls"),
            MqttTls(ca_file=sec.ca_file, cert_file=foreign.cert, key_file=foreign.key),
        ),
        ("plain TCP (mqtt://) on the TLS port", False, plain_tls_port, MqttTls()),
        ("TLS without the local CA (system trust store)", False, broker.url("dev-a"), MqttTls()),
        ("dev-a with its password over TLS", True, broker.url("dev-a"), tls),
        ("dev-c by client certificate (CN = user name)", True, broker.url("dev-c", listener="mtls"), tls_for(sec, "dev-c")),
        ("flow on the loopback plaintext listener", True, broker.url("flow", listener="plain"), MqttTls()),
    ]  # fmt: skip
    for case, expect, url, case_tls in logins:
        allowed, detail = check_login(url, case_tls)
        tally.record(f"login: {case}", expect, allowed, detail)

    publishes: list[tuple[str, str, bool]] = [
        ("dev-a", T.telemetry("dev-a"), True),
        ("dev-a", T.state("dev-a"), True),
        ("dev-a", T.ack("dev-a"), True),
        ("dev-a", T.telemetry("dev-b"), False),
        ("dev-a", T.ack("dev-b"), False),
        ("dev-a", T.state("dev-b"), False),
        ("dev-a", T.cmd("dev-b"), False),
        ("dev-a", T.cmd("dev-a"), False),  # a device never sends commands, not even to itself
        ("dev-a", f"{BASE}/flows/iotflow-telemetry-0/status", False),
        ("dev-a", T.gateway_status("gw-1"), False),
        ("dev-a", f"{BASE}/devices/dev-a/extra", False),
        ("dev-a", "elsewhere/x", False),
        ("dev-c", T.telemetry("dev-c"), True),
        ("dev-c", T.telemetry("dev-b"), False),
        ("gw-1", T.gateway_status("gw-1"), True),
        ("gw-1", T.telemetry("dev-g"), True),
        ("gw-1", T.ack("dev-g"), True),
        ("gw-1", T.telemetry("dev-a"), False),
        ("gw-1", T.gateway_status("gw-2"), False),
        ("flow", f"{BASE}/flows/iotflow-telemetry-0/status", True),
        ("flow", T.telemetry("dev-a"), False),
        ("flow", T.cmd("dev-a"), False),
        ("bridge", f"{BASE}/bridges/iotflow-bridge/status", True),
        ("bridge", T.cmd("dev-a"), False),
        ("orchestrator", T.cmd("dev-b"), True),
        ("orchestrator", T.telemetry("dev-b"), False),
        ("orchestrator", T.ack("dev-b"), False),
    ]
    for user, topic, expect in publishes:
        allowed, detail = check_publish(world, user, topic)
        tally.record(f"{user} publishes {topic}", expect, allowed, detail)

    reads: list[tuple[str, str, str, str, bool]] = [
        ("dev-a", T.cmd("dev-a"), "orchestrator", T.cmd("dev-a"), True),
        ("dev-a", T.cmd("dev-b"), "orchestrator", T.cmd("dev-b"), False),
        ("dev-a", T.cmd(), "orchestrator", T.cmd("dev-b"), False),
        ("dev-a", "#", "orchestrator", T.cmd("dev-b"), False),
        ("dev-a", T.telemetry("dev-b"), "dev-b", T.telemetry("dev-b"), False),
        ("dev-a", T.ack(), "dev-b", T.ack("dev-b"), False),
        ("dev-c", T.cmd("dev-c"), "orchestrator", T.cmd("dev-c"), True),
        ("dev-c", T.cmd("dev-a"), "orchestrator", T.cmd("dev-a"), False),
        ("gw-1", T.cmd("dev-g"), "orchestrator", T.cmd("dev-g"), True),
        ("gw-1", T.cmd("dev-a"), "orchestrator", T.cmd("dev-a"), False),
        ("flow", T.telemetry(), "dev-a", T.telemetry("dev-a"), True),
        ("flow", T.telemetry(), "dev-b", T.telemetry("dev-b"), True),
        ("flow", f"$share/iotflow/{T.telemetry()}", "dev-b", T.telemetry("dev-b"), True),
        ("flow", T.state(), "dev-a", T.state("dev-a"), True),
        ("flow", T.cmd(), "orchestrator", T.cmd("dev-a"), False),
        ("flow", T.ack(), "dev-a", T.ack("dev-a"), False),
        ("bridge", T.ack(), "dev-a", T.ack("dev-a"), True),
        ("bridge", T.telemetry(), "gw-1", T.telemetry("dev-g"), True),
        ("bridge", T.cmd(), "orchestrator", T.cmd("dev-a"), False),
        ("orchestrator", T.ack(), "dev-b", T.ack("dev-b"), True),
        ("orchestrator", T.telemetry(), "dev-b", T.telemetry("dev-b"), False),
    ]
    for user, topic_filter, publisher, topic, expect in reads:
        allowed, detail = check_read(world, user, topic_filter, publisher, topic)
        tally.record(
            f"{user} reads {topic_filter} ({publisher} -> {topic})", expect, allowed, detail
        )

    report = "\n".join(tally.lines)
    print(f"\nACL matrix: {tally.tried} cases, {len(tally.unexpected_allows)} unexpected allows, "
          f"{len(tally.unexpected_denies)} unexpected denies\n{report}")  # fmt: skip
    assert tally.tried == len(logins) + len(publishes) + len(reads) == 60
    assert tally.unexpected_allows == [], report
    assert tally.unexpected_denies == [], report


def test_wrong_password_error_and_logs_never_show_it(
    sec: SecurityDir, broker: SecureMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"Wr0ng-{uuid.uuid4().hex}"
    url = broker.url("dev-a", password=secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NotAuthorized) as err:
        connect_client(url, "wrong-pw", tls=tls_for(sec), timeout_s=5)
    message = str(err.value)
    assert f"dev-a:***@localhost:{broker.tls_port}" in message
    assert "not authorized (0x87)" in message and "IOTFLOW_MQTT_URL" in message
    for text in (message, repr(err.value), repr(MqttUrl.parse(url)), caplog.text):
        assert secret not in text
    # A good login logs the redacted URL, never the password.
    client = connect_client(broker.url("dev-a"), "right-pw", tls=tls_for(sec))
    client.disconnect()
    client.loop_stop()
    assert sec.password("dev-a") not in caplog.text
    assert "dev-a:***@" in caplog.text


def test_anonymous_refusal_names_the_fix(sec: SecurityDir, broker: SecureMosquitto) -> None:
    with pytest.raises(NotAuthorized, match=r"anonymous client.*put a user name and password"):
        connect_client(broker.url(None, listener="plain"), "anon", timeout_s=5)


def test_tls_failures_say_what_to_fix(sec: SecurityDir, broker: SecureMosquitto) -> None:
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="use mqtts://"):
        connect_client(f"mqtt://127.0.0.1:{broker.tls_port}", "plain-on-tls", timeout_s=10)
    with pytest.raises(BrokerUnavailable, match="IOTFLOW_MQTT_CA_FILE"):
        connect_client(broker.url("dev-a"), "no-ca", tls=MqttTls(), timeout_s=10)
    with pytest.raises(BrokerUnavailable, match="IOTFLOW_MQTT_CERT_FILE"):
        connect_client(
            broker.url("dev-c", listener="mtls"), "no-cert", tls=tls_for(sec), timeout_s=10
        )
    assert time.monotonic() - start < 5  # refused at once, not after the CONNACK timeout


def test_missing_or_bad_tls_files_are_config_errors(sec: SecurityDir, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    with pytest.raises(ConfigError, match=f"IOTFLOW_MQTT_CA_FILE={missing}: no such file"):
        connect_client("mqtts://u:p@localhost:1", tls=MqttTls(ca_file=missing))
    with pytest.raises(
        ConfigError, match=r"IOTFLOW_MQTT_KEY_FILE=.* without IOTFLOW_MQTT_CERT_FILE"
    ):
        MqttTls(ca_file=sec.ca_file, key_file=sec.server.key).check()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        connect_client("mqtts://u:p@localhost:1", tls=MqttTls(ca_file=garbage))
    with pytest.raises(ConfigError, match="is not TLS; use mqtts://"):
        connect_client("mqtt://localhost:1", tls=MqttTls(ca_file=sec.ca_file))


def test_tls_files_come_from_settings(
    sec: SecurityDir, broker: SecureMosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With IOTFLOW_MQTT_CA_FILE/CERT_FILE/KEY_FILE set, connectors need no TLS argument."""
    pair = sec.client_cert("dev-c")
    monkeypatch.setenv("IOTFLOW_MQTT_CA_FILE", str(sec.ca_file))
    monkeypatch.setenv("IOTFLOW_MQTT_CERT_FILE", str(pair.cert))
    monkeypatch.setenv("IOTFLOW_MQTT_KEY_FILE", str(pair.key))
    assert MqttTls.from_settings() == MqttTls(sec.ca_file, pair.cert, pair.key)
    client = connect_client(broker.url("dev-c", listener="mtls"), "dev-c-env")
    client.disconnect()
    client.loop_stop()
    with pytest.raises(
        Exception,
        match="IOTFLOW_MQTT_CA_FILE, IOTFLOW_MQTT_CERT_FILE, IOTFLOW_MQTT_KEY_FILE set but IOTFLOW_MQTT_URL 'mqtt://u:\\*\\*\\*@h:1' is not mqtts://",
    ):
        Settings(_env_file=None, mqtt_url="mqtt://u:pw@h:1")


def test_source_and_sink_over_tls_with_acl(
    sec: SecurityDir, broker: SecureMosquitto, mqtt_poll: Callable[..., list[Any]]
) -> None:
    """The flow user's MqttSource gets device telemetry over mqtts; a device's MqttSink may
    publish its own telemetry and gets PublishRejected for another device's."""
    tls = tls_for(sec)
    source = MqttSource(
        broker.url("flow"),
        [T.telemetry()],
        client_id=f"flow-{uuid.uuid4().hex[:6]}",
        status_base=BASE,
        tls=tls,
    )
    part = source.build("in", 0, 1)
    sink = MqttSink(broker.url("dev-a"), client_id=f"dev-a-{uuid.uuid4().hex[:6]}", tls=tls).build(
        "out", 0, 1
    )
    try:
        sink.write_batch([MqttMessage(T.telemetry("dev-a"), b'{"t": 1}')])
        got = mqtt_poll(part, 1)
        assert [(m.topic, m.payload) for m in got] == [(T.telemetry("dev-a"), b'{"t": 1}')]
        with pytest.raises(
            PublishRejected, match=r"refused the message to .*dev-b/telemetry.*0x87.*user 'dev-a'"
        ) as err:
            sink.write_batch([MqttMessage(T.telemetry("dev-b"), b'{"t": 2}')])
        assert sec.password("dev-a") not in str(err.value)
        assert mqtt_poll(part, 1, 0.5) == []
    finally:
        sink.close()
        part.close()


def test_persistence_keeps_retained_state_across_a_restart(
    sec: SecurityDir, tmp_path: Path
) -> None:
    """Mosquitto's defaults keep nothing across a restart; the secure profile persists."""
    payload = f"state-{uuid.uuid4().hex}".encode()
    data = tmp_path / "data"
    with SecureMosquitto(sec, data_dir=data).start() as first:
        probe = Probe(first.url("dev-b"), tls_for(sec), T.cmd("dev-b"))
        assert probe.publish(T.state("dev-b"), payload, retain=True) < 0x80
        probe.close()
    assert (data / "mosquitto.db").exists()
    with SecureMosquitto(sec, data_dir=data).start() as second:
        reader = Probe(second.url("flow"), tls_for(sec), T.state("dev-b"))
        try:
            assert reader.wait_for(payload, 5)
        finally:
            reader.close()


def test_reload_applies_a_new_device_without_restart(
    sec: SecurityDir, broker: SecureMosquitto
) -> None:
    device = f"dev-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConfigError, match="no password for user"):
        broker.url(device)
    sec.add_device(device)
    broker.reload()
    deadline = time.monotonic() + 5
    while True:
        allowed, detail = check_login(broker.url(device), tls_for(sec))
        if allowed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert allowed, detail


def test_password_hash_matches_mosquitto_passwd_format(tmp_path: Path) -> None:
    import subprocess

    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "u", "pw"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    _, kind, iterations, salt, _digest = theirs.split("$")
    import base64

    assert hash_password("pw", iterations=int(iterations), salt=base64.b64decode(salt)) == theirs
    assert kind == "7"


def test_acl_rejects_names_that_would_widen_a_pattern() -> None:
    for bad in ["a/b", "+", "#", "x:y", ""]:
        with pytest.raises(ConfigError):
            render_acl("iotflow", [AclUser(bad, read=("t",))])
    with pytest.raises(ConfigError, match="not a topic filter"):
        render_acl("iotflow", [AclUser("svc", read=("a\nuser root",))])


def test_secrets_stay_out_of_repr_and_config_dumps() -> None:
    s = Settings(
        _env_file=None,
        mqtt_url="mqtts://flow:mqtt-s3cret@broker:8883",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="scram-sha-512",
        kafka_sasl_username="flow",
        kafka_sasl_password="kafka-s3cret",
    )
    for text in (repr(s), str(s), repr(MqttUrl.parse("mqtts://flow:mqtt-s3cret@broker:8883"))):
        assert "mqtt-s3cret" not in text and "kafka-s3cret" not in text
    config = security_config(s)
    assert config == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "flow",
        "sasl.password": "kafka-s3cret",
    }
    assert "kafka-s3cret" not in repr(redact_config(config))
    assert s.to_env()["IOTFLOW_KAFKA_SASL_PASSWORD"] == "kafka-s3cret"  # for the flow subprocess


def test_kafka_security_settings_map_and_validate(tmp_path: Path) -> None:
    """Tansu has no SASL, so the mapping is checked as a pure function."""
    assert security_config(Settings(_env_file=None)) == {}
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    s = Settings(_env_file=None, kafka_security_protocol="ssl", kafka_ca_file=ca)
    assert security_config(s) == {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
    with pytest.raises(
        ConfigError,
        match="SASL_SSL needs IOTFLOW_KAFKA_SASL_MECHANISM, IOTFLOW_KAFKA_SASL_PASSWORD",
    ):
        security_config(
            Settings(_env_file=None, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u")
        )
    with pytest.raises(
        ConfigError,
        match="IOTFLOW_KAFKA_SASL_USERNAME set but IOTFLOW_KAFKA_SECURITY_PROTOCOL is None",
    ):
        security_config(Settings(_env_file=None, kafka_sasl_username="u"))
    with pytest.raises(
        ConfigError, match=f"IOTFLOW_KAFKA_CA_FILE={tmp_path / 'x.pem'}: no such file"
    ):
        security_config(
            Settings(
                _env_file=None, kafka_security_protocol="SSL", kafka_ca_file=tmp_path / "x.pem"
            )
        )
    with pytest.raises(
        ConfigError, match="CA_FILE is set but IOTFLOW_KAFKA_SECURITY_PROTOCOL is PLAINTEXT"
    ):
        security_config(
            Settings(_env_file=None, kafka_security_protocol="plaintext", kafka_ca_file=ca)
        )


def test_security_config_reaches_every_kafka_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.kafka import KafkaInput, producer_config

    monkeypatch.setenv("IOTFLOW_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("IOTFLOW_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("IOTFLOW_KAFKA_SASL_USERNAME", "flow")
    monkeypatch.setenv("IOTFLOW_KAFKA_SASL_PASSWORD", "pw")
    assert producer_config("h:9")["sasl.username"] == "flow"
    assert KafkaInput("h:9", ["t"])._add_config["security.protocol"] == "SASL_SSL"


def test_stable_client_id_is_required_for_a_will() -> None:
    with pytest.raises(ConfigError, match="stable client id"):
        connect_client("mqtt://127.0.0.1:1", "", will=("x/status", b"offline"))
    with pytest.raises(ConfigError, match="stable client_id"):
        MqttSource("mqtt://127.0.0.1:1", ["a/#"], client_id="")


def test_cli_creates_users_and_keeps_mosquitto_passwd_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's commands, then a user added with mosquitto_passwd: all of them log in."""
    import subprocess

    d = tmp_path / "sec"
    assert main([str(d), "init", "--base", BASE]) == 0
    assert main([str(d), "device", "pump-7"]) == 0
    assert main([str(d), "device", "valve-3", "--cert", "--no-password"]) == 0
    assert main([str(d), "gateway", "gw-9", "--device", "pump-7"]) == 0
    assert main([str(d), "device", "bad/id"]) == 2
    sec = SecurityDir(d)
    printed = capsys.readouterr()
    assert "contains '/'" in printed.err
    for user in sec.users():
        assert sec.password(user) not in printed.out + printed.err
    subprocess.run(
        ["mosquitto_passwd", "-b", str(sec.password_file), "legacy", "legacy-pw"], check=True
    )
    sec.add_device("pump-8")
    sec.write_broker_files()  # keeps the line mosquitto_passwd wrote
    tls = tls_for(sec)
    with SecureMosquitto(sec).start() as broker:
        for url, case_tls in [
            (broker.url("legacy", password="legacy-pw"), tls),
            (broker.url("pump-7"), tls),
            (broker.url("gw-9"), tls),
            (broker.url("flow"), tls),
            (broker.url("valve-3", listener="mtls"), tls_for(sec, "valve-3")),
        ]:
            allowed, detail = check_login(url, case_tls)
            assert allowed, detail
        allowed, _ = check_login(broker.url("valve-3", password="x"), tls)
        assert not allowed  # certificate only
