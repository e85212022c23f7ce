"""The Deferred-based client library.

    client = await connect(reactor, "tcp:127.0.0.1:7420")
    total = await client.run("sum", [1, 2, 3])

Requests are pipelined on one connection: each method writes its line at once and returns a
Deferred that fires when its reply arrives (the server answers in request order). Errors arrive
as :mod:`clusterd.client.errors` exceptions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from clusterd import PROTOCOL_VERSION
from clusterd.client.errors import ClusterError, InputUnreadable, ServerTimeout, raise_for
from clusterd.client.pieces import stream_lines
from clusterd.core.auth import proof
from clusterd.core.framing import LineFramer, LineTooLong
from clusterd.core.wire import Reply, ReplyReader, WireError, dumps, parse_greeting, parse_json
from clusterd.endpoints import no_delay

__all__ = ["ClientProtocol", "Client", "connect", "job_line", "auth_line", "DEFAULT_TIMEOUT"]

# Seconds to connect, finish a TLS handshake, read the greeting and authenticate. A server
# answers all of that in milliseconds (a failed AUTH is delayed at most 5 s); without a bound a
# port that accepts and never speaks would hang a client forever.
DEFAULT_TIMEOUT = 10.0

ProgressFn = Callable[[str, dict[str, Any]], None]


def job_line(verb: str, task: str, value: Any, chunks: int | None = None, **options: Any) -> str:
    """``RUN``/``SUBMIT`` request line: task, input, and the job options that are set
    (``chunks``, ``timeout``, ``attempts``, ``key``)."""
    line = f"{verb} {task} {dumps(value)}"
    opts = {k: v for k, v in {"chunks": chunks, **options}.items() if v is not None}
    if opts:
        line += " " + dumps(opts)
    return line


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
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
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
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.next is not None:
            self._write()

    def stopProducing(self) -> None:
        self.next = None


def _ok_json(reply: Reply) -> Any:
    return parse_json(raise_for(reply).text, "the reply")


class Client:
    """High-level calls on one connection. Every method returns a Deferred."""

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol

    @property
    def server_info(self) -> dict[str, Any]:
        return self.protocol.server_info or {}

    def _call(self, line: str, on_progress: ProgressFn | None = None) -> Deferred[Reply]:
        return self.protocol.request(line, on_progress).addCallback(raise_for)

    def ping(self) -> Deferred[str]:
        return self._call("PING").addCallback(lambda r: r.text)

    def submit(
        self, task: str, value: Any, chunks: int | None = None, **options: Any
    ) -> Deferred[str]:
        """Submit a job; fires with its id once the server has durably recorded it. Options:
        ``timeout`` (seconds per sub-task), ``attempts``, ``key`` (idempotent submit)."""
        line = job_line("SUBMIT", task, value, chunks, **options)
        return self._call(line).addCallback(lambda r: r.text)

    def run(
        self, task: str, value: Any, chunks: int | None = None, **options: Any
    ) -> Deferred[Any]:
        """Submit a job and fire with its result (JobFailed / JobCancelled on failure)."""
        line = job_line("RUN", task, value, chunks, **options)
        return self._call(line).addCallback(lambda r: r.value)

    def submit_stream(
        self, task: str, pieces: Iterable[Any], chunks: int | None = None, **options: Any
    ) -> Deferred[str]:
        """Submit a job whose input is streamed: ``pieces`` yields JSON arrays (or strings, for
        text tasks) whose concatenation is the input, read lazily as the connection drains.
        Option ``size``: the input's length (items or characters), so ``chunks`` sub-tasks come
        out equal. Fires with the job id once the whole input is durably recorded."""
        lines = stream_lines(
            "SUBMIT", task, pieces, {"chunks": chunks, **options}, dumps, self._max_line()
        )
        return (
            self.protocol.request_lines(lines).addCallback(raise_for).addCallback(lambda r: r.text)
        )

    def run_stream(
        self, task: str, pieces: Iterable[Any], chunks: int | None = None, **options: Any
    ) -> Deferred[Any]:
        """:meth:`submit_stream`, then the job's result."""
        lines = stream_lines(
            "RUN", task, pieces, {"chunks": chunks, **options}, dumps, self._max_line()
        )
        return (
            self.protocol.request_lines(lines).addCallback(raise_for).addCallback(lambda r: r.value)
        )

    def _max_line(self) -> int:
        """The server's line limit, from its greeting."""
        return int(self.server_info.get("max_line", 16 << 20))

    def wait(self, job: str) -> Deferred[Any]:
        return self._call(f"WAIT {job}").addCallback(lambda r: r.value)

    def watch(self, job: str, on_progress: ProgressFn) -> Deferred[Any]:
        """Call ``on_progress(job, {"done":..,"total":..})`` as the job advances; fire with the
        result."""
        return self._call(f"WATCH {job}", on_progress).addCallback(lambda r: r.value)

    def status(self, job: str) -> Deferred[dict[str, Any]]:
        return self.protocol.request(f"STATUS {job}").addCallback(_ok_json)

    def cancel(self, job: str) -> Deferred[str]:
        """Cancel a job; fires with its state afterwards (``cancelled``, or how it had ended)."""
        return self._call(f"CANCEL {job}").addCallback(lambda r: r.text.split(" ", 1)[-1])

    def jobs(
        self, limit: int | None = None, before: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """One page of jobs, newest first (the server's default page is 100); pass the last
        id of a page as ``before`` for the next one."""
        return self.protocol.request(jobs_line(limit, before)).addCallback(_ok_json)

    def workers(self) -> Deferred[list[dict[str, Any]]]:
        return self.protocol.request("WORKERS").addCallback(_ok_json)

    def tasks(self) -> Deferred[list[dict[str, Any]]]:
        return self.protocol.request("TASKS").addCallback(_ok_json)

    def stats(self) -> Deferred[dict[str, Any]]:
        return self.protocol.request("STATS").addCallback(_ok_json)

    def close(self) -> None:
        self.protocol.transport.loseConnection()


def connect(
    reactor: Any,
    endpoint: str,
    secret: bytes | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Deferred[Client]:
    """Connect to a server by endpoint string (``tcp:host:port``, ``unix:path``, ``tls:...``);
    fires with a :class:`Client` once the server's greeting has arrived and, if the server
    requires it, the client secret has been proven. All of that must happen within
    ``timeout`` seconds (None: wait forever), or it fails with :class:`ServerTimeout` and the
    connection is closed. A TLS handshake that fails says why (``certificate verify
    failed``)."""
    state = _Connecting(endpoint)
    d = Deferred.fromCoroutine(_connect(reactor, endpoint, secret, state))
    if timeout is not None:

        def timed_out(result: Any, _timeout: float) -> Any:
            if state.proto is not None and state.proto.transport is not None:
                state.proto.transport.abortConnection()
            if isinstance(result, Failure) and result.check(
                CancelledError, ConnectingCancelledError
            ):
                raise ServerTimeout(f"timed out after {timeout:g} s {state.stage}")
            return result

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    return d


class _Connecting:
    """How far a connect got: what a timeout message names, and the connection it closes."""

    def __init__(self, endpoint: str) -> None:
        self.stage = f"connecting to {endpoint}"
        self.proto: ClientProtocol | None = None


async def _connect(reactor: Any, endpoint: str, secret: bytes | None, state: _Connecting) -> Client:
    from clusterd.tls import client_endpoint

    try:
        ep = client_endpoint(reactor, endpoint)
    except (ValueError, OSError) as e:
        raise ClusterError(str(e)) from None
    proto = await ep.connect(Factory.forProtocol(ClientProtocol))
    state.proto = proto
    state.stage = "waiting for the server's greeting (is it a clusterd server?)"
    info = await proto.greeted
    line = auth_line(info, secret)
    if line is not None:
        state.stage = "waiting for the answer to AUTH"
        try:
            raise_for(await proto.request(line))
        except ClusterError:
            proto.transport.loseConnection()
            raise
    return Client(proto)


def jobs_line(limit: int | None = None, before: str | None = None) -> str:
    """``JOBS``, with its paging options when any is given."""
    opts = {k: v for k, v in (("limit", limit), ("before", before)) if v is not None}
    return "JOBS " + dumps(opts) if opts else "JOBS"


def auth_line(info: dict[str, Any], secret: bytes | None) -> str | None:
    """The AUTH request a client must send after this greeting, or None if none is needed."""
    if "client" not in info.get("auth", ()):
        return None
    if secret is None:
        raise ClusterError(
            "the server requires a client secret: set $CLUSTERD_SECRET or use --secret-file"
        )
    return "AUTH client " + proof(secret, str(info.get("nonce")), "client")
