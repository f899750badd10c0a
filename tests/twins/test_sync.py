"""TwinSync: reported/desired sync, rejections, delta -> commands, staleness, healing, recovery."""

from __future__ import annotations

import math

import pytest

from iotflow.errors import ConfigError
from tests.twins.kit import T0_MS, THERMO, desired, make_registry, reported
from twins.registry import Registry
from twins.sync import INCONSISTENT_RULE, TwinOut, TwinSync
from twins.updates import Reported


def run(sync: TwinSync, *updates) -> TwinOut:
    outs = sync.on_batch(list(updates))
    return outs[0] if outs else TwinOut()


def timer(sync: TwinSync) -> TwinOut:
    outs = sync.on_timer()
    return outs[0] if outs else TwinOut()


@pytest.fixture
def sync(clock) -> TwinSync:
    return TwinSync(make_registry(), now=clock)


def test_first_reading_creates_the_twin(sync):
    out = run(sync, reported("t1", T0_MS, temperature=21.5, setpoint=20, seq=1))
    [change] = out.changes
    assert change.device_id == "t1" and change.model == "thermo"
    assert change.version == 1 and change.cause == "online" and change.online
    assert change.reported == {"temperature": 21.5, "setpoint": 20.0}
    assert change.reported_ts_ms == {"temperature": T0_MS, "setpoint": T0_MS}
    assert sorted(change.changed) == ["setpoint", "temperature"]
    assert change.delta == {} and not out.commands and not out.rejections


def test_a_repeated_reading_makes_no_version(sync):
    run(sync, reported("t1", T0_MS, temperature=21.5))
    out = run(sync, reported("t1", T0_MS + 1000, temperature=21.5))
    assert not out
    twin = sync.twin("t1")
    assert twin.version == 1 and twin.r_ts["temperature"] == T0_MS + 1000
    out = run(sync, reported("t1", T0_MS + 2000, temperature=22.0))
    assert [c.version for c in out.changes] == [2]


def test_unknown_device_is_rejected_and_counted(sync):
    out = run(sync, reported("ghost", T0_MS, temperature=1.0), desired("ghost", T0_MS, setpoint=20))
    assert [r.kind for r in out.rejections] == ["unknown_device", "unknown_device"]
    assert "ghost" in out.rejections[0].reason
    assert out.rejections[1].source == "twins.desired"
    assert sync.counters["rejected.unknown_device"] == 2
    assert sync.twin("ghost") is None and not out.changes


@pytest.mark.parametrize(
    ("values", "kind", "needle"),
    [
        ({"colour": "red"}, "unknown_property", "unknown property 'colour'"),
        ({"setpoint": 40.0}, "out_of_range", "out of range 10..32 C"),
        ({"setpoint": "hot"}, "wrong_type", "expected a number"),
        ({"temperature": math.nan}, "wrong_type", "not a finite number"),
        ({"temperature": math.inf}, "wrong_type", "not a finite number"),
        ({"mode": "turbo"}, "out_of_range", "not one of off, heat, cool"),
        ({"label": "x" * 5000}, "out_of_range", "over the limit"),
        ({"temperature": {"nested": 1}}, "wrong_type", "expected a number"),
    ],
)
def test_bad_fields_are_rejected_and_valid_ones_kept(sync, values, kind, needle):
    good = {"mode": "heat"} if "temperature" in values else {"temperature": 20.0}
    out = run(sync, Reported("t1", T0_MS, {**good, "seq": 4, **values}, "telemetry", T0_MS))
    [rejection] = out.rejections
    assert rejection.kind == kind and needle in rejection.reason
    assert rejection.device_id == "t1"
    assert sync.counters[f"rejected.{kind}"] == 1
    [change] = out.changes  # the valid field made it
    assert "seq" not in change.reported  # declared telemetry, not state
    assert change.reported == good


