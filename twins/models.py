"""Twin models: typed properties, telemetry fields and commands with parameter schemas.

A model is a declaration (pydantic), loaded from a dict, JSON or YAML. It
answers two questions for the twin-update step and the orchestrator: is this
value valid for this property (``check_property``), and is this command valid
for this device (``check_command``). Every "no" is a ``TwinRejected`` naming
the place, the value and the rule; nothing is coerced silently beyond the
normalizations documented on ``PropertySpec.check``.

Example::

    >>> hvac = define_model("hvac_controller", {
    ...     "properties": {
    ...         "setpoint": {"type": "float", "unit": "C", "min": 10, "max": 32, "writable": True},
    ...         "mode": {"type": "enum", "values": ["off", "heat", "cool"], "writable": True},
    ...     },
    ...     "telemetry": ["temperature"],
    ...     "commands": [
    ...         {"name": "set_temperature", "params": {"setpoint": {"type": "float", "min": 10, "max": 32}},
    ...          "sets": {"setpoint": "params.setpoint"}},
    ...     ],
    ... })
    >>> hvac.check_command("set_temperature", {"setpoint": 23})
    {'setpoint': 23.0}
    >>> hvac.check_property("setpoint", 40)
    Traceback (most recent call last):
    ...
    iotflow.errors.TwinRejected: setpoint: 40 is out of range 10..32 C
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from iotflow.declarations import load_file, validate
from iotflow.durations import Duration
from iotflow.errors import ConfigError, TwinRejected
from iotflow.events import to_ms

__all__ = [
    "MAX_STRING_CHARS",
    "CommandSpec",
    "PropertySpec",
    "TwinModel",
    "TwinRejected",
    "define_model",
    "load_models",
    "models_from",
]

MAX_STRING_CHARS = 1024
"""The longest string a ``string`` property or parameter accepts."""

PropertyType = Literal["float", "int", "bool", "enum", "timestamp", "string"]
_PARAM_PREFIX = "params."


def _shown(value: object) -> str:
    """A short repr for messages: hostile or huge values never flood a log line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


