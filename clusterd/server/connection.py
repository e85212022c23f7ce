"""One server connection: framing, backpressure, limits, the auth gate and bounded closes.

The connection frames lines and hands each to its current *session*: a
:class:`~clusterd.server.client_session.ClientSession` until the peer sends ``REGISTER``, then
a :class:`~clusterd.server.worker_session.WorkerSession` (the connection swaps its session).
It knows nothing of verbs.

Its mode is two named things instead of scattered flags:

- ``phase``: OPEN, CLOSING (read nothing more; close once the replies are out) or GONE
  (``connectionLost`` has run);
- ``stops``: why it reads nothing for now: ``"paused"`` (the peer does not read its replies),
  ``"held"`` (a stream's flow control, or a big request parsed on a thread), ``"auth"`` (a
  failed AUTH's slow answer is pending); and, beside them, a full reply queue
  (MAX_PENDING_REPLIES). A stopped connection's unread requests wait in TCP flow control, and
  the lines already framed wait here, run in order once it may read again.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clusterd.core.errors import ErrorCode
from clusterd.core.framing import DEFAULT_MAX_LINE, LineFramer, LineTooLong, frame_header
from clusterd.core.replies import format_error
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import format_greeting
from clusterd.endpoints import no_delay
from clusterd.server.auth_gate import AuthGate
from clusterd.server.client_session import ClientSession
from clusterd.server.limits import LOG_NAMESPACE, ConnectionSettings
from clusterd.server.replies import ReplyQueue

__all__ = ["ServerProtocol", "Phase", "Session"]


class Phase(enum.Enum):
    """Where a connection is in its life: open, closing, or gone."""

    OPEN = "open"
    CLOSING = "closing"  # QUIT, a refusal, end of input...: read nothing more, then close
    GONE = "gone"  # connectionLost has run


class Session(TypingProtocol):
    """What a connection's current session does with it (client or worker role)."""

    def line(self, event: bytes | LineTooLong) -> None:
        """Handle one framed line (or an overlong one, already discarded)."""

    def touch(self) -> None:
        """Bytes arrived (a worker's heartbeat counts them)."""

    def flush(self) -> None:
        """Write what is held back (a worker's batched DOs): a line is about to be written."""

    def eof(self) -> None:
        """The peer closed its sending side; its lines so far have all been handled."""

    def lost(self) -> None:
        """The connection is gone: release everything."""


