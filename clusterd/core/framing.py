r"""Bytes in, lines out, in time linear in the bytes.

Twisted's LineReceiver wants ``\r\n``, caps lines at 16 KiB, drops the connection silently when a
line is too long, and is quadratic on long lines; ``nc`` users send ``\n`` and jobs carry megabytes.
So every clusterd connection frames with :class:`LineFramer`: ``\n`` or ``\r\n`` ends a line, an
overlong line becomes exactly one :class:`LineTooLong` event (its bytes are discarded as they
arrive, so memory stays bounded) and framing resynchronises at the next ``\n``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LineFramer", "LineTooLong", "DEFAULT_MAX_LINE"]

DEFAULT_MAX_LINE = 16 * 1024 * 1024


@dataclass(frozen=True)
class LineTooLong:
    """A line exceeded the limit; ``size`` is how many bytes had arrived when it was noticed."""

    size: int
    limit: int


class LineFramer:
    """Splits a byte stream into lines (``bytes`` without the terminator) and LineTooLong events."""

    def __init__(self, limit: int = DEFAULT_MAX_LINE) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._skipping = False

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished line (0 while skipping an overlong one)."""
        return self._size

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        """Frame ``data``: the complete lines it ends, and a LineTooLong event for each overlong
        one; a partial line is held."""
        if b"\n" not in data:
            return self._hold(data)
        first, *middle, tail = data.split(b"\n")
        events: list[bytes | LineTooLong] = []
        if self._skipping:
            self._skipping = False
        else:
            self._parts.append(first)
            self._size += len(first)
            events.append(self._line(b"".join(self._parts), self._size))
        self._parts, self._size = [], 0
        for m in middle:
            events.append(self._line(m, len(m)))
        events.extend(self._hold(tail))
        return events

    def _line(self, line: bytes, size: int) -> bytes | LineTooLong:
        if line.endswith(b"\r"):
            line = line[:-1]
            size -= 1
        if size > self.limit:
            return LineTooLong(size, self.limit)
        return line

    def _hold(self, data: bytes) -> list[bytes | LineTooLong]:
        if self._skipping or not data:
            return []
        self._parts.append(data)
        self._size += len(data)
        # One byte of slack: a trailing "\r" of a line exactly at the limit is not yet known.
        if self._size > self.limit + 1:
            size = self._size
            self._parts, self._size, self._skipping = [], 0, True
            return [LineTooLong(size, self.limit)]
        return []