class PropertySpec(BaseModel):
    """One typed value: a twin property, or a command parameter.

    ``check`` returns the normalized value or raises ``TwinRejected``:

    - ``float``: a finite int or float (not a bool), within ``min``..``max``; returned as float.
    - ``int``: an int, or a float with an integral value (devices often send ``2.0``),
      within ``min``..``max``; returned as int.
    - ``bool``: ``true``/``false``, or ``0``/``1`` as many devices send it; returned as bool.
    - ``enum``: one of ``values`` (strings).
    - ``timestamp``: epoch milliseconds, an ISO 8601 string with a time zone, or an
      aware datetime; returned as epoch milliseconds.
    - ``string``: a string of ``min_length``..``max_length`` characters (at most
      ``MAX_STRING_CHARS``).

    NaN and infinities are rejected for every type.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: PropertyType
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    values: list[str] | None = None
    writable: bool = False
    min_length: int | None = None
    max_length: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # "setpoint": "float" is the same as "setpoint": {"type": "float"}
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _consistent(self) -> PropertySpec:
        numeric = self.type in ("float", "int")
        if not numeric and (self.min is not None or self.max is not None):
            raise ValueError(f"min/max apply to float and int properties, not to {self.type}")
        for bound in (self.min, self.max):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"min/max must be finite numbers, got {bound}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}; swap them")
        lengths = (self.min_length, self.max_length)
        if self.type != "string" and lengths != (None, None):
            raise ValueError(
                f"min_length/max_length apply to string properties, not to {self.type}"
            )
        if any(n is not None and not 0 <= n <= MAX_STRING_CHARS for n in lengths):
            raise ValueError(f"min_length/max_length must be within 0..{MAX_STRING_CHARS}")
        if None not in lengths and self.min_length > self.max_length:  # type: ignore[operator]
            raise ValueError(f"min_length {self.min_length} is above max_length {self.max_length}")
        if self.type == "enum":
            if not self.values:
                raise ValueError("an enum property needs values: a non-empty list of strings")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"enum values repeat: {self.values}")
        elif self.values is not None:
            raise ValueError(f"values apply to enum properties, not to {self.type}")
        return self

    def _range(self) -> str:
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        unit = f" {self.unit}" if self.unit else ""
        return f"{low}..{high}{unit}"

    def check(self, value: object, *, where: str) -> object:
        """The normalized value, or ``TwinRejected`` naming ``where``, the value and the rule."""
        kind = self.type
        original = value
        if kind == "float" or kind == "int":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TwinRejected(
                    f"{where}: expected a number ({kind}), got {_type_name(value)} {_shown(value)}",
                    field=where,
                    kind="wrong_type",
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise TwinRejected(
                    f"{where}: {value} is not a finite number", field=where, kind="wrong_type"
                )
            if kind == "int":
                if isinstance(value, float):
                    if value != int(value):
                        raise TwinRejected(
                            f"{where}: expected an integer, got {_shown(value)}",
                            field=where,
                            kind="wrong_type",
                        )
                    value = int(value)
            else:
                value = float(value)
            if (self.min is not None and value < self.min) or (
                self.max is not None and value > self.max
            ):
                raise TwinRejected(
                    f"{where}: {_shown(original)} is out of range {self._range()}",
                    field=where,
                    kind="out_of_range",
                )
            return value
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TwinRejected(
                f"{where}: expected true/false (or 0/1), got {_type_name(value)} {_shown(value)}",
                field=where,
                kind="wrong_type",
            )
        if kind == "enum":
            if not isinstance(value, str):
                raise TwinRejected(
                    f"{where}: expected one of {', '.join(self.values or [])}, got "
                    f"{_type_name(value)} {_shown(value)}",
                    field=where,
                    kind="wrong_type",
                )
            if value not in (self.values or ()):
                raise TwinRejected(
                    f"{where}: {_shown(value)} is not one of {', '.join(self.values or [])}",
                    field=where,
                    kind="out_of_range",
                )
            return value
        if kind == "timestamp":
            return _timestamp_ms(value, where)
        if not isinstance(value, str):
            raise TwinRejected(
                f"{where}: expected a string, got {_type_name(value)} {_shown(value)}",
                field=where,
                kind="wrong_type",
            )
        longest = MAX_STRING_CHARS if self.max_length is None else self.max_length
        if len(value) > longest:
            raise TwinRejected(
                f"{where}: string of {len(value)} characters is over the limit of {longest}",
                field=where,
                kind="out_of_range",
            )
        if self.min_length is not None and len(value) < self.min_length:
            raise TwinRejected(
                f"{where}: string of {len(value)} characters is under the minimum of {self.min_length}",
                field=where,
                kind="out_of_range",
            )
        return value


def _timestamp_ms(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    dt: datetime | None = None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            dt = None
    if dt is None or dt.tzinfo is None:
        raise TwinRejected(
            f"{where}: expected epoch milliseconds or an ISO 8601 time with a zone, got "
            f"{_type_name(value)} {_shown(value)}",
            field=where,
            kind="wrong_type",
        )
    return to_ms(dt)


class CommandSpec(BaseModel):
    """A command a device accepts: its parameters and the state it leads to.

    ``sets`` maps a property to the reported value the device shows once the
    command took effect: a constant (``{"locked": 1}``) or ``"params.<name>"``
    (``{"setpoint": "params.setpoint"}``). Every parameter is required.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict[str, PropertySpec] = {}
    sets: dict[str, Any] = {}

    @model_validator(mode="after")
    def _sets_name_params(self) -> CommandSpec:
        for prop, source in self.sets.items():
            if isinstance(source, str) and source.startswith(_PARAM_PREFIX):
                param = source.removeprefix(_PARAM_PREFIX)
                if param not in self.params:
                    known = ", ".join(self.params) or "none"
                    raise ValueError(
                        f"sets.{prop} refers to {source!r} but the command has no parameter "
                        f"{param!r} (its parameters: {known})"
                    )
        return self

    def expected_state(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The reported properties the device shows after this command with ``params``.

        Example::

            >>> CommandSpec(params={"setpoint": {"type": "float"}},
            ...             sets={"setpoint": "params.setpoint"}).expected_state({"setpoint": 23.5})
            {'setpoint': 23.5}
        """
        expected: dict[str, Any] = {}
        for prop, source in self.sets.items():
            if isinstance(source, str) and source.startswith(_PARAM_PREFIX):
                expected[prop] = params[source.removeprefix(_PARAM_PREFIX)]
            else:
                expected[prop] = source
        return expected


def _commands_from_list(data: Any) -> Any:
    """``[{"name": "lock", ...}, "unlock"]`` -> ``{"lock": {...}, "unlock": {}}``."""
    if not isinstance(data, list):
        return data
    commands: dict[str, Any] = {}
    for index, item in enumerate(data):
        if isinstance(item, str):
            name, body = item, {}
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            body = {k: v for k, v in item.items() if k != "name"}
            name = item["name"]
        else:
            raise ValueError(
                f"commands[{index}] must be a command name or an object with a name, got {_shown(item)}"
            )
        if name in commands:
            raise ValueError(f"commands[{index}]: command {name!r} is declared twice")
        commands[name] = body
    return commands


class TwinModel(BaseModel):
    """A kind of device: typed properties, telemetry fields, commands, heartbeat.

    ``properties`` are the twin's state (reported from telemetry and the state
    topic; ``writable`` ones may also be desired). ``telemetry`` names fields a
    device sends that are time series, not twin state: the twin accepts and
    ignores them. ``commands`` is a mapping or a list of ``{"name": ...}``
    objects. ``heartbeat`` is the staleness window: a twin not heard from
    within it is offline.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    properties: dict[str, PropertySpec]
    telemetry: list[str] = []
    commands: dict[str, CommandSpec] = {}
    heartbeat: Duration | None = None

    _setters: dict[str, list[tuple[str, Any]]] = PrivateAttr(default_factory=dict)

    @field_validator("commands", mode="before")
    @classmethod
    def _command_list(cls, data: Any) -> Any:
        return _commands_from_list(data)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or not value.isprintable() or len(value) > 128:
            raise ValueError(f"model name {value[:40]!r} must be 1..128 printable characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TwinModel:
        if self.heartbeat is not None and self.heartbeat.total_seconds() <= 0:
            raise ValueError(f"heartbeat must be positive, got {self.heartbeat}")
        for name, command in self.commands.items():
            for prop, source in command.sets.items():
                spec = self.properties.get(prop)
                if spec is None:
                    known = ", ".join(self.properties)
                    raise ValueError(
                        f"commands.{name}.sets: unknown property {prop!r} (properties: {known})"
                    )
                if isinstance(source, str) and source.startswith(_PARAM_PREFIX):
                    continue
                try:
                    spec.check(source, where=f"commands.{name}.sets.{prop}")
                except TwinRejected as exc:
                    raise ValueError(exc.reason) from None
        return self

    def model_post_init(self, context: Any) -> None:
        # property -> [(command, constant or "params.x")], to turn a delta into commands
        for name, command in self.commands.items():
            for prop, source in command.sets.items():
                self._setters.setdefault(prop, []).append((name, source))

    @property
    def fingerprint(self) -> str:
        """Identifies the declaration, so state made under another one is never misread."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def property_spec(self, name: str) -> PropertySpec:
        """The spec of property ``name``, or ``TwinRejected`` (unknown_property) listing the known ones."""
        spec = self.properties.get(name)
        if spec is None:
            known = ", ".join(sorted(self.properties))
            raise TwinRejected(
                f"unknown property {_shown(name)} for model {self.name!r} (properties: {known})",
                field=str(name)[:128],
                kind="unknown_property",
            )
        return spec

    def check_property(self, name: str, value: object) -> object:
        """``value`` normalized for property ``name``; ``TwinRejected`` when unknown or invalid."""
        return self.property_spec(name).check(value, where=name)

    def check_desired(self, name: str, value: object) -> object:
        """Like ``check_property``, and the property must be ``writable`` (``not_writable`` otherwise)."""
        spec = self.property_spec(name)
        if not spec.writable:
            writable = ", ".join(sorted(p for p, s in self.properties.items() if s.writable))
            raise TwinRejected(
                f"property {name!r} of model {self.name!r} is read-only; writable: {writable or 'none'}",
                field=name,
                kind="not_writable",
            )
        return spec.check(value, where=name)

    def check_command(self, name: str, params: object) -> dict[str, Any]:
        """Normalized ``params`` for command ``name``, or ``TwinRejected``.

        Rejects an unknown command (listing the accepted ones), params that are
        not an object, a missing or an unknown parameter, and a parameter of
        the wrong type or out of range.
        """
        command = self.commands.get(name)
        if command is None:
            accepted = ", ".join(sorted(self.commands)) or "none"
            raise TwinRejected(
                f"unknown command {_shown(name)} for model {self.name!r}; it accepts: {accepted}",
                field="name",
                kind="unknown_command",
            )
        if not isinstance(params, Mapping):
            raise TwinRejected(
                f"{name}.params: expected an object, got {_type_name(params)} {_shown(params)}",
                field="params",
                kind="wrong_type",
            )
        unknown = [p for p in params if p not in command.params]
        if unknown:
            accepted = ", ".join(sorted(command.params)) or "none"
            raise TwinRejected(
                f"{name}: unknown parameter {_shown(unknown[0])}; it takes: {accepted}",
                field=f"params.{str(unknown[0])[:128]}",
                kind="unknown_param",
            )
        checked: dict[str, Any] = {}
        for param, spec in command.params.items():
            if param not in params:
                raise TwinRejected(
                    f"{name}: missing parameter {param!r} ({spec.type})",
                    field=f"params.{param}",
                    kind="missing_param",
                )
            checked[param] = spec.check(params[param], where=f"{name}.params.{param}")
        return checked

    def commands_for(self, changes: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The commands that bring the device to the (already checked) property values ``changes``.

        Per property, in order: a parameterless command whose constant ``sets``
        equals the value (``locked: 0`` -> ``unlock``), else a command that sets
        the property from a parameter and whose other parameters are all taken
        from ``changes`` too. ``TwinRejected`` (``no_command``) when none fits.

        Example::

            >>> lock = define_model("lock", {"properties": {"locked": {"type": "int", "min": 0, "max": 1, "writable": True}},
            ...     "commands": {"lock": {"sets": {"locked": 1}}, "unlock": {"sets": {"locked": 0}}}})
            >>> lock.commands_for({"locked": 0})
            [('unlock', {})]
        """
        out: list[tuple[str, dict[str, Any]]] = []
        covered: set[str] = set()
        for prop, value in changes.items():
            if prop in covered:
                continue
            found = self._command_for(prop, value, changes)
            if found is None:
                raise TwinRejected(
                    f"no command of model {self.name!r} sets {prop} to {_shown(value)}",
                    field=prop,
                    kind="no_command",
                )
            name, params, sets = found
            covered.update(sets)
            out.append((name, params))
        return out

    def _command_for(
        self, prop: str, value: Any, changes: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any], list[str]] | None:
        for name, source in self._setters.get(prop, ()):
            command = self.commands[name]
            from_param = isinstance(source, str) and source.startswith(_PARAM_PREFIX)
            if not from_param:
                if not command.params and source == value:
                    return name, {}, [prop]
                continue
            params: dict[str, Any] = {}
            sets: list[str] = []
            for other, other_source in command.sets.items():
                if isinstance(other_source, str) and other_source.startswith(_PARAM_PREFIX):
                    if other in changes:
                        params[other_source.removeprefix(_PARAM_PREFIX)] = changes[other]
                        sets.append(other)
                elif changes.get(other, other_source) != other_source:
                    break  # the command would also set another property to a different value
            else:
                if set(params) == set(command.params):
                    try:
                        return name, self.check_command(name, params), sets
                    except TwinRejected:
                        continue
        return None


def define_model(name: str, spec: Mapping[str, Any]) -> TwinModel:
    """A ``TwinModel`` from its dictionary form; ``ConfigError`` naming the wrong field."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"twin model {name!r} must be an object with properties, telemetry and commands, "
            f"got {_type_name(spec)}"
        )
    if "name" in spec and spec["name"] != name:
        raise ConfigError(f"twin model {name!r} declares another name {spec['name']!r}; drop it")
    return validate(TwinModel, {**spec, "name": name}, f"twin model {name!r}")


def models_from(data: object, what: str) -> dict[str, TwinModel]:
    """Models from ``{"models": {name: spec}}`` plain data (a models or registry file)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
        raise ConfigError(f"{what} needs a top-level 'models' mapping of model name -> model")
    return {str(name): define_model(str(name), spec) for name, spec in data["models"].items()}


def load_models(path: str | Path) -> dict[str, TwinModel]:
    """Models from a JSON or YAML file with a top-level ``models`` mapping (a registry file works too)."""
    return models_from(load_file(path, "twin models"), f"twin models file {path}")
