"""One twin's state: reported and desired values, per-property timestamps and sources, version, delta.

``TwinState`` is plain data (``snapshot``/``restore`` round-trip exactly) and
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


class TwinChange(msgspec.Struct, frozen=True, gc=False):
    """A twin after one change: the value of ``{prefix}.twins`` (key: device_id, compacted).

    ``version`` grows by one with every change of a value, a desired value,
    the delta or the online flag; a reading that repeats every value only
    refreshes timestamps and ``last_seen_ms`` and makes no new version.
    ``ts_ms`` is the change's event time (the reading's or desired write's
    stamp; the clock for going offline), ``recorded_ms`` when the twin step
    made it. ``changed`` names the properties whose reported or desired value
    changed. Its dicts are shared with the twin's state, and ``changed`` with other
    changes that name the same properties: read them, never change them.
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

    ``reported``, ``r_ts``, ``desired`` and ``d_ts`` are copied on write, never
    changed in place, so a ``TwinChange`` can share them: treat them as read-only.

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
        new_reported: dict[str, Any] | None = None
        new_ts: dict[str, int] | None = None
        replaces = None if policy.by_arrival else policy.reported_replaces
        skipped = 0
        for key, value in values.items():
            if replaces is not None:
                cur_ts = r_ts.get(key)
                if cur_ts is not None and not replaces(ts_ms, source, cur_ts, r_src[key]):
                    skipped += 1
                    continue
            if new_ts is None:
                new_ts = self.r_ts = r_ts.copy()
            new_ts[key] = ts_ms
            r_src[key] = source
            if reported.get(key, _MISSING) != value:
                if new_reported is None:
                    new_reported = self.reported = reported.copy()
                new_reported[key] = value
                changed.append(key)
        if policy.follows_reported and self.desired:
            for key in values:
                if key in self.desired and self.desired[key] != self.reported.get(key, _MISSING):
                    self._set_desired(key, self.reported[key], ts_ms, source)
                    if key not in changed:
                        changed.append(key)
        self.skipped = skipped
        return changed

    def _set_desired(self, key: str, value: Any, ts_ms: int, source: str) -> None:
        # copy on write: a TwinChange made earlier shares the previous dicts
        self.desired = {**self.desired, key: value}
        self.d_ts = {**self.d_ts, key: ts_ms}
        self.d_src[key] = source

    def apply_desired(
        self, values: dict[str, Any], ts_ms: int, source: str, policy: Policy
    ) -> list[str]:
        """Apply checked desired values (``None`` clears a property's desire); the properties that changed."""
        changed: list[str] = []
        skipped = 0
        for key, value in values.items():
            cur_ts = self.d_ts.get(key)
            if cur_ts is not None and not policy.desired_replaces(
                ts_ms, source, cur_ts, self.d_src[key]
            ):
                skipped += 1
                continue
            if value is None:
                if key in self.desired:
                    self.desired = {k: v for k, v in self.desired.items() if k != key}
                    self.d_ts = {k: v for k, v in self.d_ts.items() if k != key}
                    del self.d_src[key]
                    changed.append(key)
                continue
            if self.desired.get(key, _MISSING) != value:
                changed.append(key)
            self._set_desired(key, value, ts_ms, source)
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
        """Count a new version and describe the twin after it (sharing its dicts: read-only)."""
        self.version += 1
        return TwinChange(
            device_id,
            self.model,
            self.version,
            ts_ms,
            recorded_ms,
            cause,
            changed,
            self.reported,
            self.desired,
            self.delta(policy) if self.desired else {},
            self.r_ts,
            self.d_ts,
            self.online,
            self.last_seen_ms,
        )

    def snapshot(self) -> list[Any]:
        """Plain data (a list, lean: one per twin at every epoch) for ``restore``.

        The copied-on-write dicts are shared, the others copied.
        """
        return [
            self.model,
            self.version,
            self.reported,
            self.r_ts,
            dict(self.r_src),
            self.desired,
            self.d_ts,
            dict(self.d_src),
            self.online,
            self.last_seen_ms,
            {k: list(v) for k, v in self.sent.items()} if self.sent else {},
        ]

    @classmethod
    def restore(cls, data: list[Any]) -> TwinState:
        """The twin a ``snapshot`` describes (copied, so the snapshot stays untouched)."""
        model, version, reported, r_ts, r_src, desired, d_ts, d_src, online, seen, sent = data
        twin = cls(model)
        twin.version = version
        twin.reported, twin.r_ts, twin.r_src = dict(reported), dict(r_ts), dict(r_src)
        twin.desired, twin.d_ts, twin.d_src = dict(desired), dict(d_ts), dict(d_src)
        twin.online = online
        twin.last_seen_ms = seen
        twin.sent = {k: list(v) for k, v in sent.items()}
        return twin
