"""Helpers for the command tests: a manual clock and a command factory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from iotflow.events import Command

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A hand-advanced clock."""

    def __init__(self, start: datetime = T0) -> None:
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **delta: float) -> datetime:
        self.t += timedelta(**delta)
        return self.t


def make_command(
    command_id: str,
    device_id: str = "hvac-0001",
    name: str = "set_temperature",
    params: dict[str, Any] | None = None,
    *,
    at: datetime = T0,
    ttl_s: float = 60.0,
    priority: int = 0,
    correlation_id: str | None = None,
) -> Command:
    if params is None:
        params = {"setpoint": 22.0} if name == "set_temperature" else {}
    return Command(
        command_id,
        device_id,
        name,
        params,
        at,
        at + timedelta(seconds=ttl_s),
        priority,
        correlation_id,
    )
