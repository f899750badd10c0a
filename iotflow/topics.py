"""Topic names of the integration surface (DESIGN.md), in one place.

MQTT topics live under ``{base}`` (default ``iotflow``), Kafka topics under
``{prefix}`` (default ``iot``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KafkaTopics", "MqttTopics", "check_device_id"]

_FORBIDDEN_ID_CHARS = frozenset("+#/\0")
MAX_DEVICE_ID_LEN = 128


def check_device_id(device_id: object) -> str | None:
    """Return why ``device_id`` cannot name a device, or None when it can.

    A device id is a non-empty string of at most 128 printable characters
    without MQTT's ``+``, ``#`` or the level separator ``/``.
    """
    if not isinstance(device_id, str):
        return f"device id must be a string, got {type(device_id).__name__}"
    if not device_id:
        return "device id is empty"
    if len(device_id) > MAX_DEVICE_ID_LEN:
        return f"device id is {len(device_id)} characters; the limit is {MAX_DEVICE_ID_LEN}"
    bad = _FORBIDDEN_ID_CHARS.intersection(device_id)
    if bad:
        return f"device id {device_id[:40]!r} contains {''.join(sorted(bad))!r}"
    if not device_id.isprintable():
        return f"device id {device_id[:40]!r} contains control characters"
    return None


@dataclass(frozen=True)
class MqttTopics:
    """Device-side MQTT topics."""

    base: str = "iotflow"

    def telemetry(self, device_id: str = "+") -> str:
        return f"{self.base}/devices/{device_id}/telemetry"

    def state(self, device_id: str = "+") -> str:
        return f"{self.base}/devices/{device_id}/state"

    def cmd(self, device_id: str = "+") -> str:
        return f"{self.base}/devices/{device_id}/cmd"

    def ack(self, device_id: str = "+") -> str:
        return f"{self.base}/devices/{device_id}/ack"

    def gateway_status(self, gateway_id: str = "+") -> str:
        return f"{self.base}/gateways/{gateway_id}/status"


@dataclass(frozen=True)
class KafkaTopics:
    """Kafka topics, the integration surface between flows and the outside."""

    prefix: str = "iot"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}.telemetry"

    @property
    def aggregates(self) -> str:
        return f"{self.prefix}.aggregates"

    @property
    def detections(self) -> str:
        return f"{self.prefix}.detections"

    @property
    def twins(self) -> str:
        return f"{self.prefix}.twins"

    @property
    def twins_desired(self) -> str:
        """Desired-state changes for twins (key: device_id), read by the twins flow."""
        return f"{self.prefix}.twins.desired"

    @property
    def command_requests(self) -> str:
        return f"{self.prefix}.commands.requests"

    @property
    def command_events(self) -> str:
        return f"{self.prefix}.commands.events"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def edge_uplink(self) -> str:
        return f"{self.prefix}.edge.uplink"

    @property
    def edge_definitions(self) -> str:
        """Versioned workflow definitions the cloud publishes for edge gateways."""
        return f"{self.prefix}.edge.definitions"
