"""One twin's state: reported and desired values, per-property timestamps and sources, version, delta.

``TwinState`` is plain data (``to_dict``/``from_dict`` round-trip exactly) and
holds no policy: every method that resolves a race takes the group's policy
(``twins.policies``). Values arrive already checked against the twin model.
``TwinChange`` is what the twin looks like after one change, as published on
``{prefix}.twins`` and recorded in ``twin_history``.

Example::

    >>> from twins.policies import DesiredWins
    >>> twin = TwinState("hvac")
    >>> twin.apply_reported({"setpoint": 21.0}, 1000, "telemetry", DesiredWins())
    ['setpoint']
    >>> twin.apply_desired({"setpoint": 23.0}, 1500, "api", DesiredWins())
    ['setpoint']
    >>> twin.delta(DesiredWins())
    {'setpoint': 23.0}
    >>> _ = twin.apply_reported({"setpoint": 23.0}, 2000, "state", DesiredWins())
    >>> twin.delta(DesiredWins())
    {}
"""

from __future__ import annotations

from typing import Any

import msgspec

from twins.policies import Policy

__all__ = ["TwinChange", "TwinState"]

_MISSING = object()


class TwinChange(msgspec.Struct, frozen=True):
    """A twin after one change: the value of ``{prefix}.twins`` (key: device_id, compacted).

    ``version`` grows by one with every change of a value, a desired value,
    the delta or the online flag; a reading that repeats every value only
    refreshes timestamps and ``last_seen_ms`` and makes no new version.
    ``ts_ms`` is the change's event time (the reading's or desired write's
    stamp; the clock for going offline), ``recorded_ms`` when the twin step
    made it. ``changed`` names the properties whose reported or desired value
    changed.
    """

    device_id: str
    model: str
    version: int
    ts_ms: int
    recorded_ms: int
    cause: str
    changed: list[str]
    reported: dict[str, Any]
    desired: dict[str, Any]
    delta: dict[str, Any]
    reported_ts_ms: dict[str, int]
    desired_ts_ms: dict[str, int]
    online: bool
    last_seen_ms: int | None


class TwinState:
    """Reported/desired cells of one device, its version and what was commanded.

    ``sent`` maps a property to the command sent for its current delta:
    ``[value, command_id, issued_ms, attempts, reported_inconsistent]``.
    """

    __slots__ = (
        "d_src",
        "d_ts",
        "desired",
        "due_s",
        "last_seen_ms",
        "model",
        "online",
        "r_src",
        "r_ts",
        "reported",
        "sent",
        "skipped",
        "version",
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.version = 0
        self.reported: dict[str, Any] = {}
        self.r_ts: dict[str, int] = {}
        self.r_src: dict[str, str] = {}
        self.desired: dict[str, Any] = {}
        self.d_ts: dict[str, int] = {}
        self.d_src: dict[str, str] = {}
        self.online = False
        self.last_seen_ms: int | None = None
        self.sent: dict[str, list[Any]] = {}
        self.due_s: int | None = None
        """The staleness bucket (whole second) the device is filed under, if any."""
        self.skipped = 0
        """Values the last ``apply_*`` call skipped because they lost the race (not state)."""

    def apply_reported(
        self, values: dict[str, Any], ts_ms: int, source: str, policy: Policy
    ) -> list[str]:
        """Apply checked reported values; the properties whose reported (or desired) value changed.

        A value the policy ranks below the current one is skipped (it lost
        the race); ``skipped`` counts those of the last call.
        """
        changed: list[str] = []
        reported, r_ts, r_src = self.reported, self.r_ts, self.r_src
        replaces = policy.reported_replaces
        skipped = 0
        for key, value in values.items():
            cur_ts = r_ts.get(key)
            if cur_ts is not None and not replaces(ts_ms, source, cur_ts, r_src[key]):
                skipped += 1
                continue
            r_ts[key] = ts_ms
            r_src[key] = source
            if reported.get(key, _MISSING) != value:
                reported[key] = value
                changed.append(key)
        if policy.follows_reported and self.desired:
            for key in values:
                if key in self.desired and self.desired[key] != reported.get(key, _MISSING):
                    self.desired[key] = reported[key]
                    self.d_ts[key] = ts_ms
                    self.d_src[key] = source
                    if key not in changed:
                        changed.append(key)
        self.skipped = skipped
        return changed

    def apply_desired(
        self, values: dict[str, Any], ts_ms: int, source: str, policy: Policy
    ) -> list[str]:
        """Apply checked desired values (``None`` clears a property's desire); the properties that changed."""
        changed: list[str] = []
        desired, d_ts, d_src = self.desired, self.d_ts, self.d_src
        skipped = 0
        for key, value in values.items():
            cur_ts = d_ts.get(key)
            if cur_ts is not None and not policy.desired_replaces(
                ts_ms, source, cur_ts, d_src[key]
            ):
                skipped += 1
                continue
            if value is None:
                if key in desired:
                    del desired[key], d_ts[key], d_src[key]
                    changed.append(key)
                continue
            d_ts[key] = ts_ms
            d_src[key] = source
            if desired.get(key, _MISSING) != value:
                desired[key] = value
                changed.append(key)
        self.skipped = skipped
        return changed

    def delta(self, policy: Policy) -> dict[str, Any]:
        """Desired values in force that the device does not report (yet)."""
        if not self.desired:
            return {}
        reported, r_ts, r_src, d_ts, d_src = (
            self.reported,
            self.r_ts,
            self.r_src,
            self.d_ts,
            self.d_src,
        )
        delta = {}
        for key, value in self.desired.items():
            if reported.get(key, _MISSING) == value:
                continue
            if key not in r_ts or policy.in_force(d_ts[key], d_src[key], r_ts[key], r_src[key]):
                delta[key] = value
        return delta

    def change(
        self,
        device_id: str,
        ts_ms: int,
        recorded_ms: int,
        cause: str,
        changed: list[str],
        policy: Policy,
    ) -> TwinChange:
        """Count a new version and describe the twin after it."""
        self.version += 1
        return TwinChange(
            device_id,
            self.model,
            self.version,
            ts_ms,
            recorded_ms,
            cause,
            changed,
            dict(self.reported),
            dict(self.desired),
            self.delta(policy),
            dict(self.r_ts),
            dict(self.d_ts),
            self.online,
            self.last_seen_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (copies), for snapshots."""
        return {
            "model": self.model,
            "version": self.version,
            "reported": dict(self.reported),
            "r_ts": dict(self.r_ts),
            "r_src": dict(self.r_src),
            "desired": dict(self.desired),
            "d_ts": dict(self.d_ts),
            "d_src": dict(self.d_src),
            "online": self.online,
            "last_seen_ms": self.last_seen_ms,
            "sent": {k: list(v) for k, v in self.sent.items()},
            "due_s": self.due_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinState:
        """The state ``to_dict`` gave (copied, so the snapshot stays untouched)."""
        twin = cls(data["model"])
        twin.version = data["version"]
        twin.reported = dict(data["reported"])
        twin.r_ts = dict(data["r_ts"])
        twin.r_src = dict(data["r_src"])
        twin.desired = dict(data["desired"])
        twin.d_ts = dict(data["d_ts"])
        twin.d_src = dict(data["d_src"])
        twin.online = data["online"]
        twin.last_seen_ms = data["last_seen_ms"]
        twin.sent = {k: list(v) for k, v in data["sent"].items()}
        twin.due_s = data["due_s"]
        return twin
