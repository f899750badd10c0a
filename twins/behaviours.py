"""Behaviour models: how a twin's properties move over time between commands.

A behaviour is a declaration (pydantic; ``kind`` picks it) that names the
properties it ``moves`` and the properties it reads as ``inputs``. Commands
never talk to a behaviour directly: a command changes the twin's state as
its model's ``CommandSpec.sets`` says (``expected_state``), and the
behaviour reads those properties at the next step, so ``set_mode("cool")``
switches a thermal model on and ``set_temperature(19)`` moves its target.
``driven_by(model)`` lists which commands reach a behaviour's inputs.

Kinds:

- ``thermal``: a first-order zone, ``T' = a·(T_set - T)/tau + (T_ambient - T)/ambient_tau``
  where ``a`` is 1 while the unit conditions (mode in ``heat_modes`` and
  ``T < T_set``, mode in ``cool_modes`` and ``T > T_set``, and the optional
  ``on`` property true) and 0 otherwise; without ``ambient_tau`` there is no
  drift. Integrated exactly over each step (the solution of a linear ODE with
  constant inputs, split where a heat- or cool-only unit reaches its
  setpoint and stops), so results do not depend on the step size.
- ``linear``: ``value += per_h·hours`` (a battery's drain with a negative
  ``per_h``), plus ``per_command`` amounts applied when those commands run
  (a lock's actuation costs battery).
- ``exponential``: ``value = target + (value - target)·e^(-t/tau)``
  (exponential decay towards ``target``, 0 by default).

The simulation clamps every moved value into its property's ``min``..``max``.
A behaviour that lacks a value it needs (the twin has no temperature yet, a
setpoint is not a number) moves nothing and says why (``Stalled``).

Example::

    >>> from twins.registry import simulator_registry
    >>> hvac = simulator_registry().models["hvac"]
    >>> zone = Thermal(tau="15m", ambient=30, ambient_tau="2h")
    >>> zone.moves, zone.inputs
    (('temperature',), ('mode', 'setpoint'))
    >>> zone.driven_by(hvac)
    {'set_mode': ['mode'], 'set_temperature': ['setpoint']}
    >>> state = {"temperature": 26.0, "mode": "cool", "setpoint": 22.0}
    >>> round(zone.advance(state, 3600)["temperature"], 2)
    22.92
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from iotflow.declarations import load_file, validate
from iotflow.durations import Duration
from iotflow.durations import label as label_of
from iotflow.errors import ConfigError
from twins.models import TwinModel

__all__ = [
    "SIMULATOR_BEHAVIOURS",
    "Behaviour",
    "Behaviours",
    "Exponential",
    "Linear",
    "Stalled",
    "Thermal",
    "load_behaviours",
]


@dataclass(frozen=True)
class Stalled:
    """A behaviour could not move its properties this step, and why."""

    reason: str


def _number(state: Mapping[str, Any], name: str) -> float | None:
    value = state.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _need(state: Mapping[str, Any], name: str, kind: str) -> float | Stalled:
    value = _number(state, name)
    if value is None:
        return Stalled(f"{kind}: {name} is {state.get(name)!r}, not a finite number")
    return value


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @property
    def moves(self) -> tuple[str, ...]:
        """The properties this behaviour changes."""
        raise NotImplementedError

    @property
    def inputs(self) -> tuple[str, ...]:
        """The properties (besides those it moves) this behaviour reads."""
        return ()

    @property
    def commands(self) -> tuple[str, ...]:
        """Commands this behaviour reacts to directly (``on_command``)."""
        return ()

    def advance(self, state: Mapping[str, Any], seconds: float) -> dict[str, float] | Stalled:
        """The moved properties after ``seconds`` from ``state`` (which is not changed)."""
        raise NotImplementedError

    def on_command(self, command: str, state: Mapping[str, Any]) -> dict[str, float]:
        """Changes a command makes to the moved properties beyond its ``sets``."""
        return {}

    def check(self, model: TwinModel, where: str) -> None:
        """``ConfigError`` naming ``where`` unless ``model`` has what this behaviour needs:
        float properties to move, the input properties, the commands it reacts to."""
        for prop in (*self.moves, *self.inputs):
            if prop not in model.properties:
                known = ", ".join(sorted(model.properties))
                raise ConfigError(
                    f"{where}: model {model.name!r} has no property {prop!r} (properties: {known})"
                )
        for prop in self.moves:
            kind = model.properties[prop].type
            if kind != "float":
                raise ConfigError(
                    f"{where}: moves {prop!r}, a {kind} property of model {model.name!r}; "
                    "behaviours move float properties"
                )
        for command in self.commands:
            if command not in model.commands:
                known = ", ".join(sorted(model.commands)) or "none"
                raise ConfigError(
                    f"{where}: model {model.name!r} has no command {command!r} (commands: {known})"
                )

    def driven_by(self, model: TwinModel) -> dict[str, list[str]]:
        """Command -> the inputs (and moved properties) of this behaviour it sets,
        from the model's ``CommandSpec.sets``; direct ``on_command`` reactions are listed too."""
        watched = (*self.inputs, *self.moves)
        found: dict[str, list[str]] = {}
        for name, spec in model.commands.items():
            hit = [p for p in watched if p in spec.sets]
            if name in self.commands:
                hit += [p for p in self.moves if p not in hit]
            if hit:
                found[name] = hit
        return found


