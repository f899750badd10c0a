"""Device writers: how a ``Write`` becomes a message for a device's protocol (the orchestration sink).

A writer is pure: ``encode(write, now)`` returns the message to hand to its
transport (``MqttCommand``, ``KafkaCommand`` or ``HttpCall``), or a
``Dropped`` when the command expired between the orchestrator's decision and
the writer (``expires_at`` is checked again right before each send: a stale
command is never written). The orchestrator flow runs the writers as the
orchestrator's ``deliver`` hook, so such a command is reported EXPIRED
(``applied`` False, never sent) in the same step. The transports are the connectors' sinks:
``connectors.mqtt.MqttSink`` (QoS 1, never retained, MQTT 5 message expiry),
``connectors.kafka.KafkaOutput`` and ``connectors.command_writers.HttpSink``
(httpx, credentials from settings). A new protocol is a writer here plus a
sink there, named by the devices' ``protocol`` metadata.

The command payload is the same for every protocol but Home Assistant's:
``{"command_id", "name", "params", "issued_at", "expires_at"}`` (times ISO 8601 UTC).

Example::

    >>> from datetime import UTC, datetime, timedelta
    >>> from commands.orchestrator import Write
    >>> from iotflow.events import Command
    >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
    >>> cmd = Command("c1", "lock-0001", "unlock", {}, t0, t0 + timedelta(seconds=30))
    >>> msg = MqttWriter("home").encode(Write(cmd, "mqtt", 1, {}), t0 + timedelta(seconds=0.5))
    >>> msg.topic, msg.expiry_s, msg.retain
    ('home/devices/lock-0001/cmd', 30, False)
    >>> MqttWriter("home").encode(Write(cmd, "mqtt", 1, {}), t0 + timedelta(seconds=30)).reason
    'command c1 expired at 2026-01-01T00:00:30+00:00, before the mqtt writer could send it; not sent'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote

import msgspec

from commands.orchestrator import Dropped, Write
from iotflow.events import Command
from iotflow.topics import MqttTopics

__all__ = [
    "HttpCall",
    "HttpWriter",
    "KafkaCommand",
    "KafkaWriter",
    "MqttCommand",
    "MqttWriter",
    "Writer",
    "command_payload",
]


class _Payload(msgspec.Struct, frozen=True):
    command_id: str
    name: str
    params: dict[str, Any]
    issued_at: datetime
    expires_at: datetime


_encode = msgspec.json.encode


def command_payload(command: Command) -> bytes:
    """What a device receives: command_id, name, params, issued_at, expires_at (JSON)."""
    return _encode(
        _Payload(
            command.command_id, command.name, command.params, command.issued_at, command.expires_at
        )
    )


class Writer(Protocol):
    """Turns a ``Write`` into its transport's message, or a ``Dropped`` once expired."""

    protocol: str

    def encode(self, write: Write, now: datetime) -> Any: ...


def _expired(write: Write, now: datetime, protocol: str) -> Dropped | None:
    command = write.command
    if now < command.expires_at:
        return None
    reason = (
        f"command {command.command_id} expired at {command.expires_at.isoformat()}, "
        f"before the {protocol} writer could send it; not sent"
    )
    return Dropped("writer", reason, command_payload(command), now)


@dataclass(frozen=True)
class MqttCommand:
    """A command for ``{base}/devices/{id}/cmd``: QoS 1, never retained, MQTT 5 expiry in seconds."""

    topic: str
    payload: bytes
    expiry_s: int
    qos: int = 1
    retain: Literal[False] = False


@dataclass(frozen=True)
class MqttWriter:
    """Writes to ``{base}/devices/{device_id}/cmd``.

    ``expiry_s`` is the whole seconds left until ``expires_at``, rounded up
    (MQTT 5 counts whole seconds; rounding down would expire a command with
    0.5 s left at once). A broker may so hold a command up to a second past
    ``expires_at``; devices check ``expires_at`` themselves.
    """

    base: str = "iotflow"
    protocol: str = "mqtt"

    def encode(self, write: Write, now: datetime) -> MqttCommand | Dropped:
        dropped = _expired(write, now, self.protocol)
        if dropped is not None:
            return dropped
        command = write.command
        left_s = (command.expires_at - now).total_seconds()
        return MqttCommand(
            MqttTopics(self.base).cmd(command.device_id),
            command_payload(command),
            max(1, math.ceil(left_s)),
        )


@dataclass(frozen=True)
class KafkaCommand:
    """A command record for a Kafka topic, keyed by device id (one partition keeps a device's order)."""

    topic: str
    key: str
    value: bytes


@dataclass(frozen=True)
class KafkaWriter:
    """Writes to a Kafka topic that a gateway or device backend consumes.

    The topic is the device's ``topic`` metadata, else ``topic``.
    """

    topic: str
    protocol: str = "kafka"

    def encode(self, write: Write, now: datetime) -> KafkaCommand | Dropped:
        dropped = _expired(write, now, self.protocol)
        if dropped is not None:
            return dropped
        command = write.command
        topic = str(write.metadata.get("topic", self.topic))
        return KafkaCommand(topic, command.device_id, command_payload(command))


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request to a device API, relative to the writer's base URL."""

    method: str
    path: str
    json: dict[str, Any]
    command_id: str
    device_id: str
    expires_at: datetime


@dataclass(frozen=True)
class HttpWriter:
    """Writes through an HTTP API: a REST device API or a Home Assistant-style service call.

    - ``rest``: ``POST /devices/{device_id}/commands`` with the command payload.
    - ``home_assistant``: ``POST /api/services/{domain}/{service}`` with
      ``{"entity_id": ..., **params}``. The device's metadata gives
      ``entity_id`` (default ``{domain}.{device_id}``), ``domain`` (default:
      the entity id's prefix, else the model name) and ``services``, a map
      from command name to service (default: the command name).

    Confirmation comes as for any device, by its ack or its reported state
    (Home Assistant's state changes): a 2xx response only says the API took
    the call.
    """

    style: Literal["rest", "home_assistant"] = "rest"
    protocol: str = "http"

    def encode(self, write: Write, now: datetime) -> HttpCall | Dropped:
        dropped = _expired(write, now, self.protocol)
        if dropped is not None:
            return dropped
        command = write.command
        if self.style == "rest":
            body = msgspec.json.decode(command_payload(command))
            path = f"/devices/{quote(command.device_id, safe='')}/commands"
            return HttpCall(
                "POST", path, body, command.command_id, command.device_id, command.expires_at
            )
        meta = write.metadata
        entity = meta.get("entity_id")
        domain = meta.get("domain") or (str(entity).split(".", 1)[0] if entity else None)
        domain = str(domain or meta.get("model") or "homeassistant")
        entity = str(entity or f"{domain}.{command.device_id}")
        services = meta.get("services") or {}
        service = str(services.get(command.name, command.name))
        path = f"/api/services/{quote(domain, safe='')}/{quote(service, safe='')}"
        return HttpCall(
            "POST",
            path,
            {"entity_id": entity, **command.params},
            command.command_id,
            command.device_id,
            command.expires_at,
        )
