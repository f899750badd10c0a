"""The device simulator: seeded patterns, exact fault counts, commands over a real broker."""

from __future__ import annotations

import doctest
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

import infra.simulator.config
import infra.simulator.model
from connectors.decode import TelemetryDecoder
from infra.simulator import Fleet, FleetConfig
from infra.stack import StackInfo, free_port
from iotflow.errors import BrokerUnavailable, ConfigError
from iotflow.events import Command, DeviceMessage
from iotflow.topics import MqttTopics

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Got:
    topic: str
    payload: bytes
    retain: bool
    received_ms: int

    def json(self) -> Any:
        return msgspec.json.decode(self.payload)


class Recorder:
    """A plain paho client that records what arrives on its topics and can send commands."""

    def __init__(self, url: str, topics: list[str]) -> None:
        parts = urlsplit(url)
        self.messages: list[Got] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        self.client.subscribe([(topic, 1) for topic in topics])
        if not subscribed.wait(5):
            raise RuntimeError("the recorder could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        got = Got(message.topic, message.payload, bool(message.retain), now_ms())
        with self._cond:
            self.messages.append(got)
            self._cond.notify_all()

    def wait_for(self, count: int, where: Callable[[Got], bool] = lambda g: True) -> list[Got]:
        """The first ``count`` messages matching ``where``; fails after 5 s."""
        with self._cond:
            self._cond.wait_for(lambda: len([g for g in self.messages if where(g)]) >= count, 5)
            found = [g for g in self.messages if where(g)]
        assert len(found) >= count, f"got {len(found)} of {count} messages"
        return found

    def send(self, topic: str, payload: bytes) -> int:
        sent_ms = now_ms()
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)
        return sent_ms

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def record(stack: StackInfo) -> Iterator[Callable[[list[str]], Recorder]]:
    recorders: list[Recorder] = []

    def make(topics: list[str]) -> Recorder:
        recorders.append(Recorder(stack.mqtt_url, topics))
        return recorders[-1]

    yield make
    for recorder in recorders:
        recorder.close()


def command(
    command_id: str, device_id: str, name: str, expires_in_s: float = 30.0, **params: Any
) -> bytes:
    issued = datetime.now(UTC)
    return msgspec.json.encode(
        Command(
            command_id, device_id, name, params, issued, issued + timedelta(seconds=expires_in_s)
        )
    )


def test_docstring_examples_run() -> None:
    for module in (infra.simulator.model, infra.simulator.config):
        result = doctest.testmod(module)
        assert result.failed == 0
        assert result.attempted > 0


# --- fleet layout and config -----------------------------------------------


def test_devices_split_over_kinds_with_readable_ids() -> None:
    model = FleetConfig(devices=7).build()
    assert list(model.devices) == [
        "temp-0001",
        "temp-0002",
        "power-0001",
        "power-0002",
        "hvac-0001",
        "lock-0001",
        "light-0001",
    ]
    weighted = FleetConfig(devices=10, kinds={"hvac": 3, "light": 1}).device_counts()
    assert weighted == {"hvac": 8, "light": 2}
    assert list(FleetConfig(devices={"lock": 2}).build().devices) == ["lock-0001", "lock-0002"]


