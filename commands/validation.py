"""What comes into the orchestrator, decoded and checked: command requests, acks, reported states.

``decode_request`` turns the bytes of one ``{prefix}.commands.requests``
record into a ``Command``, an ``Instruction``, a ``CoordinatorRequest``, or an
``InvalidRequest`` that says what was wrong; it never raises on bad input.
Three request shapes are understood:

- a ``Command`` as JSON (``command_id``, ``device_id``, ``name``, ``params``,
  ``issued_at``, ``expires_at``, optional ``priority`` and ``correlation_id``);
- a pattern action of the monitoring flow (``request_id``, ``device_id``,
  ``name``, ``params``, ``ts``, ``ttl_s``): the request id becomes the command id;
- a high-level instruction (``instruction_id``, ``target``, ``steps``; see
  ``commands.instructions``), or a coordinator declaration
  (``{"coordinator": {"type": "saga", ...}}``) for the plans, sagas and
  rollouts the orchestrator hosts.

``decode_device_message`` does the same for the device side (``.../ack`` and
``.../state`` topics). ``CommandValidator.check`` then decides whether a
decoded command may go to its device: the device is known, the command
exists in its twin model, the parameters are typed and in range (NaN and
infinities included), the ids are usable, the times make sense. A "no" is a
``TwinRejected`` whose ``reason`` names the value and the rule and whose
``kind`` is a short category; the orchestrator reports it as a REJECTED event
(audited) and never sends the command.

Example::

    >>> from datetime import UTC, datetime
    >>> from twins.registry import simulator_registry
    >>> now = datetime(2026, 1, 1, tzinfo=UTC)
    >>> req = decode_request(
    ...     b'{"command_id": "c1", "device_id": "hvac-0001", "name": "set_temperature",'
    ...     b' "params": {"setpoint": 40}, "issued_at": "2026-01-01T00:00:00Z",'
    ...     b' "expires_at": "2026-01-01T00:05:00Z"}'
    ... )
    >>> CommandValidator(simulator_registry()).check(req, now)
    Traceback (most recent call last):
    ...
    iotflow.errors.TwinRejected: device 'hvac-0001': set_temperature.params.setpoint: 40 is out of range 10..32 C
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec

from commands.instructions import Instruction
from iotflow.errors import ConfigError, TwinRejected
from iotflow.events import Ack, Command, DeviceMessage
from iotflow.topics import MqttTopics, check_device_id
from twins.registry import Registry

__all__ = [
    "MAX_ID_CHARS",
    "MAX_PRIORITY",
    "CancelRequest",
    "CommandValidator",
    "CoordinatorRequest",
    "DeviceAck",
    "DeviceState",
    "InvalidDeviceMessage",
    "InvalidRequest",
    "Request",
    "Validated",
    "check_command_id",
    "decode_device_message",
    "decode_request",
    "state_matches",
]

MAX_ID_CHARS = 200
"""The longest command id or correlation id accepted."""
MAX_PRIORITY = 1000
"""Priorities lie within ``-MAX_PRIORITY..MAX_PRIORITY``."""
MAX_REQUEST_BYTES = 64 * 1024


class InvalidRequest(msgspec.Struct, frozen=True):
    """A request that could not become a command, and why.

    With a usable ``command_id`` the orchestrator audits it as REJECTED;
    without one it can only become a dead letter (``payload`` keeps the bytes).
    """

    reason: str
    kind: str
    payload: bytes
    command_id: str | None = None
    device_id: str | None = None


class CoordinatorRequest(msgspec.Struct, frozen=True):
    """A declaration of a plan, saga or rollout for the orchestrator to build and host."""

    type: str
    spec: dict[str, Any]
    payload: bytes


class CancelRequest(msgspec.Struct, frozen=True):
    """Stop a running plan, saga or rollout by hand: ``{"cancel": "<coordinator id>",
    "reason": "..."}``. A plan starts no further step, a saga compensates what ran, a
    rollout rolls back what it updated."""

    coordinator_id: str
    reason: str
    payload: bytes


Request = Command | Instruction | CoordinatorRequest | CancelRequest | InvalidRequest
"""What ``decode_request`` returns."""


class DeviceAck(msgspec.Struct, frozen=True):
    """An ack as it arrived on ``{base}/devices/{device_id}/ack``."""

    device_id: str
    ack: Ack


class DeviceState(msgspec.Struct, frozen=True):
    """Reported properties as they arrived on ``{base}/devices/{device_id}/state``."""

    device_id: str
    reported: dict[str, Any]


class InvalidDeviceMessage(msgspec.Struct, frozen=True):
    """A device message that is neither a valid ack nor a valid state, and why."""

    reason: str
    message: DeviceMessage


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_command_id(value: object, what: str = "command_id") -> str | None:
    """Why ``value`` cannot be a command (or correlation) id, or None when it can.

    An id is a non-empty printable string of at most ``MAX_ID_CHARS`` characters.
    """
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not value:
        return f"{what} is empty"
    if len(value) > MAX_ID_CHARS:
        return f"{what} is {len(value)} characters; the limit is {MAX_ID_CHARS}"
    if not value.isprintable():
        return f"{what} {_shown(value)} contains control characters"
    return None


_any = msgspec.json.Decoder()


class _PatternRequest(msgspec.Struct, frozen=True):
    # the monitoring flow's pattern action (operators.cep.CommandRequest)
    request_id: str
    device_id: str
    name: str
    params: dict[str, Any]
    ts: datetime
    ttl_s: float
    pattern: str | None = None


def decode_request(payload: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Request | None:
    """One request record's value as a request, or an ``InvalidRequest``; never raises.

    Returns None for records on the requests topic that are not for the
    orchestrator (the monitoring flow's twin-update requests).
    """
    if len(payload) > max_bytes:
        return InvalidRequest(
            f"request is {len(payload)} bytes; the limit is {max_bytes}", "too_large", payload
        )
    try:
        doc = _any.decode(payload)
    except msgspec.DecodeError as exc:
        return InvalidRequest(f"request is not valid JSON: {exc}", "malformed", payload)
    if not isinstance(doc, dict):
        return InvalidRequest(
            f"request must be a JSON object, got {type(doc).__name__}", "malformed", payload
        )
    if "command_id" in doc:
        return _command(doc, payload)
    if "request_id" in doc and "properties" in doc and "name" not in doc:
        return None  # a twin update, for the twins flow
    if "request_id" in doc:
        return _pattern_command(doc, payload)
    if "instruction_id" in doc:
        try:
            return Instruction.from_data(doc)
        except ConfigError as exc:
            return InvalidRequest(str(exc), "invalid_instruction", payload)
    if "cancel" in doc:
        target, reason = doc["cancel"], doc.get("reason", "cancelled by request")
        if not isinstance(target, str) or not target or not isinstance(reason, str):
            return InvalidRequest(
                'a cancel request is {"cancel": "<coordinator id>", "reason": "..."} '
                f"with strings; got cancel={_shown([target])}",
                "invalid_cancel",
                payload,
            )
        return CancelRequest(target, reason[:500], payload)
    coordinator = doc.get("coordinator")
    if coordinator is not None:
        kind = coordinator.get("type") if isinstance(coordinator, dict) else None
        if not isinstance(kind, str):
            return InvalidRequest(
                "coordinator declaration must be an object with a string 'type' (plan, saga, rollout)",
                "invalid_coordinator",
                payload,
            )
        return CoordinatorRequest(kind, coordinator, payload)
    return InvalidRequest(
        "request is neither a command (command_id), a pattern action (request_id), an "
        f"instruction (instruction_id) nor a coordinator; fields: {_shown(sorted(doc)[:10])}",
        "unknown_request",
        payload,
    )


def _ids(doc: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    command_id = doc.get(key)
    device_id = doc.get("device_id")
    usable_id = command_id if check_command_id(command_id) is None else None
    usable_device = device_id if check_device_id(device_id) is None else None
    return usable_id, usable_device


def _command(doc: dict[str, Any], payload: bytes) -> Command | InvalidRequest:
    command_id, device_id = _ids(doc, "command_id")
    try:
        return msgspec.convert(doc, Command)
    except msgspec.ValidationError as exc:
        return InvalidRequest(
            f"invalid command: {exc}", "invalid_command", payload, command_id, device_id
        )


def _pattern_command(doc: dict[str, Any], payload: bytes) -> Command | InvalidRequest:
    command_id, device_id = _ids(doc, "request_id")
    try:
        req = msgspec.convert(doc, _PatternRequest)
        ttl = timedelta(seconds=req.ttl_s)
    except (msgspec.ValidationError, OverflowError, ValueError) as exc:
        return InvalidRequest(
            f"invalid pattern action: {exc}", "invalid_command", payload, command_id, device_id
        )
    if not math.isfinite(req.ttl_s) or req.ttl_s <= 0:
        return InvalidRequest(
            f"pattern action ttl_s {req.ttl_s!r} must be a positive number of seconds",
            "bad_expiry",
            payload,
            command_id,
            device_id,
        )
    try:
        expires = req.ts + ttl
    except OverflowError:
        return InvalidRequest(
            f"pattern action ts {req.ts} + ttl_s {req.ttl_s} is past the year 9999",
            "bad_expiry",
            payload,
            command_id,
            device_id,
        )
    return Command(
        command_id=req.request_id,
        device_id=req.device_id,
        name=req.name,
        params=req.params,
        issued_at=req.ts,
        expires_at=expires,
        correlation_id=None if req.pattern is None else f"pattern:{req.pattern}",
    )


def decode_device_message(
    message: DeviceMessage, topics: MqttTopics
) -> DeviceAck | DeviceState | InvalidDeviceMessage | None:
    """An ack or a state from a device topic; None for topics that are neither."""
    parts = message.topic.split("/")
    base = topics.base.split("/")
    if len(parts) != len(base) + 3 or parts[: len(base)] != base or parts[-3] != "devices":
        return None
    device_id, leaf = parts[-2], parts[-1]
    if leaf not in ("ack", "state"):
        return None
    problem = check_device_id(device_id)
    if problem is not None:
        return InvalidDeviceMessage(problem, message)
    if leaf == "ack":
        try:
            return DeviceAck(device_id, msgspec.json.decode(message.payload, type=Ack))
        except msgspec.DecodeError as exc:
            return InvalidDeviceMessage(f"invalid ack from {device_id!r}: {exc}", message)
    try:
        reported = _any.decode(message.payload)
    except msgspec.DecodeError as exc:
        return InvalidDeviceMessage(f"invalid state from {device_id!r}: {exc}", message)
    if not isinstance(reported, dict):
        return InvalidDeviceMessage(
            f"state from {device_id!r} must be a JSON object, got {type(reported).__name__}",
            message,
        )
    return DeviceState(device_id, reported)


@dataclass(frozen=True)
class Validated:
    """A command cleared for its device.

    ``command`` carries the normalized params; ``expected`` is the reported
    state that confirms it (the model's ``sets``); ``properties`` are the
    properties it writes; ``protocol`` picks the writer; ``metadata`` is the
    device's registry metadata (addresses for HTTP writers and the like).
    """

    command: Command
    protocol: str
    expected: dict[str, Any]
    properties: tuple[str, ...]
    metadata: dict[str, Any]


class CommandValidator:
    """Checks commands against the twins registry and the orchestrator's limits.

    ``protocols`` are the writers available (a device whose ``protocol``
    metadata names another one is rejected: nothing could deliver to it);
    ``max_ttl`` bounds how far in the future ``expires_at`` may be, and
    ``max_future_skew`` how far ``issued_at`` may be ahead of the clock.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        protocols: Collection[str] = ("mqtt", "kafka", "http"),
        default_protocol: str = "mqtt",
        max_ttl: timedelta = timedelta(days=1),
        max_future_skew: timedelta = timedelta(minutes=5),
    ) -> None:
        self.registry = registry
        self.protocols = frozenset(protocols)
        self.default_protocol = default_protocol
        self.max_ttl = max_ttl
        self.max_future_skew = max_future_skew

    def check(self, command: Command, now: datetime) -> Validated:
        """The validated command, or ``TwinRejected`` with the reason and a ``kind``."""
        device_id = command.device_id
        problem = check_command_id(command.command_id)
        if problem is not None:
            raise TwinRejected(problem, field="command_id", kind="bad_id")
        problem = check_device_id(device_id)
        if problem is not None:
            raise TwinRejected(problem, field="device_id", kind="bad_id")
        if command.correlation_id is not None:
            problem = check_command_id(command.correlation_id, "correlation_id")
            if problem is not None:
                raise TwinRejected(
                    problem, device_id=device_id, field="correlation_id", kind="bad_id"
                )
        if not -MAX_PRIORITY <= command.priority <= MAX_PRIORITY:
            raise TwinRejected(
                f"priority {command.priority} is outside -{MAX_PRIORITY}..{MAX_PRIORITY}",
                device_id=device_id,
                field="priority",
                kind="out_of_range",
            )
        self._check_times(command, now)
        device = self.registry.device(device_id)
        params = self.registry.check_command(device_id, command.name, command.params)
        protocol = device.metadata.get("protocol", self.default_protocol)
        if protocol not in self.protocols:
            raise TwinRejected(
                f"device {device_id!r} speaks {_shown(protocol)}, and no writer for it is "
                f"configured (writers: {', '.join(sorted(self.protocols))})",
                device_id=device_id,
                field="protocol",
                kind="no_writer",
            )
        spec = self.registry.model_of(device_id).commands[command.name]
        expected = spec.expected_state(params)
        normalized = msgspec.structs.replace(command, params=params)
        return Validated(normalized, protocol, expected, tuple(expected), dict(device.metadata))

    def _check_times(self, command: Command, now: datetime) -> None:
        device_id = command.device_id
        for name in ("issued_at", "expires_at"):
            value = getattr(command, name)
            if value.tzinfo is None or value.utcoffset() is None:
                raise TwinRejected(
                    f"{name} {value.isoformat()} has no time zone; send UTC, e.g. "
                    "2026-01-01T12:00:00Z",
                    device_id=device_id,
                    field=name,
                    kind="naive_timestamp",
                )
        if command.issued_at > now + self.max_future_skew:
            raise TwinRejected(
                f"issued_at {command.issued_at.isoformat()} is more than "
                f"{self.max_future_skew} ahead of the orchestrator's clock ({now.isoformat()})",
                device_id=device_id,
                field="issued_at",
                kind="future_timestamp",
            )
        if command.expires_at <= command.issued_at:
            raise TwinRejected(
                f"expires_at {command.expires_at.isoformat()} is not after issued_at "
                f"{command.issued_at.isoformat()}",
                device_id=device_id,
                field="expires_at",
                kind="bad_expiry",
            )
        if command.expires_at > now + self.max_ttl:
            raise TwinRejected(
                f"expires_at {command.expires_at.isoformat()} is more than {self.max_ttl} "
                "ahead; a command that may wait that long is stale when it runs "
                "(raise the orchestrator's max_ttl if you mean it)",
                device_id=device_id,
                field="expires_at",
                kind="far_future_expiry",
            )


def state_matches(expected: Mapping[str, Any], reported: Mapping[str, Any]) -> bool:
    """Whether ``reported`` shows every property of ``expected`` (numbers within 1e-9)."""
    for name, want in expected.items():
        if name not in reported:
            return False
        have = reported[name]
        if isinstance(want, int | float) and isinstance(have, int | float):
            if not math.isclose(want, have, rel_tol=1e-9, abs_tol=1e-9):
                return False
        elif have != want:
            return False
    return True