def test_a_property_also_named_as_telemetry_is_state(clock):
    reg = Registry()
    reg.define_model("thermo", {**THERMO, "telemetry": ["seq", "setpoint", "mode"]})
    reg.add_device("t1", "thermo")
    sync = TwinSync(reg, now=clock)
    out = run(sync, reported("t1", T0_MS, setpoint=21.0, mode="heat", seq=1))
    assert out.changes[0].reported == {"setpoint": 21.0, "mode": "heat"}
    out = run(sync, reported("t1", T0_MS + 1000, setpoint=40.0, mode="turbo", seq=2))
    assert sorted(sync.counters) == ["changes", "online", "rejected.out_of_range"]
    assert sync.counters["rejected.out_of_range"] == 2 and not out.changes


def test_future_timestamps_beyond_tolerance_are_rejected(clock):
    sync = TwinSync(
        make_registry({"policy": "latest_timestamp", "skew_tolerance": "2s"}), now=clock
    )
    out = run(sync, reported("t1", T0_MS + 2000, received_ms=T0_MS, temperature=1.0))
    assert out.changes and not out.rejections  # within tolerance
    out = run(sync, reported("t1", T0_MS + 60_000, received_ms=T0_MS, temperature=2.0))
    [rejection] = out.rejections
    assert rejection.kind == "future_timestamp" and "60000 ms" in rejection.reason
    assert sync.counters["rejected.future_timestamp"] == 1
    assert sync.twin("t1").reported["temperature"] == 1.0
    out = run(sync, desired("t1", T0_MS + 60_000, received_ms=T0_MS, setpoint=20))
    assert out.rejections[0].kind == "future_timestamp"


def test_desired_makes_a_command_and_the_report_clears_the_delta(sync, clock):
    run(sync, reported("t1", T0_MS, setpoint=20.0, mode="off"))
    out = run(sync, desired("t1", T0_MS + 10, base_version=1, setpoint=23, mode="heat"))
    [change] = out.changes
    assert change.version == 2 and change.cause == "desired"
    assert change.delta == {"setpoint": 23.0, "mode": "heat"}
    assert change.desired_ts_ms == {"setpoint": T0_MS + 10, "mode": T0_MS + 10}
    assert [(c.name, c.params) for c in out.commands] == [
        ("set_temperature", {"setpoint": 23.0}),
        ("set_mode", {"mode": "heat"}),
    ]
    command = out.commands[0]
    assert command.command_id == "twin/t1/v2/set_temperature"
    assert command.device_id == "t1" and command.issued_at == clock.now
    assert (command.expires_at - command.issued_at).total_seconds() == 60
    # the device did one of the two: half the delta clears, nothing is sent again
    out = run(sync, reported("t1", T0_MS + 500, source="state", setpoint=23.0))
    assert out.changes[0].delta == {"mode": "heat"} and not out.commands
    out = run(sync, reported("t1", T0_MS + 900, source="state", mode="heat"))
    assert out.changes[0].delta == {} and not out.commands
    assert sync.twin("t1").sent == {}


def test_a_new_delta_value_is_sent_again(sync):
    run(sync, reported("t1", T0_MS, setpoint=20.0))
    assert len(run(sync, desired("t1", T0_MS + 1, setpoint=23)).commands) == 1
    assert not run(sync, desired("t1", T0_MS + 2, setpoint=23)).commands  # same: no-op
    out = run(sync, desired("t1", T0_MS + 3, setpoint=25))
    assert [c.params for c in out.commands] == [{"setpoint": 25.0}]


