"""The server's side of the line protocol: frame, parse, call the scheduler, write the reply.

One port serves both roles: a connection is a client until it sends ``REGISTER``, then it is a
worker. Client requests may be pipelined; each takes a :class:`_Slot` in a FIFO and a slot's
lines reach the wire only once every earlier slot has finished, so replies keep request order
even when a ``RUN`` ahead of a ``PING`` takes minutes.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clusterd import PROTOCOL_VERSION
from clusterd.core.auth import ROLES, new_nonce, verify
from clusterd.core.errors import BadResult, task_failed
from clusterd.core.framing import DEFAULT_MAX_LINE, LineFramer, LineTooLong
from clusterd.core.jobs import Job, JobState
from clusterd.core.scheduler import (
    Scheduler,
    SubTask,
    TimedResult,
    WorkerHandle,
    WorkerLost,
)
from clusterd.core.streaming import END, STREAM_MARK, piece_lines
from clusterd.core.wire import (
    CLIENT_VERBS,
    DEFAULT_MAX_JSON_DEPTH,
    WORKER_VERBS,
    ErrorCode,
    WireError,
    dumps,
    format_error,
    format_greeting,
    parse_job_request,
    parse_json_object,
    parse_json_objects,
    parse_request,
    refusal_line,
)
from clusterd.endpoints import no_delay
from clusterd.heartbeat import Heartbeat
from clusterd.server.results import ResultStream
from clusterd.server.streams import InputStream

__all__ = ["ServerProtocol", "ServerFactory", "final_reply"]

MAX_WORKER_SLOTS = 4096
OFFLOAD_LINE = 1 << 20  # RUN/SUBMIT lines longer than this are parsed and split on a thread
PIECES_PER_TURN = 4  # pieces of a streamed answer written per reactor turn
# Requests read but not yet answered, per connection: past this many reply slots the server reads
# nothing more from that connection until replies drain (docs/PROTOCOL.md, "Pipelining").
MAX_PENDING_REPLIES = 1000
# Before a role is granted (secrets set), a line may be at most this long: AUTH, PING, HELP and
# QUIT are short, and an unauthenticated peer must not make the server hold megabytes.
PRE_AUTH_MAX_LINE = 4096
JOBS_DEFAULT_LIMIT = 100  # JOBS without a limit: the newest 100 jobs
JOBS_MAX_LIMIT = 1000
# A worker's DONE/ERROR that cannot be parsed: its ticket id, if the line starts as workers write
# it ({"id":N,...}), so that attempt can be failed instead of left hanging.
_TICKET_PREFIX = re.compile(rb"\s*(?:DONE|ERROR)\s+\{\s*\"id\"\s*:\s*(\d{1,18})\s*[,}]", re.I)


def final_reply(job: Job) -> str:
    """The line that ends a RUN, WAIT or WATCH: RESULT, FAILED or CANCELLED."""
    if job.state == JobState.DONE:
        return f"RESULT {job.id} {job.result_json}"
    return _not_done_reply(job)


def final_lines(job: Job, max_line: int) -> tuple[str, Iterator[str] | None]:
    """:func:`final_reply`, except that an answer too long for one line is streamed: the first
    line is ``RESULT <job> @``, and the iterator gives the ``+<piece>`` lines (each within
    ``max_line`` bytes, about 1 MiB) and then ``.`` (docs/PROTOCOL.md, "Streamed values")."""
    line = final_reply(job)
    if len(line) <= max_line // 4 or len(line.encode("utf-8", "backslashreplace")) <= max_line:
        return line, None
    encoded = job.result_json or "null"
    value = job.result if job.result is not None else json.loads(encoded)
    pieces = piece_lines(value, encoded, max_line, dumps)
    if pieces is None:
        return line, None  # a number: nothing smaller to send

    def lines() -> Iterator[str]:
        yield from pieces
        yield END

    return f"RESULT {job.id} {STREAM_MARK}", lines()


def _starts_stream(request: Any) -> bool:
    """Whether a (refused) request line was ``RUN``/``SUBMIT <task> @ ...``: its piece lines
    follow and must be read without replies."""
    if request is None or request.verb not in ("RUN", "SUBMIT"):
        return False
    parts = request.rest.split(None, 2)
    return len(parts) >= 2 and parts[1] == STREAM_MARK


def _not_done_reply(job: Job) -> str:
    if job.state == JobState.CANCELLED:
        return f"CANCELLED {job.id}"
    err = dict(job.error or {})
    code = err.pop("code", ErrorCode.TASK_ERROR)
    return f"FAILED {job.id} {code} {dumps(err)}"


class _Slot:
    """One request's place in the reply order."""

    __slots__ = ("lines", "finished", "cleanup")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.finished = False
        self.cleanup: Callable[[], None] | None = None


@dataclass
class ConnectionSettings:
    """Per-connection limits and timers (server options of the same names)."""

    max_line: int = DEFAULT_MAX_LINE
    max_client_jobs: int = 10_000  # unfinished jobs one connection may have submitted
    heartbeat_interval: float = 5.0  # worker connections: PING after this much quiet
    heartbeat_timeout: float = 15.0  # worker connections: declared lost after this much silence
    secrets: dict[str, bytes] = field(default_factory=dict)  # role -> secret; absent role: open
    auth_timeout: float = 10.0  # seconds to authenticate before the connection is closed
    max_auth_failures: int = 3  # failed AUTHs before the connection is closed
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    # A close the server decides (auth timeout, refusal, QUIT, ...) waits this long for the peer
    # (TLS close_notify, a full write buffer) before the socket is aborted.
    close_grace: float = 5.0
    # Failed AUTHs from one address within auth_failure_window seconds after which further AUTHs
    # from it are refused unchecked until the window has passed (across connections).
    max_address_auth_failures: int = 10
    auth_failure_window: float = 60.0


