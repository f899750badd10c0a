"""The simulated fleet as pure logic: devices, their telemetry, commands and counters.

``FleetModel`` never touches the network and never reads a clock: every call
takes ``now_ms`` and returns the MQTT messages to publish. ``Fleet`` wraps it
with a broker connection and a scheduler. It is not thread-safe; its caller
serializes calls.

Determinism: a reading's values, its fault draws and a command's latency and
failure draw come from generators seeded with the fleet seed, the device id
and the reading's timestamp (or the command id), so the same seed and the same
calls give byte-identical payloads, whatever ran in between.
"""

from __future__ import annotations

import fnmatch
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgspec

from infra.simulator.kinds import KINDS, CommandRejected, DeviceKind, KindSpec
from infra.simulator.patterns import ConstantPattern, Pattern
from iotflow.events import Ack, AckStatus, to_ms
from iotflow.topics import MqttTopics

if TYPE_CHECKING:
    from infra.simulator.config import FleetConfig

__all__ = [
    "CommandIntake",
    "DeviceSnapshot",
    "FleetModel",
    "FleetStats",
    "FollowUp",
    "MalformedKind",
    "Outgoing",
]


class MalformedKind(StrEnum):
    """How a malformed telemetry message is broken; a decoder rejects each as a whole."""

    TRUNCATED = "truncated"
    """A valid reading cut in half: invalid JSON."""
    NOT_OBJECT = "not_object"
    """The JSON string ``"oops"``: not a reading."""
    BAD_TS = "bad_ts"
    """A reading whose ts is ``"yesterday"``: neither epoch ms nor ISO 8601."""


@dataclass(frozen=True)
class Outgoing:
    """One MQTT message to publish."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class FollowUp:
    """Call ``FleetModel.follow_up(device_id, command_id, ...)`` after ``delay_ms``."""

    device_id: str
    command_id: str
    delay_ms: float


@dataclass(frozen=True)
class CommandIntake:
    """What receiving a command led to: messages to publish now, and maybe a follow-up."""

    outgoing: list[Outgoing]
    follow_up: FollowUp | None = None


@dataclass(frozen=True)
class DeviceSnapshot:
    """Ground truth of one device: its reported state and the last valid reading it sent."""

    device_id: str
    kind: DeviceKind
    reported: dict[str, Any]
    last_telemetry: dict[str, Any] | None
    seq: int
    """Telemetry messages sent so far, valid or malformed; the next one carries this seq."""
    clock_skew_ms: int
    executed: tuple[str, ...] = ()
    """Ids of the commands it ran (acked done), oldest first, of the last
    ``commands.remember_commands``."""
    deliveries: dict[str, int] = field(default_factory=dict)
    """Command id -> how many times a message of it reached the device (duplicates and
    redeliveries included), for the last ``commands.remember_commands`` ids."""
    runs: dict[str, int] = field(default_factory=dict)
    """Command id -> how many times it changed the device's state, for every id it ever
    ran: 1, unless the device forgot the id (past ``commands.remember_commands``) and
    ran a late copy again."""


@dataclass(frozen=True)
class FleetStats:
    """Exact counters of everything the fleet sent and received, and each device's truth."""

    readings_sent: int
    """Valid telemetry messages."""
    malformed_sent: int
    malformed_by_kind: dict[str, int]
    offline_skips: int
    """Telemetry messages not sent because their device was offline."""
    commands_received: int
    """Command messages for fleet devices while online (duplicates and invalid ones included)."""
    commands_executed: int
    """Commands that changed a device's state (ack ``done``)."""
    commands_failed: int
    """Commands answered ``failed``, re-acks of duplicates not included."""
    duplicate_commands: int
    invalid_commands: int
    """Command messages that could not be parsed; answered ``failed`` when they had a command_id."""
    ignored_commands: dict[str, int]
    """Command messages not handled, by reason: ``offline``, ``unknown device``, ``stopped``..."""
    acks_sent: int
    states_published: int
    schedule_overruns: int
    """Telemetry slots dropped because the publisher fell more than a period behind."""
    publishes_failed: int
    """Messages the broker refused (error reason code), QoS 0 ones sent without a
    connection, or ones still queued when a fleet offline by hand was stopped."""
    redeliveries: int
    """Command messages the broker delivered again (MQTT DUP flag), after a connection
    was lost before the device acknowledged them (PUBACK)."""
    devices: dict[str, DeviceSnapshot]