def test_optimistic_concurrency(sync):
    run(sync, reported("t1", T0_MS, setpoint=20.0))
    out = run(sync, desired("t1", T0_MS, base_version=0, setpoint=22))
    [rejection] = out.rejections
    assert rejection.kind == "version_conflict"
    assert "based on version 0, but the twin is at version 1" in rejection.reason
    assert not out.changes and sync.twin("t1").desired == {}
    # two writers read version 1; the first wins, the second must re-read
    out = run(
        sync,
        desired("t1", T0_MS + 1, base_version=1, setpoint=22),
        desired("t1", T0_MS + 2, base_version=1, setpoint=24),
    )
    assert [c.version for c in out.changes] == [2]
    assert [r.kind for r in out.rejections] == ["version_conflict"]
    assert sync.twin("t1").desired == {"setpoint": 22.0}
    assert run(sync, desired("t1", T0_MS + 3, base_version=2, setpoint=24)).changes
    assert run(
        sync, desired("t1", T0_MS + 4, base_version=None, setpoint=25)
    ).changes  # unconditional


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ({"temperature": 30.0}, "not_writable"),
        ({"colour": "red"}, "unknown_property"),
        ({"setpoint": 99}, "out_of_range"),
        ({"setpoint": True}, "wrong_type"),
        ({"label": None}, "not_writable"),
    ],
)
def test_desired_is_all_or_nothing(sync, values, kind):
    out = run(sync, desired("t1", T0_MS, mode="heat", **values))
    [rejection] = out.rejections
    assert rejection.kind == kind and "nothing applied" in rejection.reason
    assert not out.changes and not out.commands
    assert sync.counters[f"rejected.{kind}"] == 1


def test_desired_without_a_command_is_rejected():
    reg = Registry()
    spec = {"properties": {"level": {"type": "int", "writable": True}}}
    reg.define_model("m", spec)
    reg.add_device("d", "m")
    out = run(TwinSync(reg), desired("d", T0_MS, level=3))
    assert (
        out.rejections[0].kind == "no_command"
        and "no command of model 'm' sets level" in out.rejections[0].reason
    )


def test_null_clears_a_desire(sync):
    run(sync, reported("t1", T0_MS, setpoint=20.0))
    run(sync, desired("t1", T0_MS + 1, setpoint=23))
    out = run(sync, desired("t1", T0_MS + 2, setpoint=None))
    assert out.changes[0].desired == {} and out.changes[0].delta == {}
    assert out.changes[0].changed == ["setpoint"]
    assert not run(sync, desired("t1", T0_MS + 3, setpoint=None))  # nothing to clear


def test_offline_device_gets_only_its_pending_delta_on_reconnect(sync, clock):
    run(sync, reported("t1", clock.ms, setpoint=20.0, mode="off", temperature=19.0))
    assert sync.next_timer() is not None
    clock.advance(9)
    assert not timer(sync)
    clock.advance(2)
    out = timer(sync)
    [change] = out.changes
    assert change.cause == "offline" and not change.online and change.version == 2
    assert sync.counters["offline"] == 1
    # while it is away: a desired change is kept, not sent
    out = run(sync, desired("t1", clock.ms, setpoint=23))
    assert out.changes[0].delta == {"setpoint": 23.0} and not out.commands
    clock.advance(30)
    out = run(sync, reported("t1", clock.ms, temperature=19.5, setpoint=20.0, mode="off"))
    [change] = out.changes
    assert change.cause == "online" and change.online
    assert [(c.name, c.params) for c in out.commands] == [("set_temperature", {"setpoint": 23.0})]
    # a desire it already shows is not sent again on reconnect
    clock.advance(11)
    timer(sync)
    run(sync, desired("t1", clock.ms, mode="heat"))
    clock.advance(1)
    out = run(sync, reported("t1", clock.ms, mode="heat", setpoint=20.0))
    assert [(c.name, c.params) for c in out.commands] == [("set_temperature", {"setpoint": 23.0})]


def test_a_device_heard_from_stays_online(sync, clock):
    run(sync, reported("t1", clock.ms, temperature=1.0))
    for _ in range(5):
        clock.advance(6)
        run(sync, reported("t1", clock.ms, temperature=1.0))
        assert not timer(sync)
    assert sync.twin("t1").online


