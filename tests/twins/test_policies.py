"""Each conflict policy, race by race, through TwinSync; declarations of policies and per-group choice."""

from __future__ import annotations

import pytest

from iotflow.errors import ConfigError
from tests.twins.kit import T0_MS, desired, make_registry, reported
from twins.policies import DesiredWins, LatestTimestamp, ReportedWins, SourcePriority, parse_policy
from twins.registry import Registry
from twins.sync import TwinSync


def sync_for(policy, clock) -> TwinSync:
    return TwinSync(make_registry(policy), now=clock)


def apply(sync, *updates):
    outs = sync.on_batch(list(updates))
    return outs[0] if outs else None


# -- latest timestamp ----------------------------------------------------------------


def test_latest_timestamp_two_readings_race(clock):
    for order in ((0, 1), (1, 0)):
        sync = sync_for("latest_timestamp", clock)
        updates = [
            reported("t1", T0_MS + 1000, setpoint=21.0),
            reported("t1", T0_MS + 2000, setpoint=22.0),
        ]
        apply(sync, *[updates[i] for i in order])
        assert sync.twin("t1").reported == {"setpoint": 22.0}
        assert sync.twin("t1").r_ts == {"setpoint": T0_MS + 2000}
    assert sync.counters["superseded"] == 1  # the late, older reading lost


def test_latest_timestamp_desired_against_reading(clock):
    sync = sync_for("latest_timestamp", clock)
    apply(sync, reported("t1", T0_MS, setpoint=20.0))
    out = apply(sync, desired("t1", T0_MS + 100, setpoint=23))
    assert out.changes[0].delta == {"setpoint": 23.0} and out.commands
    # the device reports its old value, stamped after the desire: the device wins, the delta ends
    out = apply(sync, reported("t1", T0_MS + 200, setpoint=21.0))
    assert out.changes[0].delta == {}
    # a reading stamped before the desire does not end it (and does not replace the newer reading)
    sync2 = sync_for("latest_timestamp", clock)
    apply(sync2, reported("t1", T0_MS, setpoint=20.0), desired("t1", T0_MS + 100, setpoint=23))
    assert apply(sync2, reported("t1", T0_MS + 50, setpoint=20.0)) is None
    assert sync2.twin("t1").delta(LatestTimestamp()) == {"setpoint": 23.0}


def test_latest_timestamp_two_desired_writes_race(clock):
    sync = sync_for("latest_timestamp", clock)
    apply(sync, desired("t1", T0_MS + 500, setpoint=25), desired("t1", T0_MS + 100, setpoint=15))
    assert sync.twin("t1").desired == {"setpoint": 25.0}


# -- source priority -----------------------------------------------------------------

PRIORITY = {"policy": "source_priority", "priorities": ["operator", "state", "telemetry", "api"]}


def test_source_priority_state_beats_telemetry(clock):
    sync = sync_for(PRIORITY, clock)
    apply(sync, reported("t1", T0_MS, source="state", setpoint=22.0))
    # a later telemetry reading of lower priority does not replace the state topic's value
    apply(sync, reported("t1", T0_MS + 1000, source="telemetry", setpoint=21.0))
    assert sync.twin("t1").reported == {"setpoint": 22.0}
    # the same priority replaces by timestamp; an unknown source ranks lowest
    apply(sync, reported("t1", T0_MS + 2000, source="state", setpoint=23.0))
    apply(sync, reported("t1", T0_MS + 3000, source="gateway", setpoint=10.0))
    assert sync.twin("t1").reported == {"setpoint": 23.0}


def test_source_priority_desired_against_reading(clock):
    sync = sync_for(PRIORITY, clock)
    apply(sync, reported("t1", T0_MS, source="state", setpoint=20.0))
    out = apply(sync, desired("t1", T0_MS + 100, source="api", setpoint=23))
    assert out.changes[0].delta == {} and not out.commands  # the device outranks the API
    out = apply(sync, desired("t1", T0_MS + 200, source="operator", setpoint=24))
    assert out.changes[0].delta == {"setpoint": 24.0} and out.commands  # the operator outranks it
    assert apply(sync, reported("t1", T0_MS + 300, source="state", setpoint=20.0)) is None
    assert sync.twin("t1").delta(sync.registry.policy_of("t1")) == {"setpoint": 24.0}
    # an api write cannot replace the operator's desire
    apply(sync, desired("t1", T0_MS + 400, source="api", setpoint=11))
    assert sync.twin("t1").desired == {"setpoint": 24.0}


