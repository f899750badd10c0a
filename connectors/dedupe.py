"""Drop duplicates by natural key when reading the project's own Kafka topics.

The cloud path is at least once: the bridge may forward a message twice, and
a flow resumed from its recovery store re-sends the outputs of the epoch it
resumes (Bytewax's ``KafkaSink``). Every output carries its natural key, so a
reader that keeps the first record per key sees each result once:

==========================  ==============================================
topic                       natural key
==========================  ==============================================
``{prefix}.aggregates``     (key, metric, window_start)
``{prefix}.twins``          (device_id, version)
``{prefix}.commands.events``  (command_id, kind, ts): a lifecycle step; a
                            command may be SENT again after RETRIED, with
                            a new ts, and that is a new event. A terminal
                            event (done, failed, expired, rejected) is
                            keyed (command_id, "end"): a command ends
                            once, and a flow resumed after a crash may
                            reach that end again at a later ts (an ack
                            or retained state it reads again)
``{prefix}.commands.requests``  command_id
==========================  ==============================================

A replayed record is the same record (the flow recomputes it from the same
state and input), so keeping the first is keeping the only one. Memory is
bounded: a ``Deduper`` remembers the last ``max_keys`` keys (replays are
close to the original: at most one snapshot interval apart). A record whose
value is not JSON or lacks a key field is kept and counted as ``unkeyed``,
never dropped silently. DuckDB writes need none of this: they upsert.

Example::

    >>> d = Deduper(aggregate_key)
    >>> rows = [
    ...     {"key": "d1", "metric": "t", "window_start": "2026-01-01T00:00:00Z", "count": 2},
    ...     {"key": "d1", "metric": "t", "window_start": "2026-01-01T00:00:00+00:00", "count": 2},
    ...     {"key": "d1", "metric": "t", "window_start": "2026-01-01T00:01:00Z", "count": 1},
    ... ]
    >>> [r["count"] for r in d.filter(rows)], d.dropped
    ([2, 1], 1)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

from iotflow.errors import ConfigError
from iotflow.events import TERMINAL_EVENT_KINDS

__all__ = [
    "DedupeResult",
    "Deduper",
    "aggregate_key",
    "command_event_key",
    "command_key",
    "dedupe_records",
    "key_for_topic",
    "twin_key",
]

T = TypeVar("T")

_json = msgspec.json.Decoder()


def _field(item: Any, name: str) -> Any:
    if isinstance(item, dict):
        return item[name]
    try:
        return getattr(item, name)
    except AttributeError:
        raise KeyError(name) from None


def _instant(value: Any) -> Any:
    """A timestamp as epoch microseconds, whatever its spelling (``Z``/``+00:00``, datetime)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime) and value.tzinfo is not None:
        return round(value.timestamp() * 1_000_000)
    return value


def aggregate_key(item: Any) -> tuple[Any, ...]:
    """(key, metric, window_start) of a window result (a dict or a ``WindowResult``)."""
    return (
        _field(item, "key"),
        _field(item, "metric"),
        _instant(_field(item, "window_start")),
    )


def twin_key(item: Any) -> tuple[Any, ...]:
    """(device_id, version) of a twin state change."""
    return (_field(item, "device_id"), _field(item, "version"))


def command_event_key(item: Any) -> tuple[Any, ...]:
    """(command_id, kind, ts) of a command lifecycle event; (command_id, "end") of its end."""
    command_id, kind = _field(item, "command_id"), str(_field(item, "kind"))
    if kind in TERMINAL_EVENT_KINDS:
        return (command_id, "end")
    return (command_id, kind, _instant(_field(item, "ts")))


def command_key(item: Any) -> Hashable:
    """command_id of a command request."""
    return _field(item, "command_id")


_BY_SUFFIX: dict[str, Callable[[Any], Hashable]] = {
    "aggregates": aggregate_key,
    "twins": twin_key,
    "commands.events": command_event_key,
    "commands.requests": command_key,
}


def key_for_topic(topic: str, prefix: str) -> Callable[[Any], Hashable]:
    """The natural-key function of one of the project's topics; ``ConfigError`` otherwise."""
    suffix = topic[len(prefix) + 1 :] if topic.startswith(f"{prefix}.") else topic
    key = _BY_SUFFIX.get(suffix)
    if key is None:
        known = ", ".join(f"{prefix}.{s}" for s in _BY_SUFFIX)
        msg = f"{topic!r} has no natural key to de-duplicate on; topics that do: {known}"
        raise ConfigError(msg)
    return key


class Deduper(Generic[T]):
    """Keeps the first item per natural key among the last ``max_keys`` keys seen.

    ``kept``, ``dropped`` and ``unkeyed`` (items whose key could not be read:
    kept) count what passed through.
    """

    def __init__(self, key: Callable[[T], Hashable], max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ConfigError(f"max_keys {max_keys} must be at least 1")
        self._key = key
        self._max = max_keys
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self.kept = 0
        self.dropped = 0
        self.unkeyed = 0

    def is_new(self, item: T) -> bool:
        """True the first time a key shows up (and for items without a readable key)."""
        try:
            k = self._key(item)
            hash(k)
        except (KeyError, TypeError, AttributeError):
            self.unkeyed += 1
            self.kept += 1
            return True
        if k in self._seen:
            self._seen.move_to_end(k)
            self.dropped += 1
            return False
        self._seen[k] = None
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)
        self.kept += 1
        return True

    def filter(self, items: Iterable[T]) -> Iterator[T]:
        """The items whose key is new, in order."""
        for item in items:
            if self.is_new(item):
                yield item


@dataclass(frozen=True)
class DedupeResult(Generic[T]):
    """Records kept (first per key, in order) and how many were dropped or unkeyed."""

    kept: list[T]
    dropped: int
    unkeyed: int


def dedupe_records(records: Iterable[T], key: Callable[[Any], Hashable]) -> DedupeResult[T]:
    """De-duplicate Kafka records (anything with a JSON ``value``) by ``key`` of their value."""
    deduper: Deduper[Any] = Deduper(key)
    kept: list[T] = []
    for record in records:
        value = getattr(record, "value", None)
        try:
            doc = _json.decode(value) if value is not None else None
        except (msgspec.DecodeError, TypeError):
            doc = None
        if deduper.is_new(doc if doc is not None else {}):
            kept.append(record)
    return DedupeResult(kept, deduper.dropped, deduper.unkeyed)
