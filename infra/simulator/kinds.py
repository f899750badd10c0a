"""The device kinds the simulator knows: their metrics, reported state and commands.

| kind | ids | telemetry | commands (params) |
| --- | --- | --- | --- |
| ``temp`` | ``temp-0001`` | temperature, humidity | none |
| ``power`` | ``power-0001`` | power_w, energy_kwh | none |
| ``hvac`` | ``hvac-0001`` | temperature, setpoint, fan_speed | ``set_mode`` (mode), ``set_temperature`` (setpoint), ``set_fan_speed`` (speed) |
| ``lock`` | ``lock-0001`` | locked (0/1), battery | ``lock``, ``unlock`` |
| ``light`` | ``light-0001`` | on (0/1), brightness | ``turn_on``, ``turn_off``, ``set_brightness`` (brightness) |
| ``security`` | ``security-0001`` | armed (0/1) | ``arm``, ``disarm`` |
| ``notifier`` | ``notifier-0001`` | none (state: last_message) | ``notify`` (message) |
| ``node`` | ``node-0001`` | none (state: firmware) | ``update_firmware`` (version) |

Telemetry fields that are reported state (setpoint, fan_speed, locked, on,
brightness, armed) change only through commands; the others follow patterns.
The last three kinds exist for orchestration (sagas, rollouts) and join a
fleet only when asked for by name: a default split covers ``DEFAULT_KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from infra.simulator.patterns import (
    DriftPattern,
    NoisePattern,
    Pattern,
    SinePattern,
    SpikePattern,
)

__all__ = [
    "DEFAULT_KINDS",
    "HVAC_MODES",
    "KINDS",
    "CommandRejected",
    "DeviceKind",
    "KindSpec",
    "MetricSpec",
    "pattern_metrics",
]

_DAY_S = 86_400.0
# Room temperature an HVAC unit drifts to while its mode is "off".
_AMBIENT_C = 24.0
HVAC_MODES = ("off", "heat", "cool", "auto", "fan")


class DeviceKind(StrEnum):
    """A kind of simulated device; its value prefixes the device ids."""

    TEMP = "temp"
    POWER = "power"
    HVAC = "hvac"
    LOCK = "lock"
    LIGHT = "light"
    SECURITY = "security"
    NOTIFIER = "notifier"
    NODE = "node"


DEFAULT_KINDS = (
    DeviceKind.TEMP,
    DeviceKind.POWER,
    DeviceKind.HVAC,
    DeviceKind.LOCK,
    DeviceKind.LIGHT,
)
"""The kinds a fleet without explicit kinds is split over."""


class CommandRejected(Exception):
    """A command cannot run on this device; the message is the ack's reason."""


State = dict[str, Any]
CommandHandler = Callable[[Mapping[str, Any], Mapping[str, Any]], State]
"""``handler(params, state) -> changes to the state``; raises CommandRejected."""


@dataclass(frozen=True)
class MetricSpec:
    """A telemetry metric driven by patterns, with its default shape and bounds."""

    name: str
    baseline: float | Callable[[Mapping[str, Any]], float]
    patterns: tuple[Pattern, ...]
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class KindSpec:
    """Everything that makes a device of one kind."""

    kind: DeviceKind
    metrics: tuple[MetricSpec, ...]
    state_metrics: tuple[str, ...]
    initial_state: Mapping[str, Any]
    commands: Mapping[str, CommandHandler]


