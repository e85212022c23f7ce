"""The server's side of the line protocol: frame, parse, call the scheduler, write the reply.

One port serves both roles: a connection is a client until it sends ``REGISTER``, then it is a
worker. Client requests may be pipelined; each takes a :class:`_Slot` in a FIFO and a slot's
lines reach the wire only once every earlier slot has finished, so replies keep request order
even when a ``RUN`` ahead of a ``PING`` takes minutes.
"""

from __future__ import annotations

import json
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
from clusterd.core.framing import DEFAULT_MAX_LINE, LineFramer, LineTooLong
from clusterd.core.jobs import Job, JobState
from clusterd.core.scheduler import (
    Scheduler,
    SubTask,
    TaskFailed,
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
        self.open_jobs: set[Job] = set()
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
        self.counted = False
        self.stream: InputStream | None = None  # a RUN/SUBMIT whose input is arriving
        self.result_stream: ResultStream | None = None  # a worker's result arriving in pieces
        self.held = False  # reading paused by a stream's flow control or a big parse
        self._backlog: deque[bytes | LineTooLong] = deque()  # framed, not yet handled
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
                self.transport.loseConnection()
                return
            self.counted = True
        if not ISSLTransport.providedBy(self.transport):
            self._register_producer()
        secrets = self.settings.secrets
        self.roles = {r for r in ROLES if r not in secrets}
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
            self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
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
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if not self.held:
                self.transport.resumeProducing()
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
            self.transport.pauseProducing()
            return
        self._drain()
        if not self.held and not self.paused and self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self.heartbeat is not None:
            self.heartbeat.touch()
        self._backlog.extend(self.framer.feed(data))
        self._drain()

    def _drain(self) -> None:
        """Handle framed lines in order until none is left or reading is held (a stream's
        flow control, a big request being parsed off the reactor): a held connection's lines
        wait here, so requests are still handled strictly in the order they were sent."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._backlog and not self.held:
                if self.quitting:
                    self._backlog.clear()
                    return
                self._handle(self._backlog.popleft())
        finally:
            self._draining = False

    def readConnectionLost(self) -> None:
        """The peer closed its sending side (``nc -N``, a script at end of input): answer what
        was asked, then close."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.fail(
                ErrorCode.UPLOAD_INCOMPLETE,
                "the input ended before the streamed input's '.' line.",
            )
        self.quitting = True
        if not self.slots:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.gone = True
        self._backlog.clear()
        if self.auth_timer is not None and self.auth_timer.active():
            self.auth_timer.cancel()
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
                if not stream.d.called:
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
        while self.slots and self.slots[0].finished:
            self.slots.popleft()
            if self.slots:
                head = self.slots[0]
                for queued in head.lines:
                    self._write(queued)
                head.lines.clear()
        if self.quitting and not self.slots:
            self.transport.loseConnection()

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
        if isinstance(event, LineTooLong):
            self.log.warn(
                "line of {size}+ bytes from {peer} over the {limit}-byte limit",
                size=event.size,
                peer=self.peer,
                limit=event.limit,
            )
            self._reply(
                format_error(
                    ErrorCode.LINE_TOO_LONG,
                    f"the line is longer than {event.limit} bytes and was discarded; "
                    "nothing in it was run.",
                )
            )
            return
        request = None
        try:
            request = parse_request(event)
            if request is None:
                return
            if self.worker is not None:
                self._worker_verb(request.verb, request.rest)
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
        if self.nonce is not None and verify(secret, self.nonce, role, given):
            self.roles.add(role)
            self.log.info("{peer} authenticated as {role}", peer=self.peer, role=role)
            self._reply(f"OK AUTHENTICATED {role}")
            return
        self.auth_failures += 1
        factory = getattr(self, "factory", None)
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
        # Read nothing more until this answer goes out: requests piling up behind a delayed
        # answer would otherwise hold memory without bound.
        self.transport.pauseProducing()

        def answer() -> None:
            if not last and not self.paused:
                self.transport.resumeProducing()
            self._finish(
                slot,
                format_error(
                    ErrorCode.AUTH_FAILED,
                    "authentication failed" + ("; too many failures, closing." if last else "."),
                ),
            )
            if last:
                self.quitting = True
                self.transport.loseConnection()

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

    def _submit(self, rest: str, verb: str) -> None:
        self.open_jobs = {j for j in self.open_jobs if not j.is_final}
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
        if not job.is_final:
            self.open_jobs.add(job)
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
        if not job.is_final:
            self.open_jobs.add(job)
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
        brief = [
            {k: s[k] for k in ("id", "task", "state", "done", "total")}
            for s in (j.status() for j in self.core.jobs())
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
            d = inflight.pop(ticket, None) if isinstance(ticket, int) else None
            streamed = verb == "DONE" and msg.get("stream") is True
            if streamed:
                # The result follows as piece lines; they are read (and dropped, if nobody
                # waits for them any more) up to the '.' line.
                waiter: Deferred[Any] = d if d is not None else Deferred()
                if d is None:
                    self.core.late_result()
                stream = ResultStream(waiter, msg.get("t"), self.core.config.max_result_bytes)
                if n < len(msgs):  # pieces can only follow the line's last answer
                    stream.failure = TaskFailed("BadResult", "a streamed DONE must come last")
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
                d.errback(TaskFailed(str(msg.get("type", "Error")), str(msg.get("message", ""))))


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

    def auth_failed(self, host: str) -> float:
        """Record a failed AUTH from ``host``; returns how long to wait before answering. The
        delay grows with recent failures from that address, across connections."""
        now = self.clock.seconds()
        count, last = self.failures.get(host, (0, now))
        if now - last > 60:
            count = 0
        count += 1
        self.failures[host] = (count, now)
        if len(self.failures) > 10_000:  # bounded memory under a spray of addresses
            self.failures.clear()
        return min(5.0, 0.25 * 2 ** min(count - 1, 5))

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        p = ServerProtocol(self.core, settings=self.settings, clock=self.clock)
        p.factory = self
        return p
