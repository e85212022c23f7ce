"""The worker's side of the line protocol: register, take DO lines, answer DONE or ERROR.

``ClientService`` builds a new protocol per connection, so registration happens in every
connection: a worker that lost its server registers again as soon as it is back. Both sides
send heartbeats; a server silent past the timeout is treated as gone (the connection is aborted
and ClientService reconnects), which catches half-open connections TCP never reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.framing import DEFAULT_MAX_LINE, Frame, LineFramer, LineTooLong
from clusterd.core.messages import (
    batch_lines,
    byte_size,
    do_header_size,
    done_body,
    error_body,
    line_size,
)
from clusterd.core.streaming import END
from clusterd.core.wire import WireError, dumps, parse_json_object, parse_json_objects
from clusterd.endpoints import no_delay
from clusterd.heartbeat import Heartbeat
from clusterd.worker import registration, runs
from clusterd.worker.parts import PartStreams
from clusterd.worker.pool import PoolService, RunResult

__all__ = ["WorkerProtocol", "WorkerFactory"]


class WorkerProtocol(Protocol):
    """The worker's connection to the server: registers, runs each DO in the pool, answers DONE or
    ERROR."""

    log = Logger()

    def __init__(self, factory: WorkerFactory) -> None:
        self.factory = factory
        # A binary DO's header holds '"bytes":' (docs/PROTOCOL.md, "Binary DO").
        self.framer = LineFramer(factory.max_line, header=do_header_size, marker=b'"bytes":')
        self.registered = False
        self.greeted = False
        self.lost = False
        self.draining = False
        self.drain_acked = False
        self.closing = False
        self.server_max_line = DEFAULT_MAX_LINE
        self.batch = False  # the server takes DONE/ERROR arrays (its OK REGISTERED says so)
        self.parts_ok = False  # the server takes results in parts (its OK REGISTERED says so)
        self._answers: list[tuple[str, str, int]] = []  # batch: (verb, object, bytes) to send
        self._answer_call: Any = None  # the callLater(0) that sends them
        self.running: dict[Any, Deferred[Any]] = {}
        self.parts = PartStreams(self._raw, lambda: self.server_max_line)  # generator results
        self.verbs: dict[str, Callable[[str], None]] = {
            "DO": self._on_do,
            "CANCEL": self._on_cancel,
            "PING": lambda rest: self.send_line("OK PONG"),
            "OK": self._on_ok,
        }
        self.idle: Deferred[None] | None = None
        self.heartbeat = Heartbeat(
            factory.clock,
            factory.heartbeat_interval,
            factory.heartbeat_timeout,
            lambda: self.send_line("PING"),
            self._server_silent,
        )

    def connectionMade(self) -> None:
        """Turn off Nagle's algorithm, become the factory's current connection, start the
        heartbeat."""
        no_delay(self.transport)
        self.factory.current = self
        self.heartbeat.start()

    def dataReceived(self, data: bytes) -> None:
        """Note a sign of life, frame the bytes into lines, and handle each (logging bad ones)."""
        self.heartbeat.touch()
        for event in self.framer.feed(data):
            if isinstance(event, LineTooLong):
                self.log.error("server sent a line over {limit} bytes; ignored", limit=event.limit)
                continue
            if isinstance(event, Frame):
                self._on_do_bytes(event)
                continue
            try:
                self._line(event.decode("utf-8"))
            except (WireError, UnicodeDecodeError) as e:
                self.log.error("bad line from server: {error}", error=str(e))

    def _line(self, text: str) -> None:
        if not self.greeted:
            registration.greeted(self, text)
            return
        verb, _, rest = text.partition(" ")
        if verb == "ERR":
            registration.refused(self, text)
            return
        handler = self.verbs.get(verb)
        if handler is not None:
            handler(rest)

    def _on_do(self, rest: str) -> None:
        bad = 0
        for msg in parse_json_objects(rest, "DO"):
            if isinstance(msg.get("id"), (int, str)):
                self._do(msg)
            else:
                bad += 1
        if bad:
            raise WireError("BAD_REQUEST", "DO without an id")

    def _on_do_bytes(self, frame: Frame) -> None:
        """A binary DO: its header's fields, and its input the raw bytes that followed, handed
        to the pool as they came (the child decodes them once)."""
        try:
            msg = parse_json_object(frame.header[3:].decode("utf-8"), "DO")
        except (WireError, UnicodeDecodeError) as e:
            self.log.error("bad line from server: {error}", error=str(e))
            return
        if not isinstance(msg.get("id"), (int, str)):
            self.log.error("bad line from server: {error}", error="DO without an id")
            return
        msg["input"] = frame.data
        self._do(msg)

    def _on_cancel(self, rest: str) -> None:
        ticket = parse_json_object(rest, "CANCEL").get("id")
        d = self.running.pop(ticket, None) if isinstance(ticket, (int, str)) else None
        if d is not None:
            d.cancel()

    def _on_ok(self, rest: str) -> None:
        if rest.startswith("DRAINING"):
            # Every DO the server sent before it saw our DRAIN has arrived by now (one stream,
            # in order), so once those are answered we hold nothing.
            self.drain_acked = True
            self._maybe_idle()
        elif rest.startswith("REGISTERED"):
            registration.registered(self, rest)

    def _do(self, msg: dict[str, Any]) -> None:
        ticket = msg.get("id")
        if ticket in self.running:
            # The server never reuses an id on one connection; a repeat is not ours to run twice.
            self.log.error(
                "server sent DO for sub-task {ticket!r} already held; ignored", ticket=ticket
            )
            return
        d = self.running[ticket] = self._start(ticket, msg)

        def ok(run: Any) -> None:
            """Answer DONE with the result, streamed if too long for a line (ERROR ResultTooLarge if
            it cannot be)."""
            # A pool fires with a RunResult (value and run time, or parts sent) or a bare value.
            if isinstance(run, RunResult) and run.parts:
                self._parts_done(ticket, msg)
                return
            done = {"id": ticket, "job": msg.get("job")}
            if isinstance(run, RunResult):
                done.update(result=run.value, t=run.seconds)
            else:
                done["result"] = run
            body = done_body(done)
            size = byte_size(body)
            length = line_size("DONE", size, self.batch)
            if length > self.server_max_line and self._stream_result(done):
                return
            if length > self.server_max_line:
                self._error(
                    ticket,
                    msg,
                    "ResultTooLarge",
                    f"the result needs a {length}-byte line; the server accepts "
                    f"{self.server_max_line}",
                )
            else:
                self._answer("DONE", body, size)

        def failed(f: Failure) -> None:
            """Answer ERROR with the failure's type and message, unless the server cancelled the
            run."""
            if f.check(CancelledError):  # the server expects no answer; drops its pieces
                return self.parts.drop(ticket)  # (a stream the run began ends with '.')
            self._error(ticket, msg, *runs.failure_fields(f))

        def settled(_: Any) -> None:
            """The run is over: forget it, and finish a drain if it was the last."""
            self.running.pop(ticket, None)
            self._maybe_idle()

        d.addCallbacks(ok, failed).addBoth(settled)

    def _start(self, ticket: Any, msg: dict[str, Any]) -> Deferred[Any]:
        """Run a DO in the pool (worker/runs.py); a generator's parts go out as produced when
        the pool and the server both take parts (worker/parts.py)."""
        pool = self.factory.pool
        sink = None
        if self.parts_ok and getattr(pool, "streams_parts", False):
            sink = self.parts.sink(ticket, msg.get("job"), str(msg.get("task")))
        return runs.start(pool, msg, self.factory.ref_roots, sink)

    def _error(
        self,
        ticket: Any,
        msg: dict[str, Any],
        kind: str,
        message: str,
        traceback: str = "",
        retry: bool = True,
    ) -> None:
        """Answer ERROR, with the task's traceback and ``"retry": false`` if it marked the
        exception not worth retrying. A line the server cannot take would leave the sub-task
        unanswered until a timeout, if it has one, so a long traceback or message is
        shortened to fit the server's line, with a note that it was."""
        room = self.server_max_line - 7  # "ERROR [" + body + "]"
        body, size = error_body(ticket, msg.get("job"), kind, message, room, traceback, retry)
        if self.parts.streamed(ticket):  # its ERROR line, alone, ends the stream it began
            self.parts.end(ticket, ("ERROR " + body).encode("utf-8", "backslashreplace") + b"\n")
            return
        self._answer("ERROR", body, size)

    def _parts_done(self, ticket: Any, msg: dict[str, Any]) -> None:
        """A generator run answered after streaming its parts: ``.`` ends the stream, unless a
        part was too long for the server's line (ResultTooLarge)."""
        too_long = self.parts.oversized(ticket)
        if too_long is None:
            self.parts.end(ticket, b".\n")
            return
        self._error(
            ticket,
            msg,
            "ResultTooLarge",
            f"a part of the result needs a {too_long}-byte line; the server accepts "
            f"{self.server_max_line}",
        )

    def _stream_result(self, done: dict[str, Any]) -> bool:
        """A result too long for one line goes as ``DONE {..., "stream": true}``, ``+<piece>``
        lines within the server's line limit, and ``.`` (docs/PROTOCOL.md, "Streamed values").
        False when it cannot be cut that way (a number, or one element longer than a line):
        the caller then reports ResultTooLarge."""
        value = done.pop("result", None)
        lines = runs.result_lines(value, self.server_max_line)
        if lines is None:
            done["result"] = value
            return False
        done["stream"] = True
        self.send_line("DONE " + dumps(done))  # a line of its own, after any batched answers
        for line in lines:
            self.send_line(line)
        self.send_line(END)
        return True

    def _answer(self, verb: str, body: str, size: int) -> None:
        """Send a DONE or ERROR. To a batch server, the answers of one reactor turn go out
        together at its end, as one array line per verb (or a few, within its max_line)."""
        if not self.batch:
            self.send_line(verb + " " + body)
            return
        self._answers.append((verb, body, size))
        if self._answer_call is None:
            self._answer_call = self.factory.clock.callLater(0, self._flush_answers)

    def _flush_answers(self) -> None:
        call, self._answer_call = self._answer_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._answers:
            return
        answers, self._answers = self._answers, []
        if self.lost or self.transport.disconnecting:
            return
        lines = batch_lines(answers, self.server_max_line)
        data = "\n".join(lines).encode("utf-8", "backslashreplace") + b"\n"
        if self.parts.open is not None:
            self.parts.hold(data)  # after the part stream on the wire ends
        else:
            self.transport.write(data)

    def send_line(self, line: str) -> None:
        """Write one line, after any answers still batched (and after an open part stream,
        unless it is a heartbeat)."""
        if self._answers:
            self._flush_answers()  # answers first, in the order they were made
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        if self.parts.holds(line):
            self.parts.hold(data)
        else:
            self._raw(data)

    def _raw(self, data: bytes) -> None:
        """Write bytes as they are, unless the connection is going."""
        if not self.lost and not self.transport.disconnecting:
            self.transport.write(data)

    # -- graceful stop -------------------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Ask for no new sub-tasks; fires once those held have been answered."""
        if not self.draining:
            self.draining = True
            self.send_line("DRAIN")
        if self.idle is None:
            self.idle = Deferred()
        self._maybe_idle()
        return self.idle

    def _maybe_idle(self) -> None:
        if self.idle is None or self.idle.called or self.running:
            return
        if self.drain_acked or self.lost:
            self._flush_answers()  # the last answers go out before the caller disconnects
            self.idle.callback(None)

    def _server_silent(self, silent: float) -> None:
        self.log.warn(
            "server silent for {silent:.1f}s; dropping the connection to reconnect",
            silent=silent,
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        """Stop the heartbeat and timers, cancel the runs the server will requeue, and log why."""
        self.lost = True
        self.heartbeat.stop()
        self._answers.clear()
        self.parts.clear()
        if self._answer_call is not None and self._answer_call.active():
            self._answer_call.cancel()
        self._answer_call = None
        backoff = getattr(self, "backoff", None)
        if backoff is not None and backoff.active():
            backoff.cancel()
        if self.factory.current is self:
            self.factory.current = None
        # The server requeues what we held; stop computing it here.
        running, self.running = self.running, {}
        for d in running.values():
            d.cancel()
        self._maybe_idle()
        if self.registered:
            self.log.info("lost the server: {reason}", reason=reason.getErrorMessage())
        elif not self.closing and not self.factory.stopping:
            registration.log_unregistered_loss(self, reason)


class WorkerFactory(Factory):
    """Builds the worker's connections (one per reconnect) and holds what they share: pool, name,
    tasks, limits."""

    def __init__(
        self,
        pool: PoolService,
        name: str,
        tasks: list[str],
        slots: int,
        max_line: int = DEFAULT_MAX_LINE,
        clock: Any = None,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 15.0,
        secret: bytes | None = None,
        max_delay: float = 30.0,
        ref_roots: tuple[str, ...] = (),
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.pool = pool
        self.name = name
        self.tasks = tasks
        self.slots = slots
        self.max_line = max_line
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.registrations = 0
        self.rejections = 0
        self.secret = secret
        self.max_delay = max_delay
        self.ref_roots = ref_roots  # where inputs by reference may be read (empty: nowhere)
        self.current: WorkerProtocol | None = None
        self.stopping = False
        self.last_loss: str | None = None  # why the last connections ended before registering
        self.losses = 0  # how many in a row ended so

    def buildProtocol(self, addr: Any) -> WorkerProtocol:
        """A new connection, which registers with the server once greeted."""
        return WorkerProtocol(self)
