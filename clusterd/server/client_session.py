"""A connection's client role: decode a verb, make one :class:`ClientOps` call, encode it.

Every request takes its place in the connection's reply queue (``conn.replies``) so replies
keep request order. ``REGISTER`` turns the connection into a worker: it swaps in a
:class:`~clusterd.server.worker_session.WorkerSession`. A streamed ``RUN``/``SUBMIT`` hands
the following piece lines to an :class:`~clusterd.server.streams.InputStream`.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd import PROTOCOL_VERSION
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.framing import Frame, LineTooLong
from clusterd.core.jobs import Job
from clusterd.core.replies import format_error, progress_line
from clusterd.core.streaming import STREAM_MARK
from clusterd.core.wire import (
    CLIENT_VERBS,
    WORKER_VERBS,
    JobRequest,
    Request,
    dumps,
    parse_job_request,
    parse_json_object,
    parse_request,
)
from clusterd.server.client_ops import ClientOps
from clusterd.server.limits import JOBS_DEFAULT_LIMIT, LOG_NAMESPACE, OFFLOAD_LINE
from clusterd.server.replies import PendingReply
from clusterd.server.streams import InputStream
from clusterd.server.worker_session import WorkerSession, parse_registration

FRAME_OUTSIDE = "a $<n> frame belongs inside a streamed input (after RUN/SUBMIT <task> @); dropped."

__all__ = ["ClientSession"]


def _starts_stream(request: Request | None) -> bool:
    """Whether a (refused) request line was ``RUN``/``SUBMIT <task> @ ...``: its piece lines
    follow and must be read without replies."""
    if request is None or request.verb not in ("RUN", "SUBMIT"):
        return False
    parts = request.rest.split(None, 2)
    return len(parts) >= 2 and parts[1] == STREAM_MARK


def _job_id(rest: str, verb: str) -> str:
    job_id = rest.strip()
    if not job_id or any(c.isspace() for c in job_id):
        raise WireError(ErrorCode.BAD_REQUEST, f"{verb} takes one job id, e.g. {verb} j1.")
    return job_id


class ClientSession:
    """A connection in the client role: parses each request line, calls :class:`ClientOps` and
    queues the reply."""

    log = Logger(namespace=LOG_NAMESPACE)  # the namespace logs had before the split

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # a ServerProtocol (connection.py)
        self.replies = conn.replies
        self.ops = ClientOps(conn.core, conn.settings)
        self.stream: InputStream | None = None  # a RUN/SUBMIT whose input is arriving
        self.verbs = {
            "PING": self.do_PING,
            "HELP": self.do_HELP,
            "QUIT": self.do_QUIT,
            "AUTH": conn.auth.auth,
            "SUBMIT": lambda rest: self._submit(rest, "SUBMIT"),
            "RUN": lambda rest: self._submit(rest, "RUN"),
            "WAIT": self.do_WAIT,
            "WATCH": self.do_WATCH,
            "STATUS": self.do_STATUS,
            "CANCEL": self.do_CANCEL,
            "JOBS": self.do_JOBS,
            "WORKERS": lambda rest: self._ok(self.ops.workers()),
            "TASKS": lambda rest: self._ok(self.ops.tasks()),
            "STATS": lambda rest: self._ok(self.ops.stats()),
            "REGISTER": self.do_REGISTER,
        }

    # -- the Session interface (connection.py) -------------------------------------------------

    def touch(self) -> None:
        """A client has no heartbeat to feed: nothing to do."""
        pass

    def flush(self) -> None:
        """A client has no batched lines to send first: nothing to do."""
        pass

    def eof(self) -> None:
        """The peer closed its side: a streamed input still open fails with UPLOAD_INCOMPLETE."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.fail(
                ErrorCode.UPLOAD_INCOMPLETE,
                "the input ended before the streamed input's '.' line.",
            )

    def lost(self) -> None:
        """The connection is gone: drop this client's waits and abandon a streamed input in
        progress."""
        self.ops.close()
        if self.stream is not None:
            self.stream.lost()
            self.stream = None

    def line(self, event: bytes | LineTooLong) -> None:
        """Handle one framed line: a piece of an open stream, or a request run by its verb's handler
        (ERR on a bad one)."""
        if self.stream is not None:
            stream = self.stream
            if stream.line(event):
                if stream.done:
                    self.stream = None
                return
            self.stream = None
        if isinstance(event, LineTooLong):
            self._too_long(event)
            return
        if isinstance(event, Frame):
            self.replies.reply(format_error(ErrorCode.BAD_REQUEST, FRAME_OUTSIDE))
            return
        request = None
        try:
            request = parse_request(event)
            if request is None:
                return
            self.conn.auth.check(request.verb)
            handler = self.verbs.get(request.verb)
            if handler is None:
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
            self.replies.reply(format_error(e.code, e.message))
            if self.stream is None and _starts_stream(request):
                # The refusal is the request's one reply; its piece lines and '.' get none.
                self.stream = InputStream.refused()

    def _too_long(self, event: LineTooLong) -> None:
        self.log.warn(
            "line of {size}+ bytes from {peer} over the {limit}-byte limit",
            size=event.size,
            peer=self.conn.peer,
            limit=event.limit,
        )
        before_auth = (
            f" (until AUTH succeeds, lines may be at most {event.limit} bytes)"
            if event.limit < self.conn.max_line
            else ""
        )
        self.replies.reply(
            format_error(
                ErrorCode.LINE_TOO_LONG,
                f"the line is longer than {event.limit} bytes and was discarded; "
                f"nothing in it was run{before_auth}.",
            )
        )

    # -- verbs ---------------------------------------------------------------------------------

    def _ok(self, value: Any) -> None:
        self.replies.reply("OK " + dumps(value))

    def do_PING(self, rest: str) -> None:
        """PING: reply ``OK PONG``."""
        self.replies.reply("OK PONG")

    def do_HELP(self, rest: str) -> None:
        """HELP: reply ``OK`` with the protocol version and the client verbs."""
        self._ok({"protocol": PROTOCOL_VERSION, "verbs": CLIENT_VERBS})

    def do_QUIT(self, rest: str) -> None:
        """QUIT: reply ``OK BYE``, then close once every earlier reply is out."""
        self.conn.closing = True
        self.replies.reply("OK BYE")

    def _submit(self, rest: str, verb: str) -> None:
        self.ops.check_capacity()
        if len(rest) > OFFLOAD_LINE and self.ops.core.offload is not None:
            self._submit_offloaded(rest, verb)
            return
        req = parse_job_request(rest, verb, self.conn.settings.max_json_depth)
        if req.streamed:
            self._open_stream(req.task, req.options, verb)
            return
        self._answer_job(PendingReply(), self.ops.submit(req), verb)

    def _submit_offloaded(self, rest: str, verb: str) -> None:
        """A request line over OFFLOAD_LINE bytes (up to --max-line, 16 MiB) is parsed and split
        on a thread: tens of milliseconds of JSON work must not stall every other connection.
        This connection reads nothing more meanwhile, so its requests keep their order."""
        reply = self.replies.open()
        chunks = self.ops.core.default_chunks(rest.split(None, 1)[0])
        depth = self.conn.settings.max_json_depth

        def prepare() -> tuple[JobRequest, Any]:
            """On a thread: parse the request and split and encode its input."""
            # Parse, split and encode the cut the journal keeps: all pure, all off the reactor.
            req = parse_job_request(rest, verb, depth)
            return req, self.ops.prepare(req, chunks)

        def parsed(out: tuple[JobRequest, Any]) -> None:
            """Back on the reactor: submit the parsed job, or refuse a streamed request with long
            options."""
            req, (pieces, encoded) = out
            if req.streamed:  # "RUN task @ <a megabyte of options>"
                message = "a streamed request's options must be short; send the input as pieces."
                self.replies.finish(reply, format_error(ErrorCode.BAD_REQUEST, message))
                self.stream = InputStream.refused()
            else:
                self._answer_job(reply, self.ops.submit(req, pieces, encoded), verb)

        def refused(failure: Failure) -> None:
            """The request could not be parsed: reply ERR with its code (BAD_REQUEST if
            unexpected)."""
            e = failure.value
            if isinstance(e, WireError):
                self.replies.finish(reply, format_error(e.code, e.message))
            else:
                self.log.failure("parsing a request failed", failure)
                self.replies.finish(reply, format_error(ErrorCode.BAD_REQUEST, "cannot parse it."))

        def settle(_: Any) -> None:
            """Read the connection again, unless it is gone."""
            if not self.conn.gone:
                self.conn.hold(False)

        self.conn.hold(True)
        d = self.ops.core.offload(prepare)
        d.addCallback(parsed).addErrback(refused).addBoth(settle)

    def _answer_job(self, reply: PendingReply, job: Job, verb: str) -> None:
        """SUBMIT: the id, once the job is durably recorded. RUN: the job's final line."""
        if reply not in self.replies:
            self.replies.open(reply)
        if verb == "RUN":
            self.replies.await_final(job, reply)
            return
        d = self.ops.accepted(job)
        reply.cleanup = d.cancel
        d.addCallbacks(
            lambda j: self.replies.finish(reply, f"OK {j.id}"),
            self.replies.refused,
            errbackArgs=(reply,),
        )

    def _open_stream(self, task: str, options: dict[str, Any], verb: str) -> None:
        """``RUN``/``SUBMIT <task> @``: the input follows as piece lines (streams.py)."""
        job, upload = self.ops.open_stream(task, options)
        reply = self.replies.open()
        self.stream = InputStream(
            self.ops.core,
            job,
            upload,
            verb,
            self.conn.settings.max_json_depth,
            refuse=lambda line: self.replies.finish(reply, line),
            accept=lambda j: self._answer_job(reply, j, verb),
            hold=self.conn.hold,
        )

    def do_WAIT(self, rest: str) -> None:
        """WAIT <job>: reply with the job's final line once it has ended and the end is durable."""
        self.replies.await_final(self.ops.get(_job_id(rest, "WAIT")))

    def do_WATCH(self, rest: str) -> None:
        """WATCH <job>: reply a PROGRESS line per whole percent done, then the job's final line."""
        job = self.ops.get(_job_id(rest, "WATCH"))
        reply = self.replies.open()
        last = [-1]

        def progress(j: Job) -> None:
            """Emit a PROGRESS line when the job's whole percent done has changed."""
            # At most ~100 lines per job: one per whole percent, plus the first.
            pct = j.shown_done * 100 // j.total if j.total else 100
            if pct != last[0] and not j.settled:
                last[0] = pct
                self.replies.emit(reply, progress_line(j))

        unsubscribe = None
        if not job.is_final:
            progress(job)
            unsubscribe = job.watch(progress)
        self.replies.await_final(job, reply, extra_cleanup=unsubscribe)

    def do_STATUS(self, rest: str) -> None:
        """STATUS <job>: reply ``OK`` with the job's STATUS object."""
        self._ok(self.ops.status(_job_id(rest, "STATUS")))

    def do_CANCEL(self, rest: str) -> None:
        """``OK <job> cancelled`` once the cancel is durable (a job already ended answers its
        own final state)."""
        d = self.ops.cancel(_job_id(rest, "CANCEL"))
        reply = self.replies.open()
        reply.cleanup = d.cancel
        d.addCallbacks(
            lambda j: self.replies.finish(reply, f"OK {j.id} {j.state}"),
            self.replies.refused,
            errbackArgs=(reply,),
        )

    def do_JOBS(self, rest: str) -> None:
        """``JOBS [{"limit": N, "before": "<job id>"}]``: one page of jobs, newest first, so
        the reply's size is bounded whatever the server holds (the last id is the cursor)."""
        limit, before = JOBS_DEFAULT_LIMIT, None
        if rest.strip():
            opts = parse_json_object(rest, "the JOBS options", self.conn.settings.max_json_depth)
            unknown = sorted(set(opts) - {"limit", "before"})
            if unknown:
                raise WireError(
                    ErrorCode.BAD_REQUEST,
                    f"unknown JOBS option {unknown[0][:40]!r}; known options: before, limit.",
                )
            limit, before = opts.get("limit", JOBS_DEFAULT_LIMIT), opts.get("before")
        self._ok(self.ops.jobs(limit, before))

    def do_REGISTER(self, rest: str) -> None:
        """Become a worker: the connection swaps this session for a worker session."""
        info = parse_registration(rest, self.conn.settings.max_json_depth)
        if self.replies.unfinished():
            raise WireError(
                ErrorCode.BAD_REQUEST, "REGISTER while client requests are pending is not allowed."
            )
        WorkerSession.register(self.conn, info)
