"""Topic names, topic filters and the subscription tree (MQTT 5 section 4.7 and 4.8.2).

``+`` matches one whole level (an empty one too), ``#`` the rest of the topic
including the parent level (``a/#`` matches ``a``). A topic whose first level
starts with ``$`` is not matched by a filter starting with ``+`` or ``#``.
``$share/{group}/{filter}`` is a shared subscription: each matching message
goes to one member of the group, round robin, preferring members online.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "SharedGroup",
    "SubOptions",
    "SubscriptionTree",
    "filter_matches",
    "parse_filter",
    "topic_name_error",
]

_SHARE = "$share/"


class SubOptions(NamedTuple):
    """A subscription's options (qos is the granted one)."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


def topic_name_error(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None when it can."""
    if not topic:
        return "empty topic name"
    if "+" in topic or "#" in topic:
        return f"topic name {topic!r} contains a wildcard; wildcards belong in SUBSCRIBE filters"
    return None


def parse_filter(text: str) -> tuple[str | None, str]:
    """``(share_group, filter)``; raise ValueError naming the problem for an invalid filter."""
    group = None
    flt = text
    if text.startswith(_SHARE):
        group, sep, flt = text[len(_SHARE) :].partition("/")
        if not group or "+" in group or "#" in group or not sep:
            msg = f"shared subscription {text!r} must look like $share/<group>/<filter>"
            raise ValueError(msg)
    if not flt:
        raise ValueError(f"empty topic filter in {text!r}")
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"filter {text!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"filter {text!r}: '+' must be a whole level")
    return group, flt


def filter_matches(flt: str, topic: str) -> bool:
    """Whether the (non-shared, valid) filter matches the topic name."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    f_levels = flt.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


class SharedGroup:
    """The members of one ``$share/{group}/{filter}``; hands out messages round robin."""

    __slots__ = ("_next", "members", "order")

    def __init__(self) -> None:
        self.members: dict[str, SubOptions] = {}
        self.order: list[str] = []
        self._next = 0

    def pick(self, online: Callable[[str], bool]) -> tuple[str, SubOptions]:
        """The next member, skipping offline ones unless every member is offline."""
        n = len(self.order)
        start = self._next % n
        for step in range(n):
            client_id = self.order[(start + step) % n]
            if online(client_id):
                self._next = start + step + 1
                return client_id, self.members[client_id]
        self._next = start + 1
        client_id = self.order[start]
        return client_id, self.members[client_id]


class _Node:
    __slots__ = ("children", "shared", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[str, SubOptions] = {}
        self.shared: dict[str, SharedGroup] = {}


Match = tuple[list[tuple[str, SubOptions]], list[SharedGroup]]
_CACHE_LIMIT = 10_000


class SubscriptionTree:
    """Subscriptions by filter level; ``match(topic)`` is cached until the next change."""

    def __init__(self) -> None:
        self._root = _Node()
        self._cache: dict[str, Match] = {}

    def add(self, group: str | None, flt: str, client_id: str, opts: SubOptions) -> bool:
        """Add or replace a subscription; True when it existed before."""
        self._cache.clear()
        node = self._root
        for level in flt.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if group is None:
            existed = client_id in node.subs
            node.subs[client_id] = opts
            return existed
        shared = node.shared.get(group)
        if shared is None:
            shared = node.shared[group] = SharedGroup()
        existed = client_id in shared.members
        if not existed:
            shared.order.append(client_id)
        shared.members[client_id] = opts
        return existed

    def remove(self, group: str | None, flt: str, client_id: str) -> bool:
        """Remove a subscription (pruning empty branches); True when it existed."""
        self._cache.clear()
        path = [self._root]
        levels = flt.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        if group is None:
            existed = node.subs.pop(client_id, None) is not None
        else:
            shared = node.shared.get(group)
            existed = shared is not None and shared.members.pop(client_id, None) is not None
            if existed and shared is not None:
                shared.order.remove(client_id)
                if not shared.order:
                    del node.shared[group]
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.children or node.subs or node.shared:
                break
            del path[depth - 1].children[levels[depth - 1]]
        return existed

    def match(self, topic: str) -> Match:
        """The plain subscriptions (client id, options) and the shared groups matching topic."""
        found = self._cache.get(topic)
        if found is not None:
            return found
        subs: list[tuple[str, SubOptions]] = []
        groups: list[SharedGroup] = []

        def collect(node: _Node) -> None:
            if node.subs:
                subs.extend(node.subs.items())
            if node.shared:
                groups.extend(node.shared.values())

        levels = topic.split("/")
        depth = len(levels)
        dollar = topic.startswith("$")
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            children = node.children
            if i == depth:
                collect(node)
                hash_node = children.get("#")
                if hash_node is not None:
                    collect(hash_node)
                continue
            if not (dollar and i == 0):
                hash_node = children.get("#")
                if hash_node is not None:
                    collect(hash_node)
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        found = self._cache[topic] = (subs, groups)
        return found
