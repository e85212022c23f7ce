"""A connection's worker role: the :class:`~clusterd.core.workers.IWorkerLink` over the line
protocol.

After ``REGISTER`` the connection hands its lines here. The scheduler drives the link through
``send`` (one ``DO`` per sub-task; to a batch worker the DOs of one reactor turn go out as
``DO [...]`` lines) and ``close``; the worker answers ``DONE``/``ERROR`` (batched or not, a
result too long for a line streamed as piece lines, server/results.py), ``DRAIN`` and
heartbeats. An answer that cannot be read never leaves its sub-task waiting: its attempt fails
if its ticket can be recovered, else the connection is dropped and every sub-task on it runs
elsewhere.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from clusterd import PROTOCOL_VERSION
from clusterd.core.errors import BadResult, ErrorCode, WireError, WorkerLost, task_failed
from clusterd.core.framing import DEFAULT_MAX_LINE, LineTooLong
from clusterd.core.messages import (
    answer_ticket,
    batch_lines,
    byte_size,
    do_body,
    do_bytes_header,
    error_fields,
    is_answer,
    line_size,
)
from clusterd.core.replies import format_error
from clusterd.core.scheduler import SubTask, TimedResult
from clusterd.core.wire import dumps, parse_json_object, parse_json_objects, parse_request
from clusterd.core.workers import IWorkerLink
from clusterd.heartbeat import Heartbeat
from clusterd.server.limits import LOG_NAMESPACE, MAX_WORKER_SLOTS
from clusterd.server.results import ResultStream, part_merge

__all__ = ["WorkerSession", "parse_registration"]


def parse_registration(rest: str, max_depth: int) -> dict[str, Any]:
    """A ``REGISTER`` object, checked: protocol version, name, tasks and slots."""
    info = parse_json_object(rest, "REGISTER", max_depth)
    name, tasks, slots = info.get("name"), info.get("tasks"), info.get("slots")
    version = info.get("protocol", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"protocol version {info.get('protocol')!r} is not supported; "
            f"this server speaks {PROTOCOL_VERSION}.",
        )
    if not isinstance(name, str) or not name or len(name) > 200 or any(c.isspace() for c in name):
        raise WireError(
            ErrorCode.BAD_REQUEST, "REGISTER needs a 'name': 1-200 characters, no spaces."
        )
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise WireError(ErrorCode.BAD_REQUEST, "REGISTER needs 'tasks': a list of task names.")
    if type(slots) is not int or not 1 <= slots <= MAX_WORKER_SLOTS:
        raise WireError(
            ErrorCode.BAD_REQUEST, f"REGISTER needs 'slots': an integer 1-{MAX_WORKER_SLOTS}."
        )
    return info


@implementer(IWorkerLink)
class WorkerSession:
    """A connection in the worker role: the scheduler's link to that worker over the line
    protocol."""

    log = Logger(namespace=LOG_NAMESPACE)  # the namespace logs had before the split

    def __init__(self, conn: Any, info: dict[str, Any]) -> None:
        self.conn = conn  # a ServerProtocol (connection.py)
        self.name: str = info["name"]
        self.tasks = frozenset(info["tasks"])
        self.slots: int = info["slots"]
        self.address: str = conn.peer
        max_line = info.get("max_line")
        self.max_line = max_line if type(max_line) is int and max_line > 0 else DEFAULT_MAX_LINE
        self.batch = info.get("batch") is True  # takes DO arrays and may answer with arrays
        self.binary = info.get("bytes") is True  # takes a text chunk as a binary DO
        self.inflight: dict[int, Deferred[Any]] = {}
        self.next_ticket = 0
        self.outbox: dict[int, tuple[str, int]] = {}  # batch: ticket -> (DO object, bytes)
        self._flush_call: Any = None  # the callLater(0) that writes the outbox
        self.result_stream: ResultStream | None = None  # a result arriving in pieces
        self.handle: Any = None  # the scheduler's WorkerHandle
        s = conn.settings
        self.heartbeat = Heartbeat(
            conn.clock,
            s.heartbeat_interval,
            s.heartbeat_timeout,
            lambda: self.conn.write("PING"),
            self._silent,
        )

    @classmethod
    def register(cls, conn: Any, info: dict[str, Any]) -> WorkerSession:
        """Answer ``OK REGISTERED``, swap the connection's session, attach to the scheduler."""
        s = conn.settings
        registered = {
            "name": info["name"],
            "protocol": PROTOCOL_VERSION,
            "heartbeat_interval": s.heartbeat_interval,
            "heartbeat_timeout": s.heartbeat_timeout,
        }
        if info.get("batch") is True:
            registered["batch"] = True
        if info.get("parts") is True:  # it may send results in parts (server/results.py)
            registered["parts"] = True
        conn.replies.reply("OK REGISTERED " + dumps(registered))
        session = cls(conn, info)
        conn.swap(session)
        session.handle = conn.core.attach(session)
        session.heartbeat.start()
        return session

    # -- IWorkerLink -----------------------------------------------------------------------------

    def send(self, sub: SubTask) -> Deferred[Any]:
        """Send one sub-task; raises (and sends nothing) if it is longer than this worker
        accepts. A batch worker's DO objects wait in the outbox until the end of the reactor
        turn, then go out as one ``DO [...]`` line (or a few, within its max_line)."""
        if self.binary and isinstance(sub.input, bytes):
            return self._send_bytes(sub)
        body = do_body(self.next_ticket + 1, sub)
        size = byte_size(body)
        length = line_size("DO", size, self.batch)
        if length > self.max_line:
            raise ValueError(
                f"its DO line has {length} bytes; worker {self.name} accepts {self.max_line}"
            )
        self.next_ticket += 1
        ticket = self.next_ticket
        d: Deferred[Any] = Deferred(lambda _: self._cancel_ticket(ticket))
        self.inflight[ticket] = d
        if self.batch:
            self.outbox[ticket] = (body, size)
            if self._flush_call is None:
                self._flush_call = self.conn.clock.callLater(0, self.flush)
        else:
            self.conn.write("DO " + body)
        return d

    def _send_bytes(self, sub: SubTask) -> Deferred[Any]:
        """A text chunk as a binary DO: the header line, the chunk's bytes as they were cut
        (never copied into a line) and ``\n`` (docs/PROTOCOL.md, "Binary DO"). Never batched:
        the outbox goes first, so the worker sees the DOs in the order they were sent."""
        if len(sub.input) > self.max_line:
            raise ValueError(
                f"its DO has {len(sub.input)} bytes of input; "
                f"worker {self.name} accepts {self.max_line}"
            )
        self.next_ticket += 1
        ticket = self.next_ticket
        d: Deferred[Any] = Deferred(lambda _: self._cancel_ticket(ticket))
        self.inflight[ticket] = d
        self.flush()
        transport = self.conn.transport
        if transport is not None and not transport.disconnecting:
            transport.writeSequence([do_bytes_header(ticket, sub), sub.input, b"\n"])
        return d

    def close(self) -> None:
        """Drop the worker: abort its connection (the scheduler gave up on it)."""
        self.conn.transport.abortConnection()

    def _cancel_ticket(self, ticket: int) -> None:
        """Timed out, job ended, or a copy won: the worker drops it and frees the slot. One
        still in the outbox is simply never sent."""
        if self.inflight.pop(ticket, None) is not None:
            if self.outbox.pop(ticket, None) is None:
                self.conn.write("CANCEL " + dumps({"id": ticket}))

    # -- the Session interface (connection.py) -------------------------------------------------

    def flush(self) -> None:
        """Write the outbox as ``DO [...]`` lines, each within the worker's max_line, in one
        transport write."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if not self.outbox:
            return
        outbox, self.outbox = self.outbox, {}
        transport = self.conn.transport
        if transport is None or transport.disconnecting:
            return
        lines = batch_lines((("DO", body, size) for body, size in outbox.values()), self.max_line)
        transport.write("\n".join(lines).encode("utf-8", "backslashreplace") + b"\n")

    def touch(self) -> None:
        """A line arrived: the worker is alive (WORKERS shows when, as ``last_seen``)."""
        self.heartbeat.touch()
        if self.handle is not None:
            self.handle.last_seen = self.heartbeat.last

    def eof(self) -> None:
        """A worker closing its side changes nothing until the connection is lost."""
        pass

    def lost(self) -> None:
        """The worker is gone: remove it from the scheduler and fail its sub-tasks with
        WorkerLost."""
        self.heartbeat.stop()
        self.outbox.clear()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.handle is None:
            return
        self.conn.core.remove_worker(self.handle)  # first: nothing is requeued onto us
        if self.result_stream is not None:
            stream, self.result_stream = self.result_stream, None
            if stream.d is not None and not stream.d.called:
                stream.d.errback(WorkerLost(self.name))
        inflight, self.inflight = self.inflight, {}
        for d in inflight.values():
            d.errback(WorkerLost(self.name))

    def line(self, event: bytes | LineTooLong) -> None:
        """One line from the worker."""
        if self.result_stream is not None:
            stream = self.result_stream
            if stream.line(event):
                if stream.done:
                    self.result_stream = None
                return
            if stream.done:  # else a heartbeat passed through an open stream
                self.result_stream = None
        if isinstance(event, LineTooLong):
            why = f"a line of {event.size}+ bytes, over the {event.limit}-byte limit"
            if self.inflight:
                self._broken(why)
            else:
                self._reply_error(ErrorCode.LINE_TOO_LONG, f"{why}; it was discarded.")
            return
        try:
            request = parse_request(event)
        except WireError as e:
            self._unreadable_answer(event, e)
            return
        if request is None:
            return
        try:
            self._verb(request.verb, request.rest)
        except WireError as e:
            if request.verb in ("DONE", "ERROR"):
                self._unreadable_answer(event, e)
            else:
                self._reply_error(e.code, e.message)

    def _reply_error(self, code: str, message: str) -> None:
        self.conn.replies.reply(format_error(code, message))

    # -- what the worker sends -----------------------------------------------------------------

    def _verb(self, verb: str, rest: str) -> None:
        if verb == "PING":
            self.conn.write("OK PONG")
        elif verb == "OK":  # the worker's answer to our PING: liveness is all it carries
            pass
        elif verb == "DRAIN":
            self.conn.core.drain_worker(self.handle)
            self.conn.write("OK DRAINING")
        elif verb in ("DONE", "ERROR"):
            # Results are the worker's, not a stranger's: only Python's recursion limit applies.
            if self.batch:
                msgs = parse_json_objects(rest, verb, max_depth=100_000)
            else:
                msgs = [parse_json_object(rest, verb, max_depth=100_000)]
            for n, msg in enumerate(msgs, 1):
                self._answer(verb, msg, last=n == len(msgs))
        else:
            raise WireError(
                ErrorCode.WRONG_ROLE,
                f"{verb[:40]} is not a worker verb; workers send DONE, ERROR, DRAIN or PING.",
            )

    def _answer(self, verb: str, msg: dict[str, Any], last: bool) -> None:
        """One DONE or ERROR object: settle its ticket's Deferred."""
        ticket = msg.get("id")
        d = self.inflight.pop(ticket, None) if type(ticket) is int else None
        core = self.conn.core
        if verb == "DONE" and msg.get("stream") is True:
            # The result follows as piece lines; they are read (and dropped as they come, if
            # nobody waits for them) up to the '.' line.
            if d is None:
                core.late_result()
            limit = core.config.max_result_bytes
            stream = ResultStream(d, msg.get("t"), limit, part_merge(core.registry, msg), ticket)
            if not last:  # pieces can only follow the line's last answer
                stream.failure = BadResult("BadResult", "a streamed DONE must come last")
                stream.finish()
            else:
                self.result_stream = stream
        elif d is None:
            # Timed out, cancelled, or a losing speculative copy: counted, never combined.
            core.late_result()
        elif verb == "DONE":
            seconds = msg.get("t")
            if type(seconds) is float and seconds >= 0:
                d.callback(TimedResult(msg.get("result"), seconds))
            else:
                d.callback(msg.get("result"))
        else:
            d.errback(answer_failure(msg))

    def _unreadable_answer(self, line: bytes, e: WireError) -> None:
        ticket = answer_ticket(line)
        if ticket is None:
            if not self.inflight or not is_answer(line):
                self._reply_error(e.code, e.message)  # nothing can be waiting for it
                return
            self._broken(f"an answer that cannot be read ({e.code}: {e.message})")
            return
        d = self.inflight.pop(ticket, None)
        if d is None:
            self.conn.core.late_result()
        else:
            self.outbox.pop(ticket, None)
            self.log.warn(
                "worker {worker} answered ticket {ticket} unreadably ({code}); that attempt failed",
                worker=self.name,
                ticket=ticket,
                code=e.code,
            )
            d.errback(BadResult("BadResult", f"the worker's answer could not be read: {e}"))
        self._reply_error(e.code, e.message)  # the worker logs it

    def _broken(self, why: str) -> None:
        """The worker sent something that cannot be matched to a sub-task: nothing it holds can
        be trusted to be answered, so the connection is aborted and its loss requeues every one
        of its sub-tasks (WorkerLost)."""
        self.log.error(
            "worker {worker} at {peer} sent {why}; dropping the connection so its sub-tasks "
            "run elsewhere",
            worker=self.name,
            peer=self.conn.peer,
            why=why,
        )
        self.conn.abort()

    def _silent(self, silent: float) -> None:
        self.log.warn(
            "worker {worker} silent for {silent:.1f}s; declaring it lost",
            worker=self.name,
            silent=silent,
        )
        self.conn.transport.abortConnection()


def answer_failure(msg: dict[str, Any]) -> Exception:
    """The failure an ERROR object reports: its type, message and (optional) ``traceback``;
    ``"retry": false`` makes it a NotRetryable (docs/PROTOCOL.md §5, ERROR)."""
    return task_failed(*error_fields(msg))
