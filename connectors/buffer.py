"""Store-and-forward on the gateway's local disk: what the edge sends the cloud, kept until Kafka has it.

``StoreAndForward`` is one SQLite file (stdlib ``sqlite3``; no DuckDB in the
edge process) holding uplink records in the order they were made, each with a
gateway-wide sequence number (``seq``, never reused, also across restarts), a
record id (``rid``) that the cloud de-duplicates on, its kind and its bytes,
plus the gateway's last state checkpoint.

Guarantees:

- **Durable hand-off.** ``put`` adds records; ``checkpoint(state)`` makes
  everything added so far and ``state`` durable in one SQLite commit (WAL,
  ``synchronous=FULL`` by default: a power cut loses nothing committed). The
  gateway acknowledges device messages to the MQTT broker only after the
  checkpoint that covers them, so a SIGKILL or a power cut loses nothing:
  what was committed is resent, what was not is redelivered by the broker.
- **Order.** ``fetch`` returns records in ``seq`` order; a record leaves the
  buffer only by ``remove`` (Kafka confirmed it) or by the drop policy.
- **Bounded in bytes.** The bound counts each record's id, key and body
  bytes (the file adds SQLite page and index overhead). When an insert goes
  over it, whole records are dropped, oldest first, by class: raw readings
  first, then dead letters, then aggregates, and detections, commands, twin
  updates, definition acknowledgements and gateway status last; so
  aggregates and detections are kept as long as any raw reading or dead
  letter can make room. Every drop is
  counted per kind in ``stats().dropped``, persisted with the checkpoint.
- **Idempotent.** Adding a record whose ``rid`` is still buffered does
  nothing (a replay after a crash recomputes the same records).

Thread safety: every method takes one lock, so the dataflow's sink thread
and the uplink thread can share a buffer.

Example::

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "buffer.db"
    >>> buf = StoreAndForward(path, max_bytes=200)
    >>> buf.put([UplinkRecord("g|r|d1|1", "reading", "d1", b'{"t": 1}', 1)])
    1
    >>> buf.checkpoint(b"state-1")
    >>> [(r.seq, r.kind, r.body) for r in buf.fetch()]
    [(1, 'reading', b'{"t": 1}')]
    >>> buf.close()
    >>> again = StoreAndForward(path, max_bytes=200)
    >>> again.load_state(), again.stats().records
    (b'state-1', 1)
    >>> again.close()
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from iotflow.errors import ConfigError

__all__ = ["DROP_CLASS", "BufferStats", "StoreAndForward", "StoredRecord", "UplinkRecord"]

# Which records go first when the buffer is full (lower first); within a class, oldest first.
DROP_CLASS: dict[str, int] = {
    "reading": 0,
    "deadletter": 1,
    "aggregate": 2,
    "detection": 3,
    "command": 3,
    "twin_update": 3,
    "definition": 3,
    "status": 3,
}

_CACHE_KIB = 512  # SQLite's page cache; its 2 MiB default is a lot for a gateway

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rid TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    cls INTEGER NOT NULL,
    key TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_class ON records (cls, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB);
"""


@dataclass(frozen=True)
class UplinkRecord:
    """A record for the cloud: ``rid`` (de-duplication id), ``kind`` (a ``DROP_CLASS``
    key), ``key`` (device or rule key), ``body`` (JSON bytes), ``created_ms``."""

    rid: str
    kind: str
    key: str
    body: bytes
    created_ms: int

    @property
    def size(self) -> int:
        """The bytes the bound counts: id, key and body."""
        return len(self.rid.encode()) + len(self.key.encode()) + len(self.body)


@dataclass(frozen=True)
class StoredRecord:
    """A buffered record with its gateway-wide sequence number."""

    seq: int
    rid: str
    kind: str
    key: str
    body: bytes
    created_ms: int


@dataclass(frozen=True)
class BufferStats:
    """What the buffer holds and what its bound made it drop (per kind, since it was created)."""

    records: int
    bytes: int
    max_bytes: int
    dropped: dict[str, int] = field(default_factory=dict)
    first_seq: int | None = None
    last_seq: int | None = None