@pytest.mark.parametrize(
    ("config", "loc", "says"),
    [
        ({"rate_hz": 0}, ("rate_hz",), "greater than 0"),
        ({"faults": {"malformed_rate": 1.5}}, ("faults", "malformed_rate"), "less than or equal"),
        ({"faults": {"offline_s": 0}}, ("faults", "offline_s"), "greater than 0"),
        ({"commands": {"ack_latency_ms": -1}}, ("commands", "ack_latency_ms"), "greater than"),
        (
            {"patterns": {"temprature": [{"kind": "noise", "std": 1}]}},
            ("patterns",),
            "choose from battery (lock), energy_kwh (power), humidity (temp), power_w (power), "
            "temperature (temp/hvac)",
        ),
        ({"patterns": {"light.temperature": []}}, ("patterns",), "no device kind"),
        (
            {"patterns": {"temperature": [{"kind": "sinus"}]}},
            ("patterns", "temperature", 0),
            "'constant', 'noise', 'sine', 'spikes', 'drift'",
        ),
        (
            {"patterns": {"locked": [{"kind": "constant", "value": 0}]}},
            ("patterns",),
            "'locked' is reported state of lock devices and changes only through commands",
        ),
        ({"devices": {"toaster": 1}}, ("devices",), "toaster"),
        ({"devices": 0}, ("devices",), "at least 1"),
        ({"devices": {"lock": 1}, "kinds": {"lock": 1}}, ("kinds",), "counts per kind"),
        ({"base": "a/b"}, ("base",), "without '+', '#', '/'"),
        ({"qos": 3}, ("qos",), "Input should be 0, 1 or 2"),
        ({"rate": 2}, ("rate",), "Extra inputs are not permitted"),
    ],
)
def test_bad_config_names_the_field(
    config: dict[str, Any], loc: tuple[Any, ...], says: str
) -> None:
    with pytest.raises(ValidationError) as info:
        FleetConfig.model_validate(config)
    errors = info.value.errors()
    assert any(err["loc"][: len(loc)] == loc for err in errors), errors
    assert says in str(info.value)


def test_bad_url_and_unreachable_broker_raise_named_errors() -> None:
    with pytest.raises(ConfigError, match="mqtt:// or mqtts://"):
        Fleet({"devices": 1}, "http://127.0.0.1:1883")
    url = f"mqtt://sim:s3cret@127.0.0.1:{free_port()}"
    fleet = Fleet({"devices": 1}, url, connect_timeout_s=2)
    with pytest.raises(BrokerUnavailable) as info:
        fleet.start()
    assert "sim:***@127.0.0.1" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="not started"):
        fleet.publish_once()


# --- values: determinism and patterns ----------------------------------------


def payloads(config: FleetConfig, stamps: list[int]) -> list[bytes]:
    model = config.build()
    return [out.payload for stamp in stamps for out in model.round(stamp)]


def test_same_seed_and_timestamps_give_identical_payloads() -> None:
    faults = {"malformed_rate": 0.2, "clock_skew_ms": 2000, "offline_rate": 0.2, "offline_s": 2}
    stamps = [T0 + i * 500 for i in range(20)]
    first = payloads(FleetConfig(devices=25, seed=7, faults=faults), stamps)
    assert first == payloads(FleetConfig(devices=25, seed=7, faults=faults), stamps)
    assert first != payloads(FleetConfig(devices=25, seed=8, faults=faults), stamps)


def series(patterns: list[dict[str, Any]], stamps: list[int], seed: int = 0) -> list[float]:
    config = FleetConfig(devices={"temp": 1}, seed=seed, patterns={"temperature": patterns})
    model = config.build()
    readings = [model.telemetry("temp-0001", stamp) for stamp in stamps]
    return [msgspec.json.decode(out.payload)["temperature"] for out in readings if out]


def test_sine_swings_by_its_amplitude_around_the_constant() -> None:
    stamps = [T0 + i * 250 for i in range(240)]  # one 60 s period; T0 is a multiple of 60 s
    values = series(
        [{"kind": "constant", "value": 20}, {"kind": "sine", "period_s": 60, "amplitude": 5}],
        stamps,
    )
    assert max(values) == 25.0
    assert min(values) == 15.0
    assert values[0] == 20.0
    assert values[60] == 25.0  # a quarter period in


def test_drift_grows_per_hour_from_the_first_reading() -> None:
    stamps = [T0 + i * 60_000 for i in range(61)]
    values = series([{"kind": "constant", "value": 10}, {"kind": "drift", "per_hour": 2}], stamps)
    assert values[0] == 10.0
    assert values[30] == 11.0
    assert values[60] == 12.0
    assert values == sorted(values)


