"""Drop the ingest bridge's redelivered duplicates of device messages, before any window.

Why there are duplicates: the bridge (``connectors.bridge``) is at least once.
Killed after Kafka took a record but before its PUBACK reached the MQTT
broker, it leaves the broker to resend the message to the next bridge on the
same session, and the reading lands on ``{prefix}.ingest`` twice: a window
would count it twice. The bridge marks every record that may repeat an
earlier one (header ``redelivered``: the broker's DUP flag, or a retried
Kafka delivery). ``RedeliveryFilter`` drops a marked record when it has seen
the same device message before. ``connectors.ingest.DedupedIngest`` runs one
per Kafka partition of the ingest topic, in ``device_messages``'s Kafka path,
so the telemetry, monitoring and twins flows get it alike; the bridge keys a
record by its device, so a message and its redelivery share a partition.

What counts as the same message: the same MQTT delivery (the bridge's
session and the packet id, header ``mqtt_delivery``), the same topic (so the
same device) and the same payload, byte for byte. A broker's resend is the
same PUBLISH on the same session with its original packet id (MQTT 5, 4.4),
so all three are identical; its receive time is not (the next bridge
receives it later), so that is no part of the key. The mark alone is not
enough: Mosquitto marks everything it had sent to the dead connection
(measured: about 4,000 marked records per bridge kill, 7 % of them
duplicates; the rest never reached Kafka before); and the payload alone is
not either: a device may send the same bytes on
purpose (a heartbeat without a timestamp). Unmarked records are never
dropped. The one way to lose a reading: a marked record whose original
never reached Kafka while the message that held its packet id one cycle
(65,535 messages of the session) earlier had the same topic and bytes and is
still remembered: only a device that repeats payloads byte for byte can
meet it, and a horizon under 65,535 / (ingest partitions) messages (the
default: 16,384 with 3 partitions) rules it out for a session that carries
the whole ingest.

Memory is bounded: each partition remembers the 64-bit digests (BLAKE2b) of
its last ``capacity`` messages, 8 bytes each, kept in a few immutable byte
strings that are also the snapshot. The horizon is a number
of messages, not a time: receive times jump over a bridge outage (the resent
copy is stamped when the bridge is back), while the distance from an
original to its redelivery is what that bridge had in flight (its receive
maximum plus the broker's resend burst) plus whatever other bridges sharing
the subscription forwarded meanwhile. A redelivery arriving more than
``capacity`` messages of its partition after its original gets through.
While marked records come (a resumed session resends its whole backlog
marked), an index of the remembered digests answers lookups; it is rebuilt
from the digests when needed and dropped once a horizon passes unmarked.

Collisions: a marked record is dropped wrongly only when its digest equals one
of the at most ``capacity`` remembered digests of its partition without being
the same message: a chance of at most ``capacity / 2**64`` per marked record
(16,384 / 1.8e19, about 1e-15; a billion redeliveries, about 1e-6).
Collisions among unmarked records cost nothing: those are never dropped.

State is plain data, snapshotted with the flow's recovery store: a flow
restarted from a snapshot remembers what it had seen then, and the input it
replays from there meets the same state, so a redelivery arriving after a
restart is dropped all the same.

Example::

    >>> from iotflow.events import DeviceMessage
    >>> f = RedeliveryFilter(capacity=1000)
    >>> first = DeviceMessage("b/devices/d1/telemetry", b'{"t": 1}', 100)
    >>> resent = DeviceMessage("b/devices/d1/telemetry", b'{"t": 1}', 900)
    >>> heartbeat = DeviceMessage("b/devices/d1/telemetry", b'{"t": 1}', 950)
    >>> [m.received_ms for m in f.keep([first])]
    [100]
    >>> [m.received_ms for m in f.keep([resent, heartbeat], redelivered=[0])]
    [950]
    >>> f.counts["duplicates"]
    1
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from hashlib import blake2b
from typing import Any

from connectors.bridge import IngestBatch, unwrap_records
from iotflow.errors import ConfigError
from iotflow.events import DeviceMessage

__all__ = ["DEFAULT_CAPACITY", "RedeliveryFilter", "message_digests"]

DEFAULT_CAPACITY = 16_384  # messages remembered (per ingest partition)
_LAYOUT = 1  # of the snapshot; another one is refused, never misread
_DIGEST_BYTES = 8


def message_digests(
    messages: Sequence[DeviceMessage], deliveries: Sequence[bytes] | None = None
) -> list[bytes]:
    """The 8-byte BLAKE2b digest of each message's delivery (``b""`` when unknown), topic
    and payload; never its receive time.

    The same in every process (a snapshot restored elsewhere still matches).
    Neither a delivery name nor an MQTT topic holds U+0000, so the separators
    make the triple unambiguous.
    """
    if deliveries is None:
        deliveries = [b""] * len(messages)
    return [
        blake2b(
            d + b"\0" + m.topic.encode() + b"\0" + m.payload, digest_size=_DIGEST_BYTES
        ).digest()
        for m, d in zip(messages, deliveries, strict=True)
    ]


def _numbered(chunk: bytes, start: int) -> Iterator[tuple[int, int]]:
    """(digest as a native int, position) for each digest of a chunk, from ``start``."""
    digests = memoryview(chunk).cast("Q")
    return zip(digests, range(start, start + len(digests)), strict=True)


class RedeliveryFilter:
    """Drops marked device messages already seen among the last ``capacity`` of a stream.

    ``on_batch(records)`` unwraps ingest records (``connectors.bridge.unwrap_records``
    with ``accept``) and returns one ``IngestBatch`` without the duplicates
    (counted in its ``duplicates``); ``keep(messages, redelivered, deliveries)``
    is the same on device messages. Order is kept. ``counts`` (``messages``,
    ``redelivered``, ``duplicates``) only grow and survive a restart.
    ``resume_state`` is a ``snapshot()``; another layout raises ``ConfigError``.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        accept: Callable[[str], bool] | None = None,
        resume_state: dict[str, Any] | None = None,
    ) -> None:
        if capacity < 1:
            msg = f"capacity {capacity} must be at least 1 (messages remembered per partition)"
            raise ConfigError(msg)
        self.capacity = capacity
        self._accept = accept
        # Digests, oldest first, in immutable chunks: a snapshot copies no digest,
        # and forgetting drops whole chunks from the left.
        self._chunks: deque[bytes] = deque()
        self._remembered = 0
        self._end = 0  # position (a running count) just past the newest digest
        self._chunk_max = max(1, capacity // 16) * _DIGEST_BYTES
        # Only while redelivered records come (the broker resends a whole backlog with DUP
        # after a bridge restart): each digest, as a native int, -> the position of its
        # newest copy; one older than the oldest remembered is forgotten (stale entries are
        # left in place and cleared by a rebuild at twice the capacity). Built from the
        # chunks, dropped once `capacity` messages passed without a mark; never snapshotted.
        self._index: dict[int, int] | None = None
        self._unmarked_run = 0
        self.counts = {"messages": 0, "redelivered": 0, "duplicates": 0}
        if resume_state is not None:
            self._resume(resume_state)

    def _resume(self, state: dict[str, Any]) -> None:
        layout = state.get("layout") if isinstance(state, dict) else None
        if layout != _LAYOUT:
            msg = (
                f"the recovered ingest de-duplication state has layout {layout!r}, this "
                f"version reads layout {_LAYOUT}; resume with the version that wrote the "
                "recovery store, or point IOTFLOW_RECOVERY_DIR at a new directory"
            )
            raise ConfigError(msg)
        chunks = state["digests"]
        if state["capacity"] != self.capacity:
            # Resized (IOTFLOW_INGEST_DEDUPE_RECORDS changed): keep the newest `capacity`.
            joined = b"".join(chunks)[-self.capacity * _DIGEST_BYTES :]
            chunks = [joined] if joined else []
        self._chunks.extend(chunks)
        self._remembered = self._end = sum(len(c) for c in self._chunks) // _DIGEST_BYTES
        self.counts.update(state["counts"])

    def on_batch(self, records: list[Any]) -> list[IngestBatch]:
        """Ingest records of one partition -> one ``IngestBatch`` without redelivered duplicates."""
        batch = unwrap_records(records, self._accept)
        before = len(batch.messages)
        batch.messages = self.keep(batch.messages, batch.redelivered, batch.deliveries)
        batch.duplicates = before - len(batch.messages)
        # Both were per message before filtering.
        batch.redelivered, batch.deliveries = [], []
        return [batch]

    def keep(
        self,
        messages: Sequence[DeviceMessage],
        redelivered: Sequence[int] = (),
        deliveries: Sequence[bytes] | None = None,
    ) -> list[DeviceMessage]:
        """The messages to pass on, in order: all but the ``redelivered`` ones (indices,
        ascending) already seen, earlier in this call or among the remembered.
        ``deliveries`` holds each message's delivery name (``mqtt_delivery``).
        Every message is remembered, dropped ones too (a second redelivery of the
        same message must still find it)."""
        digests = message_digests(messages, deliveries)
        self.counts["messages"] += len(digests)
        kept = messages if isinstance(messages, list) else list(messages)
        if redelivered:
            self._unmarked_run = 0
            self.counts["redelivered"] += len(redelivered)
            seen = self._seen_before(digests, redelivered)
            if seen:
                kept = [m for i, m in enumerate(messages) if i not in seen]
                self.counts["duplicates"] += len(seen)
        else:
            self._unmarked_run += len(digests)
            if self._unmarked_run >= self.capacity:
                self._index = None  # no redelivery within the whole horizon: free it
        self._remember(digests)
        return kept

    def _seen_before(self, digests: list[bytes], redelivered: Sequence[int]) -> set[int]:
        """Indices of the redelivered digests seen earlier in ``digests`` or remembered."""
        # Each digest -> its first index in the batch (built backwards: earlier ones win).
        first = dict(zip(reversed(digests), range(len(digests) - 1, -1, -1), strict=True))
        index = self._index if self._index is not None else self._build_index()
        get, order, oldest = index.get, sys.byteorder, self._end - self._remembered
        return {
            i
            for i in redelivered
            if first[digests[i]] < i or get(int.from_bytes(digests[i], order), -1) >= oldest
        }

    def _build_index(self) -> dict[int, int]:
        index: dict[int, int] = {}
        position = self._end - self._remembered
        for chunk in self._chunks:
            n = len(chunk) // _DIGEST_BYTES
            # Later copies overwrite earlier ones: each digest maps to its newest position.
            index.update(_numbered(chunk, position))
            position += n
        self._index = index
        return index

    def _remember(self, digests: list[bytes]) -> None:
        if not digests:
            return
        new = b"".join(digests)
        if self._chunks and len(self._chunks[-1]) < self._chunk_max:
            self._chunks[-1] += new  # a new bytes object: snapshots taken stay as they were
        else:
            self._chunks.append(new)
        self._end += len(digests)
        self._remembered += len(digests)
        self._forget()
        if self._index is not None:
            if len(self._index) + len(digests) > 2 * self.capacity:
                self._build_index()  # sheds the stale entries
            else:
                self._index.update(_numbered(new, self._end - len(digests)))

    def _forget(self) -> None:
        """Drop the oldest chunks while the rest still holds ``capacity`` digests."""
        while len(self._chunks) > 1:
            oldest = len(self._chunks[0]) // _DIGEST_BYTES
            if self._remembered - oldest < self.capacity:
                break
            self._chunks.popleft()
            self._remembered -= oldest

    @property
    def remembered(self) -> int:
        """How many digests are held now (``capacity`` up to one chunk more, once full)."""
        return self._remembered

    def snapshot(self) -> dict[str, Any]:
        """Plain data: the layout, the capacity, the digests (byte strings, oldest first)
        and the counts."""
        return {
            "layout": _LAYOUT,
            "capacity": self.capacity,
            "digests": list(self._chunks),
            "counts": dict(self.counts),
        }