@implementer(IHalfCloseableProtocol, IPushProducer, IHandshakeListener)
class ServerProtocol(Protocol):
    """One server connection: frames lines for its session, applies backpressure and limits."""

    log = Logger(namespace=LOG_NAMESPACE)  # the namespace logs had before the split

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
        # "$<n>" frames: the raw bytes of a streamed text input (docs/PROTOCOL.md).
        self.framer = LineFramer(self.max_line, header=frame_header)
        self.replies = ReplyQueue(self, self.max_line)
        self.auth = AuthGate(self)
        self.session: Session = ClientSession(self)
        self._retired: Session | None = None  # the client session a REGISTER replaced
        self.phase = Phase.OPEN
        self.stops: set[str] = set()
        self.peer = ""
        self.host = ""
        self.counted = False  # holds a place in the factory's connection limits
        self.handshake_timer: Any = None  # TLS: the handshake must finish by auth_timeout
        self._abort_call: Any = None  # a close in progress: abortConnection after close_grace
        self._reads_paused = False  # what this protocol last told the transport
        self._backlog: deque[bytes | LineTooLong] = deque()  # framed, not yet handled
        # Before AUTH: bytes not yet framed, framed one line at a time so that a granted AUTH
        # raises the line limit for the very next line (a pipelined request after AUTH).
        self._raw: deque[bytes] = deque()
        self._raw_off = 0
        self._eof_pending = False  # the peer half-closed while read lines still waited here
        self._draining = False
        self._on_resume: list[Callable[[], None]] = []  # streamed answers waiting for room

    @property
    def closing(self) -> bool:
        """Whether the connection reads nothing more (closing or gone)."""
        return self.phase is not Phase.OPEN

    @closing.setter
    def closing(self, value: bool) -> None:
        """Setting it True moves an open connection to CLOSING."""
        if value and self.phase is Phase.OPEN:
            self.phase = Phase.CLOSING

    @property
    def gone(self) -> bool:
        """Whether ``connectionLost`` has run."""
        return self.phase is Phase.GONE

    def swap(self, session: Session) -> None:
        """The peer changed role (REGISTER): later lines go to ``session``. Workers send no
        ``$<n>`` frames, so their lines are framed as plain lines."""
        self._retired, self.session = self.session, session
        self.framer.header = None

    # -- connection ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Admit the connection (or refuse it), then await TLS or start reading."""
        peer = self.transport.getPeer()
        self.host = str(getattr(peer, "host", peer))
        self.peer = f"{self.host}:{getattr(peer, 'port', '')}".rstrip(":")
        self.log.debug("connection from {peer}", peer=self.peer)
        no_delay(self.transport)
        factory = getattr(self, "factory", None)
        if factory is not None:
            refusal = factory.admit(self)
            if refusal:
                self.closing = True
                self.write(format_error(ErrorCode.TOO_MANY_CONNECTIONS, refusal))
                self.close()
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
        extra = self.auth.start()
        self.write(format_greeting("server", self.max_line, **extra))

    def _handshake_expired(self) -> None:
        self.handshake_timer = None
        self.log.warn(
            "{peer} did not complete the TLS handshake in {t}s; closing",
            peer=self.peer,
            t=self.settings.auth_timeout,
        )
        self.close()

    def close(self) -> None:
        """Every close the server decides comes here: ``loseConnection()`` (which lets queued
        replies out, and on TLS waits for the peer's close_notify), then ``abortConnection()``
        after ``close_grace`` seconds whatever the peer does, so a peer that never reads, never
        answers close_notify or never finishes the handshake cannot keep its socket (and its
        place in the connection limits). Reads nothing more meanwhile."""
        self.closing = True
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

    def abort(self) -> None:
        """Drop the connection at once (a broken worker, an answer that cannot be sent)."""
        self.closing = True  # run none of the lines read behind it
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """TLS is up: disarm the handshake deadline and start reading."""
        if self.handshake_timer is not None and self.handshake_timer.active():
            self.handshake_timer.cancel()
        self.handshake_timer = None
        self._register_producer()

    def _register_producer(self) -> None:
        """Backpressure: when this peer reads slower than we write, the transport pauses us and
        we stop reading its requests, instead of buffering replies without bound. On TLS this
        waits for the handshake: TLS pauses producers until then, and pausing our reads would
        stall the very handshake being waited for."""
        if not self.closing:
            self.transport.registerProducer(self, True)

    # -- backpressure --------------------------------------------------------------------------

    # IPushProducer: the transport's write buffer is full (pause) or drained (resume).
    def pauseProducing(self) -> None:
        """The peer is not reading its replies: read and run nothing more."""
        self.stop_reading("paused")

    def resumeProducing(self) -> None:
        """The peer's buffer drained: run held lines and paced answers, read again."""
        if "paused" in self.stops:
            self.stops.discard("paused")
            self.drain()  # the lines framed before the pause run now, and reading resumes
            waiting, self._on_resume = self._on_resume, []
            for fn in waiting:
                fn()

    def stopProducing(self) -> None:
        """Nothing to stop: ``connectionLost`` does the cleanup."""
        pass

    def stop_reading(self, reason: str) -> None:
        """Read and run nothing more until :meth:`resume_reading` with the same reason."""
        if reason not in self.stops:
            self.stops.add(reason)
            self._sync_reading()

    def resume_reading(self, reason: str) -> None:
        """Undo :meth:`stop_reading` for ``reason``, and run what waited."""
        if reason in self.stops:
            self.stops.discard(reason)
            self.drain()

    def hold(self, hold: bool) -> None:
        """Stop (or start again) reading this connection: a stream's flow control, or a big
        request being parsed on another thread."""
        if hold:
            self.stop_reading("held")
        else:
            self.resume_reading("held")

    def writable(self) -> bool | None:
        """For paced answers: None once gone, False while the peer's buffer is full."""
        return None if self.gone else "paused" not in self.stops

    def when_writable(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the peer's write buffer drains (a paced answer)."""
        self._on_resume.append(fn)

    def _stopped(self) -> bool:
        """Whether this connection may run nothing more for now (see the module docstring)."""
        return bool(self.stops) or self.replies.full()

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

    def replies_settled(self, was_full: bool) -> None:
        """Replies left the queue: close once a closing connection's are all out, or read
        again once the queue dropped below its limit."""
        if self.closing and not self.replies:
            self.close()
        elif was_full and not self.replies.full():
            self.drain()  # replies drained below the backlog limit: read again

    # -- reading -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Note a sign of life, frame the bytes into lines, and run them."""
        self.session.touch()
        if self._raw or self.framer.limit < self.max_line:
            self._raw.append(data)
        else:
            self._backlog.extend(self.framer.feed(data))
        self.drain()

    def drain(self) -> None:
        """Handle framed lines in order until none is left or the connection is stopped (see
        :meth:`_stopped`), checked between every two lines: the rest wait here, so requests
        are still handled strictly in the order they were sent, and nothing runs while the
        peer is not reading its replies."""
        if self._draining:
            return
        self._draining = True
        try:
            while not self._stopped():
                if self.closing:
                    self._backlog.clear()
                    self._raw.clear()
                    break
                if self._backlog:
                    self.session.line(self._backlog.popleft())
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
        self.session.eof()
        self.closing = True
        if not self.replies:
            self.close()

    def writeConnectionLost(self) -> None:
        """The peer no longer reads: close the connection."""
        self.close()

    def connectionLost(self, reason: Failure = None) -> None:
        """Stop timers, release the connection's count, end its session."""
        self.phase = Phase.GONE
        self._backlog.clear()
        self._raw.clear()
        self.auth.stop()
        for timer in (self.handshake_timer, self._abort_call):
            if timer is not None and timer.active():
                timer.cancel()
        self.handshake_timer = self._abort_call = None
        if self.counted:
            self.counted = False
            self.factory.release(self)
        if self._retired is not None:
            self._retired.lost()
        self.session.lost()
        self.replies.clear()

    def write(self, line: str) -> None:
        """Write one line, after any batched lines of the session."""
        self.session.flush()  # a worker's batched DOs first: a later CANCEL follows them
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.write(line.encode("utf-8", "backslashreplace") + b"\n")
