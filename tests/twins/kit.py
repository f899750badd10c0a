"""Helpers of the twin tests: a small registry, a manual clock, update builders."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from iotflow.events import to_ms
from twins.registry import Registry
from twins.updates import DesiredChange, Reported

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
T0_MS = to_ms(T0)

THERMO = {
    "properties": {
        "temperature": {"type": "float", "unit": "C"},
        "setpoint": {"type": "float", "unit": "C", "min": 10, "max": 32, "writable": True},
        "mode": {"type": "enum", "values": ["off", "heat", "cool"], "writable": True},
        "label": {"type": "string"},
    },
    "telemetry": ["seq"],
    "heartbeat": "10s",
    "commands": {
        "set_temperature": {
            "params": {"setpoint": {"type": "float", "min": 10, "max": 32}},
            "sets": {"setpoint": "params.setpoint"},
        },
        "set_mode": {
            "params": {"mode": {"type": "enum", "values": ["off", "heat", "cool"]}},
            "sets": {"mode": "params.mode"},
        },
    },
}


class Clock:
    """A manual clock: ``clock()`` is now; ``advance(seconds)`` moves it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @property
    def ms(self) -> int:
        return to_ms(self.now)


def make_registry(
    policy: Any = "desired_wins", devices: tuple[str, ...] = ("t1", "t2")
) -> Registry:
    reg = Registry()
    reg.define_model("thermo", THERMO)
    for device_id in devices:
        reg.add_device(device_id, "thermo")
    reg.set_policy("default", policy)
    return reg


def reported(
    device_id: str,
    ts_ms: int,
    received_ms: int | None = None,
    source: str = "telemetry",
    **values: Any,
) -> Reported:
    return Reported(device_id, ts_ms, values, source, ts_ms if received_ms is None else received_ms)


def desired(
    device_id: str,
    ts_ms: int,
    base_version: int | None = None,
    source: str = "api",
    received_ms: int | None = None,
    **values: Any,
) -> DesiredChange:
    return DesiredChange(
        device_id,
        values,
        base_version,
        source,
        ts_ms,
        ts_ms if received_ms is None else received_ms,
    )
