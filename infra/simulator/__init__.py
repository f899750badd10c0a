"""Device simulator: a seeded fleet of virtual devices talking real MQTT.

Devices of five kinds (``temp``, ``power``, ``hvac``, ``lock``, ``light``;
``security``, ``notifier`` and ``node`` join for orchestration) publish flat
JSON telemetry on ``{base}/devices/{id}/telemetry``, report their state
retained on ``{base}/devices/{id}/state``, and answer commands from
``{base}/devices/{id}/cmd`` with acks on ``{base}/devices/{id}/ack``.
Values follow declared patterns (constant, noise, sine, spikes, drift) and
faults (malformed messages, offline slots, clock skew, command deliveries
left unanswered, hubs going offline, firmware updates that fail) are
injected as declared, all reproducible from the seed.

- ``FleetConfig`` declares the fleet (a pydantic model, loads from a dict);
- ``FleetModel`` (``config.build()``) is the pure logic, with no network;
- ``Fleet`` runs it on a broker: ``with Fleet(config, "mqtt://host:1883") as fleet: ...``.
"""

from infra.simulator.config import (
    CommandConfig,
    CommandDrop,
    FaultConfig,
    FirmwareConfig,
    FleetConfig,
    HubConfig,
)
from infra.simulator.fleet import Fleet
from infra.simulator.kinds import DEFAULT_KINDS, HVAC_MODES, KINDS, DeviceKind
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
    "DEFAULT_KINDS",
    "HVAC_MODES",
    "KINDS",
    "CommandConfig",
    "CommandDrop",
    "ConstantPattern",
    "DeviceKind",
    "DeviceSnapshot",
    "DriftPattern",
    "FaultConfig",
    "FirmwareConfig",
    "Fleet",
    "FleetConfig",
    "FleetModel",
    "FleetStats",
    "HubConfig",
    "MalformedKind",
    "NoisePattern",
    "Outgoing",
    "SinePattern",
    "SpikePattern",
]
