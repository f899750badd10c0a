"""Device simulator: a seeded fleet of virtual devices talking real MQTT.

Devices of five kinds (``temp``, ``power``, ``hvac``, ``lock``, ``light``)
publish flat JSON telemetry on ``{base}/devices/{id}/telemetry``, report
their state retained on ``{base}/devices/{id}/state``, and answer commands
from ``{base}/devices/{id}/cmd`` with acks on ``{base}/devices/{id}/ack``.
Values follow declared patterns (constant, noise, sine, spikes, drift) and
faults (malformed messages, offline slots, clock skew) are injected at
declared rates, all reproducible from the seed.

- ``FleetConfig`` declares the fleet (a pydantic model, loads from a dict);
- ``FleetModel`` (``config.build()``) is the pure logic, with no network;
- ``Fleet`` runs it on a broker: ``with Fleet(config, "mqtt://host:1883") as fleet: ...``.
"""

from infra.simulator.config import CommandConfig, FaultConfig, FleetConfig
from infra.simulator.fleet import Fleet
from infra.simulator.kinds import HVAC_MODES, KINDS, DeviceKind
from infra.simulator.model import (
    DeviceSnapshot,
    FleetModel,
    FleetStats,
    MalformedKind,
    Outgoing,
)
from infra.simulator.patterns import (
    ConstantPattern,
    DriftPattern,
    NoisePattern,
    SinePattern,
    SpikePattern,
)

__all__ = [
    "HVAC_MODES",
    "KINDS",
    "CommandConfig",
    "ConstantPattern",
    "DeviceKind",
    "DeviceSnapshot",
    "DriftPattern",
    "FaultConfig",
    "Fleet",
    "FleetConfig",
    "FleetModel",
    "FleetStats",
    "MalformedKind",
    "NoisePattern",
    "Outgoing",
    "SinePattern",
    "SpikePattern",
]
