"""CommandState: every legal move works, every other one raises InvalidTransition."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from cmdkit import T0, make_command

from commands.model import TERMINAL, TRANSITIONS, CommandRecord, CommandState, InvalidTransition

MOVES = list(itertools.product(CommandState, CommandState))


def record_in(state: CommandState) -> CommandRecord:
    rec = CommandRecord(make_command("c1"), seq=1, protocol="mqtt")
    rec.state = state
    return rec


@pytest.mark.parametrize(("have", "want"), MOVES, ids=[f"{a}->{b}" for a, b in MOVES])
def test_each_move_is_allowed_exactly_when_listed(have: CommandState, want: CommandState) -> None:
    rec = record_in(have)
    if want in TRANSITIONS[have]:
        rec.move(want, T0)
        assert rec.state is want
        assert rec.updated_at == T0
    else:
        with pytest.raises(InvalidTransition) as err:
            rec.move(want, T0)
        assert rec.state is have  # unchanged
        assert (err.value.subject, err.value.have, err.value.want) == ("command 'c1'", have, want)
        assert err.value.allowed == TRANSITIONS[have]
        assert f"cannot go from {have} to {want}" in str(err.value)


def test_terminal_states_have_no_way_out() -> None:
    assert {
        CommandState.DONE,
        CommandState.FAILED,
        CommandState.EXPIRED,
        CommandState.REJECTED,
    } == TERMINAL
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset()
        assert record_in(state).terminal
    with pytest.raises(InvalidTransition, match=r"allowed from done: none \(terminal\)"):
        record_in(CommandState.DONE).move(CommandState.SENT, T0)


def test_every_state_is_reachable_from_requested() -> None:
    seen, frontier = {CommandState.REQUESTED}, [CommandState.REQUESTED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(CommandState)


def test_record_round_trips_through_plain_data() -> None:
    rec = record_in(CommandState.SENT)
    rec.attempts = 2
    rec.deadline = T0 + timedelta(seconds=5)
    rec.expected = {"setpoint": 22.0}
    rec.properties = ("setpoint",)
    rec.metadata = {"building": "A"}
    rec.updated_at = T0
    rec.digest = "abc"
    again = CommandRecord.from_data(rec.to_data())
    assert again == rec
