r"""Bytes in, lines out, in time linear in the bytes.

Twisted's LineReceiver wants ``\r\n``, caps lines at 16 KiB, drops the connection silently when a
line is too long, and is quadratic on long lines; ``nc`` users send ``\n`` and jobs carry megabytes.
So every clusterd connection frames with :class:`LineFramer`: ``\n`` or ``\r\n`` ends a line, an
overlong line becomes exactly one :class:`LineTooLong` event (its bytes are discarded as they
arrive, so memory stays bounded) and framing resynchronises at the next ``\n``.

Bulk bytes skip line framing: a framer given a ``header`` function (``frame_header`` for the
``$<n>`` lines of streamed inputs, or the worker's binary ``DO``) hands over a line it accepts as
a header together with exactly the ``n`` raw bytes that follow it (and their ``\n``) as one
:class:`Frame`, however the bytes were split into reads; those bytes are never searched for
newlines. A frame longer than the limit is one LineTooLong, its bytes skipped as they arrive.
Reads without the header's marker byte string take the plain line path unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LineFramer", "LineTooLong", "DEFAULT_MAX_LINE", "Frame", "frame_header"]

DEFAULT_MAX_LINE = 16 * 1024 * 1024


@dataclass(frozen=True)
class LineTooLong:
    """A line exceeded the limit; ``size`` is how many bytes had arrived when it was noticed."""

    size: int
    limit: int


@dataclass(frozen=True)
class Frame:
    """A header line and the ``n`` raw bytes it announced (docs/PROTOCOL.md, "Streamed values")."""

    header: bytes
    data: bytes


_DOLLAR = re.compile(rb"\$(\d{1,15})\r?")


def frame_header(line: bytes) -> int | None:
    """The byte count of a ``$<n>`` line, or None for any other line."""
    m = _DOLLAR.fullmatch(line) if line[:1] == b"$" else None
    return None if m is None else int(m.group(1))


class LineFramer:
    """Splits a byte stream into lines (``bytes`` without the terminator) and LineTooLong events."""

    def __init__(
        self,
        limit: int = DEFAULT_MAX_LINE,
        header: Callable[[bytes], int | None] | None = None,
        marker: bytes = b"$",
    ) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._skipping = False
        self.header = header  # a line -> the raw bytes that follow it (None: a plain line)
        self.marker = marker  # every header line contains it: reads without it frame plainly
        self._frame: bytes | None = None  # the header of the frame being read
        self._need = 0  # raw bytes of that frame still to come
        self._raw: list[bytes] = []  # those that came (nothing while skipping an overlong one)
        self._nl = False  # the frame's bytes are in; its "\n" is next

    def binary(self, header: Callable[[bytes], int | None], marker: bytes) -> None:
        """Recognise frames from now on (the worker protocol turns this on at registration)."""
        self.header, self.marker = header, marker

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished line (0 while skipping an overlong one)."""
        return self._size

    def feed(self, data: bytes) -> list[bytes | LineTooLong | Frame]:
        """Frame ``data``: the complete lines it ends, and a LineTooLong event for each overlong
        one; a partial line is held."""
        if self.header is not None:
            if self._frame is not None or self._nl or self.marker in data:
                return self._feed_framed(data)
            if self._parts and b"\n" in data:
                return self._complete_held(data)
        if b"\n" not in data:
            return self._hold(data)
        first, *middle, tail = data.split(b"\n")
        events: list[bytes | LineTooLong | Frame] = []
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

    # -- frames --------------------------------------------------------------------------------

    def _feed_framed(self, data: bytes) -> list[bytes | LineTooLong | Frame]:
        """Frame ``data`` line by line, switching to raw bytes after each header line. Linear:
        each byte is looked at once, by ``find`` or a slice."""
        events: list[bytes | LineTooLong | Frame] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._frame is not None:
                pos = self._take_raw(data, pos, events)
                continue
            if self._nl:
                self._nl = False
                if data[pos : pos + 1] == b"\r":
                    pos += 1
                    self._nl = pos == end  # "\r" ends this read: the "\n" may be next
                if data[pos : pos + 1] == b"\n":
                    pos += 1
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                events.extend(self._hold(data[pos:] if pos else data))
                break
            lines = self.feed_plain(data[pos : nl + 1])
            pos = nl + 1
            n = None
            if lines and isinstance(lines[-1], bytes) and self.header is not None:
                n = self.header(lines[-1])
            if n is None:
                events.extend(lines)
            else:
                self._start(lines[-1], n, events)
        return events

    def _complete_held(self, data: bytes) -> list[bytes | LineTooLong | Frame]:
        """A read without the marker that ends a held partial line: only that line can be a
        header (its marker came in an earlier read); the lines after it frame plainly."""
        nl = data.find(b"\n") + 1
        events = self._feed_framed(data[:nl])
        if nl < len(data):
            rest = data[nl:]
            framed = self._frame is not None or self._nl
            events.extend(self._feed_framed(rest) if framed else self.feed(rest))
        return events

    def feed_plain(self, data: bytes) -> list[bytes | LineTooLong]:
        """Frame ``data`` (which ends with its only newline) as a plain line."""
        header, self.header = self.header, None
        try:
            return self.feed(data)
        finally:
            self.header = header

    def _start(self, header: bytes, n: int, events: list[bytes | LineTooLong | Frame]) -> None:
        """A header line: read ``n`` raw bytes next (skip them, over the limit)."""
        self._frame, self._need, self._raw = header, n, []
        if n > self.limit:
            events.append(LineTooLong(n, self.limit))
            self._frame = b""  # skipping: the bytes are counted, never kept
        elif n == 0:
            self._finish(events)

    def _take_raw(self, data: bytes, pos: int, events: list[bytes | LineTooLong | Frame]) -> int:
        """Take the frame's bytes from ``data[pos:]``; the position after them."""
        take = min(self._need, len(data) - pos)
        if self._frame:  # not skipping
            self._raw.append(data[pos : pos + take] if take < len(data) or pos else data)
        self._need -= take
        if self._need == 0:
            self._finish(events)
        return pos + take

    def _finish(self, events: list[bytes | LineTooLong | Frame]) -> None:
        header, raw = self._frame, self._raw
        self._frame, self._raw, self._nl = None, [], True
        if header:
            events.append(Frame(header, raw[0] if len(raw) == 1 else b"".join(raw)))
