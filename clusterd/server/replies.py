"""The reply order of one connection, and the pacing of long streamed answers.

Client requests may be pipelined; each takes a :class:`PendingReply` in a FIFO, and a reply's
lines reach the wire only once every earlier reply has finished, so replies keep request order
even when a ``RUN`` ahead of a ``PING`` takes minutes. A streamed answer (``RESULT <job> @``
and its piece lines) goes out a few pieces per reactor turn, and not at all while the peer's
write buffer is full.

The queue talks to its connection only through :class:`ReplyOwner`; it imports no session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.jobs import Job
from clusterd.core.replies import final_lines, refusal_line
from clusterd.core.streaming import END
from clusterd.server.limits import LOG_NAMESPACE, MAX_PENDING_REPLIES, PIECES_PER_TURN

__all__ = ["PendingReply", "ReplyOwner", "ReplyQueue"]


class ReplyOwner(Protocol):
    """What a :class:`ReplyQueue` needs from its connection."""

    clock: IReactorTime
    peer: str

    def write(self, line: str) -> None:
        """Write one line now (nothing if the connection is closing its transport)."""

    def replies_settled(self, was_full: bool) -> None:
        """Finished replies left the queue; ``was_full``: it held MAX_PENDING_REPLIES before."""

    def writable(self) -> bool | None:
        """True: write now. False: the peer's buffer is full. None: the connection is gone."""

    def when_writable(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the peer's write buffer has drained."""

    def abort(self) -> None:
        """Drop the connection at once."""


class PendingReply:
    """One request's place in the reply order: lines held until it reaches the head."""

    __slots__ = ("lines", "finished", "cleanup")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.finished = False
        self.cleanup: Callable[[], None] | None = None


class ReplyQueue:
    """One connection's pending replies, in request order; writes each reply's lines once every
    earlier reply is finished."""

    log = Logger(namespace=LOG_NAMESPACE)  # the namespace logs had before the split

    def __init__(self, owner: ReplyOwner, max_line: int) -> None:
        self.owner = owner
        self.max_line = max_line
        self._queue: deque[PendingReply] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __contains__(self, reply: PendingReply) -> bool:
        return reply in self._queue

    def full(self) -> bool:
        """Whether MAX_PENDING_REPLIES requests are unanswered: read nothing more."""
        return len(self._queue) >= MAX_PENDING_REPLIES

    def unfinished(self) -> bool:
        """Whether some reply in the queue is not finished yet."""
        return any(not r.finished for r in self._queue)

    def open(self, reply: PendingReply | None = None) -> PendingReply:
        """Take the next place in the reply order."""
        reply = reply if reply is not None else PendingReply()
        self._queue.append(reply)
        return reply

    def reply(self, line: str) -> None:
        """A request answered at once with one line."""
        self.finish(self.open(), line)

    def emit(self, reply: PendingReply, line: str) -> None:
        """Write ``line`` for ``reply`` now if it is the oldest reply, else keep it until it is."""
        if self._queue and self._queue[0] is reply:
            self.owner.write(line)
        else:
            reply.lines.append(line)

    def finish(self, reply: PendingReply, line: str | None = None) -> None:
        """Finish ``reply`` (with a last ``line``), and write the lines of the replies it held
        back."""
        if line is not None:
            self.emit(reply, line)
        reply.finished = True
        reply.cleanup = None
        queue = self._queue
        was_full = self.full()
        while queue and queue[0].finished:
            queue.popleft()
            if queue:
                head = queue[0]
                for queued in head.lines:
                    self.owner.write(queued)
                head.lines.clear()
        self.owner.replies_settled(was_full)

    def refused(self, failure: Failure, reply: PendingReply) -> None:
        """What a request waiting for a durable record gets when the record could not be made
        durable: ``ERR`` with the reason, never the id or the end it waited for."""
        if failure.check(CancelledError):
            return  # its connection went away: nothing left to tell
        self.finish(reply, refusal_line(failure.value))

    def clear(self) -> None:
        """The connection is gone: stop every reply still waiting."""
        for reply in self._queue:
            if reply.cleanup is not None:
                reply.cleanup()
        self._queue.clear()

    # -- a job's final line --------------------------------------------------------------------

    def await_final(self, job: Job, reply: PendingReply | None = None, extra_cleanup=None) -> None:
        """Finish ``reply`` (a new one by default) with the job's final line when it ends."""
        reply = reply if reply is not None else self.open()
        d = job.wait()

        def cleanup() -> None:
            """The connection is gone: stop watching the job and waiting for its end."""
            if extra_cleanup is not None:
                extra_cleanup()
            d.cancel()

        reply.cleanup = cleanup
        d.addCallbacks(self._final, self.refused, callbackArgs=(reply,), errbackArgs=(reply,))

    def _final(self, job: Job, reply: PendingReply) -> None:
        first, rest = final_lines(job, self.max_line)
        if rest is None:
            self.finish(reply, first)
            return
        self.emit(reply, first)
        self._pace(reply, rest)

    def _pace(self, reply: PendingReply, lines: Iterator[str]) -> None:
        """A streamed answer: a few pieces per reactor turn, and none while the peer's write
        buffer is full, so a 64 MB answer neither stalls other connections nor sits whole in
        the transport's buffer."""
        pending: list[Any] = [None]
        owner = self.owner

        def step() -> None:
            """Write the next few pieces, or wait for the peer's buffer to drain; abort on an
            unsendable element."""
            pending[0] = None
            writable = owner.writable()
            if writable is None:
                return
            if not writable:
                owner.when_writable(step)
                return
            try:
                for _ in range(PIECES_PER_TURN):
                    line = next(lines)
                    if line == END:
                        self.finish(reply, line)
                        return
                    self.emit(reply, line)
            except ValueError as e:
                # One element is longer than a line: the answer cannot be completed, and a
                # truncated one must never look whole, so the connection is dropped.
                self.log.error("cannot stream an answer to {peer}: {e}", peer=owner.peer, e=e)
                owner.abort()
                return
            pending[0] = owner.clock.callLater(0, step)

        def cleanup() -> None:
            """The connection is gone: cancel the next step."""
            if pending[0] is not None and pending[0].active():
                pending[0].cancel()

        reply.cleanup = cleanup
        step()
