"""Durations in declarations: ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``, ``"250ms"`` or seconds.

Example::

    >>> parse_duration("1h30m")
    datetime.timedelta(seconds=5400)
    >>> parse_duration(90)
    datetime.timedelta(seconds=90)
    >>> label(timedelta(minutes=1))
    '1m'
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from iotflow.errors import ConfigError

__all__ = ["Duration", "LeanDuration", "label", "lean_duration", "parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    """A timedelta from a timedelta, a number of seconds or a string like ``"5m"``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"duration {value!r} is not finite")
        return _seconds(value, value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        # a sign is parsed so validators can say "must be positive" rather than "not understood"
        sign = -1 if text.startswith("-") else 1
        body = text.lstrip("-")
        if body and _PART.sub("", body) == "":
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _PART.findall(body))
            return _seconds(sign * seconds, value)
    msg = f"duration {value!r} is not understood; write it like '250ms', '30s', '5m', '1h30m', '2d' or seconds"
    raise ConfigError(msg)


def _seconds(seconds: float, value: Any) -> timedelta:
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        # timedelta stops at 999,999,999 days; anything near that is a typo, not a duration
        msg = f"duration {value!r} is too long; the limit is {timedelta.max.days:,} days"
        raise ConfigError(msg) from None


def label(duration: timedelta) -> str:
    """The shortest ``parse_duration`` text for ``duration``."""
    ms = round(duration.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


class LeanDuration(timedelta):
    """A duration field of a msgspec Struct (the declarations' pydantic-free mirrors): msgspec
    hands the raw value to ``lean_duration`` (its ``dec_hook``) instead of reading ISO 8601."""


def lean_duration(value: Any) -> LeanDuration:
    """``parse_duration`` as a ``LeanDuration`` (raises ``ConfigError``, a ``ValueError``)."""
    td = parse_duration(value)
    return LeanDuration(td.days, td.seconds, td.microseconds)


if TYPE_CHECKING:
    Duration = timedelta
else:

    def __getattr__(name: str) -> Any:
        # The pydantic field type is built on first use, so a process that only parses
        # durations (the edge gateway) never imports pydantic (~7 MiB resident).
        if name != "Duration":
            raise AttributeError(name)
        from typing import Annotated

        from pydantic import BeforeValidator, PlainSerializer

        def _validate(value: Any) -> timedelta:
            try:
                return parse_duration(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None

        # accepts the forms above, serializes back to the short text
        duration = Annotated[
            timedelta, BeforeValidator(_validate), PlainSerializer(label, return_type=str)
        ]
        globals()["Duration"] = duration
        return duration
