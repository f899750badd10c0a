"""The device registry: devices, their models and metadata, groups, and lookups.

A registry holds twin models, devices (each with a model and metadata such
as building, floor, zone, coordinates ``x``/``y``, protocol, gateway), named
groups, and device-id patterns (``hvac-*`` -> model ``hvac``) for fleets too
large to list. It is plain data: ``to_dict()`` gives the file form back, and
``fingerprint`` identifies it for recovery.

A registry file (YAML or JSON) has the sections ``models``, ``devices``,
``patterns``, ``groups`` and ``policies`` (a conflict policy per group, and
``default`` for every other device; see ``twins.policies``)::

    models:
      lock:
        properties: {locked: {type: int, min: 0, max: 1, writable: true}}
        commands: {lock: {sets: {locked: 1}}, unlock: {sets: {locked: 0}}}
    devices:
      lock-front: {model: lock, building: A, floor: 0, x: 0.0, y: 1.5}
    patterns: {"lock-*": lock}
    groups: {doors: [lock-front]}
    policies: {default: desired_wins, doors: {policy: reported_wins}}

Example::

    >>> reg = Registry()
    >>> _ = reg.define_model("temp", {"properties": {"temperature": {"type": "float", "unit": "C"}}})
    >>> _ = reg.add_device("t1", "temp", building="A", floor=1, x=0.0, y=0.0)
    >>> _ = reg.add_device("t2", "temp", building="A", floor=2, x=3.0, y=4.0)
    >>> _ = reg.add_device("t3", "temp", building="B", floor=1, x=1.0, y=1.0)
    >>> reg.add_group("temperature_sensors", ["t1", "t2", "t3"])
    >>> reg.where(building="A")
    ['t1', 't2']
    >>> reg.nearest("temperature_sensors", "t1")
    ['t3']
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict

from iotflow.declarations import load_file, validate
from iotflow.errors import ConfigError, TwinRejected
from iotflow.topics import check_device_id
from twins.models import TwinModel, define_model
from twins.policies import DesiredWins, Policy, parse_policy

__all__ = [
    "DEFAULT",
    "SIMULATOR_REGISTRY_FILE",
    "Device",
    "Registry",
    "load_registry",
    "simulator_registry",
]

SIMULATOR_REGISTRY_FILE = Path(__file__).with_name("examples") / "simulator_registry.yaml"
"""The registry matching ``infra/simulator`` kinds (temp, power, hvac, lock, light) by id pattern."""


_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _frozen(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(metadata)) if metadata else _NO_METADATA


@dataclass(frozen=True)
class Device:
    """A registered device: its id, its model's name and its metadata."""

    device_id: str
    model: str
    metadata: Mapping[str, Any] = field(default_factory=lambda: _NO_METADATA)


class _DeviceEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, dict[str, Any]] = {}
    devices: dict[str, _DeviceEntry] = {}
    patterns: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    policies: dict[str, Any] = {}


DEFAULT = "default"
"""The ``policies`` key for devices in no group with a policy."""


def _check_metadata(device_id: str, metadata: Mapping[str, Any]) -> None:
    for axis in ("x", "y"):
        if axis in metadata:
            value = metadata[axis]
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value):
                raise ConfigError(
                    f"device {device_id!r}: metadata {axis} must be a finite number "
                    f"(a coordinate), got {value!r}"
                )