def test_spikes_appear_at_their_rate_exactly_again_with_the_same_seed() -> None:
    stamps = [T0 + i * 1000 for i in range(4000)]
    spec = [
        {"kind": "constant", "value": 0},
        {"kind": "spikes", "probability": 0.05, "magnitude": 100},
    ]
    values = series(spec, stamps)
    spikes = [i for i, value in enumerate(values) if value == 100.0]
    assert set(values) == {0.0, 100.0}
    assert 150 <= len(spikes) <= 250  # 200 expected; sd ~14
    assert [i for i, v in enumerate(series(spec, stamps)) if v == 100.0] == spikes
    assert [i for i, v in enumerate(series(spec, stamps, seed=1)) if v == 100.0] != spikes


def test_noise_has_its_standard_deviation() -> None:
    stamps = [T0 + i * 1000 for i in range(3000)]
    values = series([{"kind": "constant", "value": 50}, {"kind": "noise", "std": 2}], stamps)
    assert abs(statistics.mean(values) - 50) < 0.2
    assert 1.8 < statistics.stdev(values) < 2.2


def test_kind_specific_pattern_wins_and_others_keep_defaults() -> None:
    config = FleetConfig(
        devices={"temp": 1, "hvac": 1},
        patterns={
            "temperature": [{"kind": "constant", "value": 5}],
            "hvac.temperature": [{"kind": "constant", "value": 7}],
        },
    )
    model = config.build()
    temp = msgspec.json.decode(model.telemetry("temp-0001", T0).payload)
    hvac = msgspec.json.decode(model.telemetry("hvac-0001", T0).payload)
    assert temp["temperature"] == 5.0
    assert hvac["temperature"] == 7.0
    assert 30 < temp["humidity"] < 60  # the default humidity pattern
    assert hvac["setpoint"] == 21.0
    assert hvac["fan_speed"] == 1


# --- faults ------------------------------------------------------------------