@dataclass
class _Counters:
    readings_sent: int = 0
    malformed_sent: int = 0
    malformed_by_kind: dict[str, int] = field(default_factory=dict)
    offline_skips: int = 0
    commands_received: int = 0
    commands_executed: int = 0
    commands_failed: int = 0
    duplicate_commands: int = 0
    invalid_commands: int = 0
    ignored_commands: dict[str, int] = field(default_factory=dict)
    acks_sent: int = 0
    states_published: int = 0
    schedule_overruns: int = 0
    publishes_failed: int = 0
    redeliveries: int = 0


@dataclass(frozen=True)
class _Metric:
    name: str
    baseline: float | Callable[[Mapping[str, Any]], float]
    patterns: tuple[Pattern, ...]
    low: float | None
    high: float | None


class _CommandIn(msgspec.Struct):
    command_id: str
    name: str
    params: dict[str, Any] = {}
    issued_at: datetime | int | None = None
    expires_at: datetime | int | None = None


class _BadCommand(Exception):
    def __init__(self, reason: str, command_id: str | None) -> None:
        super().__init__(reason)
        self.command_id = command_id


@dataclass
class _Pending:
    command: _CommandIn
    received_ms: int
    expires_ms: int | None
    fails: bool
    duplicates: int = 0


@dataclass
class _Hub:
    name: str
    after_commands: int | None
    offline_for_ms: int | None
    commands: int = 0
    offline: bool = False
    until_ms: int | None = None
    tripped: bool = False

    def down(self, now_ms: int) -> bool:
        if self.offline and self.until_ms is not None and now_ms >= self.until_ms:
            self.offline, self.until_ms = False, None
        return self.offline


@dataclass
class _Device:
    device_id: str
    spec: KindSpec
    metrics: tuple[_Metric, ...]
    clock_skew_ms: int
    state: dict[str, Any]
    seq: int = 0
    last_telemetry: dict[str, Any] | None = None
    offline_slot: int | None = None
    offline: bool = False
    pending: dict[str, _Pending] = field(default_factory=dict)
    results: OrderedDict[str, Ack] = field(default_factory=OrderedDict)
    hub: _Hub | None = None
    drop_first: int = 0  # deliveries of each command id left unanswered (faults.command_drops)
    deliveries: OrderedDict[str, int] = field(default_factory=OrderedDict)
    runs: dict[str, int] = field(default_factory=dict)  # not bounded: the ground truth of tests
    firmware_fails: bool = False

    def reported(self) -> dict[str, Any]:
        return {"kind": self.spec.kind.value, **self.state}


_command_decoder = msgspec.json.Decoder(_CommandIn)
_any_decoder = msgspec.json.Decoder()
_encode = msgspec.json.encode


def _decode_command(payload: bytes) -> tuple[_CommandIn, int | None]:
    """The command and its expiry in epoch ms; raises _BadCommand with the reason."""
    try:
        command = _command_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise _BadCommand(f"invalid command: {exc}", _command_id_of(payload)) from None
    if not command.command_id:
        raise _BadCommand("invalid command: command_id is empty", None)
    expires = command.expires_at
    if isinstance(expires, datetime):
        try:
            return command, to_ms(expires)
        except ValueError as exc:
            raise _BadCommand(f"invalid command: expires_at: {exc}", command.command_id) from None
    return command, expires


def _command_id_of(payload: bytes) -> str | None:
    try:
        doc = _any_decoder.decode(payload)
    except msgspec.DecodeError:
        return None
    command_id = doc.get("command_id") if isinstance(doc, dict) else None
    return command_id if isinstance(command_id, str) and command_id else None


