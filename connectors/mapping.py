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

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from connectors.field_paths import DEFAULT_DEVICE_ID, DEFAULT_TS, FieldPath, is_missing

__all__ = ["FieldPath", "SourceMapping", "is_missing"]


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

    device_id: str = DEFAULT_DEVICE_ID
    ts: str = DEFAULT_TS

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
