"""The coordinator interface: outcome classification, PlanEvent on the wire, restore by type."""

from __future__ import annotations

import msgspec
import pytest
from plan_harness import T0

from commands.coordinator import (
    OUTCOME_KINDS,
    Outcome,
    PlanEvent,
    PlanEventKind,
    outcome_of,
    restore_coordinator,
)
from iotflow.errors import ConfigError
from iotflow.events import CommandEvent, CommandEventKind


def event(kind: CommandEventKind, **extra: object) -> CommandEvent:
    return CommandEvent("p/s/d", "d", kind, T0, None, **extra)


def test_outcome_kinds_are_the_terminal_ones() -> None:
    assert {k.value for k in OUTCOME_KINDS} == {"done", "failed", "expired", "rejected"}


def test_done_is_applied_rejected_is_not_and_the_rest_is_unknown_without_more_facts() -> None:
    assert outcome_of(event(CommandEventKind.DONE)) is Outcome.APPLIED
    assert outcome_of(event(CommandEventKind.REJECTED)) is Outcome.NOT_APPLIED
    assert outcome_of(event(CommandEventKind.FAILED, applied=False)) is Outcome.NOT_APPLIED
    assert outcome_of(event(CommandEventKind.EXPIRED, applied=False)) is Outcome.NOT_APPLIED
    assert outcome_of(event(CommandEventKind.FAILED)) is Outcome.UNKNOWN
    assert outcome_of(event(CommandEventKind.EXPIRED)) is Outcome.UNKNOWN
    assert outcome_of(event(CommandEventKind.REJECTED, applied=True)) is Outcome.NOT_APPLIED


def test_plan_event_round_trips_as_json() -> None:
    ev = PlanEvent("leave-1", PlanEventKind.WAVE_STARTED, T0, "10 devices", wave=1)
    wire = msgspec.json.encode(ev)
    assert b'"kind":"wave_started"' in wire
    assert msgspec.json.decode(wire, type=PlanEvent) == ev


@pytest.mark.parametrize("snap", [{}, {"type": "weather"}, [], "plan", {"type": None}])
def test_restore_refuses_unknown_snapshots(snap: object) -> None:
    with pytest.raises(ConfigError, match="coordinator snapshot type"):
        restore_coordinator(snap)  # type: ignore[arg-type]
