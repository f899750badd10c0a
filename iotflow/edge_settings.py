"""The edge gateway's own ``IOTFLOW_EDGE_*`` settings, read without pydantic (``iotflow.env``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from iotflow.env import Check, read_env
from iotflow.topics import check_device_id

__all__ = ["EdgeSettings", "check_gateway_id"]


def check_gateway_id(value: str) -> str:
    """``value`` when it can name a gateway (a device id without ``|``); ``ValueError`` otherwise."""
    problem = check_device_id(value)
    if problem is not None or "|" in value:
        raise ValueError(f"gateway id {value[:40]!r} is not usable: {problem or 'contains |'}")
    return value


_POSITIVE = msgspec.Meta(gt=0)


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``IOTFLOW_EDGE_*`` settings of a gateway (also read from ``.env``).

    ``workflow``/``profile``: YAML or JSON files (default: ``DEFAULT_WORKFLOW``,
    10 s aggregates; ``default_profile``). ``buffer``: the SQLite file,
    ``buffer_max_bytes`` its bound, ``durability`` SQLite's synchronous mode
    (``FULL`` survives a power cut). ``checkpoint_ms``/``checkpoint_messages``:
    how often state and buffer are committed and messages acknowledged.
    ``backfill_per_s``: a cap on backlog records per second (unset: the
    in-flight window). ``definitions``: follow ``{prefix}.edge.definitions``.
    ``batch_size``: device messages per batch (and the most that wait for the
    flow); ``idle_stop_s``: end the input once no message came for this long
    after the first (tests, demos; unset: never).

    Read them with ``from_env``; a bad value is a ``ConfigError`` naming the
    variable.

    Example::

        >>> EdgeSettings.from_env(None, gateway_id="gw7", checkpoint_ms="50").checkpoint_ms
        50
        >>> EdgeSettings.from_env(None, gateway_id="a/b")
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: gateway_id='a/b' is not valid: gateway id 'a/b' is not usable: device id 'a/b' contains '/'; fix it or unset it (default: 'gw1')
    """

    gateway_id: Annotated[str, Check(check_gateway_id)] = "gw1"
    workflow: Path | None = None
    profile: Path | None = None
    buffer: Path = Path(".iotflow/edge-buffer.db")
    buffer_max_bytes: Annotated[int, _POSITIVE] = 64_000_000
    durability: Literal["FULL", "NORMAL"] = "FULL"
    checkpoint_ms: Annotated[int, _POSITIVE] = 100
    checkpoint_messages: Annotated[int, _POSITIVE] = 800
    status_s: Annotated[float, _POSITIVE] = 30.0
    backfill_per_s: Annotated[float, _POSITIVE] | None = None
    definitions: bool = True
    batch_size: Annotated[int, _POSITIVE] = 1000
    idle_stop_s: Annotated[float, _POSITIVE] | None = None

    @classmethod
    def from_env(cls, env_file: str | Path | None = ".env", **values: Any) -> EdgeSettings:
        """The settings from ``IOTFLOW_EDGE_*`` variables and ``env_file`` (``None``: none),
        keyword arguments first (``iotflow.env.read_env``)."""
        return read_env(cls, "IOTFLOW_EDGE_", env_file, **values)