class StoreAndForward:
    """The SQLite store-and-forward buffer (see the module docstring for guarantees).

    ``max_bytes`` bounds the records' bytes; ``synchronous`` is SQLite's
    (``FULL``: a commit survives a power cut; ``NORMAL``: it survives a process
    crash, and a power cut may lose the last commits but never corrupts).
    Raises ``ConfigError`` when the file cannot be opened as a buffer.
    """

    def __init__(
        self,
        path: str | Path,
        max_bytes: int,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"buffer max_bytes {max_bytes} must be positive, e.g. 64_000_000")
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"buffer synchronous {synchronous!r} must be 'FULL' or 'NORMAL'")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.changed = threading.Event()  # set by put: the uplink has something new
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            self._db.executescript(_SCHEMA)
            count, total = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records"
            ).fetchone()
        except (sqlite3.Error, OSError) as exc:
            msg = f"cannot open the store-and-forward buffer {self.path}: {exc}; check the path (IOTFLOW_EDGE_BUFFER) and its permissions"
            raise ConfigError(msg) from exc
        self._count, self._bytes = int(count), int(total)
        self._dropped = {
            name.removeprefix("dropped:"): int(value)
            for name, value in self._db.execute(
                "SELECT name, value FROM meta WHERE name LIKE 'dropped:%'"
            )
        }

    # -- writing

    def put(self, records: Iterable[UplinkRecord]) -> int:
        """Add records in order (not yet durable: see ``checkpoint``); return how many were new.

        Over the bound, the drop policy runs at once (it may drop records just added).
        """
        added = 0
        with self._lock:
            for r in records:
                cls = DROP_CLASS.get(r.kind)
                if cls is None:
                    kinds = ", ".join(DROP_CLASS)
                    raise ConfigError(
                        f"uplink record kind {r.kind!r} is unknown; use one of {kinds}"
                    )
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO records (rid, kind, cls, key, created_ms, size, body) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.rid, r.kind, cls, r.key, r.created_ms, r.size, r.body),
                )
                if cursor.rowcount:
                    added += 1
                    self._count += 1
                    self._bytes += r.size
            if self._bytes > self.max_bytes:
                self._trim()
        if added:
            self.changed.set()
        return added

    def checkpoint(self, state: bytes | None = None) -> None:
        """Commit everything so far, with ``state`` (the gateway's snapshot) when given."""
        with self._lock:
            if state is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('state', ?)", (state,)
                )
            self._db.commit()

    def remove(self, seqs: Iterable[int]) -> int:
        """Forget delivered records (durable with the next ``checkpoint`` or ``commit``)."""
        chosen = list(seqs)
        if not chosen:
            return 0
        removed = 0
        with self._lock:
            for start in range(0, len(chosen), 500):
                part = chosen[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE seq IN ({marks})",
                    part,
                ).fetchone()
                self._db.execute(f"DELETE FROM records WHERE seq IN ({marks})", part)
                removed += int(rows[0])
                self._count -= int(rows[0])
                self._bytes -= int(rows[1])
        return removed

    def commit(self) -> None:
        """Make removals durable without a new state (the uplink calls it now and then)."""
        self.checkpoint(None)

    # -- reading

    def load_state(self) -> bytes | None:
        """The state of the last ``checkpoint`` (None for a new buffer)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = 'state'").fetchone()
        return None if row is None else bytes(row[0])

    def fetch(
        self,
        after_seq: int = 0,
        before_seq: int | None = None,
        limit: int = 1000,
        max_bytes: int | None = None,
    ) -> list[StoredRecord]:
        """Up to ``limit`` records with ``after_seq < seq < before_seq``, in ``seq`` order;
        with ``max_bytes``, only as many as fit in that many bytes (``UplinkRecord.size``),
        but always the first one."""
        upper = 2**62 if before_seq is None else before_seq
        out: list[StoredRecord] = []
        total = 0
        with self._lock:
            cursor = self._db.execute(
                "SELECT seq, rid, kind, key, body, created_ms, size FROM records "
                "WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                (after_seq, upper, limit),
            )
            for seq, rid, kind, key, body, created_ms, size in cursor:
                if max_bytes is not None and out and total + size > max_bytes:
                    break
                total += size
                out.append(StoredRecord(seq, rid, kind, key, bytes(body), created_ms))
            cursor.close()
        return out

    def next_seq(self) -> int:
        """The sequence number the next record will get."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'records'"
            ).fetchone()
        return 1 if row is None else int(row[0]) + 1

    def stats(self) -> BufferStats:
        with self._lock:
            first, last = self._db.execute("SELECT MIN(seq), MAX(seq) FROM records").fetchone()
            return BufferStats(
                self._count, self._bytes, self.max_bytes, dict(self._dropped), first, last
            )

    def close(self) -> None:
        """Commit and close (what was put stays: it is durable now)."""
        with self._lock:
            self._db.commit()
            self._db.close()

    # -- the drop policy

    def _trim(self) -> None:
        for cls in sorted(set(DROP_CLASS.values())):
            while self._bytes > self.max_bytes:
                rows = self._db.execute(
                    "SELECT seq, kind, size FROM records WHERE cls = ? ORDER BY seq LIMIT 256",
                    (cls,),
                ).fetchall()
                if not rows:
                    break
                chosen: list[int] = []
                for seq, kind, size in rows:
                    if self._bytes <= self.max_bytes:
                        break
                    chosen.append(seq)
                    self._bytes -= size
                    self._count -= 1
                    self._dropped[kind] = self._dropped.get(kind, 0) + 1
                marks = ",".join("?" * len(chosen))
                self._db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chosen)
            if self._bytes <= self.max_bytes:
                break
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
            [(f"dropped:{kind}", count) for kind, count in self._dropped.items()],
        )
