"""The orchestrator's promises, one at a time, on a hand-advanced clock."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from cmdkit import T0, Clock, make_command

from commands.coordinator import PlanEvent, PlanEventKind
from commands.instructions import Instruction
from commands.model import CommandRecord, CommandState
from commands.orchestrator import (
    Dropped,
    Orchestrator,
    OrchestratorConfig,
    StartCoordinator,
    Write,
)
from commands.validation import DeviceAck, DeviceState, InvalidRequest, decode_request
from commands.writers import MqttCommand, MqttWriter
from iotflow.errors import ConfigError
from iotflow.events import Ack, AckStatus, Command, CommandEvent, CommandEventKind
from twins.registry import Registry

K = CommandEventKind


def trace(out: list[Any]) -> list[tuple[str, str]]:
    """(command id, event kind or 'write') in output order."""
    steps = []
    for item in out:
        if isinstance(item, Write):
            steps.append((item.command.command_id, "write"))
        elif isinstance(item, CommandEvent):
            steps.append((item.command_id, item.kind.value))
    return steps


def events(out: list[Any], kind: CommandEventKind | None = None) -> list[CommandEvent]:
    return [e for e in out if isinstance(e, CommandEvent) and (kind is None or e.kind is kind)]


def writes(out: list[Any]) -> list[Write]:
    return [w for w in out if isinstance(w, Write)]


def done(device: str, command_id: str, **reported: Any) -> DeviceAck:
    return DeviceAck(device, Ack(command_id, AckStatus.DONE, reported))


# -- the happy path and FIFO ----------------------------------------------------------------


def test_request_is_queued_sent_and_done_by_ack(orch: Orchestrator) -> None:
    out = orch.on_batch(make_command("c1"))
    assert trace(out) == [("c1", "requested"), ("c1", "queued"), ("c1", "write"), ("c1", "sent")]
    write = writes(out)[0]
    assert (write.protocol, write.attempt) == ("mqtt", 1)
    assert write.command.params == {"setpoint": 22.0}
    assert events(out, K.SENT)[0].attempt == 1
    out = orch.on_batch(done("hvac-0001", "c1", setpoint=22.0))
    [event] = events(out)
    assert (event.kind, event.applied, event.name) == (K.DONE, True, "set_temperature")
    assert orch.reported_of("hvac-0001") == {"setpoint": 22.0}
    assert orch.in_flight("hvac-0001") is None


def test_one_device_gets_its_commands_in_order_one_at_a_time(orch: Orchestrator) -> None:
    out = []
    for i, setpoint in enumerate((20.0, 21.0, 22.0)):
        out += orch.on_batch(
            make_command(f"c{i}", params={"setpoint": setpoint}, correlation_id="plan")
        )
    out += orch.on_batch(make_command("other", device_id="hvac-0002"))
    assert [w.command.command_id for w in writes(out)] == ["c0", "other"]
    assert orch.queued("hvac-0001") == ["c1", "c2"]
    sent = []
    for cid in ("c0", "c1", "c2"):
        sent += [w.command.command_id for w in writes(orch.on_batch(done("hvac-0001", cid)))]
    assert sent == ["c1", "c2"]


def test_critical_goes_ahead_of_normal_but_never_ahead_of_the_one_in_flight(
    orch: Orchestrator,
) -> None:
    orch.on_batch(make_command("first", name="set_mode", params={"mode": "cool"}))
    orch.on_batch(make_command("normal", name="set_fan_speed", params={"speed": 1}))
    out = orch.on_batch(
        make_command("urgent", name="set_mode", params={"mode": "off"}, priority=100)
    )
    assert writes(out) == []
    assert orch.in_flight("hvac-0001") == "first"
    assert orch.queued("hvac-0001") == ["urgent", "normal"]
    out = orch.on_batch(done("hvac-0001", "first"))
    assert [w.command.command_id for w in writes(out)] == ["urgent"]


def test_accepted_then_done(orch: Orchestrator, clock: Clock) -> None:
    orch.on_batch(make_command("c1"))
    clock.advance(seconds=0.5)
    out = orch.on_batch(DeviceAck("hvac-0001", Ack("c1", AckStatus.ACCEPTED)))
    assert [e.kind for e in events(out)] == [K.ACKED]
    # the accept restarts the ack timeout: 0.9 s later it has not timed out
    clock.advance(seconds=0.9)
    assert trace(orch.on_timer()) == []
    out = orch.on_batch(done("hvac-0001", "c1"))
    assert [e.kind for e in events(out)] == [K.DONE]


def test_device_failure_is_final_and_frees_the_device(orch: Orchestrator) -> None:
    orch.on_batch(make_command("c1"))
    orch.on_batch(make_command("c2", params={"setpoint": 23.0}))
    out = orch.on_batch(DeviceAck("hvac-0001", Ack("c1", AckStatus.FAILED, reason="jammed")))
    assert trace(out) == [("c1", "failed"), ("c2", "write"), ("c2", "sent")]
    failed = events(out, K.FAILED)[0]
    assert (failed.applied, failed.reason) == (False, "device_failed")
    assert "jammed" in (failed.detail or "")


def test_reported_state_matching_the_command_counts_as_done(orch: Orchestrator) -> None:
    orch.on_batch(make_command("c1", params={"setpoint": 23}))
    assert events(orch.on_batch(DeviceState("hvac-0001", {"setpoint": 21.0})), K.DONE) == []
    out = orch.on_batch(DeviceState("hvac-0001", {"setpoint": 23.0, "mode": "auto"}))
    [event] = events(out)
    assert (event.kind, event.applied) == (K.DONE, True)
    assert "setpoint=23.0" in (event.detail or "")
    assert orch.reported_of("hvac-0001") == {"setpoint": 23.0, "mode": "auto"}


def test_a_state_for_a_device_with_nothing_in_flight_only_updates_reported(
    orch: Orchestrator,
) -> None:
    assert orch.on_batch(DeviceState("hvac-0001", {"setpoint": 19.0})) == []
    assert orch.reported_of("hvac-0001") == {"setpoint": 19.0}


# -- timeouts, retries, expiry -----------------------------------------------------------------


def test_no_answer_is_retried_with_exponential_backoff_then_failed(
    orch: Orchestrator, clock: Clock
) -> None:
    orch.on_batch(make_command("c1", ttl_s=600))
    seen, events = [], []
    for _ in range(20):
        when = orch.next_timer()
        if when is None:
            break
        clock.t = when
        out = orch.on_timer()
        events += out
        seen += [(clock.t - T0, step) for step in trace(out)]
    assert seen == [
        (timedelta(seconds=1), ("c1", "retried")),
        (timedelta(seconds=2), ("c1", "write")),
        (timedelta(seconds=2), ("c1", "sent")),
        (timedelta(seconds=3), ("c1", "retried")),
        (timedelta(seconds=5), ("c1", "write")),  # back-off doubled: 2 s
        (timedelta(seconds=5), ("c1", "sent")),
        (timedelta(seconds=6), ("c1", "failed")),
    ]
    failed = events[-1]
    assert (failed.kind.value, failed.attempt, failed.applied) == ("failed", 3, None)
    assert orch.state_of("c1") is CommandState.FAILED


def test_backoff_is_capped_and_jittered_by_the_injected_draw(registry: Registry) -> None:
    clock = Clock()
    config = OrchestratorConfig(
        ack_timeout={"mqtt": "1s"}, max_attempts=10, backoff="1s", backoff_max="4s", jitter=0.5
    )
    orch = config.build(None, registry, clock, jitter_draw=lambda cid, attempt: 1.0)
    orch.on_batch(make_command("c1", ttl_s=3600))
    delays = []
    for _ in range(6):
        clock.t = orch.next_timer()
        out = orch.on_timer()
        if events(out, K.RETRIED):
            timeout_at = clock.t
            delays.append(orch.next_timer() - timeout_at)
    # full delays 1, 2, 4, 4 (capped); the draw of 1.0 takes jitter 0.5 of each off
    assert delays == [timedelta(seconds=s) for s in (0.5, 1, 2)]


def test_seeded_jitter_is_the_same_for_the_same_command_and_attempt(
    registry: Registry,
) -> None:
    config = OrchestratorConfig(jitter=1.0, seed=7)
    a = config.build(None, registry)
    b = config.build(None, registry)
    draws = [a._draw("c1", n) for n in (1, 2, 3)]
    assert draws == [b._draw("c1", n) for n in (1, 2, 3)]
    assert len(set(draws)) == 3


def test_an_expired_command_is_never_written(orch: Orchestrator, clock: Clock) -> None:
    orch.on_batch(make_command("blocker", ttl_s=600))
    orch.on_batch(make_command("late", params={"setpoint": 25.0}, ttl_s=0.5))
    clock.advance(seconds=0.6)
    out = orch.on_timer()
    assert trace(out) == [("late", "expired")]
    expired = events(out)[0]
    assert (expired.applied, expired.reason) == (False, "expired")
    assert "never sent" in (expired.detail or "")
    out = orch.on_batch(done("hvac-0001", "blocker"))
    assert writes(out) == []


def test_a_request_that_arrives_expired_is_expired_at_once(
    orch: Orchestrator, clock: Clock
) -> None:
    clock.advance(seconds=120)
    out = orch.on_batch(make_command("stale", ttl_s=60))
    assert trace(out) == [("stale", "requested"), ("stale", "expired")]


def test_a_command_expiring_between_retries_is_not_sent_again(
    orch: Orchestrator, clock: Clock
) -> None:
    orch.on_batch(make_command("c1", ttl_s=1.5))
    clock.advance(seconds=1)
    assert trace(orch.on_timer()) == [("c1", "retried")]
    # the re-send would be at 2 s, after the expiry at 1.5 s: the timer fires at the expiry
    assert orch.next_timer() == T0 + timedelta(seconds=1.5)
    clock.advance(seconds=0.5)
    out = orch.on_timer()
    assert trace(out) == [("c1", "expired")]
    assert events(out)[0].applied is None  # sent once, never confirmed


def _late_writer(clock: Clock, lag_s: float) -> Callable[[Write], Any]:
    """A deliver hook whose writer reads the clock ``lag_s`` after the orchestrator did."""
    writer = MqttWriter("home")
    return lambda write: writer.encode(write, clock.t + timedelta(seconds=lag_s))


def test_a_command_expiring_on_its_way_to_the_writer_is_expired_never_sent(
    registry: Registry, clock: Clock
) -> None:
    orch = OrchestratorConfig(ack_timeout={"mqtt": "1s"}, backoff="1s", jitter=0).build(
        None, registry, clock, deliver=_late_writer(clock, 0.5)
    )
    out = orch.on_batch(make_command("ok", ttl_s=60))
    assert [type(o).__name__ for o in out][2:] == ["MqttCommand", "CommandEvent"]
    out = orch.on_batch(make_command("late", device_id="hvac-0002", ttl_s=0.3))
    assert trace(out) == [("late", "requested"), ("late", "queued"), ("late", "expired")]
    expired = events(out)[-1]
    assert (expired.applied, expired.reason, expired.attempt) == (False, "expired", None)
    assert "before the mqtt writer could send it" in (expired.detail or "")
    assert not [o for o in out if isinstance(o, MqttCommand)]
    assert orch.state_of("late") is CommandState.EXPIRED
    assert orch.in_flight("hvac-0002") is None  # the device is free for its next command


def test_a_resend_expiring_on_its_way_to_the_writer_was_maybe_applied(
    registry: Registry, clock: Clock
) -> None:
    orch = OrchestratorConfig(ack_timeout={"mqtt": "1s"}, backoff="1s", jitter=0).build(
        None, registry, clock, deliver=_late_writer(clock, 0.5)
    )
    orch.on_batch(make_command("c1", ttl_s=2.2))  # sent at 0 s, no answer
    clock.advance(seconds=1)
    assert trace(orch.on_timer()) == [("c1", "retried")]
    clock.advance(seconds=1)  # the re-send is due at 2 s; the writer sees 2.5 s
    out = orch.on_timer()
    assert trace(out) == [("c1", "expired")]
    expired = events(out)[0]
    assert (expired.applied, expired.reason) == (None, "expired")
    assert "sent 1 times before, never confirmed" in (expired.detail or "")


def test_a_late_ack_during_backoff_still_completes(orch: Orchestrator, clock: Clock) -> None:
    orch.on_batch(make_command("c1"))
    clock.advance(seconds=1)
    orch.on_timer()
    out = orch.on_batch(done("hvac-0001", "c1"))
    assert [e.kind for e in events(out)] == [K.DONE]
    clock.advance(seconds=5)
    assert orch.on_timer() == []


# -- duplicates ----------------------------------------------------------------------------------


def test_a_replayed_request_does_nothing(orch: Orchestrator) -> None:
    first = make_command("c1", params={"setpoint": 22})
    orch.on_batch(first)
    assert orch.on_batch(first) == []
    orch.on_batch(done("hvac-0001", "c1"))
    assert orch.on_batch(first) == []  # also after it finished
    assert orch.stats["duplicate_requests"] == 2


def test_a_reused_id_with_other_content_goes_to_the_dead_letters(orch: Orchestrator) -> None:
    orch.on_batch(make_command("c1"))
    out = orch.on_batch(make_command("c1", params={"setpoint": 30.0}))
    [dropped] = out
    assert isinstance(dropped, Dropped)
    assert "already used by another command" in dropped.reason
    assert orch.records["c1"].command.params == {"setpoint": 22.0}


def test_a_redelivered_ack_does_nothing(orch: Orchestrator) -> None:
    orch.on_batch(make_command("c1"))
    orch.on_batch(make_command("c2", params={"setpoint": 23.0}))
    orch.on_batch(done("hvac-0001", "c1"))
    assert orch.on_batch(done("hvac-0001", "c1")) == []
    assert orch.on_batch(DeviceAck("hvac-0001", Ack("c1", AckStatus.FAILED))) == []
    assert orch.state_of("c1") is CommandState.DONE
    assert orch.in_flight("hvac-0001") == "c2"
    assert orch.stats["acks_duplicate"] == 2


def test_an_ack_from_another_device_is_dropped(orch: Orchestrator) -> None:
    orch.on_batch(make_command("c1"))
    [dropped] = orch.on_batch(done("hvac-0002", "c1"))
    assert isinstance(dropped, Dropped)
    assert "'hvac-0002' acked command 'c1'" in dropped.reason
    assert orch.records["c1"].state.value == "sent"


def test_an_ack_for_an_unknown_command_is_counted(orch: Orchestrator) -> None:
    assert orch.on_batch(done("hvac-0001", "nobody")) == []
    assert orch.stats["acks_unknown"] == 1


# -- rejections -----------------------------------------------------------------------------------


def reject_reason(orch: Orchestrator, command: Command) -> tuple[str | None, str]:
    out = orch.on_batch(command)
    assert writes(out) == []
    [requested, rejected] = events(out)
    assert requested.kind is K.REQUESTED
    assert (rejected.kind, rejected.applied) == (K.REJECTED, False)
    return rejected.reason, rejected.detail or ""


@pytest.mark.parametrize(
    ("command", "kind", "words"),
    [
        (make_command("u1", device_id="toaster-1"), "unknown_device", "unknown device 'toaster-1'"),
        (make_command("u2", name="self_destruct"), "unknown_command", "self_destruct"),
        (make_command("u3", params={"setpoint": 99}), "out_of_range", "out of range"),
        (make_command("u4", params={"setpoint": float("nan")}), "wrong_type", "not a finite"),
        (make_command("u5", params={"setpoint": "hot"}), "wrong_type", "expected a number"),
        (make_command("u6", params={}), "missing_param", "missing parameter"),
        (
            make_command("u7", params={"setpoint": 22, "boost": True}),
            "unknown_param",
            "boost",
        ),
        (make_command("u8", ttl_s=10 * 86400), "far_future_expiry", "more than 1 day"),
        (make_command("u9", at=T0 + timedelta(hours=1)), "future_timestamp", "ahead"),
        (make_command("u10", ttl_s=-5), "bad_expiry", "not after issued_at"),
        (make_command("u11", priority=10**6), "out_of_range", "priority"),
        (make_command("u12", device_id="hvac-0001/../+"), "bad_id", "contains"),
        (make_command("u13", device_id="x" * 500), "bad_id", "the limit is 128"),
        (make_command("u14", correlation_id="plan\x00"), "bad_id", "control characters"),
        (make_command("u15", device_id="lock-zigbee", name="lock"), "no_writer", "zigbee"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(
    orch: Orchestrator, command: Command, kind: str, words: str
) -> None:
    reason, detail = reject_reason(orch, command)
    assert reason == kind, detail
    assert words in detail


@pytest.mark.parametrize("command_id", ["evil\nid", "", "x" * 201, "\x1b[31mred"])
def test_unusable_command_ids_go_to_the_dead_letters(orch: Orchestrator, command_id: str) -> None:
    [dropped] = orch.on_batch(make_command(command_id))
    assert isinstance(dropped, Dropped)
    assert "command_id" in dropped.reason


def test_naive_times_are_rejected(orch: Orchestrator) -> None:
    request = decode_request(
        b'{"command_id": "n1", "device_id": "hvac-0001", "name": "set_temperature",'
        b' "params": {"setpoint": 22}, "issued_at": "2026-01-01T12:00:00",'
        b' "expires_at": "2026-01-01T12:01:00Z"}'
    )
    assert isinstance(request, Command)
    reason, detail = reject_reason(orch, request)
    assert reason == "naive_timestamp"
    assert "no time zone" in detail


def test_invalid_requests_are_audited_under_their_id_or_dropped(orch: Orchestrator) -> None:
    bad = decode_request(b'{"command_id": "x1", "device_id": "hvac-0001", "name": 5}')
    assert isinstance(bad, InvalidRequest)
    out = orch.on_batch(bad)
    assert trace(out) == [("x1", "requested"), ("x1", "rejected")]
    assert events(out)[1].reason == "invalid_command"
    assert orch.on_batch(bad) == []  # replayed: once
    [dropped] = orch.on_batch(decode_request(b"{not json"))
    assert isinstance(dropped, Dropped)
    assert "not valid JSON" in dropped.reason


# -- conflicts -------------------------------------------------------------------------------------


def setpoint(cid: str, value: float, plan: str, **kw: Any) -> Command:
    return make_command(cid, params={"setpoint": value}, correlation_id=plan, **kw)


def test_higher_priority_supersedes_a_queued_conflicting_command(orch: Orchestrator) -> None:
    orch.on_batch(make_command("busy", name="set_mode", params={"mode": "cool"}))
    orch.on_batch(setpoint("a", 20.0, "plan-a"))
    out = orch.on_batch(setpoint("b", 25.0, "plan-b", priority=100))
    assert trace(out) == [("b", "requested"), ("a", "rejected"), ("b", "queued")]
    loser = events(out, K.REJECTED)[0]
    assert loser.reason == "conflict"
    assert "superseded by b" in (loser.detail or "")
    assert orch.queued("hvac-0001") == ["b"]


def test_lower_priority_newcomer_loses(orch: Orchestrator) -> None:
    orch.on_batch(setpoint("a", 20.0, "plan-a", priority=100))  # in flight
    out = orch.on_batch(setpoint("b", 25.0, "plan-b", at=T0 + timedelta(seconds=1)))
    assert trace(out) == [("b", "requested"), ("b", "rejected")]
    assert "lost to a" in (events(out, K.REJECTED)[0].detail or "")


def test_equal_priority_goes_to_the_most_recent(orch: Orchestrator, clock: Clock) -> None:
    orch.on_batch(make_command("busy", name="set_mode", params={"mode": "cool"}))
    orch.on_batch(setpoint("newer", 20.0, "plan-a", at=T0 + timedelta(seconds=2)))
    out = orch.on_batch(setpoint("older", 25.0, "plan-b", at=T0 + timedelta(seconds=1)))
    assert trace(out) == [("older", "requested"), ("older", "rejected")]
    out = orch.on_batch(setpoint("newest", 26.0, "plan-b", at=T0 + timedelta(seconds=3)))
    assert ("newer", "rejected") in trace(out)


def test_a_winner_waits_behind_a_command_already_in_flight(orch: Orchestrator) -> None:
    orch.on_batch(setpoint("a", 20.0, "plan-a"))  # sent: cannot be recalled
    out = orch.on_batch(setpoint("b", 25.0, "plan-b", priority=100))
    assert trace(out) == [("b", "requested"), ("b", "queued")]
    out = orch.on_batch(done("hvac-0001", "a"))
    assert [w.command.command_id for w in writes(out)] == ["b"]


def test_no_conflict_within_one_origin_or_on_other_properties(orch: Orchestrator) -> None:
    orch.on_batch(setpoint("a1", 20.0, "plan-a"))
    orch.on_batch(setpoint("a2", 21.0, "plan-a"))
    out = orch.on_batch(
        make_command("b1", name="set_mode", params={"mode": "heat"}, correlation_id="plan-b")
    )
    assert events(out, K.REJECTED) == []
    assert orch.queued("hvac-0001") == ["a2", "b1"]


# -- instructions --------------------------------------------------------------------------------


def test_an_instruction_expands_to_ordered_commands_per_device(orch: Orchestrator) -> None:
    instruction = Instruction.from_data(
        {
            "instruction_id": "cool",
            "target": {"where": {"building": "A"}},
            "steps": [
                "set_mode cool",
                "set_temperature 23.5",
                {"command": "set_fan_speed", "params": {"speed": 2}},
            ],
            "priority": "high",
        }
    )
    out = orch.on_batch(instruction)
    assert [w.command.command_id for w in writes(out)] == [
        "cool/0/hvac-kitchen",
        "cool/0/hvac-hall",
    ]
    assert orch.queued("hvac-kitchen") == ["cool/1/hvac-kitchen", "cool/2/hvac-kitchen"]
    assert {w.command.priority for w in writes(out)} == {10}
    assert orch.on_batch(instruction) == []  # replayed: same ids, nothing new


def test_an_instruction_whose_target_cannot_be_resolved_is_dropped(orch: Orchestrator) -> None:
    instruction = Instruction.from_data(
        {"instruction_id": "x", "target": {"group": "nope"}, "steps": ["turn_on"]}
    )
    [dropped] = orch.on_batch(instruction)
    assert isinstance(dropped, Dropped)
    assert "unknown group 'nope'" in dropped.reason


# -- snapshot and restore ---------------------------------------------------------------------------


def test_restore_continues_where_the_snapshot_left_off(
    orch: Orchestrator, registry: Registry, clock: Clock
) -> None:
    orch.on_batch(make_command("c1"))
    orch.on_batch(make_command("c2", params={"setpoint": 23.0}))
    orch.on_batch(make_command("c3", device_id="hvac-0002"))
    orch.on_batch(done("hvac-0002", "c3"))
    snap = orch.snapshot()
    again = orch.config.build(snap, registry, clock)
    # nothing is re-sent on restore; the in-flight command keeps its deadline
    assert again.in_flight("hvac-0001") == "c1"
    assert again.on_batch(make_command("c3", device_id="hvac-0002")) == []
    out = again.on_batch(done("hvac-0001", "c1"))
    assert trace(out) == [("c1", "done"), ("c2", "write"), ("c2", "sent")]
    clock.advance(seconds=1)
    assert trace(again.on_timer()) == [("c2", "retried")]


def test_restored_queues_are_pumped_without_new_input(
    orch: Orchestrator, registry: Registry, clock: Clock
) -> None:
    orch.on_batch(make_command("c1"))
    orch.on_batch(make_command("c2", params={"setpoint": 23.0}))
    orch.on_batch(done("hvac-0001", "c1"))
    snap = orch.snapshot()
    # a snapshot where c2 was still queued (taken before the pump) resumes by sending it
    [rec] = [r for r in snap["records"] if r["command"]["command_id"] == "c2"]
    rec.update(state="queued", attempts=0, deadline=None)
    again = orch.config.build(snap, registry, clock)
    assert again.next_timer() == clock.t
    assert trace(again.on_timer()) == [("c2", "write"), ("c2", "sent")]


def test_finished_commands_are_remembered_compactly_and_still_deduplicated(
    orch: Orchestrator, registry: Registry, clock: Clock
) -> None:
    orch.on_batch(make_command("c1"))
    orch.on_batch(done("hvac-0001", "c1"))
    snap = json.loads(json.dumps(orch.snapshot()))  # plain data
    assert snap["records"] == []  # only live commands are kept whole
    [lines] = snap["remembered"].values()
    assert lines.startswith("c1\thvac-0001\tdone\t")
    again = orch.config.build(snap, registry, clock)
    assert again.state_of("c1") is CommandState.DONE
    assert again.on_batch(make_command("c1")) == []  # a replay
    [reused] = again.on_batch(make_command("c1", params={"setpoint": 30.0}))
    assert isinstance(reused, Dropped)
    assert "already used by another command (for hvac-0001)" in reused.reason
    [wrong] = again.on_batch(done("hvac-0002", "c1"))
    assert isinstance(wrong, Dropped)
    assert again.on_batch(done("hvac-0001", "c1")) == []
    assert again.stats["duplicate_requests"] == 1


def test_a_remembered_command_costs_tens_of_snapshot_bytes(
    orch: Orchestrator, clock: Clock
) -> None:
    empty = len(pickle.dumps(orch.snapshot()))
    for n in range(1000):
        orch.on_batch(make_command(f"cmd-{n:06d}", f"hvac-{n % 50:04d}", at=clock.t, ttl_s=300))
        orch.on_batch(done(f"hvac-{n % 50:04d}", f"cmd-{n:06d}"))
        clock.advance(seconds=0.002)
    per_command = (len(pickle.dumps(orch.snapshot())) - empty) / 1000
    assert per_command < 64  # as Bytewax stores it; whole records took ~290 bytes


def test_a_layout_1_snapshot_is_read(orch: Orchestrator, registry: Registry, clock: Clock) -> None:
    orch.on_batch(make_command("c1"))
    orch.on_batch(make_command("c2", params={"setpoint": 23.0}))
    finished = CommandRecord(make_command("c1"), 1, "mqtt", CommandState.DONE, attempts=1)
    finished.digest = "f" * 64  # layout 1 kept the whole sha256
    snap = orch.snapshot()
    live = [r for r in snap["records"] if r["command"]["command_id"] == "c2"]
    live[0]["digest"] = live[0]["digest"] + "0" * 48
    old = {
        **{k: v for k, v in snap.items() if k != "remembered"},
        "version": 1,
        "records": [finished.to_data(), *live],
    }
    again = orch.config.build(old, registry, clock)
    assert again.state_of("c1") is CommandState.DONE
    assert again.state_of("c2") is CommandState.QUEUED
    # the replay adds nothing; the restored queue moves on (c1 finished)
    out = again.on_batch(make_command("c2", params={"setpoint": 23.0}))
    assert trace(out) == [("c2", "write"), ("c2", "sent")]
    assert again.stats["duplicate_requests"] == 1


def test_a_snapshot_of_another_layout_is_refused(orch: Orchestrator, registry: Registry) -> None:
    snap = orch.snapshot() | {"version": 0}
    with pytest.raises(ConfigError, match="layout 0"):
        orch.config.build(snap, registry)


def test_finished_commands_are_forgotten_after_remember(registry: Registry) -> None:
    clock = Clock()
    orch = OrchestratorConfig(remember="1h").build(None, registry, clock)
    orch.on_batch(make_command("c1"))
    orch.on_batch(done("hvac-0001", "c1"))
    clock.advance(minutes=30)
    assert orch.on_batch(make_command("c1")) == []
    clock.advance(minutes=32)  # 1 h after its expiry, and past its minute's forget bucket
    orch.on_batch(DeviceState("hvac-0001", {}))
    assert orch.state_of("c1") is None
    # a replay after that finds the command expired: audited again, never written
    assert trace(orch.on_batch(make_command("c1"))) == [("c1", "requested"), ("c1", "expired")]


def test_config_rejects_a_default_protocol_without_timeout(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="default_protocol 'zigbee'"):
        OrchestratorConfig(default_protocol="zigbee").build(None, registry)


# -- coordinators -------------------------------------------------------------------------------------


class TwoStep:
    """A tiny coordinator: unlock, then lock again once the unlock finished."""

    def __init__(self, coordinator_id: str = "routine-1") -> None:
        self.coordinator_id = coordinator_id
        self.outcomes: list[CommandEvent] = []
        self.seen_reported: list[Any] = []
        self._events: list[PlanEvent] = []
        self.finished = False

    def _command(self, step: str, name: str, now: Any) -> Command:
        return make_command(
            f"{self.coordinator_id}/{step}/lock-0001",
            device_id="lock-0001",
            name=name,
            at=now,
            correlation_id=self.coordinator_id,
        )

    def start(self, now: Any, reported: Any) -> list[Command]:
        self.seen_reported.append(dict(reported("lock-0001")))
        self._events.append(PlanEvent(self.coordinator_id, PlanEventKind.STARTED, now))
        return [self._command("open", "unlock", now)]

    def on_outcome(self, event: CommandEvent, now: Any, reported: Any) -> list[Command]:
        self.outcomes.append(event)
        if len(self.outcomes) == 1:
            return [self._command("close", "lock", now)]
        self.finished = True
        self._events.append(PlanEvent(self.coordinator_id, PlanEventKind.DONE, now))
        return []

    def on_timer(self, now: Any, reported: Any) -> list[Command]:
        return []

    def next_timer(self) -> Any:
        return None

    def progress(self) -> list[PlanEvent]:
        drained, self._events = self._events, []
        return drained

    def snapshot(self) -> dict[str, Any]:
        return {"type": "test"}


def test_a_hosted_coordinator_sees_each_outcome_once(orch: Orchestrator) -> None:
    orch.on_batch(DeviceState("lock-0001", {"locked": 1}))
    routine = TwoStep()
    out = orch.on_batch(StartCoordinator(routine))
    assert routine.seen_reported == [{"locked": 1}]
    assert [e.kind for e in out if isinstance(e, PlanEvent)] == [PlanEventKind.STARTED]
    assert [w.command.name for w in writes(out)] == ["unlock"]
    out = orch.on_batch(done("lock-0001", "routine-1/open/lock-0001"))
    assert [w.command.name for w in writes(out)] == ["lock"]
    orch.on_batch(done("lock-0001", "routine-1/open/lock-0001"))  # redelivered
    out = orch.on_batch(DeviceState("lock-0001", {"locked": 1}))  # done by state
    assert [e.kind for e in out if isinstance(e, PlanEvent)] == [PlanEventKind.DONE]
    assert [(e.command_id, e.kind) for e in routine.outcomes] == [
        ("routine-1/open/lock-0001", K.DONE),
        ("routine-1/close/lock-0001", K.DONE),
    ]
    assert orch.coordinators == {}
    assert orch.on_batch(StartCoordinator(TwoStep())) == []  # replayed start: nothing


def test_a_coordinator_command_rejected_at_once_is_reported_to_it(orch: Orchestrator) -> None:
    routine = TwoStep()
    routine._command = lambda step, name, now: make_command(  # type: ignore[method-assign]
        f"r/{step}", device_id="toaster-9", name=name, at=now, correlation_id="routine-1"
    )
    orch.on_batch(StartCoordinator(routine))
    assert [e.kind for e in routine.outcomes] == [K.REJECTED, K.REJECTED]
    assert routine.finished


def test_an_unknown_coordinator_type_is_dropped(orch: Orchestrator) -> None:
    request = decode_request(b'{"coordinator": {"type": "ritual"}}')
    [dropped] = orch.on_batch(request)
    assert isinstance(dropped, Dropped)
    assert "coordinator type 'ritual' is unknown" in dropped.reason


def test_unknown_inputs_are_a_type_error(orch: Orchestrator) -> None:
    with pytest.raises(TypeError, match="cannot take a int"):
        orch.on_batch(42)
