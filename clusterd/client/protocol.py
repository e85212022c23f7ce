"""The client's line protocol: frames replies and matches each to the oldest pending request,
and writes streamed requests as the connection drains.

May import Twisted's protocol machinery, :mod:`clusterd.core` and the client's errors; it knows
no verbs (those are :mod:`clusterd.client.verbs`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from clusterd import PROTOCOL_VERSION
from clusterd.client.errors import ClusterError, InputUnreadable
from clusterd.client.verbs import ProgressFn
from clusterd.core.framing import LineFramer, LineTooLong
from clusterd.core.wire import Reply, ReplyReader, WireError, parse_greeting
from clusterd.endpoints import no_delay

__all__ = ["ClientProtocol"]


@dataclass
class _Pending:
    d: Deferred[Reply]
    on_progress: ProgressFn | None = None


class ClientProtocol(Protocol):
    """Frames replies and matches each to the oldest pending request."""

    def __init__(self, max_line: int = 1 << 40) -> None:
        self.framer = LineFramer(max_line)
        self.pending: deque[_Pending] = deque()
        self.greeted: Deferred[dict[str, Any]] = Deferred()
        self.server_info: dict[str, Any] | None = None
        self.closed = False
        self.replies = ReplyReader()
        self._writer: _LineWriter | None = None  # a streamed request being written
        self._queued: deque[tuple[Iterator[bytes], _Pending]] = deque()  # requests waiting

    def connectionMade(self) -> None:
        """Turn off Nagle's algorithm, so pipelined request lines go out at once."""
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """Frame the bytes into reply lines and match each to its pending request."""
        for event in self.framer.feed(data):
            if isinstance(event, LineTooLong):  # pragma: no cover - limit is effectively none
                continue
            self._line(event.decode("utf-8"))

    def _line(self, text: str) -> None:
        if self.server_info is None:
            try:
                version, info = parse_greeting(text)
                if version != PROTOCOL_VERSION:
                    raise ClusterError(
                        f"server speaks protocol {version}, this client {PROTOCOL_VERSION}"
                    )
            except (WireError, ClusterError) as e:
                self.transport.loseConnection()
                self.greeted.errback(ClusterError(str(e)))
                return
            self.server_info = info
            self.greeted.callback(info)
            return
        try:
            reply = self.replies.feed(text)
        except WireError as e:
            self.transport.loseConnection()
            self._fail_all(ClusterError(str(e)))
            return
        if reply is None:
            return
        if not self.pending:
            return
        head = self.pending[0]
        if reply.kind == "PROGRESS":
            if head.on_progress is not None:
                head.on_progress(reply.job or "", reply.value)
            return
        self.pending.popleft()
        if self._writer is not None and self._writer.pending is head:
            # Refused while its pieces are still going out: the rest would only be dropped.
            self._writer.cut_short()
        head.d.callback(reply)

    def request(self, line: str, on_progress: ProgressFn | None = None) -> Deferred[Reply]:
        """Send one request line; the Deferred fires with its Reply, or fails with ClusterError if
        the connection closes first."""
        return self.request_lines(iter([line.encode("utf-8") + b"\n"]), on_progress)

    def request_lines(
        self, lines: Iterator[bytes], on_progress: ProgressFn | None = None
    ) -> Deferred[Reply]:
        """Send one request made of several lines (a streamed input). Lines are written as the
        connection drains, so a 200 MB input never sits whole in the write buffer, and no other
        request is interleaved with them."""
        d: Deferred[Reply] = Deferred()
        if self.closed:
            d.errback(ClusterError("the connection to the server is closed"))
            return d
        pending = _Pending(d, on_progress)
        self.pending.append(pending)
        self._queued.append((lines, pending))
        if self._writer is None:
            self._next_writer()
        return d

    def _next_writer(self) -> None:
        while self._queued and self._writer is None and not self.closed:
            lines, pending = self._queued.popleft()
            first = next(lines, None)
            if first is not None:
                self.transport.write(first)
            try:
                nxt = next(lines, None)
            except Exception as e:  # the input could not be read
                self._writer_done(e)
                return
            if nxt is None:
                continue  # a one-line request: written
            self._writer = _LineWriter(self, lines, nxt, pending)
            self._writer.start()

    def _writer_done(self, error: Exception | None) -> None:
        self._writer = None
        if error is not None:
            self.transport.loseConnection()
            self._fail_all(InputUnreadable(f"cannot read the input to stream: {error}"))
            return
        self._next_writer()

    def _fail_all(self, exc: Exception) -> None:
        pending, self.pending = self.pending, deque()
        for p in pending:
            if not p.d.called:  # a request cancelled by a timeout already has its answer
                p.d.errback(exc)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Fail the greeting (naming a TLS failure) and every pending request with ClusterError."""
        from clusterd.tls import tls_failure_reason

        reason = reason or Failure(ConnectionDone())
        self.closed = True
        if not self.greeted.called:
            tls = tls_failure_reason(reason)
            self.greeted.errback(
                ClusterError(
                    f"TLS handshake failed: {tls}"
                    if tls is not None
                    else f"connection closed: {reason.getErrorMessage()}"
                )
            )
        self._fail_all(ClusterError(f"connection to the server lost: {reason.getErrorMessage()}"))


@implementer(IPushProducer)
class _LineWriter:
    """Writes an iterator of lines while the transport's buffer has room (push producer)."""

    def __init__(
        self, proto: ClientProtocol, lines: Iterator[bytes], first: bytes, pending: _Pending
    ) -> None:
        self.proto = proto
        self.lines = lines
        self.pending = pending
        self.next: bytes | None = first
        self.paused = False
        self.running = False

    def start(self) -> None:
        """Register as the transport's producer and write lines until its buffer fills."""
        self.proto.transport.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        if self.running:
            return
        self.running = True
        try:
            while not self.paused and self.next is not None and not self.proto.closed:
                line, self.next = self.next, None
                self.proto.transport.write(line)
                self.next = next(self.lines, None)
        except Exception as e:  # the input could not be read (bad UTF-8, bad JSON, I/O)
            self._stop(e)
            return
        finally:
            self.running = False
        if self.next is None:
            self._stop(None)

    def _stop(self, error: Exception | None) -> None:
        if self.proto.transport is not None:
            self.proto.transport.unregisterProducer()
        self.next = None
        self.proto._writer_done(error)

    def cut_short(self) -> None:
        """Send the '.' line next and nothing else of this stream."""
        if self.next is not None:
            self.lines = iter(())
            self.next = b".\n"

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop writing lines."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The transport drained: write lines again from where they stopped."""
        self.paused = False
        if self.next is not None:
            self._write()

    def stopProducing(self) -> None:
        """The connection is closing: write no more lines."""
        self.next = None
