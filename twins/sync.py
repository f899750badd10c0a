"""The twin-update logic: reported and desired updates in, twin changes and command requests out.

``TwinSync`` keeps the twins of many devices (a shard of the fleet) and
speaks the project's stateful vocabulary: ``on_batch(updates)``,
``on_timer()``, ``next_timer()``, ``snapshot()``; ``dataflows.twins`` hands
it to Bytewax through ``operators.steps.LogicStep``. Per batch it returns one
``TwinOut`` with four streams.

Guarantees:

- Nothing invalid is written. An unknown device, an unknown property, a
  wrong type, a value out of range, a read-only desired property, a stale
  ``version`` (optimistic concurrency), a write stamped beyond the policy's
  skew tolerance: each is a ``TwinRejection`` with the reason, counted by kind
  in ``counters``. A reading with some bad fields still applies its valid
  ones; a desired change is all or nothing.
- Every change makes the next version (strictly increasing per device) and one
  ``TwinChange``; races between updates are settled by the device's group
  policy (``twins.policies``).
- The delta (desired values in force that the device does not report) turns
  into ``Command`` requests, at most once per delta value while the device is
  online. When the device reports the desired value the delta clears. An
  offline device gets its pending delta, and only that, when it is next heard
  from.
- Staleness: a device not heard from within its model's ``heartbeat`` goes
  offline (a change), judged by the receive time of its messages against the
  injected clock, on whole-second timers (so up to a second late).
- Consistency: a command whose effect is not reported within the policy's
  ``heal_after`` is re-issued when ``healing: auto`` (up to ``heal_attempts``
  commands), else, or after the last attempt, reported once as a
  ``twin_inconsistent`` detection.
- Recovery: ``snapshot()`` is plain data with a fingerprint of the models and
  policies; resuming under changed ones raises ``ConfigError``. Twins of
  devices that left the registry or changed model are dropped on resume
  (counted as ``dropped_on_resume``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from iotflow.errors import ConfigError, TwinRejected
from iotflow.events import Command, Detection, from_ms, to_ms
from twins.models import TwinModel
from twins.policies import Policy
from twins.registry import Registry
from twins.state import TwinChange, TwinState
from twins.updates import DESIRED_SOURCE, DesiredChange, Reported, TwinRejection

__all__ = ["INCONSISTENT_RULE", "TwinOut", "TwinSync", "sync_fingerprint"]

INCONSISTENT_RULE = "twin_inconsistent"
"""The ``Detection.rule`` of a command whose effect the device never reported."""

_FLOAT_MAX = sys.float_info.max
_NONE = object()
_SLOW = (0.0, -1.0)  # bounds no value passes: the field takes the model's full check
_NAMES_MAX = 4096  # combinations of changed names shared per model; beyond, lists are not shared


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class TwinOut:
    """What one batch (or timer) produced, a stream each."""

    changes: list[TwinChange] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    rejections: list[TwinRejection] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.commands or self.rejections or self.detections)


class _ModelInfo:
    """A model prepared for the per-update path: one lookup per reported field, and the slow
    checker."""

    __slots__ = ("fields", "heartbeat_ms", "model", "names", "specs")

    def __init__(self, model: TwinModel) -> None:
        self.model = model
        self.specs = dict(model.properties)
        # field -> (low, high) that a plain finite float in range passes without the slow check
        # (float properties), or None: a telemetry field, not state. Other fields: the slow check.
        self.fields: dict[str, tuple[float, float] | None] = dict.fromkeys(model.telemetry)
        self.fields.update(
            (
                name,
                (
                    -_FLOAT_MAX if spec.min is None else spec.min,
                    _FLOAT_MAX if spec.max is None else spec.max,
                ),
            )
            for name, spec in model.properties.items()
            if spec.type == "float"
        )
        for name in self.specs:  # a property also listed as telemetry is a property
            if self.fields.get(name, ()) is None:
                del self.fields[name]
        # One shared list per combination of changed names (see TwinSync._reported).
        self.names: dict[tuple[str, ...], list[str]] = {}
        hb = model.heartbeat
        self.heartbeat_ms = None if hb is None else round(hb.total_seconds() * 1000)


_Entry = tuple[TwinState, Policy, int, _ModelInfo]  # a device's twin, policy, skew ms, model


def sync_fingerprint(registry: Registry) -> str:
    """Identifies what twin state depends on: the models and the policies (not the device list)."""
    data = registry.to_dict()
    text = json.dumps({"models": data["models"], "policies": data["policies"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TwinSync:
    """The twins of a set of devices and the logic that keeps them in sync (see the module doc).

    Example::

        >>> from twins.registry import simulator_registry
        >>> from twins.updates import Reported, DesiredChange
        >>> clock = lambda: datetime(2026, 1, 1, tzinfo=UTC)
        >>> sync = TwinSync(simulator_registry(), now=clock)
        >>> t = 1767225600000
        >>> out = sync.on_batch([Reported("lock-1", t, {"locked": 1}, "state", t)])[0]
        >>> out.changes[0].version, out.changes[0].reported
        (1, {'locked': 1})
        >>> out = sync.on_batch([DesiredChange("lock-1", {"locked": 0}, 1, "api", t, t)])[0]
        >>> [(c.name, c.params) for c in out.commands], out.changes[0].delta
        ([('unlock', {})], {'locked': 0})
    """

    def __init__(
        self,
        registry: Registry,
        resume_state: dict[str, Any] | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.registry = registry
        self._now = now
        self.fingerprint = sync_fingerprint(registry)
        self._infos = {name: _ModelInfo(model) for name, model in registry.models.items()}
        self.twins: dict[str, TwinState] = {}
        # device -> what its updates need, resolved once: one lookup per update
        self._entries: dict[str, _Entry] = {}
        self._counts: dict[str, int] = {}
        self._changes = 0  # counted per batch, apart from the others (see on_batch)
        # staleness: whole second -> devices due then; a heap of the seconds
        self._due: dict[int, set[str]] = {}
        self._due_heap: list[int] = []
        # consistency checks: (due ms, device id)
        self._heal: list[tuple[int, str]] = []
        if resume_state is not None:
            self._resume(resume_state)

    # -- the vocabulary ------------------------------------------------------------

    def on_batch(self, updates: list[Reported | DesiredChange]) -> list[TwinOut]:
        """Apply a batch of updates in order; one ``TwinOut`` (none when nothing came of it)."""
        out = TwinOut()
        now_ms = to_ms(self._now())
        for update in updates:
            if type(update) is Reported:
                self._reported(update, now_ms, out)
            else:
                self._desired(update, now_ms, out)  # type: ignore[arg-type]
        self._changes += len(out.changes)
        return [out] if out else []

    def on_timer(self) -> list[TwinOut]:
        """Mark devices past their heartbeat offline and run due consistency checks."""
        out = TwinOut()
        now_ms = to_ms(self._now())
        now_s = now_ms // 1000
        due, heap = self._due, self._due_heap
        while heap and heap[0] <= now_s:
            second = heapq.heappop(heap)
            for device_id in sorted(due.pop(second, ())):
                self._check_stale(device_id, now_ms, out)
        heal = self._heal
        while heal and heal[0][0] <= now_ms:
            _, device_id = heapq.heappop(heal)
            self._check_consistency(device_id, now_ms, out)
        self._changes += len(out.changes)
        return [out] if out else []

    def on_eof(self) -> list[TwinOut]:
        return []

    def next_timer(self) -> datetime | None:
        """The next staleness second or consistency check, whichever is first."""
        candidates = []
        if self._due_heap:
            candidates.append(self._due_heap[0] * 1000)
        if self._heal:
            candidates.append(self._heal[0][0])
        return from_ms(min(candidates)) if candidates else None

    def snapshot(self) -> dict[str, Any]:
        """Plain data: the fingerprint, the counters, every twin and the pending checks."""
        return {
            "fingerprint": self.fingerprint,
            "counters": dict(self.counters),
            "twins": {d: t.snapshot() for d, t in self.twins.items()},
            "heal": list(self._heal),
        }

    # -- reading -------------------------------------------------------------------

    def twin(self, device_id: str) -> TwinState | None:
        """The live state of a device's twin (None when it has none yet)."""
        return self.twins.get(device_id)

    @property
    def counters(self) -> dict[str, int]:
        """Counts by kind: ``changes``, ``commands``, ``online``, ``offline``, ``superseded``,
        ``healed``, ``inconsistent``, ``rejected.<kind>``, ``dropped_on_resume``."""
        counts = dict(self._counts)
        if self._changes:
            counts["changes"] = self._changes
        return counts

    def _count(self, kind: str, n: int = 1) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + n

    # -- updates -------------------------------------------------------------------

    def _entry(
        self, device_id: str, source: str, received_ms: int, out: TwinOut, payload: Any
    ) -> _Entry | None:
        """The device's entry; its twin is made on first sight. None: rejected (unknown device)."""
        entry = self._entries.get(device_id)
        if entry is not None:
            return entry
        twin = self.twins.get(device_id)
        if twin is None:
            try:
                device = self.registry.device(device_id)
            except TwinRejected as exc:
                self._reject(out, exc.kind, exc.reason, source, received_ms, device_id, payload)
                return None
            twin = self.twins[device_id] = TwinState(device.model)
        return self._enter(device_id, twin)

    def _enter(self, device_id: str, twin: TwinState) -> _Entry:
        policy = self.registry.policy_of(device_id)
        entry = self._entries[device_id] = (twin, policy, policy.skew_ms, self._infos[twin.model])
        return entry

    def _policy_of(self, device_id: str) -> Policy:
        """The policy of a device that has a twin."""
        entry = self._entries.get(device_id) or self._enter(device_id, self.twins[device_id])
        return entry[1]

    def _reject(
        self,
        out: TwinOut,
        kind: str,
        reason: str,
        source: str,
        received_ms: int,
        device_id: str | None,
        payload: Any,
        n: int = 1,
    ) -> None:
        self._count(f"rejected.{kind}", n)
        data = payload if isinstance(payload, bytes) else _encode(payload)
        out.rejections.append(
            TwinRejection(kind, reason, source, received_ms, device_id, None, data)
        )

    def _reported(self, update: Reported, now_ms: int, out: TwinOut) -> None:
        device_id = update.device_id
        entry = self._entries.get(device_id) or self._entry(
            device_id, update.source, update.received_ms, out, update
        )
        if entry is None:
            return
        twin, policy, skew_ms, info = entry
        ts_ms, received_ms = update.ts_ms, update.received_ms
        if ts_ms - received_ms > skew_ms:
            self._reject(
                out,
                "future_timestamp",
                f"device {device_id!r}: reading stamped {ts_ms - received_ms} ms after it was "
                f"received; the skew tolerance is {policy.skew_ms} ms (check the device clock)",
                update.source,
                received_ms,
                device_id,
                update,
            )
            return
        fields = info.fields
        clean: dict[str, Any] = {}
        problems: list[TwinRejected] | None = None
        for key, value in update.values.items():
            bounds = fields.get(key, _SLOW)
            if bounds is None:
                continue  # telemetry, not state
            if type(value) is float and bounds[0] <= value <= bounds[1]:
                clean[key] = value  # the common case: a finite float in range
                continue
            spec = info.specs.get(key)
            try:
                if spec is None:
                    info.model.property_spec(key)  # raises the unknown_property rejection
                else:
                    clean[key] = spec.check(value, where=key)
            except TwinRejected as exc:
                problems = problems or []
                problems.append(exc)
        if problems:
            self._reject_fields(update, problems, out)
        before = twin.delta(policy) if twin.desired else None
        if twin.last_seen_ms is None or received_ms > twin.last_seen_ms:
            twin.last_seen_ms = received_ms
        if twin.due_s is None and info.heartbeat_ms is not None:
            self._file(device_id, twin, info.heartbeat_ms)
        changed = twin.apply_reported(clean, ts_ms, update.source, policy) if clean else []
        if changed:
            # Readings of a model mostly change the same names: one shared list per
            # combination instead of one per change. A list per change outlived the
            # collector's young generations (it lives as long as the batch's output) and
            # the pile of them set off full collections, each walking every twin.
            names = info.names
            combination = tuple(changed)
            shared = names.get(combination)
            if shared is not None:
                changed = shared
            elif len(names) < _NAMES_MAX:
                names[combination] = changed
        if twin.skipped:
            self._count("superseded", twin.skipped)
        if not twin.online:
            twin.online = True
            self._count("online")
            self._emit(device_id, twin, ts_ms, now_ms, "online", changed, policy, out, before or {})
        elif before is None and not twin.sent:
            if changed:  # no desire, nothing commanded: only the new version goes out
                twin.version += 1
                out.changes.append(
                    TwinChange(
                        device_id,
                        twin.model,
                        twin.version,
                        ts_ms,
                        now_ms,
                        "reported",
                        changed,
                        twin.reported,
                        twin.desired,
                        {},
                        twin.r_ts,
                        twin.d_ts,
                        True,
                        twin.last_seen_ms,
                    )
                )
        elif changed or (before is not None and twin.delta(policy) != before):
            # a reading that repeats a value can still end a desire (latest_timestamp)
            self._emit(device_id, twin, ts_ms, now_ms, "reported", changed, policy, out)

    def _reject_fields(self, update: Reported, problems: list[TwinRejected], out: TwinOut) -> None:
        """One rejection for a reading's bad fields (its good ones were kept), counted per field."""
        for exc in problems:
            self._count(f"rejected.{exc.kind}")
        reason = f"device {update.device_id!r}: " + "; ".join(e.reason for e in problems)
        bad = {e.field: update.values.get(e.field or "") for e in problems}
        out.rejections.append(
            TwinRejection(
                problems[0].kind,
                reason,
                update.source,
                update.received_ms,
                update.device_id,
                None,
                _encode(bad),
            )
        )

    def _desired(self, update: DesiredChange, now_ms: int, out: TwinOut) -> None:
        device_id = update.device_id
        entry = self._entry(device_id, DESIRED_SOURCE, update.received_ms, out, update)
        if entry is None:
            return
        twin, policy = entry[0], entry[1]

        def reject(kind: str, reason: str) -> None:
            self._reject(
                out,
                kind,
                f"device {device_id!r}: {reason}",
                DESIRED_SOURCE,
                update.received_ms,
                device_id,
                update,
            )

        if update.base_version is not None and update.base_version != twin.version:
            reject(
                "version_conflict",
                f"desired change based on version {update.base_version}, but the twin is at "
                f"version {twin.version}; read the twin and retry",
            )
            return
        if update.ts_ms - update.received_ms > policy.skew_ms:
            reject(
                "future_timestamp",
                f"desired change stamped {update.ts_ms - update.received_ms} ms after it was "
                f"received; the skew tolerance is {policy.skew_ms} ms",
            )
            return
        model = self._infos[twin.model].model
        clean: dict[str, Any] = {}
        problems: list[TwinRejected] = []
        for key, value in update.values.items():
            try:
                if value is None:  # clears the desire: the property must exist and be writable
                    if not model.property_spec(key).writable:
                        model.check_desired(key, value)
                    clean[key] = None
                else:
                    clean[key] = model.check_desired(key, value)
            except TwinRejected as exc:
                problems.append(exc)
        if not problems:
            try:
                model.commands_for({k: v for k, v in clean.items() if v is not None})
            except TwinRejected as exc:
                problems.append(exc)
        if problems:
            reject(problems[0].kind, "; ".join(e.reason for e in problems) + " (nothing applied)")
            return
        before = twin.delta(policy)
        changed = twin.apply_desired(clean, update.ts_ms, update.source, policy)
        if twin.skipped:
            self._count("superseded", twin.skipped)
        # the same value from a stronger source or a newer stamp can put a desire in force
        if changed or twin.delta(policy) != before:
            self._emit(device_id, twin, update.ts_ms, now_ms, "desired", changed, policy, out)

    # -- changes, commands, timers -------------------------------------------------

    def _file(self, device_id: str, twin: TwinState, heartbeat_ms: int) -> None:
        """File the device's staleness check at the whole second its heartbeat runs out.

        Lazily: a reading does not move the check; the check, when due, files
        the device again if it was heard from meanwhile. So a device is
        refiled at most once per heartbeat, not once per reading.
        """
        second = -(-(twin.last_seen_ms + heartbeat_ms) // 1000)  # type: ignore[operator]
        bucket = self._due.get(second)
        if bucket is None:
            bucket = self._due[second] = set()
            heapq.heappush(self._due_heap, second)
        bucket.add(device_id)
        twin.due_s = second

    def _emit(
        self,
        device_id: str,
        twin: TwinState,
        ts_ms: int,
        now_ms: int,
        cause: str,
        changed: list[str],
        policy: Policy,
        out: TwinOut,
        reconnect: dict[str, Any] | None = None,
    ) -> None:
        change = twin.change(device_id, ts_ms, now_ms, cause, changed, policy)
        out.changes.append(change)
        delta = change.delta
        sent = twin.sent
        if sent:
            for key in [k for k, entry in sent.items() if delta.get(k, _NONE) != entry[0]]:
                del sent[key]
        if not twin.online:
            return
        if reconnect:
            # what the device missed while away, less what its reading shows done already
            todo = {k: v for k, v in reconnect.items() if twin.reported.get(k, _NONE) != v}
            todo.update({k: v for k, v in delta.items() if k not in todo and k not in sent})
        else:
            todo = {k: v for k, v in delta.items() if k not in sent}
        if todo:
            self._issue(device_id, twin, todo, now_ms, policy, out, attempt=1)

    def _issue(
        self,
        device_id: str,
        twin: TwinState,
        todo: dict[str, Any],
        now_ms: int,
        policy: Policy,
        out: TwinOut,
        attempt: int,
    ) -> None:
        model = self._infos[twin.model].model
        try:
            commands = model.commands_for(todo)
        except TwinRejected as exc:  # the model changed under a desired value: say so, send nothing
            self._reject(
                out,
                exc.kind,
                f"device {device_id!r}: {exc.reason}",
                DESIRED_SOURCE,
                now_ms,
                device_id,
                todo,
            )
            return
        ttl_ms = round(policy.command_ttl.total_seconds() * 1000)
        issued, expires = from_ms(now_ms), from_ms(now_ms + ttl_ms)
        for name, params in commands:
            command_id = f"twin/{device_id}/v{twin.version}/{name}"
            if attempt > 1:
                command_id += f"#{attempt}"
            out.commands.append(Command(command_id, device_id, name, params, issued, expires))
            for key in model.commands[name].expected_state(params):
                if key in todo:
                    twin.sent[key] = [todo[key], command_id, now_ms, attempt, False]
        self._count("commands", len(commands))
        heal_ms = round(policy.heal_after.total_seconds() * 1000)
        heapq.heappush(self._heal, (now_ms + heal_ms, device_id))

    def _check_stale(self, device_id: str, now_ms: int, out: TwinOut) -> None:
        twin = self.twins.get(device_id)
        if twin is None:
            return
        twin.due_s = None
        hb = self._infos[twin.model].heartbeat_ms
        if not twin.online or twin.last_seen_ms is None or hb is None:
            return
        if twin.last_seen_ms + hb > now_ms:  # heard from since it was filed: file again
            self._file(device_id, twin, hb)
            return
        twin.online = False
        twin.sent.clear()  # it may have missed them: the whole delta goes again on reconnect
        self._count("offline")
        self._emit(device_id, twin, now_ms, now_ms, "offline", [], self._policy_of(device_id), out)

    def _check_consistency(self, device_id: str, now_ms: int, out: TwinOut) -> None:
        twin = self.twins.get(device_id)
        if twin is None or not twin.sent:
            return
        policy = self._policy_of(device_id)
        heal_ms = round(policy.heal_after.total_seconds() * 1000)
        delta = twin.delta(policy)
        overdue = {}
        for key, (value, command_id, issued_ms, attempts, reported_bad) in twin.sent.items():
            if reported_bad or issued_ms + heal_ms > now_ms or delta.get(key, _NONE) != value:
                continue
            overdue[key] = (value, command_id, attempts)
        if not overdue:
            return
        attempts = max(a for _, _, a in overdue.values())
        if policy.healing == "auto" and attempts < policy.heal_attempts and twin.online:
            self._count("healed")
            self._issue(
                device_id,
                twin,
                {k: v[0] for k, v in overdue.items()},
                now_ms,
                policy,
                out,
                attempts + 1,
            )
            return
        for key, (value, command_id, tries) in overdue.items():
            twin.sent[key][4] = True
            self._count("inconsistent")
            out.detections.append(
                Detection(
                    INCONSISTENT_RULE,
                    device_id,
                    from_ms(now_ms),
                    details={
                        "property": key,
                        "commanded": value,
                        "reported": twin.reported.get(key),
                        "command_id": command_id,
                        "attempts": tries,
                        "healing": policy.healing,
                    },
                )
            )

    # -- recovery ------------------------------------------------------------------

    def _resume(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            msg = (
                f"recovered twin state was made under other twin models or policies "
                f"({state.get('fingerprint')} != {self.fingerprint}); start with a fresh "
                "recovery store (IOTFLOW_RECOVERY_DIR) for the changed registry, or restore "
                "the previous registry file"
            )
            raise ConfigError(msg)
        self._counts = dict(state["counters"])
        self._changes = self._counts.pop("changes", 0)
        for device_id, data in state["twins"].items():
            twin = TwinState.restore(data)
            device = self.registry._lookup(device_id)
            if device is None or device.model != twin.model:
                self._count("dropped_on_resume")
                continue
            self.twins[device_id] = twin
            twin.due_s = None
            heartbeat_ms = self._infos[twin.model].heartbeat_ms
            if twin.online and twin.last_seen_ms is not None and heartbeat_ms is not None:
                self._file(device_id, twin, heartbeat_ms)
        self._heal = [tuple(item) for item in state["heal"] if item[1] in self.twins]  # type: ignore[misc]
        heapq.heapify(self._heal)


def _encode(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError):
        return repr(value).encode()