def _fixed(**changes: Any) -> CommandHandler:
    def handler(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
        return dict(changes)

    return handler


def _number(
    params: Mapping[str, Any], command: str, key: str, low: float, high: float, *, integer: bool
) -> float:
    value = params.get(key)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not low <= value <= high or (integer and value != int(value)):
        what = "an integer" if integer else "a number"
        msg = f"{command} needs params.{key}, {what} in {low:g}..{high:g}; got {value!r}"
        raise CommandRejected(msg)
    return int(value) if integer else float(value)


def _set_mode(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
    mode = params.get("mode")
    if mode not in HVAC_MODES:
        msg = f"set_mode needs params.mode, one of {', '.join(HVAC_MODES)}; got {mode!r}"
        raise CommandRejected(msg)
    return {"mode": mode}


def _set_temperature(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
    return {"setpoint": _number(params, "set_temperature", "setpoint", 10, 32, integer=False)}


def _set_fan_speed(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
    return {"fan_speed": _number(params, "set_fan_speed", "speed", 0, 3, integer=True)}


def _set_brightness(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
    return {"brightness": _number(params, "set_brightness", "brightness", 0, 100, integer=True)}


_MAX_TEXT = 1000


def _text(params: Mapping[str, Any], command: str, key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        msg = f"{command} needs params.{key}, a non-empty string of at most {_MAX_TEXT} characters; got {str(value)[:60]!r}"
        raise CommandRejected(msg)
    return value


def _notify(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
    return {"last_message": _text(params, "notify", "message")}


def _update_firmware(params: Mapping[str, Any], state: Mapping[str, Any]) -> State:
    return {"firmware": _text(params, "update_firmware", "version")}


def _hvac_baseline(state: Mapping[str, Any]) -> float:
    return _AMBIENT_C if state["mode"] == "off" else state["setpoint"]


def _spec(
    kind: DeviceKind,
    metrics: tuple[MetricSpec, ...],
    state: Mapping[str, Any] | None = None,
    state_metrics: tuple[str, ...] = (),
    commands: Mapping[str, CommandHandler] | None = None,
) -> KindSpec:
    return KindSpec(
        kind,
        metrics,
        state_metrics,
        MappingProxyType(dict(state or {})),
        MappingProxyType(dict(commands or {})),
    )


KINDS: Mapping[DeviceKind, KindSpec] = MappingProxyType(
    {
        DeviceKind.TEMP: _spec(
            DeviceKind.TEMP,
            (
                MetricSpec(
                    "temperature",
                    21.0,
                    (SinePattern(period_s=_DAY_S, amplitude=2.0), NoisePattern(std=0.15)),
                ),
                MetricSpec(
                    "humidity",
                    45.0,
                    (
                        SinePattern(period_s=_DAY_S, amplitude=5.0, phase_s=_DAY_S / 2),
                        NoisePattern(std=0.8),
                    ),
                    low=0,
                    high=100,
                ),
            ),
        ),
        DeviceKind.POWER: _spec(
            DeviceKind.POWER,
            (
                MetricSpec(
                    "power_w",
                    850.0,
                    (
                        SinePattern(period_s=_DAY_S, amplitude=300.0),
                        NoisePattern(std=40.0),
                        SpikePattern(probability=0.01, magnitude=2500.0),
                    ),
                    low=0,
                ),
                MetricSpec("energy_kwh", 0.0, (DriftPattern(per_hour=0.85),), low=0),
            ),
        ),
        DeviceKind.HVAC: _spec(
            DeviceKind.HVAC,
            (
                MetricSpec(
                    "temperature",
                    _hvac_baseline,
                    (SinePattern(period_s=1800.0, amplitude=0.4), NoisePattern(std=0.3)),
                ),
            ),
            state={"mode": "auto", "setpoint": 21.0, "fan_speed": 1},
            state_metrics=("setpoint", "fan_speed"),
            commands={
                "set_mode": _set_mode,
                "set_temperature": _set_temperature,
                "set_fan_speed": _set_fan_speed,
            },
        ),
        DeviceKind.LOCK: _spec(
            DeviceKind.LOCK,
            (MetricSpec("battery", 100.0, (DriftPattern(per_hour=-0.02),), low=0, high=100),),
            state={"locked": 1},
            state_metrics=("locked",),
            commands={"lock": _fixed(locked=1), "unlock": _fixed(locked=0)},
        ),
        DeviceKind.LIGHT: _spec(
            DeviceKind.LIGHT,
            (),
            state={"on": 0, "brightness": 100},
            state_metrics=("on", "brightness"),
            commands={
                "turn_on": _fixed(on=1),
                "turn_off": _fixed(on=0),
                "set_brightness": _set_brightness,
            },
        ),
        DeviceKind.SECURITY: _spec(
            DeviceKind.SECURITY,
            (),
            state={"armed": 0},
            state_metrics=("armed",),
            commands={"arm": _fixed(armed=1), "disarm": _fixed(armed=0)},
        ),
        DeviceKind.NOTIFIER: _spec(
            DeviceKind.NOTIFIER,
            (),
            state={"last_message": ""},
            commands={"notify": _notify},
        ),
        # firmware starts at FleetConfig.firmware.version
        DeviceKind.NODE: _spec(
            DeviceKind.NODE,
            (),
            state={"firmware": ""},
            commands={"update_firmware": _update_firmware},
        ),
    }
)
"""The spec of every device kind."""


def pattern_metrics() -> dict[str, list[DeviceKind]]:
    """Metric name -> the kinds whose telemetry drives it by patterns."""
    found: dict[str, list[DeviceKind]] = {}
    for spec in KINDS.values():
        for metric in spec.metrics:
            found.setdefault(metric.name, []).append(spec.kind)
    return found