class Registry:
    """Models, devices, groups and id patterns, with lookups.

    Lookups of an unknown device raise ``TwinRejected`` (``unknown_device``):
    that is bad input arriving at runtime. Declaring something wrong (an
    unknown model, a device id MQTT cannot carry, a group naming an unknown
    device) raises ``ConfigError`` when it is declared.
    """

    def __init__(self) -> None:
        self.models: dict[str, TwinModel] = {}
        self.devices: dict[str, Device] = {}
        self.groups: dict[str, list[str]] = {}
        self.patterns: dict[str, str] = {}
        self.policies: dict[str, Policy] = {DEFAULT: DesiredWins()}
        self._compiled: list[tuple[re.Pattern[str], str]] = []
        # devices known only by pattern -> their model, resolved once (only known ids are
        # cached; a model name, not a Device: a fleet's worth of objects the collector walks)
        self._by_pattern: dict[str, str] = {}
        self._policy_of: dict[str, Policy] = {}

    # -- declaring -----------------------------------------------------------------

    def define_model(self, name: str, spec: Mapping[str, Any] | TwinModel) -> TwinModel:
        """Add (or replace) a model from its dictionary form, or an already built ``TwinModel``."""
        model = spec if isinstance(spec, TwinModel) else define_model(name, spec)
        if model.name != name:
            raise ConfigError(f"model {model.name!r} registered under another name {name!r}")
        self.models[name] = model
        return model

    def _require_model(self, model: str, where: str) -> None:
        if model not in self.models:
            known = ", ".join(sorted(self.models)) or "none defined yet"
            raise ConfigError(f"{where}: unknown model {model!r} (models: {known})")

    def add_device(self, device_id: str, model: str, **metadata: Any) -> Device:
        """Register a device of ``model`` with metadata (building, floor, zone, x, y, protocol, gateway...)."""
        problem = check_device_id(device_id)
        if problem is not None:
            raise ConfigError(f"cannot register device: {problem}")
        self._require_model(model, f"device {device_id!r}")
        _check_metadata(device_id, metadata)
        device = Device(device_id, model, _frozen(metadata))
        self.devices[device_id] = device
        self._by_pattern.pop(device_id, None)
        return device

    def add_pattern(self, pattern: str, model: str) -> None:
        """Devices whose id matches the glob ``pattern`` (``hvac-*``) are of ``model``.

        Explicitly added devices win over patterns; among patterns the first added matches.
        """
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"device id pattern must be a non-empty glob, got {pattern!r}")
        self._require_model(model, f"pattern {pattern!r}")
        self.patterns[pattern] = model
        self._compiled = [(re.compile(fnmatch.translate(p)), m) for p, m in self.patterns.items()]
        self._by_pattern.clear()

    def add_group(self, name: str, device_ids: Iterable[str]) -> None:
        """A named group of known devices (replaces a group of the same name)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"group name must be a non-empty string, got {name!r}")
        if isinstance(device_ids, str):
            raise ConfigError(
                f"group {name!r}: give a list of device ids, not the string {device_ids!r}"
            )
        members: list[str] = []
        for device_id in device_ids:
            if self._lookup(device_id) is None:
                raise ConfigError(
                    f"group {name!r}: unknown device {str(device_id)[:60]!r}; add it first"
                )
            if device_id not in members:
                members.append(device_id)
        self._check_policies(name, members)
        self.groups[name] = members
        self._policy_of.clear()

    def set_policy(self, group: str, policy: object) -> Policy:
        """The conflict policy of a group's devices (``group="default"``: of every other device).

        A device may be in several groups, but not in two with different policies.
        """
        parsed = parse_policy(policy, f"policy of {group!r}")
        if group != DEFAULT:
            self._check_policies(group, self.group(group), parsed)
        self.policies[group] = parsed
        self._policy_of.clear()
        return parsed

    def _check_policies(self, group: str, members: list[str], policy: Policy | None = None) -> None:
        policy = policy if policy is not None else self.policies.get(group)
        if policy is None:
            return
        for other, other_policy in self.policies.items():
            if other in (group, DEFAULT) or other_policy == policy:
                continue
            both = set(members).intersection(self.groups.get(other, ()))
            if both:
                raise ConfigError(
                    f"device {sorted(both)[0]!r} is in groups {group!r} and {other!r} with "
                    f"different policies ({policy.policy} and {other_policy.policy}); "
                    "give each device one policy"
                )

    def policy_of(self, device_id: str) -> Policy:
        """The policy of the first group with a policy that holds the device, else the default."""
        found = self._policy_of.get(device_id)
        if found is None:
            found = self.policies[DEFAULT]
            for name, policy in self.policies.items():
                if name != DEFAULT and device_id in self.groups.get(name, ()):
                    found = policy
                    break
            self._policy_of[device_id] = found
        return found

    # -- looking up ----------------------------------------------------------------

    def _lookup(self, device_id: object) -> Device | None:
        if not isinstance(device_id, str):
            return None
        device = self.devices.get(device_id)
        if device is not None:
            return device
        model = self._by_pattern.get(device_id)
        if model is not None:
            return Device(device_id, model)
        if check_device_id(device_id) is not None:
            return None
        for regex, model in self._compiled:
            if regex.match(device_id):
                self._by_pattern[device_id] = model
                return Device(device_id, model)
        return None

    def knows(self, device_id: object) -> bool:
        """Whether ``device_id`` is registered or matches a pattern."""
        return self._lookup(device_id) is not None

    def device(self, device_id: str) -> Device:
        """The device, or ``TwinRejected`` (``unknown_device``)."""
        device = self._lookup(device_id)
        if device is None:
            raise TwinRejected(
                f"unknown device {str(device_id)[:60]!r}: not in the registry and matching no "
                f"pattern ({', '.join(self.patterns) or 'none'})",
                device_id=device_id if isinstance(device_id, str) else None,
                kind="unknown_device",
            )
        return device

    def model_of(self, device_id: str) -> TwinModel:
        """The twin model of a device; ``TwinRejected`` for an unknown device."""
        return self.models[self.device(device_id).model]

    def group(self, name: str) -> list[str]:
        """The device ids of a group; ``ConfigError`` listing the known groups."""
        members = self.groups.get(name)
        if members is None:
            known = ", ".join(sorted(self.groups)) or "none"
            raise ConfigError(f"unknown group {name!r} (groups: {known})")
        return list(members)

    def groups_of(self, device_id: str) -> list[str]:
        """The groups a device belongs to, in declaration order."""
        return [name for name, members in self.groups.items() if device_id in members]

    def where(self, **dims: Any) -> list[str]:
        """Registered devices whose metadata (or ``model``) equals every given dimension.

        Devices known only by a pattern have no metadata and never match.
        """
        found = []
        for device_id, device in self.devices.items():
            for key, want in dims.items():
                have = device.model if key == "model" else device.metadata.get(key, _MISSING)
                if have != want:
                    break
            else:
                found.append(device_id)
        return found

    def nearest(self, group: str, device_id: str, n: int = 1) -> list[str]:
        """The ``n`` devices of ``group`` nearest to ``device_id`` by metadata ``x``/``y``.

        The device itself is left out, and so are members without coordinates;
        ties go to the smaller id. ``ConfigError`` when ``device_id`` has no coordinates.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"nearest: n must be a positive integer, got {n!r}")
        origin = self.device(device_id).metadata
        if "x" not in origin or "y" not in origin:
            raise ConfigError(
                f"device {device_id!r} has no coordinates; register it with metadata x and y"
            )
        ox, oy = origin["x"], origin["y"]
        ranked = []
        for member in self.group(group):
            if member == device_id:
                continue
            meta = self.device(member).metadata
            if "x" in meta and "y" in meta:
                ranked.append((math.hypot(meta["x"] - ox, meta["y"] - oy), member))
        ranked.sort()
        return [member for _, member in ranked[:n]]

    def check_command(self, device_id: str, name: str, params: object) -> dict[str, Any]:
        """Normalized params of command ``name`` for ``device_id``, or ``TwinRejected`` naming the device."""
        model = self.model_of(device_id)
        try:
            return model.check_command(name, params)
        except TwinRejected as exc:
            raise TwinRejected(
                f"device {device_id!r}: {exc.reason}",
                device_id=device_id,
                field=exc.field,
                kind=exc.kind,
            ) from None

    # -- plain data ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The registry in its file form (``Registry.from_dict(r.to_dict())`` is equal)."""
        return {
            "models": {
                name: model.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
                for name, model in self.models.items()
            },
            "devices": {
                device_id: {"model": device.model, **device.metadata}
                for device_id, device in self.devices.items()
            },
            "patterns": dict(self.patterns),
            "groups": {name: list(members) for name, members in self.groups.items()},
            "policies": {
                name: policy.model_dump(mode="json") for name, policy in self.policies.items()
            },
        }

    @property
    def fingerprint(self) -> str:
        """Identifies models, devices, patterns and groups, so twin state from another registry is never misread."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: object, what: str = "registry") -> Registry:
        """A registry from its file form; ``ConfigError`` naming the wrong field."""
        parsed = validate(_RegistryFile, data, what)
        registry = cls()
        for name, spec in parsed.models.items():
            registry.define_model(name, spec)
        for device_id, entry in parsed.devices.items():
            registry.add_device(device_id, entry.model, **(entry.model_extra or {}))
        for pattern, model in parsed.patterns.items():
            registry.add_pattern(pattern, model)
        for name, members in parsed.groups.items():
            registry.add_group(name, members)
        for name, policy in parsed.policies.items():
            registry.set_policy(name, policy)
        return registry

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        """A registry from a YAML or JSON file."""
        return cls.from_dict(load_file(path, "registry"), f"registry file {path}")


_MISSING = object()


def simulator_registry() -> Registry:
    """The models of the simulator's kinds, with devices assigned by id (``hvac-*`` -> ``hvac``)."""
    return Registry.load(SIMULATOR_REGISTRY_FILE)


def load_registry(path: str | Path | None) -> Registry:
    """The registry in ``path`` (``IOTFLOW_REGISTRY``), or the simulator's when None."""
    return simulator_registry() if path is None else Registry.load(path)