def _value(
    metric: _Metric, state: Mapping[str, Any], rng: random.Random, now_ms: int, origin_ms: int
) -> float:
    baseline = metric.baseline
    value = baseline(state) if callable(baseline) else baseline
    for component in metric.patterns:
        value += component.offset(rng, now_ms, origin_ms)
    if metric.low is not None:
        value = max(metric.low, value)
    if metric.high is not None:
        value = min(metric.high, value)
    return round(float(value), 3)


def _resolve_metrics(config: FleetConfig, spec: KindSpec) -> tuple[_Metric, ...]:
    metrics = []
    for metric in spec.metrics:
        override = config.patterns.get(f"{spec.kind.value}.{metric.name}")
        if override is None:
            override = config.patterns.get(metric.name)
        baseline, patterns = metric.baseline, metric.patterns
        if override is not None:
            patterns = tuple(c for c in override if not isinstance(c, ConstantPattern))
            constants = [c.value for c in override if isinstance(c, ConstantPattern)]
            baseline = constants[0] if constants else baseline
        metrics.append(_Metric(metric.name, baseline, patterns, metric.low, metric.high))
    return tuple(metrics)


class FleetModel:
    """The devices of a ``FleetConfig``, answering "what to publish now?".

    Device ids are ``{kind}-{n:04d}`` numbered from 1 per kind, in kind order
    (temp, power, hvac, lock, light). Telemetry is one flat JSON object per
    message: ``{"ts": epoch ms (+ the device's skew), "seq": n, metric: value...}``;
    a device's seq counts every telemetry message it sent, malformed ones
    included. Commands run after their latency, each command_id at most once
    per device; a repeated id is answered with the first answer again.

    Example::

        >>> from infra.simulator import FleetConfig
        >>> model = FleetConfig(devices={"lock": 1}).build()
        >>> model.telemetry("lock-0001", 1767268800000).payload
        b'{"ts":1767268800000,"seq":0,"battery":100.0,"locked":1}'
    """

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.topics = MqttTopics(config.base)
        self.origin_ms: int | None = None
        """Timestamp of the fleet's first telemetry: where drift patterns start."""
        self.counters = _Counters()
        self.devices: dict[str, _Device] = {}
        counts = config.device_counts()
        width = max(4, len(str(max(counts.values()))))
        for kind, count in counts.items():
            spec = KINDS[kind]
            metrics = _resolve_metrics(config, spec)
            for number in range(1, count + 1):
                device_id = f"{kind.value}-{number:0{width}d}"
                skew = config.faults.clock_skew_ms
                skew_ms = self._rng(device_id, "skew").randint(-skew, skew)
                self.devices[device_id] = _Device(
                    device_id, spec, metrics, skew_ms, dict(spec.initial_state)
                )
        self.hubs = {
            name: _Hub(
                name,
                hub.offline_after_commands,
                None if hub.offline_for_s is None else round(hub.offline_for_s * 1000),
            )
            for name, hub in config.hubs.items()
        }
        self._assign_faults(config)

    def _assign_faults(self, config: FleetConfig) -> None:
        """Hubs, command drops and firmware failures per device; unknown ids are refused."""
        firmware = config.firmware
        unknown = [d for d in firmware.failing if d not in self.devices]
        if unknown:
            msg = f"firmware.failing names devices the fleet does not have: {unknown[:5]}"
            raise ValueError(msg)
        failing = set(firmware.failing)
        for glob in config.initial_state:
            if not any(fnmatch.fnmatchcase(d, glob) for d in self.devices):
                msg = f"initial_state {glob!r} matches no device of the fleet"
                raise ValueError(msg)
        for device_id, device in self.devices.items():
            self._initial_state(config, device)
            if device.spec.kind is DeviceKind.NODE:
                device.state["firmware"] = firmware.version
                draw = self._rng(device_id, "firmware").random()
                device.firmware_fails = device_id in failing or draw < firmware.failure_rate
            for name, hub in config.hubs.items():
                if any(fnmatch.fnmatchcase(device_id, g) for g in hub.devices):
                    device.hub = self.hubs[name]
                    break
            for drop in config.faults.command_drops:
                if any(fnmatch.fnmatchcase(device_id, g) for g in drop.devices):
                    device.drop_first = drop.first_attempts
                    break

    @staticmethod
    def _initial_state(config: FleetConfig, device: _Device) -> None:
        for glob, changes in config.initial_state.items():
            if not fnmatch.fnmatchcase(device.device_id, glob):
                continue
            for prop, given in changes.items():
                have = device.state.get(prop)
                value = float(given) if isinstance(have, float) and type(given) is int else given
                if have is None or type(have) is not type(value):
                    kind = device.spec.kind.value
                    known = ", ".join(f"{k} ({type(v).__name__})" for k, v in device.state.items())
                    msg = (
                        f"initial_state {glob!r}: {kind} device {device.device_id} has no "
                        f"{prop} of type {type(value).__name__}; its state: {known or 'none'}"
                    )
                    raise ValueError(msg)
                device.state[prop] = value
            return

    def set_hub_online(self, name: str, online: bool, now_ms: int) -> None:
        """Take a hub offline (until set online again) or bring it back now."""
        hub = self.hubs.get(name)
        if hub is None:
            known = ", ".join(sorted(self.hubs)) or "none"
            msg = f"unknown hub {name!r}; hubs: {known}"
            raise KeyError(msg)
        hub.offline, hub.until_ms = not online, None
        if not online:
            hub.tripped = True  # a hub taken down by hand never trips on its own afterwards

    def _rng(self, device_id: str, purpose: object) -> random.Random:
        return random.Random(f"{self.config.seed}/{device_id}/{purpose}")

    def _is_offline(self, device: _Device, now_ms: int) -> bool:
        faults = self.config.faults
        if faults.offline_rate == 0:
            return False
        slot = int(now_ms // (faults.offline_s * 1000))
        if slot != device.offline_slot:
            device.offline_slot = slot
            draw = self._rng(device.device_id, f"offline/{slot}").random()
            device.offline = draw < faults.offline_rate
        return device.offline

    def is_offline(self, device_id: str, now_ms: int) -> bool:
        """Whether the device is in an offline slot at ``now_ms`` (then it sends and hears nothing)."""
        return self._is_offline(self.devices[device_id], now_ms)

    def initial_state(self) -> list[Outgoing]:
        """Every device's reported state, retained: publish once when the fleet connects."""
        return [self._state_out(device) for device in self.devices.values()]

    def round(self, now_ms: int) -> list[Outgoing]:
        """One telemetry message from every online device, all stamped ``now_ms``."""
        return [
            out
            for device_id in self.devices
            if (out := self.telemetry(device_id, now_ms)) is not None
        ]

    def telemetry(self, device_id: str, now_ms: int) -> Outgoing | None:
        """The device's telemetry message at ``now_ms``, or None while it is offline.

        With probability ``faults.malformed_rate`` the message is malformed
        (see ``MalformedKind``) instead of a reading; it is counted apart and
        never becomes the device's ``last_telemetry``.
        """
        device = self.devices[device_id]
        if self.origin_ms is None:
            self.origin_ms = now_ms
        origin_ms = self.origin_ms
        if self._is_offline(device, now_ms) or (device.hub is not None and device.hub.down(now_ms)):
            self.counters.offline_skips += 1
            return None
        faults = self.config.faults
        rng = self._rng(device_id, now_ms)
        # Both fault draws happen for every reading, so fault settings never shift the values.
        broken = rng.random() < faults.malformed_rate
        how = faults.malformed_kinds[int(rng.random() * len(faults.malformed_kinds))]
        reading: dict[str, Any] = {"ts": now_ms + device.clock_skew_ms, "seq": device.seq}
        for metric in device.metrics:
            reading[metric.name] = _value(metric, device.state, rng, now_ms, origin_ms)
        for name in device.spec.state_metrics:
            reading[name] = device.state[name]
        device.seq += 1
        topic = self.topics.telemetry(device_id)
        if not broken:
            self.counters.readings_sent += 1
            device.last_telemetry = reading
            return Outgoing(topic, _encode(reading))
        self.counters.malformed_sent += 1
        by_kind = self.counters.malformed_by_kind
        by_kind[how.value] = by_kind.get(how.value, 0) + 1
        if how == MalformedKind.TRUNCATED:
            encoded = _encode(reading)
            return Outgoing(topic, encoded[: len(encoded) // 2])
        if how == MalformedKind.NOT_OBJECT:
            return Outgoing(topic, b'"oops"')
        return Outgoing(topic, _encode({**reading, "ts": "yesterday"}))

    def receive_command(self, device_id: str, payload: bytes, now_ms: int) -> CommandIntake:
        """Take one message from the device's cmd topic; never raises on bad input.

        A command that cannot be parsed is answered ``failed`` at once when it
        has a command_id, else only counted. A new command is acked
        ``accepted`` at once when ``commands.send_accepted`` is set, and runs
        at the follow-up. A repeated command_id runs nothing: it is re-acked
        at its follow-up, or together with the first answer while that is
        still pending. Commands for unknown or offline devices, for devices
        behind a hub that is (or with this message goes) offline, and the
        deliveries a ``faults.command_drops`` device leaves unanswered are
        counted in ``ignored_commands`` (``unknown device``, ``offline``,
        ``hub offline``, ``dropped``) and get no answer.
        """
        device = self.devices.get(device_id)
        if device is None:
            self.ignore("unknown device")
            return CommandIntake([])
        if self._is_offline(device, now_ms):
            self.ignore("offline")
            return CommandIntake([])
        if device.hub is not None and self._hub_drops(device.hub, now_ms):
            self.ignore("hub offline")
            return CommandIntake([])
        self.counters.commands_received += 1
        behaviour = self.config.commands
        try:
            command, expires_ms = _decode_command(payload)
        except _BadCommand as exc:
            self.counters.invalid_commands += 1
            if exc.command_id is None:
                return CommandIntake([])
            self.counters.commands_failed += 1
            ack = Ack(exc.command_id, AckStatus.FAILED, device.reported(), str(exc))
            return CommandIntake([self._ack_out(device, ack)])
        command_id = command.command_id
        seen = device.deliveries[command_id] = device.deliveries.get(command_id, 0) + 1
        device.deliveries.move_to_end(command_id)
        if len(device.deliveries) > behaviour.remember_commands:
            device.deliveries.popitem(last=False)
        if seen <= device.drop_first:
            self.ignore("dropped")
            return CommandIntake([])
        pending = device.pending.get(command_id)
        if pending is not None or command_id in device.results:
            self.counters.duplicate_commands += 1
            if pending is not None:
                pending.duplicates += 1
                return CommandIntake([])
            return CommandIntake([], FollowUp(device_id, command_id, behaviour.ack_latency_ms))
        rng = self._rng(device_id, f"cmd/{command_id}")
        delay_ms = behaviour.ack_latency_ms + rng.uniform(0, behaviour.ack_jitter_ms)
        fails = rng.random() < behaviour.ack_failure_rate
        device.pending[command_id] = _Pending(command, now_ms, expires_ms, fails)
        outgoing = []
        if behaviour.send_accepted:
            accepted = Ack(command_id, AckStatus.ACCEPTED, device.reported())
            outgoing.append(self._ack_out(device, accepted))
        return CommandIntake(outgoing, FollowUp(device_id, command_id, delay_ms))

    def _hub_drops(self, hub: _Hub, now_ms: int) -> bool:
        """Whether a command message for a device behind ``hub`` is lost (it is, or goes, offline)."""
        if hub.down(now_ms):
            return True
        hub.commands += 1
        if hub.after_commands is not None and not hub.tripped and hub.commands > hub.after_commands:
            hub.tripped = hub.offline = True
            if hub.offline_for_ms is not None:
                hub.until_ms = now_ms + hub.offline_for_ms
            return True
        return False

    def follow_up(self, device_id: str, command_id: str, now_ms: int) -> list[Outgoing]:
        """Run a pending command (ack, and its new state retained) or re-ack a finished one.

        A command expired when it arrived, an unknown command name, invalid
        params or a simulated failure (``commands.ack_failure_rate``) are
        acked ``failed`` with the reason and leave the state unchanged.
        """
        device = self.devices[device_id]
        if device.hub is not None and device.hub.down(now_ms):
            # the hub went down between receipt and execution: the command is lost with it
            if device.pending.pop(command_id, None) is not None:
                self.ignore("hub offline")
            return []
        pending = device.pending.pop(command_id, None)
        if pending is None:
            earlier = device.results.get(command_id)
            if earlier is None:
                self.ignore("forgotten before re-ack")
                return []
            return [self._ack_out(device, earlier)]
        ack = self._execute(device, pending)
        device.results[command_id] = ack
        while len(device.results) > self.config.commands.remember_commands:
            device.results.popitem(last=False)
        outgoing = [self._ack_out(device, ack) for _ in range(1 + pending.duplicates)]
        if ack.status == AckStatus.DONE:
            outgoing.append(self._state_out(device))
        return outgoing

    def _execute(self, device: _Device, pending: _Pending) -> Ack:
        command = pending.command

        def failed(reason: str) -> Ack:
            self.counters.commands_failed += 1
            return Ack(command.command_id, AckStatus.FAILED, device.reported(), reason)

        if pending.expires_ms is not None and pending.expires_ms <= pending.received_ms:
            return failed(
                f"expired at {pending.expires_ms} ms, before it arrived at {pending.received_ms} ms"
            )
        handler = device.spec.commands.get(command.name)
        if handler is None:
            accepted = ", ".join(device.spec.commands) or "none"
            return failed(
                f"unknown command {command.name!r} for {device.spec.kind.value} "
                f"devices; they accept: {accepted}"
            )
        try:
            changes = handler(command.params, device.state)
        except CommandRejected as exc:
            return failed(str(exc))
        if pending.fails:
            return failed("simulated failure (commands.ack_failure_rate)")
        if device.firmware_fails and changes.get("firmware", device.state.get("firmware")) != (
            device.state.get("firmware")
        ):
            return failed(f"firmware {changes['firmware']} failed to install (firmware.failing)")
        device.state.update(changes)
        self.counters.commands_executed += 1
        device.runs[command.command_id] = device.runs.get(command.command_id, 0) + 1
        return Ack(command.command_id, AckStatus.DONE, device.reported())

    def ignore(self, reason: str) -> None:
        """Count a command message that was not handled, under ``reason``."""
        ignored = self.counters.ignored_commands
        ignored[reason] = ignored.get(reason, 0) + 1

    def _ack_out(self, device: _Device, ack: Ack) -> Outgoing:
        self.counters.acks_sent += 1
        return Outgoing(self.topics.ack(device.device_id), _encode(ack))

    def _state_out(self, device: _Device) -> Outgoing:
        self.counters.states_published += 1
        return Outgoing(self.topics.state(device.device_id), _encode(device.reported()), True)

    def stats(self) -> FleetStats:
        """A copy of the counters and of every device's ground truth."""
        c = self.counters
        devices = {
            device_id: DeviceSnapshot(
                device_id,
                device.spec.kind,
                device.reported(),
                None if device.last_telemetry is None else dict(device.last_telemetry),
                device.seq,
                device.clock_skew_ms,
                tuple(cid for cid, ack in device.results.items() if ack.status == AckStatus.DONE),
                dict(device.deliveries),
                dict(device.runs),
            )
            for device_id, device in self.devices.items()
        }
        return FleetStats(
            readings_sent=c.readings_sent,
            malformed_sent=c.malformed_sent,
            malformed_by_kind=dict(c.malformed_by_kind),
            offline_skips=c.offline_skips,
            commands_received=c.commands_received,
            commands_executed=c.commands_executed,
            commands_failed=c.commands_failed,
            duplicate_commands=c.duplicate_commands,
            invalid_commands=c.invalid_commands,
            ignored_commands=dict(c.ignored_commands),
            acks_sent=c.acks_sent,
            states_published=c.states_published,
            schedule_overruns=c.schedule_overruns,
            publishes_failed=c.publishes_failed,
            redeliveries=c.redeliveries,
            devices=devices,
        )
