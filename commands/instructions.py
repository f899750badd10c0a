"""High-level instructions: a target group of devices and steps, expanded into device commands.

An instruction names *which* devices (every member of a group, the devices
matching dimensions, the nearest ones to a device, or a list) and *what* to do
(steps: a command and its params), once. ``expand`` turns it into one
``Command`` per step and device, with deterministic ids
(``{instruction_id}/{step}/{device_id}``, so a replayed instruction asks for
the same commands again and the orchestrator de-duplicates them) and the
instruction id as their ``correlation_id``. The orchestrator sends each
device's commands in step order (per-device FIFO) and checks every command
against the device's twin model, so a step a device's model does not have is
rejected for that device only.

A step is ``{"command": "set_temperature", "params": {"setpoint": 23.5}}``
or the shorthand ``"set_temperature 23.5"``, which binds the value to the
command's only parameter (as the twin model declares it).

Example::

    >>> from datetime import UTC, datetime
    >>> from twins.registry import simulator_registry
    >>> cool = Instruction.from_data({
    ...     "instruction_id": "cool-down",
    ...     "target": {"devices": ["hvac-0001", "hvac-0002"]},
    ...     "steps": ["set_mode cool", "set_temperature 23.5"],
    ...     "ttl": "2m",
    ... })
    >>> cmds = cool.expand(simulator_registry(), datetime(2026, 1, 1, tzinfo=UTC))
    >>> [(c.command_id, c.name, c.params) for c in cmds[:3]]
    [('cool-down/0/hvac-0001', 'set_mode', {'mode': 'cool'}), ('cool-down/0/hvac-0002', 'set_mode', {'mode': 'cool'}), ('cool-down/1/hvac-0001', 'set_temperature', {'setpoint': 23.5})]
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from commands.model import Priority
from iotflow.declarations import validate
from iotflow.durations import Duration
from iotflow.errors import ConfigError
from iotflow.events import Command
from twins.registry import Registry

__all__ = ["Instruction", "Step", "Target"]

MAX_INSTRUCTION_ID_CHARS = 64
_PRIORITIES = {p.name.lower(): int(p) for p in Priority}


class Target(BaseModel):
    """Which devices an instruction addresses.

    Exactly one selection: ``devices`` (a list), ``group`` (every member),
    ``where`` (registered devices whose metadata match every dimension; with
    ``group``, the group's members that match) or ``nearest`` (the ``n``
    members of ``group`` nearest to that device by metadata x/y).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[str] | None = Field(None, min_length=1)
    group: str | None = None
    where: dict[str, Any] | None = Field(None, min_length=1)
    nearest: str | None = None
    n: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_selection(self) -> Target:
        if self.devices is not None and (self.group or self.where or self.nearest):
            raise ValueError("devices lists the targets itself; drop group, where and nearest")
        if self.nearest is not None and (self.group is None or self.where is not None):
            raise ValueError("nearest needs a group to choose from (and no where)")
        if self.devices is None and self.group is None and self.where is None:
            raise ValueError("say which devices: devices, group, where or nearest (with group)")
        return self

    def select(self, registry: Registry) -> list[str]:
        """The device ids, in registry order; ``ConfigError`` for an unknown group or device."""
        if self.devices is not None:
            return list(dict.fromkeys(self.devices))
        if self.nearest is not None:
            return registry.nearest(self.group, self.nearest, self.n)  # type: ignore[arg-type]
        if self.where is not None:
            matching = registry.where(**self.where)
            if self.group is None:
                return matching
            members = set(registry.group(self.group))
            return [d for d in matching if d in members]
        return registry.group(self.group)  # type: ignore[arg-type]


class Step(BaseModel):
    """One command for every target device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    value: Any = None  # the shorthand's value, bound to the command's only parameter

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            name, _, rest = data.strip().partition(" ")
            if not rest.strip():
                return {"command": name}
            return {"command": name, "value": yaml.safe_load(rest.strip())}
        return data

    @model_validator(mode="after")
    def _value_or_params(self) -> Step:
        if self.value is not None and self.params:
            raise ValueError("give params or a shorthand value, not both")
        return self

    def params_for(self, registry: Registry, device_id: str) -> dict[str, Any]:
        """The params for ``device_id``: ``params``, or the shorthand value bound by the model."""
        if self.value is None:
            return dict(self.params)
        spec = registry.model_of(device_id).commands.get(self.command)
        if spec is None:
            return {"value": self.value}  # the validator rejects the unknown command
        if len(spec.params) != 1:
            names = ", ".join(spec.params) or "none"
            msg = (
                f"step {self.command!r} {self.value!r}: the shorthand needs a command with "
                f"exactly one parameter; {self.command} has {names}: write params"
            )
            raise ConfigError(msg)
        return {next(iter(spec.params)): self.value}


class Instruction(BaseModel):
    """Steps for a target group, expanded into one command per step and device.

    ``priority`` is a number or ``low``/``normal``/``high``/``critical``;
    ``ttl`` is how long each command may wait before it expires.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction_id: str = Field(min_length=1, max_length=MAX_INSTRUCTION_ID_CHARS)
    target: Target
    steps: list[Step] = Field(min_length=1)
    priority: int = 0
    ttl: Duration = timedelta(minutes=5)

    @field_validator("instruction_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("instruction_id must be printable text")
        return value

    @field_validator("priority", mode="before")
    @classmethod
    def _named_priority(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in _PRIORITIES:
                raise ValueError(f"priority {value!r} is not one of {', '.join(_PRIORITIES)}")
            return _PRIORITIES[value]
        return value

    @field_validator("ttl")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"ttl must be positive, got {value}")
        return value

    @classmethod
    def from_data(cls, data: Any) -> Instruction:
        """An instruction from plain data (a dict from JSON or YAML); ConfigError names the field."""
        return validate(cls, data, "instruction")

    def expand(self, registry: Registry, now: datetime) -> list[Command]:
        """One command per step and target device, step by step, all issued at ``now``.

        Raises ``ConfigError`` when the target cannot be resolved (unknown
        group, nearest to a device without coordinates) or a shorthand does
        not fit the command; per-device problems (unknown device, a command
        its model lacks, bad params) are left to the validator, which rejects
        those commands one by one.
        """
        devices = self.target.select(registry)
        expires = now + self.ttl
        commands = []
        for index, step in enumerate(self.steps):
            for device_id in devices:
                known = registry.knows(device_id)
                params = step.params_for(registry, device_id) if known else dict(step.params)
                commands.append(
                    Command(
                        command_id=f"{self.instruction_id}/{index}/{device_id}",
                        device_id=device_id,
                        name=step.command,
                        params=params,
                        issued_at=now,
                        expires_at=expires,
                        priority=self.priority,
                        correlation_id=self.instruction_id,
                    )
                )
        return commands
