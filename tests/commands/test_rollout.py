"""Rollouts: waves, max in flight, thresholds, abort and roll back, resume from a snapshot."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_harness import ACK, DONE, DROPPED, FAILED, LOST, NACK, T0, DeviceLoop, HostedLoop

from commands.coordinator import PlanEventKind, coordinator_builders, restore_coordinator
from commands.rollout import RolloutRun, RolloutState, load_rollout
from iotflow.errors import ConfigError
from iotflow.events import Command, CommandEvent, CommandEventKind
from twins.registry import simulator_registry


def node_ids(n: int) -> list[str]:
    return [f"node-{i:05d}" for i in range(1, n + 1)]


def rollout(n: int, **extra: Any) -> tuple[RolloutRun, DeviceLoop]:
    reg = simulator_registry()
    spec = {
        "name": "fw2",
        "target": {"devices": node_ids(n)},
        "command": "update_firmware",
        "params": {"version": "2.0.0"},
        **extra,
    }
    run = load_rollout(spec).build(reg, "fw2-1")
    loop = DeviceLoop(reg, {d: {"firmware": "1.0.0"} for d in node_ids(n)})
    return run, loop


def failing(devices: set[str]) -> Any:
    def behaviour(command: Command) -> str:
        if command.name == "update_firmware" and command.params["version"] == "2.0.0":
            return FAILED if command.device_id in devices else DONE
        return DONE

    return behaviour


def max_outstanding(loop: DeviceLoop) -> int:
    live = peak = 0
    for kind, _ in loop.log:
        live += 1 if kind == "issue" else -1
        peak = max(peak, live)
    return peak


def kinds(loop: DeviceLoop) -> list[PlanEventKind]:
    return [e.kind for e in loop.events]


def test_wave_bounds() -> None:
    spec = load_rollout({"name": "r", "target": "node-1", "command": "c"})
    assert spec.wave_bounds(500) == [5, 50, 500]
    assert spec.wave_bounds(3) == [1, 3]
    assert spec.wave_bounds(1) == [1]
    canary = load_rollout(
        {"name": "r", "target": "node-1", "command": "c", "canary": 3, "waves": [10, 100]}
    )
    assert canary.wave_bounds(500) == [3, 50, 500]
    assert canary.wave_bounds(2) == [2]


def test_all_devices_updated_in_waves_within_max_in_flight() -> None:
    run, loop = rollout(200, max_in_flight=8)
    loop.start(run)
    loop.run(run)
    assert run.state is RolloutState.DONE
    assert all(s == {"firmware": "2.0.0"} for s in loop.states.values())
    assert max_outstanding(loop) == 8
    waves = [e for e in loop.events if e.kind is PlanEventKind.WAVE_STARTED]
    assert [(e.wave, e.detail) for e in waves] == [
        (0, "devices 1..2 of 200 (2 devices)"),
        (1, "devices 3..20 of 200 (18 devices)"),
        (2, "devices 21..200 of 200 (180 devices)"),
    ]
    # a wave starts only when the one before finished
    first_of_wave2 = loop.log.index(("issue", "fw2-1/update_firmware/node-00021"))
    last_of_wave1 = loop.log.index(("outcome", "fw2-1/update_firmware/node-00020"))
    assert last_of_wave1 < first_of_wave2
    assert kinds(loop)[-1] is PlanEventKind.DONE
    assert run.status() | {"reason": None} == {
        "state": "done",
        "wave": 2,
        "waves": 3,
        "devices": 200,
        "sent": 200,
        "done": 200,
        "failed": 0,
        "in_flight": 0,
        "rolled_back": 0,
        "reason": None,
    }


def test_failure_rate_aborts_stops_waves_and_rolls_back_the_updated_devices() -> None:
    bad = {d for i, d in enumerate(node_ids(500)) if i % 10 == 7}  # 10 % failing
    run, loop = rollout(
        500,
        abort={"failure_rate": 0.05, "min_finished": 20},
        max_in_flight=20,
        success_threshold=0.5,
    )
    loop.behaviour = failing(bad)
    loop.start(run)
    loop.run(run)
    assert run.state is RolloutState.ROLLED_BACK
    aborted = [e for e in loop.events if e.kind is PlanEventKind.ABORTED]
    assert len(aborted) == 1 and "is over 5%" in (aborted[0].detail or "")
    assert aborted[0].wave == 1  # the canary passed; wave 1 tripped once 20 had finished
    sent = {c.device_id for c in loop.issued if c.params.get("version") == "2.0.0"}
    assert len(sent) <= 50  # no device of the last wave was sent anything
    assert all(s == {"firmware": "1.0.0"} for s in loop.states.values())  # nobody left updated
    rolled = [c for c in loop.issued if "/rollback/" in c.command_id]
    assert {c.device_id for c in rolled} == sent - bad  # failed devices did nothing: no roll back
    assert all(c.params == {"version": "1.0.0"} for c in rolled)
    assert max_outstanding(loop) <= 20
    last = loop.events[-1]
    assert last.kind is PlanEventKind.FAILED
    assert f"{len(sent - bad)} updated devices rolled back" in (last.detail or "")


def test_max_failures_aborts_mid_wave() -> None:
    bad = set(node_ids(100)[30:40])
    run, loop = rollout(
        100, waves=[100], abort={"max_failures": 3, "failure_rate": None}, max_in_flight=1
    )
    loop.behaviour = failing(bad)
    loop.start(run)
    loop.run(run)
    assert run.state is RolloutState.ROLLED_BACK
    sent = [c.device_id for c in loop.issued if c.params.get("version") == "2.0.0"]
    assert sent == node_ids(100)[:33]  # stopped at the third failure
    assert "3 devices failed, the limit is 3" in (loop.events[-1].detail or "")


def test_success_threshold_per_wave() -> None:
    bad = set(node_ids(100)[:1])  # the canary fails
    run, loop = rollout(100, abort={"failure_rate": None}, success_threshold=1.0)
    loop.behaviour = failing(bad)
    loop.start(run)
    loop.run(run)
    assert run.state is RolloutState.ROLLED_BACK
    assert len([c for c in loop.issued if c.name == "update_firmware"]) == 1
    assert "wave 0: 0 of 1 devices succeeded" in (loop.events[-1].detail or "")


def test_unconfirmed_updates_are_rolled_back_too_and_rollbacks_are_retried() -> None:
    run, loop = rollout(
        20, waves=[100], abort={"max_failures": 2, "failure_rate": None}, rollback_attempts=3
    )
    tries: dict[str, int] = {}

    def behaviour(command: Command) -> str:
        if command.params["version"] == "2.0.0":
            return LOST if command.device_id in ("node-00004", "node-00005") else DONE
        tries[command.device_id] = tries.get(command.device_id, 0) + 1
        return DROPPED if command.device_id == "node-00001" and tries["node-00001"] < 3 else DONE

    loop.behaviour = behaviour
    loop.start(run)
    loop.run(run)
    assert run.state is RolloutState.ROLLED_BACK
    assert all(s == {"firmware": "1.0.0"} for s in loop.states.values())
    ids = [
        c.command_id
        for c in loop.issued
        if c.device_id == "node-00001" and "rollback" in c.command_id
    ]
    assert ids == [
        "fw2-1/rollback/node-00001/0",
        "fw2-1/rollback/node-00001/0#2",
        "fw2-1/rollback/node-00001/0#3",
    ]
    assert kinds(loop).count(PlanEventKind.COMPENSATION_RETRY) == 2


def test_rollback_gives_up_after_its_attempts_naming_the_devices() -> None:
    run, loop = rollout(10, waves=[100], abort={"max_failures": 1, "failure_rate": None})

    def behaviour(command: Command) -> str:
        if command.params["version"] == "2.0.0":
            return FAILED if command.device_id == "node-00005" else DONE
        return DROPPED if command.device_id == "node-00002" else DONE

    loop.behaviour = behaviour
    loop.start(run)
    loop.run(run)
    assert run.state is RolloutState.STUCK
    assert "node-00002" in (loop.events[-1].detail or "")
    assert run.updated_devices() == ["node-00002"]


def test_wave_pause_waits_on_the_timer() -> None:
    run, loop = rollout(10, waves=[50, 100], wave_pause="1m")
    loop.start(run)
    while loop.pending:
        loop.deliver_one(run)
    assert run.state is RolloutState.PAUSED
    resume = run.next_timer()
    assert resume is not None and resume - loop.now == timedelta(minutes=1)
    assert run.on_timer(resume - timedelta(seconds=1), loop.reported) == []
    loop.run(run)
    assert run.state is RolloutState.DONE


def test_snapshot_resumes_where_it_stopped() -> None:
    run, loop = rollout(300, max_in_flight=10)
    loop.start(run)
    for _ in range(40):
        loop.deliver_one(run)
    snap = json.loads(json.dumps(run.snapshot()))
    again = restore_coordinator(snap)
    assert isinstance(again, RolloutRun) and again.status()["done"] == 40
    loop.run(again)
    assert again.state is RolloutState.DONE
    updates = [c.device_id for c in loop.issued]
    assert sorted(updates) == node_ids(300)  # each device once, none lost in the restart


def test_restore_refuses_bad_snapshots() -> None:
    run, _ = rollout(5)
    snap = run.snapshot()
    with pytest.raises(ConfigError, match="cannot restore a rollout"):
        RolloutRun.restore({**snap, "type": "saga"})
    with pytest.raises(ConfigError, match="definition must have"):
        RolloutRun.restore({**snap, "definition": {"devices": []}})
    with pytest.raises(ConfigError, match="state is invalid"):
        RolloutRun.restore({**snap, "state": {"in_flight": "many"}})
    with pytest.raises(ConfigError, match="outside its definition"):
        RolloutRun.restore({**snap, "state": {"status": {"node-99999": "d"}}})


def test_unknown_and_repeated_outcomes_change_nothing() -> None:
    run, loop = rollout(5, waves=[100])
    (first, *_rest) = run.start(T0, loop.reported)
    before = run.status()
    for cid in (
        "other/update_firmware/node-00001",
        "fw2-1/update_firmware/node-99999",
        "fw2-1/rollback/x/0",
        "fw2-1",
    ):
        ev = CommandEvent(cid, "node-00001", CommandEventKind.DONE, T0, applied=True)
        assert run.on_outcome(ev, T0, loop.reported) == []
    ev = CommandEvent(first.command_id, first.device_id, CommandEventKind.DONE, T0, applied=True)
    run.on_outcome(ev, T0, loop.reported)
    after = run.status()
    assert run.on_outcome(ev, T0, loop.reported) == []
    assert run.status() == after and after["done"] == before["done"] + 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"waves": [10, 5, 100]}, "must grow"),
        ({"waves": [10, 50]}, "must reach 100"),
        ({"waves": [0, 100]}, r"in \(0, 100\]"),
        ({"waves": [float("nan"), 100]}, r"in \(0, 100\]"),
        ({"waves": []}, "at least 1"),
        ({"canary": 0}, "canary"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"success_threshold": 1.5}, "success_threshold"),
        ({"abort": {"failure_rate": 0}}, "failure_rate"),
        ({"abort": {"max_failures": -1}}, "max_failures"),
        ({"timeout": "0s"}, "must be positive"),
        ({"rollout": "yes"}, "rollout"),
    ],
)
def test_bad_declarations_fail_at_load(change: dict, message: str) -> None:
    base = {
        "name": "r",
        "target": "node-1",
        "command": "update_firmware",
        "params": {"version": "2"},
    }
    with pytest.raises(ConfigError, match=message):
        load_rollout({**base, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"command": "reboot"}, "unknown command 'reboot'"),
        ({"params": {"version": 2}}, "version"),
        ({"params": {}}, "missing parameter 'version'"),
        ({"target": {"group": "nodes"}}, "unknown group 'nodes'"),
        ({"rollback": {"restore": ["colour"]}}, "unknown property 'colour'"),
        ({"rollback": {"command": "update_firmware", "params": {}}}, "missing parameter"),
    ],
)
def test_expansion_checks_the_registry(change: dict, message: str) -> None:
    base = {
        "name": "r",
        "target": {"devices": node_ids(3)},
        "command": "update_firmware",
        "params": {"version": "2"},
    }
    with pytest.raises(ConfigError, match=message):
        load_rollout({**base, **change}).build(simulator_registry(), "r-1")


def test_request_builder_needs_a_run_id() -> None:
    build = coordinator_builders()["rollout"]
    spec = {
        "type": "rollout",
        "name": "r",
        "target": "node-1",
        "command": "update_firmware",
        "params": {"version": "2"},
    }
    with pytest.raises(ConfigError, match="needs an id naming this run"):
        build(spec, simulator_registry(), T0)
    run = build({**spec, "id": "r-7"}, simulator_registry(), T0)
    assert run.coordinator_id == "r-7"
    assert set(coordinator_builders()) == {"plan", "saga", "rollout"}


@settings(max_examples=30, deadline=None)
@given(
    bad=st.sets(st.integers(0, 59), max_size=20),
    flaky=st.lists(st.sampled_from([DONE, DONE, DONE, DROPPED, LOST]), max_size=40),
    max_in_flight=st.integers(1, 12),
)
def test_random_failures_end_done_or_fully_rolled_back(
    bad: set[int], flaky: list[str], max_in_flight: int
) -> None:
    run, loop = rollout(
        60,
        max_in_flight=max_in_flight,
        abort={"failure_rate": 0.1, "min_finished": 5},
        rollback_attempts=50,
    )
    failing_ids = {node_ids(60)[i] for i in bad}
    script = list(flaky)

    def behaviour(command: Command) -> str:
        if command.params["version"] == "2.0.0" and command.device_id in failing_ids:
            return FAILED
        return script.pop(0) if script else DONE

    loop.behaviour = behaviour
    loop.start(run)
    loop.run(run)
    assert run.state in (RolloutState.DONE, RolloutState.ROLLED_BACK)
    assert max_outstanding(loop) <= max_in_flight
    ids = [c.command_id for c in loop.issued]
    assert len(ids) == len(set(ids))
    if run.state is RolloutState.ROLLED_BACK:
        assert all(s == {"firmware": "1.0.0"} for s in loop.states.values())
    else:
        status = run.status()
        assert status["failed"] <= 0.1 * 60 and status["sent"] == 60


def hosted_rollout(n: int, failing_ids: set[str], **extra: Any) -> tuple[RolloutRun, HostedLoop]:
    run, _ = rollout(n, **extra)

    def behaviour(command: Command, attempt: int) -> str:
        fails = command.params["version"] == "2.0.0" and command.device_id in failing_ids
        return NACK if fails else ACK

    loop = HostedLoop(
        simulator_registry(), {d: {"firmware": "1.0.0"} for d in node_ids(n)}, behaviour=behaviour
    )
    loop.host(run)
    return run, loop


def test_hosted_rollout_aborts_and_rolls_back_through_the_orchestrator() -> None:
    bad = {d for i, d in enumerate(node_ids(200)) if i % 10 == 7}
    run, loop = hosted_rollout(
        200, bad, abort={"failure_rate": 0.05, "min_finished": 20}, success_threshold=0.5
    )
    loop.run(run)
    assert run.state is RolloutState.ROLLED_BACK
    assert {s["firmware"] for s in loop.states.values()} == {"1.0.0"}
    assert not any(d in bad for d, ids in loop.acted.items() if any("rollback" in i for i in ids))


@pytest.mark.parametrize("cut", [5, 40, 90])
def test_hosted_rollout_resumes_after_an_orchestrator_restart(cut: int) -> None:
    run, loop = hosted_rollout(100, set(), max_in_flight=7)
    loop.step(cut)
    again = loop.restart(run.coordinator_id)
    loop.run(again)
    assert again.state is RolloutState.DONE
    assert {s["firmware"] for s in loop.states.values()} == {"2.0.0"}
    sent = [w.command.command_id for w in loop.writes if w.attempt == 1]
    assert sorted(sent) == sorted(f"fw2-1/update_firmware/{d}" for d in node_ids(100))


def test_cancel_rolls_back_what_was_updated_even_during_a_pause() -> None:
    run, loop = rollout(20, waves=[50, 100], wave_pause="1m")
    loop.start(run)
    while loop.pending:
        loop.deliver_one(run)
    assert run.state is RolloutState.PAUSED
    loop._take(run.cancel(loop.now, "bad reports from the field"), run)
    loop.run(run)
    assert run.state is RolloutState.ROLLED_BACK
    assert {s["firmware"] for s in loop.states.values()} == {"1.0.0"}
    assert "cancelled: bad reports from the field" in (loop.events[-1].detail or "")
    assert run.cancel(loop.now, "again") == []
