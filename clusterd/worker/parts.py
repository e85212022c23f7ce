"""A generator run's parts, forwarded to the server as they are produced.

A pool child writes each part a task's generator yields as soon as it is made; the worker passes
it on as a ``+<part>`` line of ``DONE {"id":N,"job":J,"task":T,"stream":true,"parts":true}``, with no
decoding (the part is the child's bytes), and ends the stream with ``.`` when the run answers
(docs/PROTOCOL.md, "Results in parts"). The worker never holds a result whole.

One stream is on the wire at a time, since piece lines carry no ticket. While one is open the
worker's other lines (answers, DRAIN) wait in :attr:`PartStreams.held`, except heartbeats
(``PING``, ``OK PONG``), which the server lets through an open stream; another run's parts wait
in its own queue and go out when the open stream ends. A run that fails after its stream opened
ends it with its ``ERROR`` line (one object, on a line of its own), which the server reads as the
end of that stream; a cancelled one with ``.`` (the server drops its pieces). A part too long
for the server's line cannot be sent: the run's answer becomes ``ResultTooLarge``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from clusterd.core.wire import dumps

__all__ = ["PartStreams", "HEARTBEATS"]

HEARTBEATS = frozenset(("PING", "OK PONG"))


class _Queued:
    """A stream waiting for the wire: its header, the parts so far, its end once known."""

    __slots__ = ("header", "parts", "end")

    def __init__(self, header: bytes) -> None:
        self.header = header
        self.parts: list[bytes] = []
        self.end: bytes | None = None


class PartStreams:
    """The part streams of one connection: the open one, those waiting, the lines held."""

    def __init__(self, write: Callable[[bytes], None], max_line: Callable[[], int]) -> None:
        self.write = write  # writes bytes to the connection (nothing once it is lost)
        self.max_line = max_line  # the server's line limit
        self.open: Any = None  # the ticket whose stream is on the wire
        self.queued: dict[Any, _Queued] = {}  # other streams, in the order they started
        self.held: list[bytes] = []  # other lines, waiting for the open stream's end
        self.started: set[Any] = set()  # tickets whose stream began (on the wire or queued)
        self.too_long: dict[Any, int] = {}  # ticket -> the length of a part that cannot go

    def sink(self, ticket: Any, job: Any, task: str) -> Callable[[bytes], None]:
        """The ``on_part`` for ``ticket``'s run (of ``task``, for ``job``)."""
        return partial(self.part, ticket, (job, task))

    def part(self, ticket: Any, of: tuple[Any, str], body: bytes) -> None:
        """One part (encoded JSON) of ``ticket``'s run: on the wire now, or queued."""
        if ticket in self.too_long:
            return
        if len(body) + 1 > self.max_line():
            self.too_long[ticket] = len(body) + 1
            return
        line = b"+" + body + b"\n"
        if ticket not in self.started:
            self.started.add(ticket)
            done = {"id": ticket, "job": of[0], "task": of[1], "stream": True, "parts": True}
            header = "DONE " + dumps(done)
            if self.open is None:
                self.open = ticket
                self.write(header.encode("utf-8") + b"\n" + line)
                return
            self.queued[ticket] = _Queued(header.encode("utf-8") + b"\n")
        if self.open == ticket:
            self.write(line)
        else:
            self.queued[ticket].parts.append(line)

    def holds(self, line: str) -> bool:
        """Whether a line must wait for the open stream's end (not a heartbeat)."""
        return self.open is not None and line not in HEARTBEATS

    def hold(self, data: bytes) -> None:
        """Keep ``data`` (whole lines) until the open stream ends."""
        self.held.append(data)

    def streamed(self, ticket: Any) -> bool:
        """Whether ``ticket``'s run started a stream (its answer is its end, not a DONE)."""
        return ticket in self.started

    def oversized(self, ticket: Any) -> int | None:
        """The length of a part of ``ticket`` that could not be sent, if any (forgotten)."""
        return self.too_long.pop(ticket, None)

    def end(self, ticket: Any, last: bytes) -> None:
        """``ticket``'s run settled: ``last`` (``.`` or its ERROR line) ends its stream."""
        self.started.discard(ticket)
        if self.open == ticket:
            self.write(last)
            self._next()
        elif ticket in self.queued:
            self.queued[ticket].end = last

    def drop(self, ticket: Any) -> None:
        """``ticket``'s run was cancelled: end its stream if on the wire, else forget it."""
        self.too_long.pop(ticket, None)
        if self.open == ticket:
            self.end(ticket, b".\n")
        else:
            self.started.discard(ticket)
            self.queued.pop(ticket, None)

    def _next(self) -> None:
        """The open stream ended: the lines held go out, then the next stream waiting."""
        self.open = None
        held, self.held = self.held, []
        if held:
            self.write(b"".join(held))
        while self.queued and self.open is None:
            ticket = next(iter(self.queued))
            q = self.queued.pop(ticket)
            self.write(q.header + b"".join(q.parts) + (q.end or b""))
            if q.end is None:
                self.open = ticket

    def clear(self) -> None:
        """The connection is gone: nothing waits any more."""
        self.open = None
        self.queued.clear()
        self.held.clear()
        self.started.clear()
        self.too_long.clear()
