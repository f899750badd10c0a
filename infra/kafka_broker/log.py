"""One partition's log: record batches kept as the producer sent them, in memory.

A batch (magic 2) is stored whole with its base offset rewritten, which the
batch CRC does not cover, so a fetch returns the stored bytes as they are. The
log is bounded in bytes: past ``retention_bytes`` the oldest batches go and
the log start offset moves on. Idempotent producers are checked per producer
id: a resent batch (same epoch and sequence range as one of the last five)
is answered with its first offset and not appended again; a gap in the
sequence is refused with OUT_OF_ORDER_SEQUENCE_NUMBER.
"""

from __future__ import annotations

import asyncio
import bisect
import struct
from dataclasses import dataclass, field

__all__ = ["BATCH_HEADER_BYTES", "AppendError", "PartitionLog"]

BATCH_HEADER_BYTES = 61
_PRODUCER_WINDOW = 5  # Kafka keeps the last five batches per producer for duplicate checks

CORRUPT_MESSAGE = 2
MESSAGE_TOO_LARGE = 10
UNSUPPORTED_FOR_MESSAGE_FORMAT = 43
OUT_OF_ORDER_SEQUENCE_NUMBER = 45
INVALID_PRODUCER_EPOCH = 47

_BASE_OFFSET = struct.Struct(">q")
_LEADER_EPOCH = struct.Struct(">i")  # at byte 12, after the batch length
_LENGTH = struct.Struct(">i")
_LAST_DELTA = struct.Struct(">i")
_TIMES = struct.Struct(">qq")  # first timestamp, max timestamp
_PRODUCER = struct.Struct(">qhi")  # producer id, epoch, base sequence


