"""Natural keys of the project's topics: what a reader keeps after a replay."""

from __future__ import annotations

from connectors.dedupe import Deduper, command_event_key


def _event(kind: str, ts: str, command_id: str = "c1") -> dict[str, str]:
    return {"command_id": command_id, "kind": kind, "ts": ts}


def test_a_command_ends_once_even_when_a_resumed_flow_reaches_its_end_again_later() -> None:
    deduper = Deduper(command_event_key)
    events = [
        _event("sent", "2026-01-01T00:00:00Z"),
        _event("done", "2026-01-01T00:00:03Z"),
        _event("done", "2026-01-01T00:00:09Z"),  # re-derived after a crash, later ts
        _event("expired", "2026-01-01T00:00:10Z"),  # any second end of the same command
        _event("done", "2026-01-01T00:00:09Z", command_id="c2"),
    ]
    kept = list(deduper.filter(events))
    assert kept == [events[0], events[1], events[4]]
    assert deduper.dropped == 2


def test_a_retry_is_a_new_sent_event_and_a_replayed_one_is_not() -> None:
    deduper = Deduper(command_event_key)
    events = [
        _event("sent", "2026-01-01T00:00:00Z"),
        _event("retried", "2026-01-01T00:00:05Z"),
        _event("sent", "2026-01-01T00:00:05.5Z"),
        _event("sent", "2026-01-01T00:00:05.5Z"),  # the same record replayed
    ]
    assert list(deduper.filter(events)) == events[:3]


def test_an_event_without_its_key_fields_is_kept_and_counted() -> None:
    deduper = Deduper(command_event_key)
    assert list(deduper.filter([{"kind": "done"}, {"kind": "done"}])) == [
        {"kind": "done"},
        {"kind": "done"},
    ]
    assert deduper.unkeyed == 2
