"""Conflict policies: which write stands when updates to one property race.

A twin property has two cells, reported (what the device says) and desired
(what someone wants). A policy answers three questions, each documented on
its class with what happens when two updates race:

- does an incoming reported write replace the current reported value?
- does an incoming desired write replace the current desired value?
- is the desired value in force against the reported one (then a difference
  is a delta, sent to the device as a command)?

Every policy also rejects a write stamped more than ``skew_tolerance`` ahead
of its receive time (``future_timestamp``): a reading from the future would
otherwise outrank every honest reading after it. Policies are chosen per
group (``policies`` in the registry file) and carry the twin's healing
settings: with ``healing: auto`` a command whose effect is not reported
within ``heal_after`` is re-issued, up to ``heal_attempts`` times.

Example::

    >>> policy = parse_policy({"policy": "latest_timestamp", "skew_tolerance": "2s"})
    >>> policy.reported_replaces(new_ts=2000, new_src="telemetry", cur_ts=1000, cur_src="state")
    True
    >>> policy.reported_replaces(new_ts=500, new_src="telemetry", cur_ts=1000, cur_src="state")
    False
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from iotflow.declarations import describe
from iotflow.durations import Duration
from iotflow.errors import ConfigError

__all__ = [
    "POLICY_NAMES",
    "DesiredWins",
    "LatestTimestamp",
    "Policy",
    "ReportedWins",
    "SourcePriority",
    "parse_policy",
]


class _PolicyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    skew_tolerance: Duration = timedelta(seconds=5)
    """How far ahead of its receive time a write may be stamped; beyond: rejected."""
    healing: Literal["auto", "off"] = "off"
    """``auto``: re-issue a command whose effect is not reported within ``heal_after``."""
    heal_after: Duration = timedelta(seconds=30)
    heal_attempts: int = Field(3, ge=1, le=100)
    """Commands sent for one delta at most (the first included) before it is reported inconsistent."""
    command_ttl: Duration = timedelta(seconds=60)
    """Lifetime of the command requests made from a delta (their ``expires_at``)."""

    follows_reported: ClassVar[bool] = False
    """True when a reported value that contradicts the desired one replaces it."""
    by_arrival: ClassVar[bool] = False
    """True when every write replaces the cell (arrival order; no comparison needed)."""

    @field_validator("skew_tolerance")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError(f"must be zero or positive, got {value}")
        return value

    @field_validator("heal_after", "command_ttl")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be positive, got {value}")
        return value

    @property
    def skew_ms(self) -> int:
        """``skew_tolerance`` in milliseconds."""
        # computed on each call: a private attribute goes through pydantic's __getattr__,
        # several times slower than the field and the arithmetic
        return round(self.skew_tolerance.total_seconds() * 1000)

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def reported_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        raise NotImplementedError

    def desired_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        raise NotImplementedError

    def in_force(self, d_ts: int, d_src: str, r_ts: int, r_src: str) -> bool:
        raise NotImplementedError


class LatestTimestamp(_PolicyBase):
    """Latest device timestamp wins, on both sides.

    Races: of two readings of one property, the one stamped later stands,
    whatever order they arrive in (equal stamps: the later arrival). Of two
    desired writes, the one stamped later stands. A desired write and a
    reading race by their stamps too: a desired value stamped after the last
    reading is in force (the difference is a delta, sent as a command); a
    reading stamped after it ends that desire (the twin follows the device,
    no command, no healing). So a device that reports its old value before a
    command reached it closes the delta; choose ``desired_wins`` where a
    value must be enforced. The final state depends only on the set of
    writes, not on their arrival order.
    """

    policy: Literal["latest_timestamp"] = "latest_timestamp"

    def reported_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return new_ts >= cur_ts

    def desired_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return new_ts >= cur_ts

    def in_force(self, d_ts: int, d_src: str, r_ts: int, r_src: str) -> bool:
        return d_ts > r_ts


class SourcePriority(_PolicyBase):
    """The higher-priority source wins; between equals, the later timestamp.

    ``priorities`` lists sources from the highest down (``state``,
    ``telemetry``, and the ``source`` of desired writes such as ``api`` or
    ``operator``); unlisted sources rank below all listed ones. Races: a
    write replaces a cell when its (priority, timestamp) is at least the
    cell's, so a higher source's value holds until a source of the same or
    higher priority writes again, whatever the arrival order. A desired value
    is in force while its (priority, timestamp) is above that of the reported
    value: ``[operator, state, api]`` lets an operator override the device
    and the device override the API.
    """

    policy: Literal["source_priority"] = "source_priority"
    priorities: list[str] = Field(min_length=1)

    @field_validator("priorities")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"sources repeat in {value}")
        return value

    _ranks: dict[str, int] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        self._ranks.update({s: len(self.priorities) - i for i, s in enumerate(self.priorities)})

    def _rank(self, source: str) -> int:
        # straight from the private values: ``self._ranks`` goes through pydantic's __getattr__
        # (~2.5 us, twice per compared value on the per-update path)
        return self.__pydantic_private__["_ranks"].get(source, 0)  # type: ignore[index]

    def reported_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return (self._rank(new_src), new_ts) >= (self._rank(cur_src), cur_ts)

    def desired_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return (self._rank(new_src), new_ts) >= (self._rank(cur_src), cur_ts)

    def in_force(self, d_ts: int, d_src: str, r_ts: int, r_src: str) -> bool:
        return (self._rank(d_src), d_ts) > (self._rank(r_src), r_ts)


class DesiredWins(_PolicyBase):
    """The desired value always stands; the device is driven to it.

    Races: readings replace each other in arrival order (the device's own
    stream order; timestamps are not compared), desired writes too (the
    version check orders concurrent writers). A reading that contradicts the
    desired value never changes it: the delta stays and is sent again when
    the device reconnects, or by healing. The default policy.
    """

    policy: Literal["desired_wins"] = "desired_wins"
    by_arrival: ClassVar[bool] = True

    def reported_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return True

    def desired_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return True

    def in_force(self, d_ts: int, d_src: str, r_ts: int, r_src: str) -> bool:
        return True


class ReportedWins(_PolicyBase):
    """The device has the last word: a contradicting reading replaces the desired value.

    Races: readings and desired writes apply in arrival order. A desired
    write is in force until the next reading of that property: if the device
    then reports another value (someone turned the dial by hand, or the
    device refused), the desired value becomes the reported one and the delta
    clears, with no command. A command already sent may still take effect; its
    reading then becomes the desired value in turn.
    """

    policy: Literal["reported_wins"] = "reported_wins"
    follows_reported: ClassVar[bool] = True
    by_arrival: ClassVar[bool] = True

    def reported_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return True

    def desired_replaces(self, new_ts: int, new_src: str, cur_ts: int, cur_src: str) -> bool:
        return True

    def in_force(self, d_ts: int, d_src: str, r_ts: int, r_src: str) -> bool:
        return True


Policy = Annotated[
    LatestTimestamp | SourcePriority | DesiredWins | ReportedWins, Field(discriminator="policy")
]
_adapter: TypeAdapter[Any] = TypeAdapter(Policy)
POLICY_NAMES = ("latest_timestamp", "source_priority", "desired_wins", "reported_wins")


def parse_policy(
    data: Any, what: str = "policy"
) -> LatestTimestamp | SourcePriority | DesiredWins | ReportedWins:
    """A policy from its declaration (``{"policy": "latest_timestamp", ...}`` or just the name)."""
    if isinstance(data, _PolicyBase):
        return data
    if isinstance(data, str):
        data = {"policy": data}
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, what)) from None