class Thermal(_Base):
    """A first-order thermal zone (see the module docstring)."""

    kind: Literal["thermal"] = "thermal"
    property: str = "temperature"
    setpoint: str = "setpoint"
    mode: str | None = "mode"
    on: str | None = None
    heat_modes: list[str] = ["heat", "auto"]
    cool_modes: list[str] = ["cool", "auto"]
    tau: Duration
    ambient: float | None = None
    ambient_tau: Duration | None = None

    @field_validator("tau", "ambient_tau")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError(f"must be a positive time constant, e.g. '15m'; got {label_of(value)}")
        return value

    @model_validator(mode="after")
    def _ambient(self) -> Thermal:
        if (self.ambient is None) != (self.ambient_tau is None):
            raise ValueError(
                "give both ambient (the temperature the zone drifts to) and "
                "ambient_tau (how fast), or neither"
            )
        return self

    def check(self, model: TwinModel, where: str) -> None:
        super().check(model, where)
        values = model.properties[self.mode].values if self.mode is not None else None
        if values is not None and not set(values).intersection(self.heat_modes + self.cool_modes):
            raise ConfigError(
                f"{where}: none of heat_modes {self.heat_modes} or cool_modes {self.cool_modes} "
                f"is a value of {model.name}.{self.mode} ({', '.join(values)}); "
                "the unit could never condition"
            )

    @builtins.property  # the field "property" shadows the builtin here
    def moves(self) -> tuple[str, ...]:
        return (self.property,)

    @builtins.property
    def inputs(self) -> tuple[str, ...]:
        return tuple(p for p in (self.mode, self.on, self.setpoint) if p is not None)

    def _direction(self, state: Mapping[str, Any]) -> tuple[bool, bool]:
        """(heats, cools) for the current mode and on/off switch."""
        if self.on is not None and not state.get(self.on):
            return False, False
        if self.mode is None:
            return True, True
        mode = state.get(self.mode)
        return mode in self.heat_modes, mode in self.cool_modes

    def advance(self, state: Mapping[str, Any], seconds: float) -> dict[str, float] | Stalled:
        temp = _need(state, self.property, "thermal")
        if isinstance(temp, Stalled):
            return temp
        heats, cools = self._direction(state)
        target: float | Stalled = 0.0
        if heats or cools:
            target = _need(state, self.setpoint, "thermal")
            if isinstance(target, Stalled):
                return target
        drift = 0.0 if self.ambient_tau is None else 1 / self.ambient_tau.total_seconds()
        gain = 1 / self.tau.total_seconds()
        left = float(seconds)
        ambient = self.ambient if self.ambient is not None else temp
        one_way = heats != cools  # a heat- or cool-only unit switches at its setpoint
        # Pieces with constant inputs, split where a one-way unit's zone crosses the
        # setpoint: the unit switches there (at most twice: on, then held on or off).
        for _ in range(3):
            # at the setpoint, a one-way unit runs when the drift would take the zone its way
            below = temp < target or (temp == target and drift > 0 and ambient < target)
            above = temp > target or (temp == target and drift > 0 and ambient > target)
            active = (heats and below) or (cools and above)
            rate = drift + (gain if active else 0.0)
            if rate == 0.0 or left <= 0:
                break
            pull = ambient * drift + (target * gain if active else 0.0)
            settle = pull / rate
            end = settle + (temp - settle) * math.exp(-rate * left)
            if not (one_way and (end - target) * (temp - target) < 0):
                temp = end
                break
            left -= math.log((temp - settle) / (target - settle)) / rate
            temp = target
        return {self.property: temp}