class AppendError(Exception):
    """A produce that the log refuses; ``code`` is the Kafka error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _ProducerState:
    epoch: int
    recent: list[tuple[int, int, int]] = field(
        default_factory=list
    )  # (first seq, last seq, base offset)

    @property
    def last_seq(self) -> int:
        return self.recent[-1][1]


class PartitionLog:
    """Batches in offset order; ``next_offset`` is the high watermark."""

    def __init__(self, retention_bytes: int) -> None:
        self.retention_bytes = retention_bytes
        self._batches: list[bytes] = []
        self._bases: list[int] = []
        self._first = 0  # index of the oldest batch still kept
        self.start_offset = 0
        self.next_offset = 0
        self.size_bytes = 0
        self._producers: dict[int, _ProducerState] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def append(self, records: memoryview, max_batch_bytes: int) -> int:
        """Append every batch in ``records``; return the first one's offset.

        Raises AppendError for a malformed or too large batch, an old message
        format or an idempotence violation; batches before the bad one stay.
        """
        pos, end, first = 0, len(records), -1
        if end == 0:
            raise AppendError(CORRUPT_MESSAGE, "a produce with no record batch")
        while pos < end:
            if end - pos < BATCH_HEADER_BYTES:
                raise AppendError(
                    CORRUPT_MESSAGE, f"{end - pos} trailing bytes are not a record batch"
                )
            (length,) = _LENGTH.unpack_from(records, pos + 8)
            size = 12 + length
            if size < BATCH_HEADER_BYTES or pos + size > end:
                raise AppendError(CORRUPT_MESSAGE, f"a batch of {size} bytes overruns the request")
            if records[pos + 16] != 2:
                raise AppendError(
                    UNSUPPORTED_FOR_MESSAGE_FORMAT,
                    f"message format {records[pos + 16]} (only record batches, magic 2)",
                )
            if size > max_batch_bytes:
                raise AppendError(
                    MESSAGE_TOO_LARGE,
                    f"a batch of {size} bytes exceeds max.message.bytes {max_batch_bytes}",
                )
            offset = self._append_batch(records[pos : pos + size])
            first = offset if first < 0 else first
            pos += size
        self._wake()
        return first

    def _append_batch(self, batch: memoryview) -> int:
        (last_delta,) = _LAST_DELTA.unpack_from(batch, 23)
        producer_id, epoch, seq = _PRODUCER.unpack_from(batch, 43)
        if producer_id >= 0 and seq >= 0:
            state = self._producers.get(producer_id)
            last_seq = seq + last_delta
            if state is not None:
                if epoch < state.epoch:
                    raise AppendError(
                        INVALID_PRODUCER_EPOCH, f"producer {producer_id} epoch {epoch} is fenced"
                    )
                if epoch == state.epoch:
                    for first_seq, known_last, base in state.recent:
                        if first_seq == seq and known_last == last_seq:
                            return base  # a resend of a batch already in the log
                    if seq != (state.last_seq + 1) & 0x7FFFFFFF:
                        raise AppendError(
                            OUT_OF_ORDER_SEQUENCE_NUMBER,
                            f"producer {producer_id} sent sequence {seq}, expected {state.last_seq + 1}",
                        )
                else:
                    state = None
            if state is None:
                state = self._producers[producer_id] = _ProducerState(epoch)
            state.recent.append((seq, last_seq, self.next_offset))
            del state.recent[:-_PRODUCER_WINDOW]
        base = self.next_offset
        stored = bytearray(batch)
        _BASE_OFFSET.pack_into(stored, 0, base)
        _LEADER_EPOCH.pack_into(stored, 12, 0)
        self._batches.append(bytes(stored))
        self._bases.append(base)
        self.next_offset = base + last_delta + 1
        self.size_bytes += len(stored)
        self._trim()
        return base

    def _trim(self) -> None:
        while self.size_bytes > self.retention_bytes and len(self._batches) - self._first > 1:
            self.size_bytes -= len(self._batches[self._first])
            self._batches[self._first] = b""
            self._first += 1
            self.start_offset = self._bases[self._first]
        if self._first > 1024 and self._first * 2 > len(self._batches):
            del self._batches[: self._first]
            del self._bases[: self._first]
            self._first = 0

    def read(self, offset: int, max_bytes: int) -> list[bytes]:
        """Batches from the one holding ``offset`` on, up to ``max_bytes`` (at least one)."""
        if offset >= self.next_offset:
            return []
        index = max(bisect.bisect_right(self._bases, offset, self._first) - 1, self._first)
        out: list[bytes] = []
        total = 0
        for batch in self._batches[index:]:
            if out and total + len(batch) > max_bytes:
                break
            out.append(batch)
            total += len(batch)
        return out

    def offset_for_time(self, ts_ms: int) -> int | None:
        """The first offset whose timestamp is at least ``ts_ms``; None if none is."""
        for index in range(self._first, len(self._batches)):
            batch = self._batches[index]
            _first_ts, max_ts = _TIMES.unpack_from(batch, 27)
            if max_ts >= ts_ms:
                return _offset_in_batch(batch, ts_ms)
        return None

    def waiter(self, future: asyncio.Future[None]) -> None:
        """Resolve ``future`` at the next append (a long-polling fetch waits on it)."""
        self._waiters.add(future)

    def forget(self, future: asyncio.Future[None]) -> None:
        self._waiters.discard(future)

    def _wake(self) -> None:
        for future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()


def _offset_in_batch(batch: bytes, ts_ms: int) -> int:
    """The exact offset in an uncompressed batch; the batch's base when compressed."""
    (base,) = _BASE_OFFSET.unpack_from(batch, 0)
    (attributes,) = struct.unpack_from(">h", batch, 21)
    first_ts, _max_ts = _TIMES.unpack_from(batch, 27)
    if attributes & 0x7:
        return base
    pos = BATCH_HEADER_BYTES
    while pos < len(batch):
        length, pos = _varint(batch, pos)
        record_end = pos + length
        pos += 1  # record attributes
        ts_delta, pos = _varint(batch, pos)
        offset_delta, pos = _varint(batch, pos)
        if first_ts + ts_delta >= ts_ms:
            return base + offset_delta
        pos = record_end
    return base


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint (records use signed varints) and the position after it."""
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