def test_offline_devices_are_silent_for_whole_slots_and_counted() -> None:
    config = FleetConfig(devices=20, faults={"offline_rate": 0.5, "offline_s": 10})
    model = config.build()
    stamps = [T0 + i * 1000 for i in range(100)]
    sent: dict[str, set[int]] = {device_id: set() for device_id in model.devices}
    for stamp in stamps:
        for out in model.round(stamp):
            sent[out.topic.split("/")[-2]].add(stamp)
    for device_id, stamps_sent in sent.items():
        for slot in range(10):
            in_slot = {s for s in stamps if (s - T0) // 10_000 == slot}
            assert in_slot & stamps_sent in (set(), in_slot), device_id
            assert (in_slot & stamps_sent == set()) == model.is_offline(device_id, min(in_slot))
    silent = 20 * 100 - sum(len(s) for s in sent.values())
    assert model.stats().offline_skips == silent
    assert 0.3 < silent / 2000 < 0.7


def test_clock_skew_is_fixed_per_device_and_bounded() -> None:
    model = FleetConfig(devices=30, faults={"clock_skew_ms": 500}).build()
    skews: dict[str, set[int]] = {}
    for stamp in (T0, T0 + 1000, T0 + 2000):
        for out in model.round(stamp):
            skews.setdefault(out.topic, set()).add(msgspec.json.decode(out.payload)["ts"] - stamp)
    assert all(len(s) == 1 for s in skews.values())
    values = [s.pop() for s in skews.values()]
    assert all(-500 <= v <= 500 for v in values)
    assert len(set(values)) > 20
    assert {d.clock_skew_ms for d in model.stats().devices.values()} == set(values)


def test_malformed_messages_are_counted_exactly_and_each_is_rejected_whole(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    recorder = record([topics.telemetry()])
    config = FleetConfig(
        devices=20,
        base=names.mqtt_base,
        seed=3,
        faults={"malformed_rate": 0.3, "clock_skew_ms": 1000},
    )
    with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
        for _ in range(10):
            fleet.publish_once()
    stats = fleet.stats
    got = recorder.wait_for(200)
    assert len(got) == 200 == stats.readings_sent + stats.malformed_sent
    assert 30 < stats.malformed_sent < 90
    assert set(stats.malformed_by_kind) == {"truncated", "not_object", "bad_ts"}
    assert sum(stats.malformed_by_kind.values()) == stats.malformed_sent

    decoder = TelemetryDecoder()
    rejected = 0
    for message in got:
        out = decoder.decode([DeviceMessage(message.topic, message.payload, message.received_ms)])
        assert len(out.ok) + len(out.dead) == 1, message.payload
        rejected += len(out.dead)
        if out.ok:
            reading = out.ok[0]
            assert reading.device_id == message.topic.split("/")[-2]
            assert reading.metrics == {k: float(v) for k, v in message.json().items() if k != "ts"}
    assert rejected == stats.malformed_sent
    for device in stats.devices.values():
        assert device.seq == 10
        assert device.last_telemetry is not None


# --- publishing on the broker ------------------------------------------------


def test_same_seed_gives_identical_payloads_over_mqtt(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    stamps = [T0, T0 + 1000, T0 + 2000]
    faults = {"malformed_rate": 0.1, "clock_skew_ms": 300}
    received: list[list[bytes]] = []
    for run in ("a", "b"):
        base = f"{names.mqtt_base}{run}"
        recorder = record([MqttTopics(base).telemetry()])
        config = FleetConfig(devices=15, seed=11, base=base, faults=faults)
        with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
            published = [out.payload for stamp in stamps for out in fleet.publish_once(stamp)]
        received.append([g.payload for g in recorder.wait_for(45)])
        assert received[-1] == published
    assert received[0] == received[1]
    assert received[0] == payloads(FleetConfig(devices=15, seed=11, faults=faults), stamps)


def test_scheduler_spreads_telemetry_and_stop_delivers_everything(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    recorder = record([topics.telemetry(), topics.state()])
    config = FleetConfig(devices=40, rate_hz=5, base=names.mqtt_base)
    stats = Fleet(config, stack.mqtt_url).run(1.0)
    assert 150 <= stats.readings_sent <= 250  # 40 devices x 5 Hz x 1 s
    telemetry = recorder.wait_for(stats.readings_sent, lambda g: g.topic.endswith("/telemetry"))
    assert len(telemetry) == stats.readings_sent
    assert len(recorder.wait_for(40, lambda g: g.topic.endswith("/state"))) == 40
    # Spread over each period, not sent in bursts: most messages carry their own ms.
    stamps = [g.json()["ts"] for g in telemetry]
    assert len(set(stamps)) > 0.6 * len(stamps)
    per_device = Counter(g.topic for g in telemetry)
    assert len(per_device) == 40
    assert min(per_device.values()) >= 3
    for device_id, device in stats.devices.items():
        last = [g.json() for g in telemetry if g.topic == topics.telemetry(device_id)][-1]
        assert device.last_telemetry == last


# --- commands ----------------------------------------------------------------


def test_command_acked_after_latency_and_new_state_retained(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    config = FleetConfig(
        devices={"hvac": 2},
        base=names.mqtt_base,
        commands={"ack_latency_ms": 150, "send_accepted": True},
    )
    recorder = record([topics.ack()])
    with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
        sent_ms = recorder.send(
            topics.cmd("hvac-0002"), command("c1", "hvac-0002", "set_temperature", setpoint=23.5)
        )
        accepted, done = recorder.wait_for(2)
        assert accepted.json() == {
            "command_id": "c1",
            "status": "accepted",
            "reason": None,
            "reported": {"kind": "hvac", "mode": "auto", "setpoint": 21.0, "fan_speed": 1},
        }
        assert done.topic == topics.ack("hvac-0002")
        assert done.json()["status"] == "done"
        assert done.json()["reported"]["setpoint"] == 23.5
        assert done.received_ms - sent_ms >= 150
        reading = msgspec.json.decode(fleet.publish_once()[1].payload)
        assert reading["setpoint"] == 23.5
    stats = fleet.stats
    assert stats.devices["hvac-0002"].reported["setpoint"] == 23.5
    assert stats.devices["hvac-0001"].reported["setpoint"] == 21.0
    assert (stats.commands_received, stats.commands_executed, stats.acks_sent) == (1, 1, 2)

    late = record([topics.state()])
    states = {g.topic: g for g in late.wait_for(2)}
    assert states[topics.state("hvac-0002")].retain
    assert states[topics.state("hvac-0002")].json()["setpoint"] == 23.5
    assert states[topics.state("hvac-0001")].json()["setpoint"] == 21.0


def test_failure_rate_fails_commands_without_changing_state(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    config = FleetConfig(
        devices={"light": 4},
        base=names.mqtt_base,
        commands={"ack_latency_ms": 0, "ack_failure_rate": 0.5},
    )
    recorder = record([topics.ack()])
    with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
        for i in range(40):
            device_id = f"light-000{i % 4 + 1}"
            recorder.send(
                topics.cmd(device_id), command(f"c{i}", device_id, "set_brightness", brightness=i)
            )
        acks = [g.json() for g in recorder.wait_for(40)]
    stats = fleet.stats
    failed = [a for a in acks if a["status"] == "failed"]
    assert 8 <= len(failed) <= 32
    assert stats.commands_failed == len(failed)
    assert stats.commands_executed == 40 - len(failed)
    assert all("ack_failure_rate" in a["reason"] for a in failed)
    for i in range(4):
        device_id = f"light-000{i + 1}"
        done = [a for a in acks if a["status"] == "done" and int(a["command_id"][1:]) % 4 == i]
        expected = done[-1]["reported"]["brightness"] if done else 100
        assert stats.devices[device_id].reported["brightness"] == expected


def test_repeated_command_id_runs_once_and_is_reacked(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    config = FleetConfig(
        devices={"lock": 1}, base=names.mqtt_base, commands={"ack_latency_ms": 100}
    )
    recorder = record([topics.ack()])
    cmd_topic = topics.cmd("lock-0001")
    with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
        unlock = command("u1", "lock-0001", "unlock")
        recorder.send(cmd_topic, unlock)
        recorder.send(cmd_topic, unlock)  # while the first is pending
        recorder.wait_for(2)
        recorder.send(cmd_topic, command("l1", "lock-0001", "lock"))
        recorder.wait_for(3)
        recorder.send(cmd_topic, unlock)  # after it ran, and after a later command
        acks = [g.json() for g in recorder.wait_for(4)]
    stats = fleet.stats
    assert [a["command_id"] for a in acks] == ["u1", "u1", "l1", "u1"]
    assert acks[0] == acks[1] == acks[3]
    assert acks[0]["reported"]["locked"] == 0
    assert stats.devices["lock-0001"].reported["locked"] == 1  # u1 did not run again
    assert (stats.commands_received, stats.commands_executed, stats.duplicate_commands) == (4, 2, 2)
    assert stats.acks_sent == 4
    assert stats.states_published == 1 + 2  # the initial state, then one per execution


def test_bad_commands_are_answered_or_counted_and_never_stop_the_fleet(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    config = FleetConfig(
        devices={"hvac": 1, "temp": 1}, base=names.mqtt_base, commands={"ack_latency_ms": 0}
    )
    recorder = record([topics.ack()])
    hvac = topics.cmd("hvac-0001")
    with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
        recorder.send(hvac, b"{not json")
        recorder.send(hvac, b'{"command_id": "b1", "params": {}}')
        recorder.send(hvac, command("b2", "hvac-0001", "self_destruct"))
        recorder.send(hvac, command("b3", "hvac-0001", "set_mode", mode="turbo"))
        recorder.send(hvac, command("b4", "hvac-0001", "set_fan_speed", speed=1.5))
        recorder.send(hvac, command("b5", "hvac-0001", "set_mode", expires_in_s=-1, mode="heat"))
        recorder.send(topics.cmd("temp-0001"), command("b6", "temp-0001", "turn_on"))
        recorder.send(topics.cmd("ghost-0001"), command("b7", "ghost-0001", "turn_on"))
        recorder.send(hvac, command("ok", "hvac-0001", "set_mode", mode="cool"))
        acks = {a["command_id"]: a for a in (g.json() for g in recorder.wait_for(7))}
    stats = fleet.stats
    assert {k: a["status"] for k, a in acks.items()} == {
        "b1": "failed",
        "b2": "failed",
        "b3": "failed",
        "b4": "failed",
        "b5": "failed",
        "b6": "failed",
        "ok": "done",
    }
    assert "invalid command" in acks["b1"]["reason"] and "name" in acks["b1"]["reason"]
    assert acks["b2"]["reason"] == (
        "unknown command 'self_destruct' for hvac devices; they "
        "accept: set_mode, set_temperature, set_fan_speed"
    )
    assert "one of off, heat, cool, auto, fan; got 'turbo'" in acks["b3"]["reason"]
    assert "an integer in 0..3; got 1.5" in acks["b4"]["reason"]
    assert acks["b5"]["reason"].startswith("expired at")
    assert "accept: none" in acks["b6"]["reason"]
    assert acks["ok"]["reported"]["mode"] == "cool"
    assert stats.invalid_commands == 2
    assert stats.commands_received == 8
    assert stats.commands_failed == 6
    assert stats.commands_executed == 1
    assert stats.ignored_commands == {"unknown device": 1}
    assert stats.devices["hvac-0001"].reported["mode"] == "cool"


def test_offline_device_ignores_commands() -> None:
    model = FleetConfig(
        devices={"light": 10}, faults={"offline_rate": 0.5, "offline_s": 60}
    ).build()
    offline = [d for d in model.devices if model.is_offline(d, T0)]
    online = [d for d in model.devices if not model.is_offline(d, T0)]
    assert offline and online
    payload = command("x", offline[0], "turn_on")
    assert model.receive_command(offline[0], payload, T0).follow_up is None
    intake = model.receive_command(online[0], payload, T0)
    assert intake.follow_up is not None
    assert msgspec.json.decode(model.follow_up(online[0], "x", T0)[0].payload)["status"] == "done"
    stats = model.stats()
    assert stats.ignored_commands == {"offline": 1}
    assert stats.devices[online[0]].reported["on"] == 1
    assert stats.devices[offline[0]].reported["on"] == 0


# -- kinds and faults for orchestration: security, notifier, node firmware, hubs, drops -----


def intake(model: Any, device_id: str, payload: bytes, at_ms: int = T0) -> list[dict[str, Any]]:
    """Receive a command and run its follow-up at once; the acks as dicts."""
    got = model.receive_command(device_id, payload, at_ms)
    out = list(got.outgoing)
    if got.follow_up is not None:
        out += model.follow_up(device_id, got.follow_up.command_id, at_ms + 1)
    return [msgspec.json.decode(o.payload) for o in out if o.topic.endswith("/ack")]


def test_orchestration_kinds_join_only_when_named() -> None:
    assert set(FleetConfig(devices=10).device_counts()) == {
        "temp",
        "power",
        "hvac",
        "lock",
        "light",
    }
    model = FleetConfig(devices={"security": 1, "notifier": 1, "node": 2}).build()
    assert list(model.devices) == ["security-0001", "notifier-0001", "node-0001", "node-0002"]
    assert [a["status"] for a in intake(model, "security-0001", command("a", "x", "arm"))] == [
        "done"
    ]
    assert model.stats().devices["security-0001"].reported == {"kind": "security", "armed": 1}
    assert msgspec.json.decode(model.telemetry("security-0001", T0).payload)["armed"] == 1
    intake(model, "security-0001", command("b", "x", "disarm"))
    assert model.stats().devices["security-0001"].reported["armed"] == 0


def test_notify_runs_once_per_command_id() -> None:
    model = FleetConfig(devices={"notifier": 1}).build()
    msg = command("n1", "notifier-0001", "notify", message="house secured")
    assert [a["status"] for a in intake(model, "notifier-0001", msg)] == ["done"]
    assert [a["status"] for a in intake(model, "notifier-0001", msg)] == ["done"]  # re-acked
    device = model.stats().devices["notifier-0001"]
    assert device.executed == ("n1",)
    assert device.reported["last_message"] == "house secured"
    bad = intake(model, "notifier-0001", command("n2", "notifier-0001", "notify", message=""))
    assert bad[0]["status"] == "failed" and "non-empty string" in bad[0]["reason"]
    huge = intake(model, "notifier-0001", command("n3", "x", "notify", message="x" * 5000))
    assert huge[0]["status"] == "failed"


def test_firmware_updates_fail_on_the_failing_nodes_only_to_another_version() -> None:
    config = FleetConfig(
        devices={"node": 20},
        firmware={"version": "1.0", "failing": ["node-0003"], "failure_rate": 0.25},
    )
    model = config.build()
    assert model.stats().devices["node-0001"].reported == {"kind": "node", "firmware": "1.0"}
    statuses = {
        d: intake(model, d, command(f"u-{d}", d, "update_firmware", version="2.0"))[0]["status"]
        for d in model.devices
    }
    failing = {d for d, s in statuses.items() if s == "failed"}
    assert "node-0003" in failing and 2 <= len(failing) <= 12
    assert failing == {d for d in model.devices if model.devices[d].firmware_fails}
    assert config.build().devices.keys() == model.devices.keys()  # the draw is seeded
    assert {d for d in model.devices if config.build().devices[d].firmware_fails} == failing
    for d in model.devices:
        want = "1.0" if d in failing else "2.0"
        assert model.stats().devices[d].reported["firmware"] == want
    # back to the version it runs: nothing to install, succeeds everywhere
    assert (
        intake(model, "node-0003", command("r", "x", "update_firmware", version="1.0"))[0]["status"]
        == "done"
    )
    with pytest.raises(
        ValueError, match=r"firmware\.failing names devices the fleet does not have"
    ):
        FleetConfig(devices={"node": 2}, firmware={"failing": ["node-0009"]}).build()


def test_hub_goes_offline_after_its_commands_and_comes_back() -> None:
    config = FleetConfig(
        devices={"light": 6, "lock": 1},
        hubs={
            "lighting": {"devices": ["light-*"], "offline_after_commands": 3, "offline_for_s": 10}
        },
    )
    model = config.build()
    answered = [
        bool(intake(model, f"light-000{i}", command(f"c{i}", "x", "turn_on"), T0 + i))
        for i in range(1, 7)
    ]
    assert answered == [True, True, True, False, False, False]
    assert model.stats().ignored_commands["hub offline"] == 3
    assert model.telemetry("light-0001", T0 + 100) is None  # silent while offline
    assert intake(model, "lock-0001", command("l", "x", "unlock"), T0 + 100)  # not behind the hub
    later = T0 + 10_004
    assert intake(model, "light-0006", command("c6", "x", "turn_on"), later)[0]["status"] == "done"
    assert model.telemetry("light-0001", later) is not None
    assert intake(model, "light-0005", command("c7", "x", "turn_on"), later + 1)  # trips once only


def test_hub_by_hand_and_lost_follow_ups() -> None:
    model = FleetConfig(
        devices={"light": 2}, hubs={"lighting": {"devices": ["light-0001"]}}
    ).build()
    got = model.receive_command("light-0001", command("c1", "x", "turn_on"), T0)
    model.set_hub_online("lighting", False, T0 + 1)
    assert (
        model.follow_up("light-0001", got.follow_up.command_id, T0 + 2) == []
    )  # lost with the hub
    assert intake(
        model, "light-0002", command("c2", "x", "turn_on"), T0 + 3
    )  # another hub's device
    model.set_hub_online("lighting", True, T0 + 4)
    assert intake(model, "light-0001", command("c1", "x", "turn_on"), T0 + 5)[0]["status"] == "done"
    with pytest.raises(KeyError, match="unknown hub 'heating'; hubs: lighting"):
        model.set_hub_online("heating", False, T0)


def test_command_drops_leave_first_deliveries_unanswered() -> None:
    model = FleetConfig(
        devices={"hvac": 2},
        faults={"command_drops": [{"devices": ["hvac-0001"], "first_attempts": 2}]},
    ).build()
    msg = command("t1", "hvac-0001", "set_temperature", setpoint=17)
    assert [intake(model, "hvac-0001", msg) for _ in range(4)] == [
        [],
        [],
        [
            {
                "command_id": "t1",
                "status": "done",
                "reported": {"kind": "hvac", "mode": "auto", "setpoint": 17.0, "fan_speed": 1},
                "reason": None,
            }
        ],
        [
            {
                "command_id": "t1",
                "status": "done",
                "reported": {"kind": "hvac", "mode": "auto", "setpoint": 17.0, "fan_speed": 1},
                "reason": None,
            }
        ],
    ]
    assert model.stats().devices["hvac-0001"].executed == ("t1",)
    assert model.stats().ignored_commands == {"dropped": 2}
    assert intake(model, "hvac-0002", command("t2", "x", "set_temperature", setpoint=17))


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"hubs": {"h": {"devices": []}}}, ("hubs", "h", "devices")),
        (
            {"hubs": {"h": {"devices": ["light-*"], "offline_for_s": 0}}},
            ("hubs", "h", "offline_for_s"),
        ),
        (
            {"faults": {"command_drops": [{"devices": ["x"], "first_attempts": 0}]}},
            ("faults", "command_drops", 0, "first_attempts"),
        ),
        ({"firmware": {"version": ""}}, ("firmware", "version")),
        ({"firmware": {"failure_rate": 2}}, ("firmware", "failure_rate")),
    ],
)
def test_bad_orchestration_faults_name_the_field(
    config: dict[str, Any], where: tuple[Any, ...]
) -> None:
    with pytest.raises(ValidationError) as info:
        FleetConfig.model_validate({"devices": {"light": 1}, **config})
    assert info.value.errors()[0]["loc"] == where


def test_hub_offline_over_mqtt(
    stack: StackInfo, names: Any, record: Callable[[list[str]], Recorder]
) -> None:
    topics = MqttTopics(names.mqtt_base)
    config = FleetConfig(
        devices={"light": 2},
        base=names.mqtt_base,
        commands={"ack_latency_ms": 0},
        hubs={"lighting": {"devices": ["light-*"]}},
    )
    recorder = record([topics.ack()])
    with Fleet(config, stack.mqtt_url, schedule_telemetry=False) as fleet:
        fleet.set_hub_online("lighting", False)
        recorder.send(topics.cmd("light-0001"), command("c1", "light-0001", "turn_on"))
        deadline = time.monotonic() + 5
        while not fleet.stats.ignored_commands and time.monotonic() < deadline:
            time.sleep(0.01)  # until the fleet has heard (and lost) c1
        fleet.set_hub_online("lighting", True)
        recorder.send(topics.cmd("light-0002"), command("c2", "light-0002", "turn_on"))
        (ack,) = recorder.wait_for(1)
        assert ack.json()["command_id"] == "c2"
    assert fleet.stats.ignored_commands == {"hub offline": 1}


def test_initial_state_overrides_by_glob() -> None:
    model = FleetConfig(
        devices={"light": 3, "hvac": 1},
        initial_state={"light-000[12]": {"on": 1, "brightness": 40}, "hvac-*": {"setpoint": 22}},
    ).build()
    states = {d: s.reported for d, s in model.stats().devices.items()}
    assert states["light-0001"] == {"kind": "light", "on": 1, "brightness": 40}
    assert states["light-0003"] == {"kind": "light", "on": 0, "brightness": 100}
    assert states["hvac-0001"]["setpoint"] == 22.0
    for bad, message in [
        ({"light-*": {"on": "x"}}, "has no on of type str"),
        ({"door-*": {"on": 1}}, "matches no device"),
        ({"light-*": {"colour": 1}}, "has no colour"),
    ]:
        with pytest.raises(ValueError, match=message):
            FleetConfig(devices={"light": 1}, initial_state=bad).build()
