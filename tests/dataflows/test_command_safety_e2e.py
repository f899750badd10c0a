"""Commands to devices that go away: the orchestrator flow, real Mosquitto and Kafka, simulated devices.

The devices keep a persistent MQTT session (stable client id, clean_start
false, a session expiry), so the broker queues their commands while they are
offline and redelivers what they took without acknowledging. Whatever the
broker or the orchestrator sends again, a device acts at most once per
command id, and a command that expired is never executed and is audited as
expired on ``{prefix}.commands.events`` and in DuckDB ``command_audit``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.duckdb_store import command_history
from dataflows.orchestrator import AUDIT_FLUSH
from infra.flowproc import FlowProcess
from infra.simulator import Fleet, FleetConfig
from iotflow.settings import Settings
from tests.dataflows.flowkit import Events, command, orchestrator_flow, request, terminal

# An in-flight command to an offline device is re-sent every ~1.2 s and outlives a
# ~5 s outage (20 sends); a ttl of 2 s expires during it.
CONFIG = {"ack_timeout": {"mqtt": "1s"}, "max_attempts": 20, "backoff": "200ms", "jitter": 0.0}
SESSION_S = 120
SHORT_TTL_S = 2.0
HVAC = "hvac-0001"


@pytest.fixture
def flow(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, FlowProcess]]:
    with orchestrator_flow(settings, tmp_path, CONFIG) as running:
        yield running


def audit_rows(settings: Settings, proc: FlowProcess, started: datetime) -> list[dict[str, Any]]:
    """Stop the flow once its last audit batch is in DuckDB; the device's audit rows."""
    deadline = time.monotonic() + 30
    while not settings.duckdb.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3 * AUDIT_FLUSH.total_seconds())
    proc.stop()
    return command_history(settings.duckdb, HVAC, started, datetime.now(UTC)).to_dicts()


@pytest.mark.parametrize(
    "expiring_at",
    [0, 1],
    ids=["expires-at-the-broker", "expires-in-the-orchestrator-queue"],
)
def test_offline_device_runs_the_valid_commands_once_and_never_the_expired_one(
    flow: tuple[Settings, FlowProcess], expiring_at: int
) -> None:
    """Three commands while the device is offline, one expiring during the outage.

    First in line, the expiring command is sent and waits in the broker's
    queue for the device's session until its MQTT 5 message expiry drops it;
    second in line, it expires in the orchestrator's queue, never sent.
    Either way the orchestrator audits it as expired and, after the device
    reconnects, the two valid ones run once each, in order.
    """
    settings, proc = flow
    config = FleetConfig(devices={"hvac": 1}, base=settings.mqtt_base)
    events = Events(settings)
    started = datetime.now(UTC)
    valid = [
        command("mode", HVAC, "set_mode", {"mode": "cool"}, ttl_s=60),
        command("fan", HVAC, "set_fan_speed", {"speed": 3}, ttl_s=60),
    ]
    stale = command("stale", HVAC, "set_temperature", {"setpoint": 25.5}, ttl_s=SHORT_TTL_S)
    docs = [*valid]
    docs.insert(expiring_at, stale)
    stale_expires = datetime.fromisoformat(stale["expires_at"])
    fleet = Fleet(
        config, settings.require_mqtt_url(), schedule_telemetry=False, session_expiry_s=SESSION_S
    )
    with fleet:
        fleet.go_offline()
        request(settings, docs)
        events.wait(lambda ev: "stale" in terminal(ev))
        # the broker rounds a message expiry up to whole seconds: stay away past that
        wait_s = (stale_expires - datetime.now(UTC)).total_seconds() + 1.5
        threading.Event().wait(max(0.0, wait_s))
        offline_sends = sum(e["kind"] == "sent" for e in events.commands())
        fleet.go_online()
        got = events.wait(lambda ev: {"mode", "fan"} <= set(terminal(ev)))
        stats = fleet.stats
    rows = audit_rows(settings, proc, started)
    got = events.commands()

    # the device: the two valid commands ran once each, in order; the stale one never reached it
    device = stats.devices[HVAC]
    assert device.executed == ("mode", "fan")
    assert stats.commands_executed == 2
    assert "stale" not in device.deliveries
    assert {k: device.reported[k] for k in ("mode", "fan_speed", "setpoint")} == {
        "mode": "cool",
        "fan_speed": 3,
        "setpoint": 21.0,
    }
    # copies the orchestrator re-sent during the outage arrived and were answered, not run
    assert offline_sends >= 3
    assert stats.duplicate_commands == sum(device.deliveries.values()) - 2

    # the orchestrator: one terminal state each, the stale one expired
    assert terminal(got) == {"mode": ["done"], "fan": ["done"], "stale": ["expired"]}
    expired = next(e for e in got if e["kind"] == "expired")
    stale_sends = sum(e["command_id"] == "stale" and e["kind"] == "sent" for e in got)
    if expiring_at == 0:
        assert stale_sends >= 1
        assert expired["applied"] is None  # sent, never confirmed: unknown to the orchestrator
    else:
        assert stale_sends == 0
        assert expired["applied"] is False
    assert expired["reason"] == "expired"

    # the audit in DuckDB says the same
    ends = {(r["command_id"], r["kind"]) for r in rows if r["kind"] in ("done", "expired")}
    assert ends == {("mode", "done"), ("fan", "done"), ("stale", "expired")}
    assert [r["reason"] for r in rows if r["kind"] == "expired"] == ["expired"]


def test_a_command_redelivered_by_the_broker_runs_once(
    flow: tuple[Settings, FlowProcess],
) -> None:
    """The device takes the command, loses its connection before the PUBACK and
    reconnects on its session: the broker sends the command again (DUP); the
    device answers it again without acting, and the orchestrator sees one DONE."""
    settings, proc = flow
    config = FleetConfig(devices={"hvac": 1}, base=settings.mqtt_base)
    events = Events(settings)
    fleet = Fleet(
        config, settings.require_mqtt_url(), schedule_telemetry=False, session_expiry_s=SESSION_S
    )
    with fleet:
        fleet.drop_before_puback()
        request(settings, [command("once", HVAC, "set_mode", {"mode": "heat"}, ttl_s=60)])
        got = events.wait(lambda ev: "once" in terminal(ev))
        deadline = time.monotonic() + 15
        while fleet.stats.redeliveries == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = fleet.stats
    proc.stop()
    assert stats.redeliveries == 1
    assert stats.devices[HVAC].deliveries == {"once": 2}
    assert stats.devices[HVAC].executed == ("once",)
    assert (stats.commands_executed, stats.duplicate_commands) == (1, 1)
    assert terminal(got) == {"once": ["done"]}
    assert sum(e["kind"] == "sent" for e in got) == 1  # the broker re-sent it, not the flow
