"""Sagas: compensation in reverse, restore of the previous state, retries, all-or-nothing."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_harness import (
    ACK,
    DONE,
    DROPPED,
    EXPIRED,
    FAILED,
    LATE,
    LEAVING_HOME,
    LOST,
    MUTE,
    NACK,
    SILENT,
    SLOW,
    STATE,
    T0,
    DeviceLoop,
    HostedLoop,
    build,
    home_registry,
    home_states,
)

from commands.coordinator import Outcome, PlanEvent, PlanEventKind, restore_coordinator
from commands.orchestrator import Dropped
from commands.plans import PlanState, StepStatus
from commands.saga import SagaRun, load_saga
from commands.validation import InvalidRequest, decode_request
from iotflow.errors import ConfigError
from iotflow.events import Command


def compensation_ids(loop: DeviceLoop) -> list[str]:
    return [c.command_id for c in loop.issued if "/undo/" in c.command_id]


# -- the three outcomes ---------------------------------------------------------------------


def test_all_steps_succeed() -> None:
    saga, reg = build()
    loop = DeviceLoop(reg, home_states())
    loop.start(saga)
    loop.run(saga)
    assert saga.state is PlanState.DONE
    assert all(s["locked"] == 1 for d, s in loop.states.items() if d.startswith("lock"))
    assert all(s["on"] == 0 for d, s in loop.states.items() if d.startswith("light"))
    assert loop.states["hvac-0001"]["setpoint"] == 16
    assert loop.states["security-0001"] == {"armed": 1}
    assert loop.states["notifier-0001"] == {"last_message": "house secured"}
    assert compensation_ids(loop) == []
    assert loop.events[-1].kind is PlanEventKind.DONE


def test_a_failed_step_rolls_back_everything_applied_in_reverse() -> None:
    saga, reg = build()
    before = home_states()
    # the lighting hub answers the first three lights, then goes silent
    seen: list[str] = []

    def hub(command: Command) -> str:
        if command.name == "turn_off":
            seen.append(command.device_id)
            return DONE if len(seen) <= 3 else DROPPED
        return DONE

    loop = DeviceLoop(reg, home_states(), behaviour=hub)
    loop.start(saga)
    loop.run(saga)
    assert saga.state is PlanState.COMPENSATED
    assert loop.states == before  # doors unlocked, setpoint and every light as it was
    assert not any(c.name == "arm" for c in loop.issued)  # never reached: nothing to disarm
    undo = [c for c in loop.issued if "/undo/" in c.command_id]
    steps = [c.command_id.split("/")[1] for c in undo]
    assert steps == sorted(steps, key=["lights_off", "thermostat_away", "lock_doors"].index)
    assert [c.params for c in undo if c.name == "set_temperature"] == [{"setpoint": 21.5}]
    assert {c.device_id for c in undo if c.name == "unlock"} == {"lock-0001", "lock-0002"}
    # lights 4..6 were sent turn_off and never confirmed: restored too (harmless if unchanged)
    restored = {c.device_id for c in undo if c.device_id.startswith("light")}
    assert restored == {f"light-{i:04d}" for i in range(1, 7)}
    kinds = [e.kind for e in loop.events]
    assert kinds[-1] is PlanEventKind.FAILED
    assert "every applied step compensated" in (loop.events[-1].detail or "")
    assert kinds.count(PlanEventKind.COMPENSATED) == 3
    assert saga.step_status("arm_security") is StepStatus.WAITING


def test_restore_sends_only_what_changed_per_light() -> None:
    saga, reg = build(lights=3)
    states = home_states(3)  # light 3 is off already, lights 1 and 2 are on
    loop = DeviceLoop(reg, states, behaviour=lambda c: FAILED if c.name == "arm" else DONE)
    loop.start(saga)
    loop.run(saga)
    undo = {
        (c.device_id, c.name, json.dumps(c.params)) for c in loop.issued if "/undo/" in c.command_id
    }
    lights = {u for u in undo if u[0].startswith("light")}
    assert lights == {
        ("light-0001", "turn_on", "{}"),
        ("light-0001", "set_brightness", '{"brightness": 10}'),
        ("light-0002", "turn_on", "{}"),
        ("light-0002", "set_brightness", '{"brightness": 20}'),
        ("light-0003", "set_brightness", '{"brightness": 30}'),  # it was off: only brightness
    }
    assert saga.state is PlanState.COMPENSATED
    assert loop.states == home_states(3)


def test_failed_device_is_not_compensated_when_the_orchestrator_knows_it_did_nothing() -> None:
    saga, reg = build(lights=2)
    loop = DeviceLoop(
        reg,
        home_states(2),
        behaviour=lambda c: (
            FAILED if c.name == "set_temperature" and "/undo/" not in c.command_id else DONE
        ),
    )
    loop.start(saga)
    loop.run(saga)
    hvac = saga.devices_of("thermostat_away")["hvac-0001"]
    undone_hvac = [
        c for c in loop.issued if "/undo/" in c.command_id and c.device_id == "hvac-0001"
    ]
    assert hvac.outcome == Outcome.NOT_APPLIED
    assert undone_hvac == []
    assert saga.state is PlanState.COMPENSATED
    assert loop.states == home_states(2)


def test_an_unconfirmed_command_is_compensated_to_be_safe() -> None:
    saga, reg = build(lights=2)
    loop = DeviceLoop(
        reg,
        home_states(2),
        behaviour=lambda c: (
            LOST if c.name == "set_temperature" and "/undo/" not in c.command_id else DONE
        ),
    )
    loop.start(saga)
    loop.run(saga)
    assert saga.devices_of("thermostat_away")["hvac-0001"].outcome == Outcome.UNKNOWN
    undone = [c for c in loop.issued if "/undo/" in c.command_id and c.device_id == "hvac-0001"]
    assert [c.params for c in undone] == [{"setpoint": 21.5}]
    assert saga.state is PlanState.COMPENSATED
    assert loop.states == home_states(2)


def test_compensations_are_retried_with_backoff_until_they_succeed() -> None:
    saga, reg = build(lights=2)
    attempts: dict[str, int] = {}

    def flaky(command: Command) -> str:
        if command.name == "arm":
            return FAILED
        if command.name == "unlock":
            key = command.device_id
            attempts[key] = attempts.get(key, 0) + 1
            return DROPPED if attempts[key] <= 3 else DONE
        return DONE

    loop = DeviceLoop(reg, home_states(2), behaviour=flaky)
    loop.start(saga)
    loop.run(saga)
    assert saga.state is PlanState.COMPENSATED
    unlocks = [c for c in loop.issued if c.name == "unlock"]
    ids = [c.command_id for c in unlocks if c.device_id == "lock-0001"]
    assert ids == [
        "leave-1/lock_doors/lock-0001/undo/0",
        "leave-1/lock_doors/lock-0001/undo/0#2",
        "leave-1/lock_doors/lock-0001/undo/0#3",
        "leave-1/lock_doors/lock-0001/undo/0#4",
    ]
    issued_at = [c.issued_at for c in unlocks if c.device_id == "lock-0001"]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(issued_at)]
    assert [round(g) for g in gaps] == [1, 2, 4]  # 1s doubling (plus delivery time)
    retries = [e for e in loop.events if e.kind is PlanEventKind.COMPENSATION_RETRY]
    assert len(retries) == 6 and all(e.device_id and e.command_id for e in retries)
    assert all(s["locked"] == 0 for d, s in loop.states.items() if d.startswith("lock"))


def test_out_of_attempts_ends_stuck_naming_devices_and_still_undoes_the_rest() -> None:
    spec = {**LEAVING_HOME, "max_compensation_attempts": 2}
    saga, reg = build(spec, lights=2)
    loop = DeviceLoop(
        reg,
        home_states(2),
        behaviour=lambda c: (
            FAILED
            if c.name == "arm" or (c.name == "set_temperature" and "/undo/" in c.command_id)
            else DONE
        ),
    )
    loop.start(saga)
    loop.run(saga)
    assert saga.state is PlanState.STUCK
    assert saga.stuck_devices() == ["hvac-0001"]
    last = loop.events[-1]
    assert last.kind is PlanEventKind.STUCK and "hvac-0001" in (last.detail or "")
    assert all(
        s["locked"] == 0 for d, s in loop.states.items() if d.startswith("lock")
    )  # doors still unlock


def test_a_failing_non_critical_notification_does_not_roll_back() -> None:
    saga, reg = build(lights=2)
    loop = DeviceLoop(
        reg, home_states(2), behaviour=lambda c: FAILED if c.name == "notify" else DONE
    )
    loop.start(saga)
    loop.run(saga)
    assert saga.state is PlanState.DONE
    assert "non-critical steps failed: notify" in (loop.events[-1].detail or "")
    assert compensation_ids(loop) == []


def test_a_failure_mid_step_waits_for_commands_in_flight_before_compensating() -> None:
    saga, reg = build(lights=4)
    loop = DeviceLoop(
        reg, home_states(4), behaviour=lambda c: FAILED if c.device_id == "light-0001" else DONE
    )
    loop.start(saga)
    # deliver up to the first light; three more turn_off are in flight
    while not any(c.name == "turn_off" for c in loop.applied) and loop.pending:
        event = loop.deliver_one(saga)
        if event.device_id == "light-0001":
            break
    assert saga.state is PlanState.DRAINING
    assert compensation_ids(loop) == []
    loop.run(saga)
    assert saga.state is PlanState.COMPENSATED
    first_undo = next(
        i for i, (kind, cid) in enumerate(loop.log) if kind == "issue" and "/undo/" in cid
    )
    forward_outcomes = [
        i for i, (kind, cid) in enumerate(loop.log) if kind == "outcome" and "/undo/" not in cid
    ]
    assert max(forward_outcomes) < first_undo


def test_missing_previous_state_is_reported_and_nothing_is_invented() -> None:
    saga, reg = build(lights=2)
    states = home_states(2)
    del states["hvac-0001"]["setpoint"]
    loop = DeviceLoop(reg, states, behaviour=lambda c: FAILED if c.name == "arm" else DONE)
    loop.start(saga)
    loop.run(saga)
    started = [
        e
        for e in loop.events
        if e.kind is PlanEventKind.STEP_STARTED and e.step == "thermostat_away"
    ]
    assert "hvac-0001 reported no setpoint to restore" in (started[0].detail or "")
    assert not any(c.device_id == "hvac-0001" and "/undo/" in c.command_id for c in loop.issued)


def test_deadline_and_cancel_roll_back() -> None:
    saga, reg = build({**LEAVING_HOME, "deadline": "10s"}, lights=2)
    loop = DeviceLoop(reg, home_states(2))
    commands = saga.start(T0, loop.reported)
    assert saga.next_timer() == T0 + timedelta(seconds=10)
    loop._take(commands, saga)
    loop.deliver_one(saga)
    loop.deliver_one(saga)  # both doors locked, the thermostat command is in flight
    late = T0 + timedelta(seconds=11)
    assert saga.on_timer(late, loop.reported) == []  # waits for the command in flight
    assert saga.state is PlanState.DRAINING
    loop.run(saga)
    assert saga.state is PlanState.COMPENSATED
    assert "deadline of 10s passed" in (loop.events[-1].detail or "")
    assert loop.states == home_states(2)

    saga2, reg2 = build(lights=2, plan_id="leave-2")
    loop2 = DeviceLoop(reg2, home_states(2))
    loop2.start(saga2)
    loop2.deliver_one(saga2)
    loop2._take(saga2.cancel(loop2.now, "user pressed stop"), saga2)
    loop2.run(saga2)
    assert saga2.state is PlanState.COMPENSATED and loop2.states == home_states(2)
    assert saga2.cancel(loop2.now) == []  # finished: nothing to cancel


def test_snapshot_mid_compensation_restores_and_finishes() -> None:
    saga, reg = build(lights=3)
    loop = DeviceLoop(reg, home_states(3), behaviour=lambda c: FAILED if c.name == "arm" else DONE)
    loop.start(saga)
    while saga.state is not PlanState.COMPENSATING:
        loop.deliver_one(saga)
    loop.deliver_one(saga)
    again = restore_coordinator(json.loads(json.dumps(saga.snapshot())))
    assert isinstance(again, SagaRun) and again.state is PlanState.COMPENSATING
    loop.run(again)
    assert again.state is PlanState.COMPENSATED
    assert loop.states == home_states(3)
    ids = [c.command_id for c in loop.issued]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compensation": None}, "compensation"),
        ({"compensation": "undo"}, "not understood"),
        ({"compensation": {"command": "unlock", "restore": []}}, "not both"),
        ({"compensation": {"params": {"x": 1}}}, "give command too"),
        ({"compensation": {"restore": ["colour"]}}, "unknown property 'colour'"),
        ({"compensation": {"restore": ["battery"]}}, "no command of model 'lock' sets 'battery'"),
        ({"compensation": {"command": "open"}}, "unknown command 'open'"),
        (
            {"compensation": {"command": "set_brightness", "params": {"brightness": 200}}},
            "brightness",
        ),
    ],
)
def test_bad_compensations_fail_at_load_or_expansion(change: dict, message: str) -> None:
    steps = [dict(LEAVING_HOME["steps"][0]), *LEAVING_HOME["steps"][1:]]
    steps[0].update(change)
    if change.get("compensation") is None:
        del steps[0]["compensation"]
    with pytest.raises(ConfigError, match=message):
        load_saga({**LEAVING_HOME, "steps": steps}).build(home_registry(), "x-1")


def test_saga_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="compensation_backoff: must be positive"):
        load_saga({**LEAVING_HOME, "compensation_backoff": "0s"})
    with pytest.raises(ConfigError, match="max_compensation_attempts"):
        load_saga({**LEAVING_HOME, "max_compensation_attempts": 0})
    with pytest.raises(ConfigError, match="is a plan, not a saga"):
        SagaRun(
            load_saga(LEAVING_HOME)
            .expand(home_registry(), "x")
            .__class__(
                **{**load_saga(LEAVING_HOME).expand(home_registry(), "x").__dict__, "kind": "plan"}
            )
        )


# -- the invariant, on random ack / timeout / failure sequences ---------------------------------

OUTCOMES = st.sampled_from([DONE, DONE, DONE, FAILED, LOST, DROPPED, EXPIRED, LATE])


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(OUTCOMES, max_size=60),
    lights=st.integers(1, 5),
    cut_at=st.none() | st.integers(0, 20),
)
def test_random_sequences_end_all_done_or_all_compensated(
    script: list[str], lights: int, cut_at: int | None
) -> None:
    saga, reg = build(lights=lights)
    initial = home_states(lights)
    script = list(script)

    def scripted(command: Command) -> str:
        return script.pop(0) if script else DONE  # devices recover eventually

    loop = DeviceLoop(reg, home_states(lights), behaviour=scripted)
    loop.start(saga)
    delivered = 0
    while loop.pending and not saga.finished:
        if cut_at is not None and delivered == cut_at:
            loop._take(saga.cancel(loop.now, "cut off"), saga)
        loop.deliver_one(saga)
        delivered += 1
    loop.run(saga)

    # all done or all compensated, never partial
    assert saga.state in (PlanState.DONE, PlanState.COMPENSATED)
    if saga.state is PlanState.COMPENSATED:
        # the notification declares no compensation: a sent message stays sent
        loop.states.pop("notifier-0001")
        initial.pop("notifier-0001")
        assert loop.states == initial
    else:
        for device, state in loop.states.items():
            if device.startswith("lock"):
                assert state["locked"] == 1
            if device.startswith("light"):
                assert state["on"] == 0
        assert loop.states["security-0001"] == {"armed": 1}
    # nothing issued twice, nothing issued already expired (the loop checks), nothing applied twice
    ids = [c.command_id for c in loop.issued]
    assert len(ids) == len(set(ids))
    applied = [c.command_id for c in loop.applied]
    assert len(applied) == len(set(applied))
    # exactly what was applied (or may have been) is compensated, step by step in reverse
    undo_steps: list[str] = []
    for kind, cid in loop.log:
        if kind == "issue" and "/undo/" in cid:
            step = cid.split("/")[1]
            if not undo_steps or undo_steps[-1] != step:
                undo_steps.append(step)
    started = [s.name for s in saga.plan.steps if saga._run.steps[s.name].started_seq is not None]
    started.sort(key=lambda n: saga._run.steps[n].started_seq)
    assert undo_steps == [s for s in reversed(started) if s in undo_steps]
    for step in saga.plan.steps:
        for device, dev in saga.devices_of(step.name).items():
            compensated = bool(dev.undo_ids)
            touched = dev.outcome in (Outcome.APPLIED, Outcome.UNKNOWN) and bool(dev.undo)
            assert compensated == (touched and saga.state is PlanState.COMPENSATED), (
                step.name,
                device,
            )
            forward_applied = any(c.command_id == dev.command_id for c in loop.applied)
            if forward_applied and saga.state is PlanState.COMPENSATED and dev.undo:
                assert compensated


# -- hosted by the real orchestrator: acks, timeouts, retries, expiry ---------------------------

DEVICE_ANSWERS = st.sampled_from([ACK, ACK, ACK, ACK, NACK, SILENT, MUTE, STATE, SLOW])


def hosted_saga(lights: int, script: list[str]) -> tuple[SagaRun, HostedLoop]:
    saga, reg = build(lights=lights)
    answers = list(script)

    def behaviour(command: Command, attempt: int) -> str:
        return answers.pop(0) if answers else ACK  # devices recover eventually

    loop = HostedLoop(reg, home_states(lights), behaviour=behaviour)
    loop.host(saga)
    return saga, loop


def test_hosted_all_succeed_and_the_audit_has_plan_events() -> None:
    saga, loop = hosted_saga(3, [])
    loop.run(saga)
    assert saga.state is PlanState.DONE
    plan_events = [e for e in loop.events if isinstance(e, PlanEvent)]
    assert plan_events[0].kind is PlanEventKind.STARTED
    assert plan_events[-1].kind is PlanEventKind.DONE
    assert loop.orchestrator.coordinators == {}  # dropped once finished


def test_hosted_timeout_recovers_within_the_retries() -> None:
    # the thermostat misses the first delivery; the orchestrator's re-send gets through
    saga, loop = hosted_saga(2, [ACK, ACK, SILENT])
    loop.run(saga)
    assert saga.state is PlanState.DONE
    sends = [w.attempt for w in loop.writes if w.command.device_id == "hvac-0001"]
    assert sends == [1, 2]
    assert loop.acted["hvac-0001"] == ["leave-1/thermostat_away/hvac-0001"]


def test_hosted_silent_light_rolls_everything_back() -> None:
    saga, loop = hosted_saga(3, [])
    # light-0002 hears nothing until the rollback (its hub is back by then)
    loop.behaviour = lambda c, attempt: (
        SILENT if c.device_id == "light-0002" and "/undo/" not in c.command_id else ACK
    )
    loop.run(saga)
    sends = [
        w.attempt for w in loop.writes if w.command.command_id == "leave-1/lights_off/light-0002"
    ]
    assert sends == [1, 2, 3]  # tried max_attempts times, then failed
    assert saga.state is PlanState.COMPENSATED
    assert {d: s for d, s in loop.states.items() if d != "notifier-0001"} == {
        d: s for d, s in home_states(3).items() if d != "notifier-0001"
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(DEVICE_ANSWERS, max_size=40), lights=st.integers(1, 4))
def test_hosted_random_device_answers_end_all_done_or_all_compensated(
    script: list[str], lights: int
) -> None:
    saga, loop = hosted_saga(lights, script)
    loop.run(saga)
    assert saga.state in (PlanState.DONE, PlanState.COMPENSATED)
    initial = home_states(lights)
    if saga.state is PlanState.COMPENSATED:
        for device, state in loop.states.items():
            if device != "notifier-0001":
                assert state == initial[device], device
    else:
        assert all(s["locked"] == 1 for d, s in loop.states.items() if d.startswith("lock"))
        assert all(s["on"] == 0 for d, s in loop.states.items() if d.startswith("light"))
        assert loop.states["security-0001"] == {"armed": 1}
    # nothing written at or after its expiry (HostedLoop asserts it on every write)
    # nothing applied twice: each forward action once at most, each command id once per device
    for device, ids in loop.acted.items():
        assert len(ids) == len(set(ids)), device
        forward = [i for i in ids if "/undo/" not in i]
        assert len(forward) == len(set(forward))
    # each (step, device) got one forward command id, whatever the retries
    forward_ids = {
        w.command.command_id for w in loop.writes if "/undo/" not in w.command.command_id
    }
    assert len(forward_ids) == len({tuple(i.split("/")[1:3]) for i in forward_ids})
    # compensations step by step in reverse start order
    undo_steps: list[str] = []
    for w in loop.writes:
        if "/undo/" in w.command.command_id:
            step = w.command.command_id.split("/")[1]
            if step not in undo_steps:
                undo_steps.append(step)
    assert undo_steps == [s for s in reversed(saga.started_steps()) if s in undo_steps]


@pytest.mark.parametrize("cut", [3, 9, 14, 20])
def test_hosted_saga_resumes_after_an_orchestrator_restart(cut: int) -> None:
    saga, loop = hosted_saga(3, [])
    loop.behaviour = lambda c, attempt: (
        SILENT if c.device_id == "light-0002" and "/undo/" not in c.command_id else ACK
    )
    loop.step(cut)
    again = loop.restart(saga.coordinator_id) if not saga.finished else saga
    loop.run(again)
    assert again.state is PlanState.COMPENSATED
    assert {d: s for d, s in loop.states.items() if d != "notifier-0001"} == {
        d: s for d, s in home_states(3).items() if d != "notifier-0001"
    }
    for device, ids in loop.acted.items():
        assert len(ids) == len(set(ids)), device


def test_a_cancel_request_through_the_orchestrator_compensates_what_ran() -> None:
    saga, loop = hosted_saga(3, [])
    loop.step(3)  # the doors are locked, the thermostat command is on its way
    cancel = decode_request(b'{"cancel": "leave-1", "reason": "owner came back"}')
    loop._take(loop.orchestrator.on_batch(cancel))
    loop.run(saga)
    assert saga.state is PlanState.COMPENSATED
    assert loop.states == home_states(3)
    assert "owner came back" in " ".join(
        e.detail or "" for e in loop.events if isinstance(e, PlanEvent)
    )
    # a second cancel, and one for a run that never existed: reported, nothing sent
    for payload in (b'{"cancel": "leave-1"}', b'{"cancel": "leave-9"}'):
        [dropped] = loop.orchestrator.on_batch(decode_request(payload))
        assert isinstance(dropped, Dropped)
    assert (
        "has finished"
        in loop.orchestrator.on_batch(decode_request(b'{"cancel": "leave-1"}'))[0].reason
    )


@pytest.mark.parametrize(
    "payload", [b'{"cancel": 7}', b'{"cancel": ""}', b'{"cancel": "x", "reason": ["no"]}']
)
def test_malformed_cancel_requests_are_invalid(payload: bytes) -> None:
    request = decode_request(payload)
    assert isinstance(request, InvalidRequest) and request.kind == "invalid_cancel"