class Linear(_Base):
    """``value += per_h`` per hour; ``per_command`` adds a fixed amount per command run."""

    kind: Literal["linear"] = "linear"
    property: str
    per_h: float
    per_command: dict[str, float] = {}

    @property
    def moves(self) -> tuple[str, ...]:
        return (self.property,)

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(self.per_command)

    def advance(self, state: Mapping[str, Any], seconds: float) -> dict[str, float] | Stalled:
        value = _need(state, self.property, "linear")
        if isinstance(value, Stalled):
            return value
        return {self.property: value + self.per_h * seconds / 3600}

    def on_command(self, command: str, state: Mapping[str, Any]) -> dict[str, float]:
        value = _number(state, self.property)
        if command not in self.per_command or value is None:
            return {}
        return {self.property: value + self.per_command[command]}


class Exponential(_Base):
    """``value = target + (value - target)·e^(-t/tau)``: decay towards ``target``."""

    kind: Literal["exponential"] = "exponential"
    property: str
    tau: Duration
    target: float = 0.0

    @field_validator("tau")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be a positive time constant, e.g. '30d'; got {label_of(value)}")
        return value

    @property
    def moves(self) -> tuple[str, ...]:
        return (self.property,)

    def advance(self, state: Mapping[str, Any], seconds: float) -> dict[str, float] | Stalled:
        value = _need(state, self.property, "exponential")
        if isinstance(value, Stalled):
            return value
        decay = math.exp(-seconds / self.tau.total_seconds())
        return {self.property: self.target + (value - self.target) * decay}


Behaviour = Annotated[Thermal | Linear | Exponential, Field(discriminator="kind")]


class Behaviours(BaseModel):
    """Which behaviours apply: per model name, and per device id (which replaces its model's list).

    Two behaviours of one device must not move the same property
    (``check`` says so with ``ConfigError``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, list[Behaviour]] = {}
    devices: dict[str, list[Behaviour]] = {}

    def for_device(self, device_id: str, model: TwinModel) -> list[Any]:
        """The behaviours of a device, checked against its model (``ConfigError`` naming the entry)."""
        if device_id in self.devices:
            found, where = self.devices[device_id], f"behaviours.devices.{device_id}"
        else:
            found, where = self.models.get(model.name, []), f"behaviours.models.{model.name}"
        moved: dict[str, int] = {}
        for index, behaviour in enumerate(found):
            behaviour.check(model, f"{where}[{index}]")
            for prop in behaviour.moves:
                if prop in moved:
                    raise ConfigError(
                        f"{where}[{index}] moves {prop!r}, already moved by {where}[{moved[prop]}]; "
                        "one behaviour per property"
                    )
                moved[prop] = index
        return list(found)


def load_behaviours(source: str | Path | Mapping[str, Any]) -> Behaviours:
    """Behaviours from a ``.yaml``/``.json`` file or plain data (``models:``, ``devices:``).

    >>> load_behaviours({"models": {"lock": [{"kind": "linear", "property": "battery", "per_h": -0.02}]}}).models["lock"][0].per_h
    -0.02
    >>> load_behaviours({"models": {"hvac": [{"kind": "thermal", "tau": "0s"}]}})
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: behaviours declaration is invalid: models.hvac[0].thermal.tau: must be a positive time constant, e.g. '15m'; got 0ms
    """
    data: Any = source
    if isinstance(source, str | Path):
        data = load_file(source, "behaviours")
    return validate(Behaviours, data, "behaviours")


SIMULATOR_BEHAVIOURS = Behaviours(
    models={
        # infra/simulator: an HVAC zone follows its setpoint unless off (then 24 C ambient)
        "hvac": [Thermal(tau=timedelta(minutes=15), ambient=24.0, ambient_tau=timedelta(hours=2))],
        # infra/simulator: a lock's battery drifts -0.02 %/h
        "lock": [Linear(property="battery", per_h=-0.02)],
    }
)
"""Behaviours for the simulator's kinds (``twins.registry.simulator_registry``)."""
