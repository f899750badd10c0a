"""Source mappings: where a reading's device id, timestamp and metrics come from.

A mapping is data, e.g. for zigbee2mqtt's ``zigbee2mqtt/{name}`` topics::

    {"device_id": "topic[1]", "temperature": "payload.temperature"}

Each value is a path, parsed at load time (never evaluated):

- ``topic[N]``: the N-th level of the MQTT topic (0-based; negative counts
  from the end),
- ``payload.a.b``: a field of the JSON payload, dotted for nested objects,
  ``payload.a[0]`` indexes a list.

The keys ``device_id`` and ``ts`` are special; every other key names a
metric. With no metric keys, every top-level numeric field of the payload is
a metric (the flat layout most devices send).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = ["FieldPath", "SourceMapping"]

_TOPIC_RE = re.compile(r"topic\[(-?[0-9]+)\]")
_PAYLOAD_STEP_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]*)((?:\[[0-9]+\])*)")
_INDEX_RE = re.compile(r"\[([0-9]+)\]")

_MISSING = object()


@dataclass(frozen=True)
class FieldPath:
    """A parsed mapping path: a topic level or a path into the payload."""

    source: str  # "topic" or "payload"
    steps: tuple[str | int, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        """Parse ``topic[N]`` or ``payload.a.b[0]``; raise ValueError naming the fix."""
        match = _TOPIC_RE.fullmatch(text)
        if match:
            return cls("topic", (int(match.group(1)),), text)
        if text == "payload":
            return cls("payload", (), text)
        if text.startswith("payload."):
            steps: list[str | int] = []
            for part in text[len("payload.") :].split("."):
                step = _PAYLOAD_STEP_RE.fullmatch(part)
                if step is None:
                    msg = (
                        f"path {text!r}: bad segment {part!r};"
                        " use names like payload.a.b or payload.a[0]"
                    )
                    raise ValueError(msg)
                steps.append(step.group(1))
                steps.extend(int(i) for i in _INDEX_RE.findall(step.group(2)))
            return cls("payload", tuple(steps), text)
        msg = f"path {text!r} is neither topic[N] nor payload.<field>"
        raise ValueError(msg)

    def get(self, levels: list[str], payload: Any) -> Any:
        """The value at this path, or the module's missing marker."""
        if self.source == "topic":
            try:
                return levels[int(self.steps[0])]
            except IndexError:
                return _MISSING
        value = payload
        for step in self.steps:
            if isinstance(step, int):
                if not isinstance(value, list) or step >= len(value):
                    return _MISSING
                value = value[step]
            else:
                if not isinstance(value, dict) or step not in value:
                    return _MISSING
                value = value[step]
        return value


def is_missing(value: Any) -> bool:
    return value is _MISSING


class SourceMapping(BaseModel):
    """How to read a reading out of a topic and a JSON payload.

    Example::

        >>> m = SourceMapping.model_validate(
        ...     {"device_id": "topic[1]", "temperature": "payload.value"}
        ... )
        >>> m.metric_paths["temperature"].text
        'payload.value'
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    device_id: str = "topic[2]"
    ts: str = "payload.ts"

    @field_validator("device_id", "ts")
    @classmethod
    def _path(cls, value: str) -> str:
        FieldPath.parse(value)
        return value

    @model_validator(mode="after")
    def _metrics(self) -> SourceMapping:
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, str):
                msg = f"metric {name!r}: path must be a string like 'payload.value', got {value!r}"
                raise ValueError(msg)
            try:
                FieldPath.parse(value)
            except ValueError as exc:
                raise ValueError(f"metric {name!r}: {exc}") from None
        return self

    @property
    def device_path(self) -> FieldPath:
        return FieldPath.parse(self.device_id)

    @property
    def ts_path(self) -> FieldPath:
        return FieldPath.parse(self.ts)

    @property
    def metric_paths(self) -> dict[str, FieldPath]:
        """Declared metrics; empty means every top-level numeric field."""
        return {name: FieldPath.parse(v) for name, v in (self.model_extra or {}).items()}