# -- desired wins --------------------------------------------------------------------


def test_desired_wins_keeps_the_desire_against_the_device(clock):
    sync = sync_for("desired_wins", clock)
    apply(sync, reported("t1", T0_MS, setpoint=20.0))
    apply(sync, desired("t1", T0_MS + 100, setpoint=23))
    out = apply(sync, reported("t1", T0_MS + 200, setpoint=21.0))  # someone turned the dial
    assert out.changes[0].desired == {"setpoint": 23.0}
    assert out.changes[0].delta == {"setpoint": 23.0}
    # readings apply in arrival order, whatever their stamps
    apply(sync, reported("t1", T0_MS + 50, setpoint=19.0))
    assert sync.twin("t1").reported == {"setpoint": 19.0}


# -- reported wins -------------------------------------------------------------------


def test_reported_wins_the_device_replaces_the_desire(clock):
    sync = sync_for("reported_wins", clock)
    apply(sync, reported("t1", T0_MS, setpoint=20.0))
    out = apply(sync, desired("t1", T0_MS + 100, setpoint=23))
    assert out.commands  # the request still goes out
    out = apply(sync, reported("t1", T0_MS + 200, setpoint=21.0))
    assert out.changes[0].desired == {"setpoint": 21.0} and out.changes[0].delta == {}
    assert not out.commands
    # the command that was in flight lands: its reading becomes the desire too
    out = apply(sync, reported("t1", T0_MS + 300, setpoint=23.0))
    assert out.changes[0].desired == {"setpoint": 23.0} and out.changes[0].delta == {}


# -- declarations ----------------------------------------------------------------------


def test_parse_policy_forms():
    assert isinstance(parse_policy("desired_wins"), DesiredWins)
    assert isinstance(parse_policy({"policy": "reported_wins"}), ReportedWins)
    sp = parse_policy({"policy": "source_priority", "priorities": ["state", "telemetry"]})
    assert isinstance(sp, SourcePriority)
    assert LatestTimestamp().skew_ms == 5000


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"policy": "lww"}, "latest_timestamp"),
        ({"policy": "source_priority"}, "priorities"),
        ({"policy": "source_priority", "priorities": ["a", "a"]}, "repeat"),
        ({"policy": "latest_timestamp", "skew_tolerance": "-1s"}, "zero or positive"),
        ({"policy": "desired_wins", "healing": "yes"}, "healing"),
        ({"policy": "desired_wins", "heal_after": "0s"}, "positive"),
        ({"policy": "desired_wins", "heal_attempts": 0}, "heal_attempts"),
        ({"policy": "desired_wins", "colour": 1}, "colour"),
    ],
)
def test_bad_policies_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_policy(data)


def test_policies_per_group():
    reg = make_registry(devices=("t1", "t2", "t3"))
    reg.add_group("doors", ["t1"])
    reg.add_group("sensors", ["t2", "t3"])
    reg.set_policy("doors", "reported_wins")
    reg.set_policy("sensors", {"policy": "latest_timestamp"})
    assert isinstance(reg.policy_of("t1"), ReportedWins)
    assert isinstance(reg.policy_of("t3"), LatestTimestamp)
    reg.add_device("t4", "thermo")
    assert isinstance(reg.policy_of("t4"), DesiredWins)  # the default
    with pytest.raises(ConfigError, match="different policies"):
        reg.add_group("mixed", ["t1", "t2"]) or reg.set_policy("mixed", "desired_wins")
    with pytest.raises(ConfigError, match="unknown group 'nope'"):
        reg.set_policy("nope", "desired_wins")
    again = Registry.from_dict(reg.to_dict())
    assert again.policies == reg.policies


def test_registry_file_with_policies(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "models: {m: {properties: {a: {type: float, writable: true}}, commands: {set_a: {params: {a: float}, sets: {a: params.a}}}}}\n"
        "devices: {d1: {model: m}, d2: {model: m}}\n"
        "groups: {g: [d1]}\n"
        "policies: {default: {policy: reported_wins}, g: {policy: latest_timestamp, skew_tolerance: 1s}}\n"
    )
    reg = Registry.load(path)
    assert reg.policy_of("d1").skew_ms == 1000 and isinstance(reg.policy_of("d2"), ReportedWins)
    path.write_text("policies: {g: desired_wins}\n")
    with pytest.raises(ConfigError, match="unknown group 'g'"):
        Registry.load(path)
