"""The orchestrator as the orchestrator flow runs it: a late refusal of an expired command.

MQTT 5 counts message expiry in whole seconds, rounded up by the writer, so a
broker may hand a device a command up to a second after its ``expires_at``.
The device refuses it (it checks the expiry itself); the audit must then say
expired, not that the device failed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from commands.orchestrator import OrchestratorConfig
from commands.validation import DeviceAck
from iotflow.events import Ack, AckStatus, Command, CommandEvent
from twins.registry import simulator_registry

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("answer_after_s", "kind", "reason"),
    [(2.4, "expired", "expired"), (1.5, "failed", "device_failed")],
    ids=["after-expiry", "before-expiry"],
)
def test_a_failed_answer_after_expiry_is_audited_as_expired(
    answer_after_s: float, kind: str, reason: str
) -> None:
    clock = [T0]
    orchestrator = OrchestratorConfig(ack_timeout={"mqtt": "5s"}).build(
        None, simulator_registry(), lambda: clock[0]
    )
    unlock = Command("late", "lock-0001", "unlock", {}, T0, T0 + timedelta(seconds=2))
    sent = orchestrator.on_batch(unlock)
    assert [e.kind.value for e in sent if isinstance(e, CommandEvent)][-1] == "sent"
    clock[0] = T0 + timedelta(seconds=answer_after_s)
    refusal = Ack("late", AckStatus.FAILED, {"locked": 1}, "expired before it arrived")
    (event,) = orchestrator.on_batch(DeviceAck("lock-0001", refusal))
    assert (event.kind.value, event.reason, event.applied) == (kind, reason, False)
    assert "expired before it arrived" in (event.detail or "")
