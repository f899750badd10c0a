"""The simulator's declarations: a fleet, its value patterns, faults and command behaviour.

Every model loads from a dict (``FleetConfig.model_validate({...})``), is
frozen, and rejects unknown fields, so a typo fails at load time with a
``pydantic.ValidationError`` whose location names the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from infra.simulator.kinds import DEFAULT_KINDS, KINDS, DeviceKind, pattern_metrics
from infra.simulator.model import FleetModel, MalformedKind
from infra.simulator.patterns import ConstantPattern, Pattern

__all__ = [
    "CommandConfig",
    "CommandDrop",
    "FaultConfig",
    "FirmwareConfig",
    "FleetConfig",
    "HubConfig",
]


def _globs(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or any(not isinstance(g, str) or not g for g in value):
        msg = f"devices must list device ids or globs such as 'light-*', got {value!r}"
        raise ValueError(msg)
    return value


class CommandDrop(BaseModel):
    """Devices that ignore the first deliveries of every command (a protocol timeout
    that recovers: the sender's retry gets through)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    devices: tuple[str, ...]
    """Device ids or globs (``hvac-*``)."""
    first_attempts: int = Field(1, ge=1)
    """How many deliveries of each command id go unanswered before one is taken."""

    _check_devices = field_validator("devices")(_globs)


class HubConfig(BaseModel):
    """A hub (gateway) some devices sit behind; while it is offline they neither act
    on commands nor send telemetry."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    devices: tuple[str, ...]
    """Device ids or globs (``light-*``); a device belongs to the first hub that lists it."""
    offline_after_commands: int | None = Field(None, ge=0)
    """The hub passes this many command messages, then goes offline (once)."""
    offline_for_s: float | None = Field(None, gt=0)
    """How long it stays offline when it trips; None: until ``Fleet.set_hub_online``."""

    _check_devices = field_validator("devices")(_globs)


class FaultConfig(BaseModel):
    """Faults injected into telemetry; all off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    malformed_rate: float = Field(0.0, ge=0, le=1)
    """Probability that one telemetry message is malformed instead of a reading."""
    malformed_kinds: tuple[MalformedKind, ...] = Field(tuple(MalformedKind), min_length=1)
    """The ways a malformed message is broken, picked uniformly."""
    offline_rate: float = Field(0.0, ge=0, le=1)
    """Probability that a device is silent for one ``offline_s`` slot of time."""
    offline_s: float = Field(30.0, gt=0)
    """Length of the time slots (aligned to the epoch) a device is offline or online for."""
    clock_skew_ms: int = Field(0, ge=0)
    """Each device's ts is off by a fixed amount drawn uniformly in ±clock_skew_ms."""
    command_drops: tuple[CommandDrop, ...] = ()
    """Devices that leave the first deliveries of each command unanswered."""


class FirmwareConfig(BaseModel):
    """The firmware of ``node`` devices and which of them fail to update."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    version: str = Field("1.0.0", min_length=1, max_length=64)
    """The version every node reports at start."""
    failure_rate: float = Field(0.0, ge=0, le=1)
    """Share of nodes (seeded draw per device) that fail every update to another version."""
    failing: tuple[str, ...] = ()
    """Device ids that fail every update to another version (an update to the version
    they run succeeds: nothing to do)."""


class CommandConfig(BaseModel):
    """How devices answer commands."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    ack_latency_ms: int = Field(20, ge=0)
    """Delay between receiving a command and executing and acking it."""
    ack_jitter_ms: int = Field(0, ge=0)
    """Extra delay drawn uniformly in 0..ack_jitter_ms per command."""
    ack_failure_rate: float = Field(0.0, ge=0, le=1)
    """Probability that a valid command fails (ack ``failed``, state unchanged)."""
    send_accepted: bool = False
    """Also ack ``accepted`` as soon as a command arrives, before the final ack."""
    remember_commands: int = Field(10_000, ge=1)
    """How many recent command ids per device are remembered to run each at most once."""


class FleetConfig(BaseModel):
    """A fleet of simulated devices.

    ``devices`` is a total split over the ``kinds`` weights (the five DEFAULT_KINDS
    equally by default) or a count per kind: ``{"hvac": 10, "lock": 5}``.
    ``patterns`` maps a metric (``"temperature"``) or a kind's metric
    (``"hvac.temperature"``, which wins) to the components that replace the
    kind's default pattern for it.

    Example::

        >>> cfg = FleetConfig.model_validate({
        ...     "devices": {"temp": 2, "lock": 1},
        ...     "patterns": {"temperature": [{"kind": "constant", "value": 20},
        ...                                  {"kind": "sine", "period_s": 60, "amplitude": 5}]},
        ... })
        >>> cfg.device_counts()
        {<DeviceKind.TEMP: 'temp'>: 2, <DeviceKind.LOCK: 'lock'>: 1}
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    devices: int | dict[DeviceKind, int] = 200
    kinds: dict[DeviceKind, float] | None = None
    rate_hz: float = Field(1.0, gt=0)
    """Telemetry messages per second per device."""
    seed: int = 0
    patterns: dict[str, list[Pattern]] = Field(default_factory=dict)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    commands: CommandConfig = Field(default_factory=CommandConfig)
    firmware: FirmwareConfig = Field(default_factory=FirmwareConfig)
    initial_state: dict[str, dict[str, int | float | str]] = Field(default_factory=dict)
    """Device id or glob -> reported properties to start with instead of the kind's
    defaults (``{"light-000[1-5]": {"on": 1, "brightness": 40}}``); the first glob
    that matches a device wins."""
    hubs: dict[str, HubConfig] = Field(default_factory=dict)
    """Named hubs and the devices behind them (``Fleet.set_hub_online``)."""
    base: str = "iotflow"
    qos: Literal[0, 1, 2] = 1

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, value: int | dict[DeviceKind, int]) -> int | dict[DeviceKind, int]:
        counts = value.values() if isinstance(value, dict) else [value]
        if any(count < 0 for count in counts) or sum(counts) < 1:
            msg = f"devices must be at least 1 in total and never negative, got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("kinds")
    @classmethod
    def _kind_weights(
        cls, value: dict[DeviceKind, float] | None, info: ValidationInfo
    ) -> dict[DeviceKind, float] | None:
        if value is None:
            return value
        if isinstance(info.data.get("devices"), dict):
            msg = (
                "kinds weights apply to a total number of devices; devices already counts per kind"
            )
            raise ValueError(msg)
        if any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            msg = f"kinds weights must be >= 0 with a positive sum, got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("base")
    @classmethod
    def _plain_base(cls, value: str) -> str:
        if not value or set(value) & set("+#/ \t\n\0"):
            msg = f"base {value!r} must be a non-empty name without '+', '#', '/' or spaces"
            raise ValueError(msg)
        return value

    @field_validator("patterns")
    @classmethod
    def _known_metrics(cls, value: dict[str, list[Pattern]]) -> dict[str, list[Pattern]]:
        metrics = pattern_metrics()
        for key, components in value.items():
            kind_name, _, metric = key.rpartition(".")
            kinds = metrics.get(metric, [])
            if kind_name and kind_name not in {kind.value for kind in kinds}:
                kinds = []
            stateful = [spec.kind.value for spec in KINDS.values() if metric in spec.state_metrics]
            if not kinds and stateful:
                msg = (
                    f"{key!r} is reported state of {'/'.join(stateful)} devices and changes "
                    f"only through commands; patterns apply to {', '.join(sorted(metrics))}"
                )
                raise ValueError(msg)
            if not kinds:
                choices = ", ".join(
                    f"{name} ({'/'.join(kind.value for kind in owners)})"
                    for name, owners in sorted(metrics.items())
                )
                msg = f"no device kind has a patterned metric {key!r}; choose from {choices}"
                raise ValueError(msg)
            if sum(isinstance(c, ConstantPattern) for c in components) > 1:
                msg = f"{key!r} has more than one constant component; keep one baseline"
                raise ValueError(msg)
        return value

    def device_counts(self) -> dict[DeviceKind, int]:
        """How many devices of each kind, in kind order (largest remainder for weights)."""
        if isinstance(self.devices, dict):
            return {kind: self.devices[kind] for kind in KINDS if self.devices.get(kind)}
        weights = self.kinds or dict.fromkeys(DEFAULT_KINDS, 1.0)
        total = sum(weights.values())
        shares = {kind: self.devices * weights.get(kind, 0.0) / total for kind in KINDS}
        counts = {kind: int(share) for kind, share in shares.items()}
        by_remainder = sorted(KINDS, key=lambda kind: counts[kind] - shares[kind])
        for kind in by_remainder[: self.devices - sum(counts.values())]:
            counts[kind] += 1
        return {kind: count for kind, count in counts.items() if count}

    def build(self) -> FleetModel:
        """The fleet's devices as pure logic (no MQTT); see ``FleetModel``."""
        return FleetModel(self)
