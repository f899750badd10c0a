"""What the orchestrator keeps of a finished command: just enough to de-duplicate.

A finished command is remembered until ``remember`` after its expiry, so that
a replayed request or a redelivered ack does nothing twice. At 500 commands/s
that is hundreds of thousands of commands, held in memory and in every
snapshot, so each keeps only its id, its device (an ack from another device is
reported), its terminal state and a 64-bit digest of its request (the same id
with other content is reported too).

``Remembered`` keeps them in forget buckets of ``BUCKET_S`` seconds, each also
held as one text of lines: a snapshot copies a few strings instead of
building an object per command, and forgetting drops whole buckets. A
command is forgotten at the first purge after its bucket ends: at least
``remember`` after its expiry, at most ``BUCKET_S`` later.

Example::

    >>> from datetime import UTC, datetime, timedelta
    >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
    >>> memory = Remembered()
    >>> memory.add("c1", "lock-0001", CommandState.DONE, "0123456789abcdef", t0)
    >>> memory.get("c1")
    Finished(device_id='lock-0001', state=<CommandState.DONE: 'done'>, digest='0123456789abcdef')
    >>> memory.purge(t0 + timedelta(seconds=BUCKET_S))
    >>> memory.get("c1") is None
    True
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import NamedTuple

from commands.model import TERMINAL, CommandState

__all__ = ["BUCKET_S", "Finished", "Remembered"]

BUCKET_S = 60
"""Width of a forget bucket, seconds."""

_STATES = {state.value: state for state in TERMINAL}


class Finished(NamedTuple):
    """A remembered command: its device, terminal state and request digest."""

    device_id: str
    state: CommandState
    digest: str


class Remembered:
    """Finished commands by id, forgotten by bucket (see the module docstring).

    Command ids and device ids never hold tabs or newlines
    (``commands.validation.check_command_id`` refuses control characters).
    """

    def __init__(self) -> None:
        # plain tuples of strings: the collector stops tracking them (a NamedTuple it never
        # does), so hundreds of thousands of them add nothing to its full passes
        self._index: dict[str, tuple[str, str, str]] = {}
        self._logs: dict[
            int, bytearray
        ] = {}  # bucket start (epoch s) -> "id\tdevice\tstate\tdigest\n"...

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, command_id: str) -> bool:
        return command_id in self._index

    def get(self, command_id: str) -> Finished | None:
        entry = self._index.get(command_id)
        if entry is None:
            return None
        device_id, state, digest = entry
        return Finished(device_id, _STATES[state], digest)

    def add(
        self,
        command_id: str,
        device_id: str,
        state: CommandState,
        digest: str,
        forget_at: datetime,
    ) -> None:
        """Remember a finished command until ``forget_at`` (rounded up to its bucket's end)."""
        device_id = sys.intern(device_id)  # one string object per device, not per command
        self._index[command_id] = (device_id, state.value, digest)
        bucket = int(forget_at.timestamp()) // BUCKET_S * BUCKET_S
        log = self._logs.setdefault(bucket, bytearray())
        log += f"{command_id}\t{device_id}\t{state.value}\t{digest}\n".encode()

    def purge(self, now: datetime) -> None:
        """Forget every command whose bucket ended at or before ``now``."""
        limit = now.timestamp()
        for bucket in [b for b in self._logs if b + BUCKET_S <= limit]:
            for line in self._logs.pop(bucket).decode().splitlines():
                self._index.pop(line.split("\t", 1)[0], None)

    def to_data(self) -> dict[str, str]:
        """Plain data (JSON-able) for a snapshot: bucket start -> its lines."""
        return {str(bucket): log.decode() for bucket, log in self._logs.items()}

    @classmethod
    def from_data(cls, data: Mapping[str, str]) -> Remembered:
        """The memory ``to_data`` described."""
        memory = cls()
        for bucket, text in data.items():
            memory._logs[int(bucket)] = bytearray(text.encode())
            for line in text.splitlines():
                command_id, device_id, state, digest = line.split("\t")
                memory._index[command_id] = (sys.intern(device_id), state, digest)
        return memory