def test_healing_auto_reissues_then_reports_inconsistent(clock):
    sync = TwinSync(
        make_registry(
            {"policy": "desired_wins", "healing": "auto", "heal_after": "5s", "heal_attempts": 3}
        ),
        now=clock,
    )
    run(sync, reported("t1", clock.ms, setpoint=20.0))
    first = run(sync, desired("t1", clock.ms, setpoint=23)).commands[0]
    ids = [first.command_id]
    for _ in range(2):
        clock.advance(3)
        run(sync, reported("t1", clock.ms, setpoint=20.0))  # keeps it online, command not done
        clock.advance(3)
        out = timer(sync)
        assert [c.params for c in out.commands] == [{"setpoint": 23.0}]
        ids.append(out.commands[0].command_id)
    assert ids == [
        "twin/t1/v2/set_temperature",
        "twin/t1/v2/set_temperature#2",
        "twin/t1/v2/set_temperature#3",
    ]
    clock.advance(3)
    run(sync, reported("t1", clock.ms, setpoint=20.0))
    clock.advance(3)
    out = timer(sync)
    assert not out.commands
    [detection] = out.detections
    assert detection.rule == INCONSISTENT_RULE and detection.key == "t1"
    assert detection.details == {
        "property": "setpoint",
        "commanded": 23.0,
        "reported": 20.0,
        "command_id": ids[-1],
        "attempts": 3,
        "healing": "auto",
    }
    assert sync.counters["healed"] == 2 and sync.counters["inconsistent"] == 1
    clock.advance(60)
    assert not timer(sync).detections  # reported once


def test_healing_off_reports_once_and_a_done_command_is_consistent(clock):
    sync = TwinSync(make_registry({"policy": "desired_wins", "heal_after": "5s"}), now=clock)
    run(sync, reported("t1", clock.ms, setpoint=20.0, mode="off"))
    run(sync, desired("t1", clock.ms, setpoint=23, mode="heat"))
    clock.advance(1)
    run(sync, reported("t1", clock.ms, setpoint=23.0, mode="off"))  # one of two took effect
    clock.advance(5)
    out = timer(sync)
    assert not out.commands
    assert [d.details["property"] for d in out.detections] == ["mode"]


def test_snapshot_resume_continues_identically(clock):
    reg = make_registry({"policy": "desired_wins", "healing": "auto", "heal_after": "5s"})
    a = TwinSync(reg, now=clock)
    run(a, reported("t1", clock.ms, setpoint=20.0), reported("t2", clock.ms, temperature=3.0))
    run(a, desired("t1", clock.ms, setpoint=23))
    snap = a.snapshot()
    b = TwinSync(reg, resume_state=snap, now=clock)
    assert b.snapshot() == snap
    clock.advance(6)
    steps = [
        lambda s: s.on_timer(),
        lambda s: s.on_batch([reported("t1", clock.ms, setpoint=23.0)]),
    ]
    for step in steps:
        assert step(a) == step(b)
    clock.advance(20)
    assert a.on_timer() == b.on_timer()
    assert a.snapshot() == b.snapshot()


def test_resume_refuses_changed_models_and_drops_departed_devices(clock):
    a = TwinSync(make_registry(), now=clock)
    run(a, reported("t1", clock.ms, temperature=1.0), reported("t2", clock.ms, temperature=2.0))
    snap = a.snapshot()
    changed = Registry()
    spec = {**THERMO, "heartbeat": "20s"}
    changed.define_model("thermo", spec)
    changed.add_device("t1", "thermo")
    with pytest.raises(ConfigError, match="fresh recovery store"):
        TwinSync(changed, resume_state=snap)
    fewer = make_registry(devices=("t1",))
    b = TwinSync(fewer, resume_state=snap, now=clock)
    assert set(b.twins) == {"t1"} and b.counters["dropped_on_resume"] == 1


def test_snapshot_is_plain_data(sync):
    import json

    run(
        sync,
        reported("t1", T0_MS, setpoint=20.0, mode="off", label="a"),
        desired("t1", T0_MS, setpoint=23),
    )
    json.dumps(sync.snapshot())