@implementer(IHalfCloseableProtocol, IPushProducer, IHandshakeListener)
class ServerProtocol(Protocol):
    log = Logger()

    def __init__(
        self,
        core: Scheduler,
        max_line: int = DEFAULT_MAX_LINE,
        settings: ConnectionSettings | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.core = core
        self.settings = settings or ConnectionSettings(max_line=max_line)
        self.max_line = self.settings.max_line
        self.clock = clock or core.clock
        self.framer = LineFramer(self.max_line)
        self.slots: deque[_Slot] = deque()
        self.worker: WorkerHandle | None = None
        self.inflight: dict[int, Deferred[Any]] = {}
        # This connection's unfinished jobs -> the wait() that forgets each when it ends: a
        # count kept in O(1) per job instead of a set rebuilt on every SUBMIT.
        self.open_jobs: dict[Job, Deferred[Any]] = {}
        self.worker_max_line = DEFAULT_MAX_LINE
        self.batch = False  # the worker takes DO arrays and may answer with arrays
        self._outbox: dict[int, tuple[str, int]] = {}  # batch: ticket -> (DO object, bytes)
        self._flush_call: Any = None  # the callLater(0) that writes the outbox
        self.heartbeat: Heartbeat | None = None
        self.next_ticket = 0
        self.quitting = False
        self.paused = False
        self.peer = ""
        self.host = ""
        self.nonce: str | None = None
        self.roles: set[str] = set()
        self.auth_failures = 0
        self.auth_timer: Any = None
        self.auth_wait = False  # a failed AUTH's delayed answer is pending: read and run nothing
        self.handshake_timer: Any = None  # TLS: the handshake must finish by auth_timeout
        self._abort_call: Any = None  # a close in progress: abortConnection after close_grace
        self._reads_paused = False  # what this protocol last told the transport
        self.counted = False
        self.stream: InputStream | None = None  # a RUN/SUBMIT whose input is arriving
        self.result_stream: ResultStream | None = None  # a worker's result arriving in pieces
        self.held = False  # reading paused by a stream's flow control or a big parse
        self._backlog: deque[bytes | LineTooLong] = deque()  # framed, not yet handled
        # Before AUTH: bytes not yet framed, framed one line at a time so that a granted AUTH
        # raises the line limit for the very next line (a pipelined request after AUTH).
        self._raw: deque[bytes] = deque()
        self._raw_off = 0
        self._eof_pending = False  # the peer half-closed while read lines still waited here
        self._draining = False
        self.gone = False  # connectionLost has run
        self._on_resume: list[Callable[[], None]] = []  # streamed answers waiting for room

    # -- connection ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.host = str(getattr(peer, "host", peer))
        self.peer = f"{self.host}:{getattr(peer, 'port', '')}".rstrip(":")
        self.log.debug("connection from {peer}", peer=self.peer)
        no_delay(self.transport)
        factory = getattr(self, "factory", None)
        if factory is not None:
            refusal = factory.admit(self)
            if refusal:
                self.quitting = True
                self._write(format_error(ErrorCode.TOO_MANY_CONNECTIONS, refusal))
                self._close()
                return
            self.counted = True
        if ISSLTransport.providedBy(self.transport):
            # A peer that never sends a ClientHello, or stalls inside the handshake, holds a
            # counted connection: it gets as long as an AUTH would, secrets or not.
            self.handshake_timer = self.clock.callLater(
                self.settings.auth_timeout, self._handshake_expired
            )
        else:
            self._register_producer()
        secrets = self.settings.secrets
        self.roles = {r for r in ROLES if r not in secrets}
        if not self.roles:
            self.framer.limit = PRE_AUTH_MAX_LINE
        extra: dict[str, Any] = {}
        if secrets:
            self.nonce = new_nonce()
            extra = {"auth": sorted(secrets), "nonce": self.nonce}
            # Slowloris: a peer that never authenticates does not keep its socket for ever.
            self.auth_timer = self.clock.callLater(self.settings.auth_timeout, self._auth_expired)
        self._write(format_greeting("server", self.max_line, **extra))

    def _auth_expired(self) -> None:
        self.auth_timer = None
        if not self.roles:
            self.log.warn("{peer} did not authenticate in time; closing", peer=self.peer)
            self.quitting = True
            self._write(
                format_error(
                    ErrorCode.AUTH_TIMEOUT,
                    f"no successful AUTH within {self.settings.auth_timeout:g}s; closing.",
                )
            )
            self._close()

    def _handshake_expired(self) -> None:
        self.handshake_timer = None
        self.log.warn(
            "{peer} did not complete the TLS handshake in {t}s; closing",
            peer=self.peer,
            t=self.settings.auth_timeout,
        )
        self._close()

    def _close(self) -> None:
        """Every close the server decides comes here: ``loseConnection()`` (which lets queued
        replies out, and on TLS waits for the peer's close_notify), then ``abortConnection()``
        after ``close_grace`` seconds whatever the peer does, so a peer that never reads, never
        answers close_notify or never finishes the handshake cannot keep its socket (and its
        place in the connection limits). Reads nothing more meanwhile."""
        self.quitting = True
        if self.gone or self.transport is None:
            return
        self.transport.loseConnection()
        if self._abort_call is None and not self.gone:
            self._abort_call = self.clock.callLater(self.settings.close_grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self.gone:
            self.log.info(
                "{peer} did not close within {grace}s; aborting the connection",
                peer=self.peer,
                grace=self.settings.close_grace,
            )
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self.handshake_timer is not None and self.handshake_timer.active():
            self.handshake_timer.cancel()
        self.handshake_timer = None
        self._register_producer()

    def _register_producer(self) -> None:
        """Backpressure: when this peer reads slower than we write, the transport pauses us and
        we stop reading its requests, instead of buffering replies without bound. On TLS this
        waits for the handshake: TLS pauses producers until then, and pausing our reads would
        stall the very handshake being waited for."""
        if not self.quitting:
            self.transport.registerProducer(self, True)

    # IPushProducer: the transport's write buffer is full (pause) or drained (resume).
    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._sync_reading()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._drain()  # the lines framed before the pause run now, and reading resumes
            waiting, self._on_resume = self._on_resume, []
            for fn in waiting:
                fn()

    def _hold(self, hold: bool) -> None:
        """Stop (or start again) reading this connection: a stream's flow control, or a big
        request being parsed on another thread."""
        if hold == self.held:
            return
        self.held = hold
        if hold:
            self._sync_reading()
        else:
            self._drain()

    def stopProducing(self) -> None:
        pass

    def _stopped(self) -> bool:
        """Whether this connection may run nothing more for now: its peer does not read its
        replies (paused), a stream or a big parse holds it, a failed AUTH's answer is pending,
        or MAX_PENDING_REPLIES requests are unanswered."""
        return self.paused or self.held or self.auth_wait or len(self.slots) >= MAX_PENDING_REPLIES

    def _sync_reading(self) -> None:
        """Tell the transport to read, or not, to match :meth:`_stopped`: a stopped connection's
        unread requests wait in TCP flow control, not in the server's memory."""
        if self.gone or self.transport is None or self.transport.disconnecting:
            return
        stop = self._stopped()
        if stop == self._reads_paused:
            return
        self._reads_paused = stop
        if stop:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.heartbeat is not None:
            self.heartbeat.touch()
        if self._raw or self.framer.limit < self.max_line:
            self._raw.append(data)
        else:
            self._backlog.extend(self.framer.feed(data))
        self._drain()

    def _drain(self) -> None:
        """Handle framed lines in order until none is left or the connection is stopped (see
        :meth:`_stopped`), checked between every two lines: the rest wait here, so requests
        are still handled strictly in the order they were sent, and nothing runs while the
        peer is not reading its replies."""
        if self._draining:
            return
        self._draining = True
        try:
            while not self._stopped():
                if self.quitting:
                    self._backlog.clear()
                    self._raw.clear()
                    break
                if self._backlog:
                    self._handle(self._backlog.popleft())
                elif self._raw:
                    self._frame_raw()
                else:
                    break
        finally:
            self._draining = False
        if self._eof_pending and not self._backlog and not self._raw and not self.gone:
            self._eof_pending = False
            self.readConnectionLost()
        self._sync_reading()

    def _frame_raw(self) -> None:
        """Frame unframed bytes: all of them once the full line limit applies, else one line
        (or one read without a newline) at a time, under the pre-AUTH limit; the framer's skip
        mode keeps nothing of an overlong line."""
        raw, off = self._raw, self._raw_off
        if self.framer.limit >= self.max_line:
            first = raw.popleft()
            self._raw_off = 0
            self._backlog.extend(self.framer.feed(first[off:] if off else first))
            while raw:
                self._backlog.extend(self.framer.feed(raw.popleft()))
            return
        chunk = raw[0]
        nl = chunk.find(b"\n", off)
        if nl < 0 or nl == len(chunk) - 1:
            raw.popleft()
            self._raw_off = 0
            piece = chunk[off:] if off else chunk
        else:
            piece = chunk[off : nl + 1]
            self._raw_off = nl + 1
        self._backlog.extend(self.framer.feed(piece))

    def readConnectionLost(self) -> None:
        """The peer closed its sending side (``nc -N``, a script at end of input): answer what
        was asked, then close. Lines already read but not yet run (the connection was paused
        or held) come first: the end of input takes effect after them."""
        if self._backlog or self._raw:
            self._eof_pending = True
            return
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.fail(
                ErrorCode.UPLOAD_INCOMPLETE,
                "the input ended before the streamed input's '.' line.",
            )
        self.quitting = True
        if not self.slots:
            self._close()

    def writeConnectionLost(self) -> None:
        self._close()

    def connectionLost(self, reason: Failure = None) -> None:
        self.gone = True
        self._backlog.clear()
        self._raw.clear()
        for timer in (self.auth_timer, self.handshake_timer, self._abort_call):
            if timer is not None and timer.active():
                timer.cancel()
        self.auth_timer = self.handshake_timer = self._abort_call = None
        open_jobs, self.open_jobs = self.open_jobs, {}
        for d in open_jobs.values():
            d.cancel()
        if self.counted:
            self.counted = False
            self.factory.release(self)
        if self.stream is not None:
            self.stream.lost()
            self.stream = None
        for slot in self.slots:
            if slot.cleanup is not None:
                slot.cleanup()
        self.slots.clear()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self._outbox.clear()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.worker is not None:
            self.core.remove_worker(self.worker)  # first: nothing is requeued onto us
            if self.result_stream is not None:
                stream, self.result_stream = self.result_stream, None
                if stream.d is not None and not stream.d.called:
                    stream.d.errback(WorkerLost(self.worker.name))
            inflight, self.inflight = self.inflight, {}
            for d in inflight.values():
                d.errback(WorkerLost(self.worker.name))

    def _write(self, line: str) -> None:
        if self._outbox:
            self._flush_outbox()  # DO lines first: a later CANCEL or OK DRAINING follows them
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.write(line.encode("utf-8", "backslashreplace") + b"\n")

    # -- reply order ---------------------------------------------------------------------------

    def _emit(self, slot: _Slot, line: str) -> None:
        if self.slots and self.slots[0] is slot:
            self._write(line)
        else:
            slot.lines.append(line)

    def _finish(self, slot: _Slot, line: str | None = None) -> None:
        if line is not None:
            self._emit(slot, line)
        slot.finished = True
        slot.cleanup = None
        full = len(self.slots) >= MAX_PENDING_REPLIES
        while self.slots and self.slots[0].finished:
            self.slots.popleft()
            if self.slots:
                head = self.slots[0]
                for queued in head.lines:
                    self._write(queued)
                head.lines.clear()
        if self.quitting and not self.slots:
            self._close()
        elif full and len(self.slots) < MAX_PENDING_REPLIES:
            self._drain()  # replies drained below the backlog limit: read again

    def _send_final(self, slot: _Slot, job: Job) -> None:
        first, rest = final_lines(job, self.max_line)
        if rest is None:
            self._finish(slot, first)
            return
        self._emit(slot, first)
        self._send_pieces(slot, rest)

    def _send_pieces(self, slot: _Slot, lines: Iterator[str]) -> None:
        """A streamed answer: a few pieces per reactor turn, and none while the peer's write
        buffer is full, so a 64 MB answer neither stalls other connections nor sits whole in
        the transport's buffer."""
        pending: list[Any] = [None]

        def step() -> None:
            pending[0] = None
            if self.gone:
                return
            if self.paused:
                self._on_resume.append(step)
                return
            try:
                for _ in range(PIECES_PER_TURN):
                    line = next(lines)
                    if line == END:
                        self._finish(slot, line)
                        return
                    self._emit(slot, line)
            except ValueError as e:
                # One element is longer than a line: the answer cannot be completed, and a
                # truncated one must never look whole, so the connection is dropped.
                self.log.error("cannot stream an answer to {peer}: {e}", peer=self.peer, e=e)
                self.transport.abortConnection()
                return
            pending[0] = self.clock.callLater(0, step)

        def cleanup() -> None:
            if pending[0] is not None and pending[0].active():
                pending[0].cancel()

        slot.cleanup = cleanup
        step()

    def _reply(self, line: str) -> None:
        slot = _Slot()
        self.slots.append(slot)
        self._finish(slot, line)

    # -- dispatch ------------------------------------------------------------------------------

    def _handle(self, event: bytes | LineTooLong) -> None:
        if self.result_stream is not None:
            result_stream = self.result_stream
            if result_stream.line(event):
                if result_stream.done:
                    self.result_stream = None
                return
            self.result_stream = None
        if self.stream is not None:
            stream = self.stream
            if stream.line(event):
                if stream.done:
                    self.stream = None
                return
            self.stream = None
        if self.worker is not None:
            self._worker_line(event)
            return
        if isinstance(event, LineTooLong):
            self.log.warn(
                "line of {size}+ bytes from {peer} over the {limit}-byte limit",
                size=event.size,
                peer=self.peer,
                limit=event.limit,
            )
            before_auth = (
                f" (until AUTH succeeds, lines may be at most {event.limit} bytes)"
                if event.limit < self.max_line
                else ""
            )
            self._reply(
                format_error(
                    ErrorCode.LINE_TOO_LONG,
                    f"the line is longer than {event.limit} bytes and was discarded; "
                    f"nothing in it was run{before_auth}.",
                )
            )
            return
        request = None
        try:
            request = parse_request(event)
            if request is None:
                return
            self._check_role(request.verb)
            handler = getattr(self, "do_" + request.verb, None)
            if request.verb not in CLIENT_VERBS and request.verb != "REGISTER" or handler is None:
                if request.verb in WORKER_VERBS:
                    raise WireError(
                        ErrorCode.WRONG_ROLE, f"{request.verb} is a worker verb; REGISTER first."
                    )
                raise WireError(
                    ErrorCode.UNKNOWN_VERB,
                    f"unknown verb {request.verb[:40]!r}; send HELP for the list.",
                )
            handler(request.rest)
        except WireError as e:
            self._reply(format_error(e.code, e.message))
            if self.stream is None and _starts_stream(request):
                # The refusal is the request's one reply; its piece lines and '.' get none.
                self.stream = InputStream.refused()

    # -- authentication ------------------------------------------------------------------------

    def _check_role(self, verb: str) -> None:
        """Until a role is granted only AUTH, PING, HELP and QUIT are answered."""
        if verb in ("AUTH", "PING", "HELP", "QUIT"):
            return
        role = "worker" if verb == "REGISTER" or verb in WORKER_VERBS else "client"
        if role not in self.roles:
            raise WireError(
                ErrorCode.NOAUTH,
                f"this connection is not authenticated as a {role}; "
                f"send AUTH {role} <proof> first (see SECURITY.md).",
            )

    def do_AUTH(self, rest: str) -> None:
        parts = rest.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise WireError(
                ErrorCode.BAD_REQUEST, "AUTH takes a role (client or worker) and a proof."
            )
        role, given = parts
        secret = self.settings.secrets.get(role)
        if secret is None or role in self.roles:
            self._reply(f"OK AUTHENTICATED {role}")
            return
        factory = getattr(self, "factory", None)
        if factory is not None and factory.auth_locked(self.host):
            # This address has spent its guesses for now, across all its connections: the
            # proof is not even checked, so opening more connections buys no more guesses.
            self.log.warn(
                "AUTH from {peer} refused unchecked: too many recent failures from {host}",
                peer=self.peer,
                host=self.host,
            )
            self.quitting = True
            self._reply(
                format_error(
                    ErrorCode.AUTH_FAILED,
                    f"too many failed AUTHs from {self.host} recently; try again later. Closing.",
                )
            )
            return
        if self.nonce is not None and verify(secret, self.nonce, role, given):
            self.roles.add(role)
            self.framer.limit = self.max_line
            self.log.info("{peer} authenticated as {role}", peer=self.peer, role=role)
            self._reply(f"OK AUTHENTICATED {role}")
            return
        self.auth_failures += 1
        delay = factory.auth_failed(self.host) if factory is not None else 0.0
        self.log.warn(
            "failed AUTH as {role} from {peer} ({n} on this connection); answering in {delay}s",
            role=role,
            peer=self.peer,
            n=self.auth_failures,
            delay=delay,
        )
        last = self.auth_failures >= self.settings.max_auth_failures
        if last:
            self.quitting = True  # read nothing more: no further guesses on this connection
        slot = _Slot()
        self.slots.append(slot)
        # Read and run nothing more until this answer goes out: a request pipelined behind a
        # failed AUTH waits for it like its reply does, and nothing piles up meanwhile.
        self.auth_wait = True
        self._sync_reading()

        def answer() -> None:
            self.auth_wait = False
            self._finish(
                slot,
                format_error(
                    ErrorCode.AUTH_FAILED,
                    "authentication failed" + ("; too many failures, closing." if last else "."),
                ),
            )
            if last:
                self._close()
            else:
                self._drain()

        # Failures are answered slowly (and later requests queue behind): guessing is costly.
        call = self.clock.callLater(delay, answer)
        slot.cleanup = lambda: call.cancel() if call.active() else None

    # -- client verbs --------------------------------------------------------------------------

    def do_PING(self, rest: str) -> None:
        self._reply("OK PONG")

    def do_HELP(self, rest: str) -> None:
        self._reply("OK " + dumps({"protocol": PROTOCOL_VERSION, "verbs": CLIENT_VERBS}))

    def do_QUIT(self, rest: str) -> None:
        self.quitting = True
        self._reply("OK BYE")

    def _track(self, job: Job) -> None:
        """Count one of this connection's jobs until it ends (for max_client_jobs): O(1) per
        job, and forgotten when the connection goes."""
        if job.is_final or job in self.open_jobs:
            return
        d = job.wait()
        self.open_jobs[job] = d
        # Its end, or an end the journal could not record: either way it stops counting.
        d.addCallbacks(self._untrack, self._untrack_failed, errbackArgs=(job,))

    def _untrack(self, job: Job) -> None:
        self.open_jobs.pop(job, None)

    def _untrack_failed(self, failure: Failure, job: Job) -> None:
        self.open_jobs.pop(job, None)

    def _submit(self, rest: str, verb: str) -> None:
        if len(self.open_jobs) >= self.settings.max_client_jobs:
            raise WireError(
                ErrorCode.BUSY,
                f"this connection has {len(self.open_jobs)} unfinished jobs, the most allowed; "
                "wait for some to end.",
            )
        if len(rest) > OFFLOAD_LINE and self.core.offload is not None:
            self._submit_offloaded(rest, verb)
            return
        req = parse_job_request(rest, verb, self.settings.max_json_depth)
        if req.streamed:
            self._open_stream(req.task, req.options, verb)
            return
        self._accept(_Slot(), req, verb, None)

    def _accept(
        self,
        slot: _Slot,
        req: Any,
        verb: str,
        pieces: list[Any] | None,
        encoded: tuple[str, ...] | None = None,
    ) -> None:
        job = self.core.submit(
            req.task, req.input, req.chunks, req.options, req.input_json, pieces, encoded
        )
        self._track(job)
        self._answer_job(slot, job, verb)

    def _submit_offloaded(self, rest: str, verb: str) -> None:
        """A request line over OFFLOAD_LINE bytes (up to --max-line, 16 MiB) is parsed and split
        on a thread: tens of milliseconds of JSON work must not stall every other connection.
        This connection reads nothing more meanwhile, so its requests keep their order."""
        slot = _Slot()
        self.slots.append(slot)
        task = rest.split(None, 1)[0]
        chunks = self.core.default_chunks(task)
        depth = self.settings.max_json_depth

        def prepare() -> tuple[Any, list[Any] | None, tuple[str, ...] | None]:
            # Parse, split and encode the cut the journal keeps: all pure, all off the reactor.
            req = parse_job_request(rest, verb, depth)
            pieces = self.core.prepare(req.task, req.input, req.chunks or chunks)
            durable = pieces is not None and self.core.journal.durable
            encoded = self.core.encode_cut(pieces) if durable else None
            return req, pieces, encoded

        def parsed(out: tuple[Any, list[Any] | None, tuple[str, ...] | None]) -> None:
            req, pieces, encoded = out
            if req.streamed:  # "RUN task @ <a megabyte of options>"
                message = "a streamed request's options must be short; send the input as pieces."
                self._finish(slot, format_error(ErrorCode.BAD_REQUEST, message))
                self.stream = InputStream.refused()
            else:
                self._accept(slot, req, verb, pieces, encoded)

        def refused(failure: Failure) -> None:
            e = failure.value
            if isinstance(e, WireError):
                self._finish(slot, format_error(e.code, e.message))
            else:
                self.log.failure("parsing a request failed", failure)
                self._finish(slot, format_error(ErrorCode.BAD_REQUEST, "cannot parse it."))

        def settle(_: Any) -> None:
            if not self.gone:
                self._hold(False)

        self._hold(True)
        d = self.core.offload(prepare)
        d.addCallback(parsed).addErrback(refused).addBoth(settle)

    def _answer_job(self, slot: _Slot, job: Job, verb: str) -> None:
        """SUBMIT: the id, once the job is durably recorded. RUN: the job's final line."""
        if slot not in self.slots:
            self.slots.append(slot)
        if verb == "RUN":
            self._attach_final(slot, job)
            return
        d = job.when_durable()
        if not d.called:
            self.core.journal.hurry()  # the id waits for the commit: no lingering for company
        slot.cleanup = d.cancel
        d.addCallbacks(
            lambda j: self._finish(slot, f"OK {j.id}"), self._refused, errbackArgs=(slot,)
        )

    def _open_stream(self, task: str, options: dict[str, Any], verb: str) -> None:
        """``RUN``/``SUBMIT <task> @``: the input follows as piece lines (streams.py)."""
        job, upload = self.core.open_stream(task, options)
        self._track(job)
        slot = _Slot()
        self.slots.append(slot)

        def accept(j: Job) -> None:
            self._answer_job(slot, j, verb)

        self.stream = InputStream(
            self.core,
            job,
            upload,
            verb,
            self.settings.max_json_depth,
            refuse=lambda line: self._finish(slot, line),
            accept=accept,
            hold=self._hold,
        )

    def do_SUBMIT(self, rest: str) -> None:
        self._submit(rest, "SUBMIT")

    def do_RUN(self, rest: str) -> None:
        self._submit(rest, "RUN")

    def do_WAIT(self, rest: str) -> None:
        self._await_final(self.core.get(self._job_id(rest, "WAIT")))

    def do_WATCH(self, rest: str) -> None:
        job = self.core.get(self._job_id(rest, "WATCH"))
        slot = _Slot()
        self.slots.append(slot)
        last = [-1]

        def progress(j: Job) -> None:
            # At most ~100 lines per job: one per whole percent, plus the first.
            pct = j.done * 100 // j.total if j.total else 100
            if pct != last[0] and not j.is_final:
                last[0] = pct
                self._emit(slot, f"PROGRESS {j.id} {dumps(j.progress())}")

        unsubscribe = None
        if not job.is_final:
            progress(job)
            unsubscribe = job.watch(progress)
        self._attach_final(slot, job, extra_cleanup=unsubscribe)

    def do_STATUS(self, rest: str) -> None:
        job = self.core.get(self._job_id(rest, "STATUS"))
        self._reply("OK " + dumps(self.core.job_status(job)))

    def do_CANCEL(self, rest: str) -> None:
        """``OK <job> cancelled`` once the cancel is durable (a job already ended answers its
        own final state): a restart never resumes a job its client was told is cancelled."""
        job = self.core.cancel(self._job_id(rest, "CANCEL"))
        slot = _Slot()
        self.slots.append(slot)
        d = job.wait()
        slot.cleanup = d.cancel
        d.addCallbacks(
            lambda j: self._finish(slot, f"OK {j.id} {j.state}"),
            self._refused,
            errbackArgs=(slot,),
        )

    def do_JOBS(self, rest: str) -> None:
        """``JOBS [{"limit": N, "before": "<job id>"}]``: one page of jobs, newest first, so
        the reply's size is bounded whatever the server holds (the last id is the cursor)."""
        limit, before = JOBS_DEFAULT_LIMIT, None
        if rest.strip():
            opts = parse_json_object(rest, "the JOBS options", self.settings.max_json_depth)
            unknown = sorted(set(opts) - {"limit", "before"})
            if unknown:
                raise WireError(
                    ErrorCode.BAD_REQUEST,
                    f"unknown JOBS option {unknown[0][:40]!r}; known options: before, limit.",
                )
            limit = opts.get("limit", JOBS_DEFAULT_LIMIT)
            if type(limit) is not int or not 1 <= limit <= JOBS_MAX_LIMIT:
                raise WireError(
                    ErrorCode.BAD_REQUEST,
                    f"JOBS option 'limit' must be an integer from 1 to {JOBS_MAX_LIMIT}.",
                )
            before = opts.get("before")
            if before is not None and not (
                isinstance(before, str) and re.fullmatch(r"j[0-9]{1,18}", before)
            ):
                raise WireError(
                    ErrorCode.BAD_REQUEST, "JOBS option 'before' must be a job id, e.g. j42."
                )
        brief = [
            {k: s[k] for k in ("id", "task", "state", "done", "total")}
            for s in (j.status() for j in self.core.list_jobs(limit, before))
        ]
        self._reply("OK " + dumps(brief))

    def do_WORKERS(self, rest: str) -> None:
        self._reply("OK " + dumps([w.describe() for w in self.core.workers()]))

    def do_TASKS(self, rest: str) -> None:
        self._reply("OK " + dumps(self.core.tasks_view()))

    def do_STATS(self, rest: str) -> None:
        self._reply("OK " + dumps(self.core.stats()))

    def _job_id(self, rest: str, verb: str) -> str:
        job_id = rest.strip()
        if not job_id or any(c.isspace() for c in job_id):
            raise WireError(ErrorCode.BAD_REQUEST, f"{verb} takes one job id, e.g. {verb} j1.")
        return job_id

    def _await_final(self, job: Job) -> None:
        slot = _Slot()
        self.slots.append(slot)
        self._attach_final(slot, job)

    def _attach_final(self, slot: _Slot, job: Job, extra_cleanup=None) -> None:
        d = job.wait()

        def cleanup() -> None:
            if extra_cleanup is not None:
                extra_cleanup()
            d.cancel()

        slot.cleanup = cleanup
        d.addCallbacks(
            self._send_final_to, self._refused, callbackArgs=(slot,), errbackArgs=(slot,)
        )

    def _send_final_to(self, job: Job, slot: _Slot) -> None:
        self._send_final(slot, job)

    def _refused(self, failure: Failure, slot: _Slot) -> None:
        """What a request waiting for a durable record gets when the record could not be made
        durable: ``ERR`` with the reason, never the id or the end it waited for."""
        if failure.check(CancelledError):
            return  # its connection went away: nothing left to tell
        self._finish(slot, refusal_line(failure.value))

    # -- worker role ---------------------------------------------------------------------------

    def do_REGISTER(self, rest: str) -> None:
        info = parse_json_object(rest, "REGISTER", self.settings.max_json_depth)
        name, tasks, slots = info.get("name"), info.get("tasks"), info.get("slots")
        version = info.get("protocol", PROTOCOL_VERSION)
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"protocol version {info.get('protocol')!r} is not supported; "
                f"this server speaks {PROTOCOL_VERSION}.",
            )
        if (
            not isinstance(name, str)
            or not name
            or len(name) > 200
            or any(c.isspace() for c in name)
        ):
            raise WireError(
                ErrorCode.BAD_REQUEST, "REGISTER needs a 'name': 1-200 characters, no spaces."
            )
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise WireError(ErrorCode.BAD_REQUEST, "REGISTER needs 'tasks': a list of task names.")
        if type(slots) is not int or not 1 <= slots <= MAX_WORKER_SLOTS:
            raise WireError(
                ErrorCode.BAD_REQUEST, f"REGISTER needs 'slots': an integer 1-{MAX_WORKER_SLOTS}."
            )
        if any(not s.finished for s in self.slots):
            raise WireError(
                ErrorCode.BAD_REQUEST, "REGISTER while client requests are pending is not allowed."
            )
        s = self.settings
        registered = {
            "name": name,
            "protocol": PROTOCOL_VERSION,
            "heartbeat_interval": s.heartbeat_interval,
            "heartbeat_timeout": s.heartbeat_timeout,
        }
        if info.get("batch") is True:
            registered["batch"] = True
        self._reply("OK REGISTERED " + dumps(registered))
        worker_max_line = info.get("max_line")
        if type(worker_max_line) is int and worker_max_line > 0:
            self.worker_max_line = worker_max_line
        self.batch = info.get("batch") is True
        self.worker = self.core.add_worker(
            name, tasks, slots, self._run_subtask, self.transport.abortConnection, self.peer
        )
        self.heartbeat = Heartbeat(
            self.clock,
            s.heartbeat_interval,
            s.heartbeat_timeout,
            lambda: self._write("PING"),
            self._worker_silent,
        )
        self.heartbeat.start()

    def _worker_silent(self, silent: float) -> None:
        self.log.warn(
            "worker {worker} silent for {silent:.1f}s; declaring it lost",
            worker=self.worker.name,
            silent=silent,
        )
        self.transport.abortConnection()

    def _run_subtask(self, sub: SubTask) -> Deferred[Any]:
        """Send one sub-task; raises (and sends nothing) if it cannot be encoded or is longer
        than this worker accepts. A batch worker's DO objects wait in the outbox until the end
        of the reactor turn, then go out as one ``DO [...]`` line (or a few, within its
        max_line)."""
        body = dumps(
            {
                "id": self.next_ticket + 1,
                "job": sub.job,
                "index": sub.index,
                "task": sub.task,
                "attempt": sub.attempt,
                "input": sub.input,
            }
        )
        size = len(body) if body.isascii() else len(body.encode("utf-8", "backslashreplace"))
        line_size = size + (5 if self.batch else 3)  # "DO [" + body + "]", or "DO " + body
        if line_size > self.worker_max_line:
            raise ValueError(
                f"its DO line has {line_size} bytes; worker "
                f"{self.worker.name} accepts {self.worker_max_line}"
            )
        self.next_ticket += 1
        ticket = self.next_ticket
        d: Deferred[Any] = Deferred(lambda _: self._cancel_ticket(ticket))
        self.inflight[ticket] = d
        if self.batch:
            self._outbox[ticket] = (body, size)
            if self._flush_call is None:
                self._flush_call = self.clock.callLater(0, self._flush_outbox)
        else:
            self._write("DO " + body)
        return d

    def _cancel_ticket(self, ticket: int) -> None:
        """Timed out, job ended, or a copy won: the worker drops it and frees the slot. One
        still in the outbox is simply never sent."""
        if self.inflight.pop(ticket, None) is not None:
            if self._outbox.pop(ticket, None) is None:
                self._write("CANCEL " + dumps({"id": ticket}))

    def _flush_outbox(self) -> None:
        """Write the outbox as ``DO [...]`` lines, each within the worker's max_line, in one
        transport write."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        if self.transport is None or self.transport.disconnecting:
            return
        limit = self.worker_max_line - 5  # "DO [" and "]" around the comma-joined objects
        lines: list[str] = []
        group: list[str] = []
        used = -1
        for body, size in outbox.values():
            if group and used + 1 + size > limit:
                lines.append("DO [" + ",".join(group) + "]")
                group, used = [], -1
            group.append(body)
            used += 1 + size
        lines.append("DO [" + ",".join(group) + "]")
        self.transport.write("\n".join(lines).encode("utf-8", "backslashreplace") + b"\n")

    def _worker_line(self, event: bytes | LineTooLong) -> None:
        """One line from a registered worker. An answer (DONE/ERROR) that cannot be read must
        never leave its sub-task waiting: its attempt fails if its ticket can be recovered,
        else the connection is dropped and every sub-task on it runs elsewhere."""
        if isinstance(event, LineTooLong):
            why = f"a line of {event.size}+ bytes, over the {event.limit}-byte limit"
            if self.inflight:
                self._worker_broken(why)
            else:
                self._reply(format_error(ErrorCode.LINE_TOO_LONG, f"{why}; it was discarded."))
            return
        try:
            request = parse_request(event)
        except WireError as e:
            self._unreadable_answer(event, e)
            return
        if request is None:
            return
        try:
            self._worker_verb(request.verb, request.rest)
        except WireError as e:
            if request.verb in ("DONE", "ERROR"):
                self._unreadable_answer(event, e)
            else:
                self._reply(format_error(e.code, e.message))

    def _unreadable_answer(self, line: bytes, e: WireError) -> None:
        match = _TICKET_PREFIX.match(line)
        if match is None:
            if not self.inflight or not re.match(rb"\s*(?:DONE|ERROR)\b", line, re.I):
                self._reply(format_error(e.code, e.message))  # nothing can be waiting for it
                return
            self._worker_broken(f"an answer that cannot be read ({e.code}: {e.message})")
            return
        ticket = int(match.group(1))
        d = self.inflight.pop(ticket, None)
        if d is None:
            self.core.late_result()
        else:
            self._outbox.pop(ticket, None)
            self.log.warn(
                "worker {worker} answered ticket {ticket} unreadably ({code}); that attempt failed",
                worker=self.worker.name,
                ticket=ticket,
                code=e.code,
            )
            d.errback(BadResult("BadResult", f"the worker's answer could not be read: {e}"))
        self._reply(format_error(e.code, e.message))  # the worker logs it

    def _worker_broken(self, why: str) -> None:
        """The worker sent something that cannot be matched to a sub-task: nothing it holds can
        be trusted to be answered, so the connection is aborted and connectionLost requeues
        every one of its sub-tasks (WorkerLost)."""
        self.log.error(
            "worker {worker} at {peer} sent {why}; dropping the connection so its sub-tasks "
            "run elsewhere",
            worker=self.worker.name,
            peer=self.peer,
            why=why,
        )
        self.quitting = True  # run none of the lines read behind it
        self.transport.abortConnection()

    def _worker_verb(self, verb: str, rest: str) -> None:
        if verb == "PING":
            self._write("OK PONG")
            return
        if verb == "OK":  # the worker's answer to our PING: liveness is all it carries
            return
        if verb == "DRAIN":
            self.core.drain_worker(self.worker)
            self._write("OK DRAINING")
            return
        if verb not in ("DONE", "ERROR"):
            raise WireError(
                ErrorCode.WRONG_ROLE,
                f"{verb[:40]} is not a worker verb; workers send DONE, ERROR, DRAIN or PING.",
            )
        # Results are the worker's, not a stranger's: only Python's own recursion limit applies.
        if self.batch:
            msgs = parse_json_objects(rest, verb, max_depth=100_000)
        else:
            msgs = [parse_json_object(rest, verb, max_depth=100_000)]
        inflight = self.inflight
        for n, msg in enumerate(msgs, 1):
            ticket = msg.get("id")
            d = inflight.pop(ticket, None) if type(ticket) is int else None
            streamed = verb == "DONE" and msg.get("stream") is True
            if streamed:
                # The result follows as piece lines; they are read (and dropped as they come,
                # if nobody waits for them) up to the '.' line.
                if d is None:
                    self.core.late_result()
                stream = ResultStream(d, msg.get("t"), self.core.config.max_result_bytes)
                if n < len(msgs):  # pieces can only follow the line's last answer
                    stream.failure = BadResult("BadResult", "a streamed DONE must come last")
                    stream.finish()
                else:
                    self.result_stream = stream
            elif d is None:
                # Timed out, cancelled, or a losing speculative copy: counted, never combined.
                self.core.late_result()
            elif verb == "DONE":
                seconds = msg.get("t")
                if type(seconds) is float and seconds >= 0:
                    d.callback(TimedResult(msg.get("result"), seconds))
                else:
                    d.callback(msg.get("result"))
            else:
                d.errback(task_failed(str(msg.get("type", "Error")), str(msg.get("message", ""))))


class ServerFactory(Factory):
    log = Logger()

    def __init__(
        self,
        core: Scheduler,
        max_line: int = DEFAULT_MAX_LINE,
        settings: ConnectionSettings | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.core = core
        self.settings = settings or ConnectionSettings(max_line=max_line)
        self.max_line = self.settings.max_line
        self.clock = clock or core.clock
        self.connections = 0
        self.per_host: Counter[str] = Counter()
        self.failures: dict[str, tuple[int, float]] = {}  # host -> (recent failures, last time)

    def admit(self, proto: ServerProtocol) -> str | None:
        """Count a new connection, or say why it is refused."""
        s = self.settings
        if self.connections >= s.max_connections:
            return f"the server has {self.connections} connections, its limit; try later."
        if self.per_host[proto.host] >= s.max_connections_per_ip:
            return f"{proto.host} already has {s.max_connections_per_ip} connections, the limit."
        self.connections += 1
        self.per_host[proto.host] += 1
        return None

    def release(self, proto: ServerProtocol) -> None:
        self.connections -= 1
        self.per_host[proto.host] -= 1
        if self.per_host[proto.host] <= 0:
            del self.per_host[proto.host]

    def _recent_failures(self, host: str, now: float) -> int:
        count, last = self.failures.get(host, (0, now))
        return 0 if now - last > self.settings.auth_failure_window else count

    def auth_locked(self, host: str) -> bool:
        """Whether ``host`` has used up its failed-AUTH budget (max_address_auth_failures
        within auth_failure_window seconds of the last one), across all its connections: its
        further AUTHs are refused without being checked until the window has passed."""
        count = self._recent_failures(host, self.clock.seconds())
        return count >= self.settings.max_address_auth_failures

    def auth_failed(self, host: str) -> float:
        """Record a failed AUTH from ``host``; returns how long to wait before answering. The
        delay grows with recent failures from that address, across connections."""
        now = self.clock.seconds()
        count = self._recent_failures(host, now) + 1
        self.failures.pop(host, None)  # re-inserted last: the dict stays in last-failure order
        self.failures[host] = (count, now)
        if len(self.failures) > 10_000:  # bounded memory under a spray of addresses:
            del self.failures[next(iter(self.failures))]  # forget the stalest address only
        return min(5.0, 0.25 * 2 ** min(count - 1, 5))

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        p = ServerProtocol(self.core, settings=self.settings, clock=self.clock)
        p.factory = self
        return p
