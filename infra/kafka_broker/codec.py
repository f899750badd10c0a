"""Kafka wire primitives for the non-flexible protocol versions the broker speaks.

Big-endian fixed-width integers, int16-length strings, int32-length bytes and
int32-count arrays (a count of -1 is a null array). Flexible versions (compact
lengths and tagged fields) are not spoken: the broker advertises only versions
below each API's first flexible one, and clients negotiate down to them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["ProtocolError", "Reader", "Writer"]

T = TypeVar("T")

_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")


class ProtocolError(ValueError):
    """A request that does not parse; the broker closes the connection on it."""


class Reader:
    """Reads one request body front to back; raises ProtocolError past its end."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self._buf = memoryview(buf)
        self._pos = pos

    @property
    def pos(self) -> int:
        return self._pos

    def _take(self, fmt: struct.Struct) -> int:
        end = self._pos + fmt.size
        if end > len(self._buf):
            raise ProtocolError(f"request ends at byte {len(self._buf)}, wanted {end}")
        (value,) = fmt.unpack_from(self._buf, self._pos)
        self._pos = end
        return value

    def int8(self) -> int:
        return self._take(_I8)

    def int16(self) -> int:
        return self._take(_I16)

    def int32(self) -> int:
        return self._take(_I32)

    def int64(self) -> int:
        return self._take(_I64)

    def bool(self) -> bool:
        return self._take(_I8) != 0

    def _raw(self, size: int) -> memoryview:
        end = self._pos + size
        if size < 0 or end > len(self._buf):
            raise ProtocolError(f"a field of {size} bytes at byte {self._pos} overruns the request")
        view = self._buf[self._pos : end]
        self._pos = end
        return view

    def nstring(self) -> str | None:
        size = self.int16()
        if size == -1:
            return None
        try:
            return str(self._raw(size), "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"a string at byte {self._pos - size} is not UTF-8") from exc

    def string(self) -> str:
        value = self.nstring()
        if value is None:
            raise ProtocolError(f"a null string at byte {self._pos - 2} where one is required")
        return value

    def nbytes(self) -> memoryview | None:
        size = self.int32()
        return None if size == -1 else self._raw(size)

    def narray(self, item: Callable[[Reader], T]) -> list[T] | None:
        count = self.int32()
        if count == -1:
            return None
        if count < 0 or count > len(self._buf) - self._pos:
            raise ProtocolError(
                f"an array of {count} items at byte {self._pos - 4} overruns the request"
            )
        return [item(self) for _ in range(count)]

    def array(self, item: Callable[[Reader], T]) -> list[T]:
        return self.narray(item) or []


class Writer:
    """Builds one response body; ``bytes(writer.buf)`` is the encoded result."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def int8(self, value: int) -> Writer:
        self.buf += _I8.pack(value)
        return self

    def int16(self, value: int) -> Writer:
        self.buf += _I16.pack(value)
        return self

    def int32(self, value: int) -> Writer:
        self.buf += _I32.pack(value)
        return self

    def int64(self, value: int) -> Writer:
        self.buf += _I64.pack(value)
        return self

    def bool(self, value: bool) -> Writer:
        return self.int8(1 if value else 0)

    def nstring(self, value: str | None) -> Writer:
        if value is None:
            return self.int16(-1)
        data = value.encode()
        self.int16(len(data))
        self.buf += data
        return self

    def nbytes(self, value: bytes | bytearray | memoryview | None) -> Writer:
        if value is None:
            return self.int32(-1)
        self.int32(len(value))
        self.buf += value
        return self

    def array(self, items: Iterable[T] | None, item: Callable[[Writer, T], object]) -> Writer:
        if items is None:
            return self.int32(-1)
        items = list(items)
        self.int32(len(items))
        for value in items:
            item(self, value)
        return self
