"""Consumer groups: the classic join/sync/heartbeat protocol, one coordinator.

A group moves Empty -> PreparingRebalance -> CompletingRebalance -> Stable as
Kafka's does. A rebalance completes when every known member has rejoined or
the longest rebalance timeout passed (members that did not rejoin are
dropped); the leader's SyncGroup hands out the assignments. A member whose
session timeout passes without a heartbeat is removed and the others are
told to rejoin (REBALANCE_IN_PROGRESS on their next heartbeat). Unlike
Kafka, a new group does not wait ``group.initial.rebalance.delay.ms``
before its first rebalance; there are no static members.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["GroupCoordinator", "JoinResult"]

NONE = 0
ILLEGAL_GENERATION = 22
INCONSISTENT_GROUP_PROTOCOL = 23
UNKNOWN_MEMBER_ID = 25
REBALANCE_IN_PROGRESS = 27


class GroupState(Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"


@dataclass(frozen=True)
class JoinResult:
    error: int
    generation: int = -1
    protocol: str = ""
    leader: str = ""
    member_id: str = ""
    members: tuple[tuple[str, bytes], ...] = ()


@dataclass
class _Member:
    member_id: str
    protocols: list[tuple[str, bytes]]
    session_timeout_s: float
    rebalance_timeout_s: float
    last_seen: float
    joining: asyncio.Future[JoinResult] | None = None
    syncing: asyncio.Future[tuple[int, bytes]] | None = None


@dataclass
class _Group:
    group_id: str
    protocol_type: str = ""
    state: GroupState = GroupState.EMPTY
    generation: int = 0
    leader: str = ""
    protocol: str = ""
    members: dict[str, _Member] = field(default_factory=dict)
    assignments: dict[str, bytes] = field(default_factory=dict)
    deadline: asyncio.TimerHandle | None = None


class GroupCoordinator:
    """Every group of one broker; call ``expire()`` periodically to drop silent members."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._groups: dict[str, _Group] = {}
        self._clock = clock
        self._ids = itertools.count(1)

    def has_members(self, group_id: str) -> bool:
        group = self._groups.get(group_id)
        return group is not None and bool(group.members)

    def generation_ok(self, group_id: str, generation: int, member_id: str) -> int:
        """The error for an offset commit from this member and generation (simple consumers pass -1)."""
        group = self._groups.get(group_id)
        if group is None or not group.members:
            return NONE if generation < 0 else ILLEGAL_GENERATION
        if member_id not in group.members:
            return UNKNOWN_MEMBER_ID
        if generation != group.generation:
            return ILLEGAL_GENERATION
        return NONE

    async def join(
        self,
        group_id: str,
        member_id: str,
        protocol_type: str,
        protocols: list[tuple[str, bytes]],
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
    ) -> JoinResult:
        group = self._groups.setdefault(group_id, _Group(group_id))
        if group.members and protocol_type != group.protocol_type:
            return JoinResult(INCONSISTENT_GROUP_PROTOCOL)
        if member_id and member_id not in group.members:
            return JoinResult(UNKNOWN_MEMBER_ID)
        if group.members and not self._common_protocol(group, protocols):
            return JoinResult(INCONSISTENT_GROUP_PROTOCOL)
        if not member_id:
            member_id = f"member-{next(self._ids)}"
        group.protocol_type = protocol_type
        member = group.members.get(member_id)
        if member is None:
            member = group.members[member_id] = _Member(
                member_id,
                protocols,
                session_timeout_ms / 1000,
                rebalance_timeout_ms / 1000,
                self._clock(),
            )
        member.protocols = protocols
        member.last_seen = self._clock()
        if member.joining is not None and not member.joining.done():
            member.joining.set_result(JoinResult(UNKNOWN_MEMBER_ID))  # replaced by this join
        member.joining = asyncio.get_running_loop().create_future()
        future = member.joining
        self._prepare_rebalance(group)
        self._maybe_complete_join(group)
        return await future

    async def sync(
        self, group_id: str, generation: int, member_id: str, assignments: list[tuple[str, bytes]]
    ) -> tuple[int, bytes]:
        group = self._groups.get(group_id)
        if group is None or member_id not in group.members:
            return UNKNOWN_MEMBER_ID, b""
        if generation != group.generation:
            return ILLEGAL_GENERATION, b""
        if group.state is GroupState.PREPARING_REBALANCE:
            return REBALANCE_IN_PROGRESS, b""
        member = group.members[member_id]
        member.last_seen = self._clock()
        if group.state is GroupState.STABLE:
            return NONE, group.assignments.get(member_id, b"")
        member.syncing = asyncio.get_running_loop().create_future()
        future = member.syncing
        if member_id == group.leader:
            group.assignments = dict(assignments)
            group.state = GroupState.STABLE
            for other in group.members.values():
                if other.syncing is not None and not other.syncing.done():
                    other.syncing.set_result((NONE, group.assignments.get(other.member_id, b"")))
        return await future

    def heartbeat(self, group_id: str, generation: int, member_id: str) -> int:
        group = self._groups.get(group_id)
        if group is None or member_id not in group.members:
            return UNKNOWN_MEMBER_ID
        group.members[member_id].last_seen = self._clock()
        if group.state is GroupState.PREPARING_REBALANCE:
            return REBALANCE_IN_PROGRESS
        if generation != group.generation:
            return ILLEGAL_GENERATION
        return NONE

    def leave(self, group_id: str, member_id: str) -> int:
        group = self._groups.get(group_id)
        if group is None or member_id not in group.members:
            return UNKNOWN_MEMBER_ID
        self._remove(group, member_id)
        return NONE

    def expire(self) -> None:
        """Remove members whose session timed out; the rest rebalance."""
        now = self._clock()
        for group in list(self._groups.values()):
            for member in list(group.members.values()):
                if member.member_id not in group.members:
                    continue
                waiting = member.joining is not None and not member.joining.done()
                if not waiting and now - member.last_seen > member.session_timeout_s:
                    self._remove(group, member.member_id)

    def describe(self, group_id: str) -> tuple[str, str, list[str]]:
        """(state, protocol, member ids) of a group, for tests and logs."""
        group = self._groups.get(group_id) or _Group(group_id)
        return group.state.value, group.protocol, sorted(group.members)

    # -- internals ----------------------------------------------------------------

    def _remove(self, group: _Group, member_id: str) -> None:
        member = group.members.pop(member_id)
        if member.joining is not None and not member.joining.done():
            member.joining.set_result(JoinResult(UNKNOWN_MEMBER_ID))
        if member.syncing is not None and not member.syncing.done():
            member.syncing.set_result((UNKNOWN_MEMBER_ID, b""))
        if not group.members:
            self._cancel_deadline(group)
            group.state, group.leader, group.assignments = GroupState.EMPTY, "", {}
            group.generation += 1
            return
        self._prepare_rebalance(group)
        self._maybe_complete_join(group)

    def _prepare_rebalance(self, group: _Group) -> None:
        if group.state is GroupState.PREPARING_REBALANCE:
            return
        for member in group.members.values():  # a sync waiting on the old generation must rejoin
            if member.syncing is not None and not member.syncing.done():
                member.syncing.set_result((REBALANCE_IN_PROGRESS, b""))
        group.state = GroupState.PREPARING_REBALANCE
        timeout = max(m.rebalance_timeout_s for m in group.members.values())
        loop = asyncio.get_running_loop()
        group.deadline = loop.call_later(timeout, self._complete_join, group)

    def _maybe_complete_join(self, group: _Group) -> None:
        if group.state is GroupState.PREPARING_REBALANCE and all(
            m.joining is not None and not m.joining.done() for m in group.members.values()
        ):
            self._complete_join(group)

    def _complete_join(self, group: _Group) -> None:
        self._cancel_deadline(group)
        for member in list(group.members.values()):  # who did not rejoin in time is out
            if member.joining is None or member.joining.done():
                group.members.pop(member.member_id)
        if not group.members:
            group.state, group.leader, group.assignments = GroupState.EMPTY, "", {}
            return
        group.generation += 1
        group.protocol = self._common_protocol(group, None) or ""
        if group.leader not in group.members:
            group.leader = next(iter(group.members))
        group.state = GroupState.COMPLETING_REBALANCE
        group.assignments = {}
        everyone = tuple(
            (m.member_id, dict(m.protocols).get(group.protocol, b""))
            for m in group.members.values()
        )
        now = self._clock()
        for member in group.members.values():
            member.last_seen = now  # the session runs from the join response on
            assert member.joining is not None
            member.joining.set_result(
                JoinResult(
                    NONE,
                    group.generation,
                    group.protocol,
                    group.leader,
                    member.member_id,
                    everyone if member.member_id == group.leader else (),
                )
            )

    @staticmethod
    def _common_protocol(group: _Group, extra: list[tuple[str, bytes]] | None) -> str | None:
        """The first protocol, in the leader's (or first member's) order, that every member speaks."""
        lists = [[name for name, _ in m.protocols] for m in group.members.values()]
        if extra is not None:
            lists.append([name for name, _ in extra])
        if not lists:
            return None
        first = group.members.get(group.leader) or next(iter(group.members.values()), None)
        order = [name for name, _ in first.protocols] if first else lists[0]
        for name in order:
            if all(name in names for names in lists):
                return name
        return None

    @staticmethod
    def _cancel_deadline(group: _Group) -> None:
        if group.deadline is not None:
            group.deadline.cancel()
            group.deadline = None
