"""One streamed ``RUN``/``SUBMIT`` on a connection: its piece lines, its end, its reply.

The protocol hands every line that arrives while a stream is open to :meth:`InputStream.line`
(see docs/PROTOCOL.md, "Streamed values"). Pieces go to the core's
:class:`~clusterd.core.uploads.Upload`, which queues sub-tasks as soon as they are cut. Reading
is paused while the job already has enough sub-tasks queued, so a fast client feeding slow
workers waits in TCP flow control instead of in the server's memory.

A stream that goes wrong (a bad piece, a limit passed, the connection closing) is answered with
one ``ERR`` at once; its job ends ``failed`` with the same code, and the rest of its pieces are
read and dropped up to the ``.`` line, so the conversation stays in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clusterd.core.framing import Frame, LineTooLong
from clusterd.core.streaming import END_LINE, OTHER_LINE, line_kind, piece_value
from clusterd.core.wire import ErrorCode, WireError, format_error, refusal_line

if TYPE_CHECKING:
    from clusterd.core.jobs import Job
    from clusterd.core.scheduler import Scheduler
    from clusterd.core.uploads import Upload

__all__ = ["InputStream"]


def _ignore(*_: Any) -> None:
    pass


class InputStream:
    """One streamed RUN/SUBMIT input on a connection: feeds its pieces to the upload and answers at
    its end."""

    def __init__(
        self,
        core: Scheduler,
        job: Job,
        upload: Upload | None,
        verb: str,
        max_depth: int,
        refuse: Callable[[str], None],
        accept: Callable[[Job], None],
        hold: Callable[[bool], None],
    ) -> None:
        self.core = core
        self.job = job
        self.upload = upload  # None: a known key returned an existing job; pieces are dropped
        self.verb = verb
        self.max_depth = max_depth
        self._refuse = refuse  # finish the request's slot with this ERR line
        self._accept = accept  # the input is complete: answer as SUBMIT/RUN do
        self._hold = hold  # pause (True) or resume (False) reading this connection
        self.failed = False
        self.done = False  # the '.' line arrived
        self.held = False
        self._unwatch: Callable[[], None] | None = None
        self._take_call: Any = None  # a check for room, after a sub-task was dispatched

    @classmethod
    def refused(cls) -> InputStream:
        """The stream of a request refused at its first line (unknown task, NOAUTH, BUSY, …):
        that refusal was its one reply, so its pieces and '.' are read and dropped silently."""
        stream = cls(None, None, None, "", 0, _ignore, _ignore, _ignore)  # type: ignore[arg-type]
        stream.failed = True
        return stream

    def line(self, event: bytes | LineTooLong | Frame) -> bool:
        """Handle one line; False when it is not part of the stream (the stream was left
        without its ``.``: it is refused, and the caller handles the line as a request)."""
        if isinstance(event, LineTooLong):
            self.fail(
                ErrorCode.LINE_TOO_LONG,
                f"a piece is longer than {event.limit} bytes; send smaller pieces.",
            )
            return True
        if isinstance(event, Frame):  # "$<n>" and n raw bytes of text: no JSON to parse
            if not self.failed and self.upload is not None:
                self._feed(event.data, len(event.data))
            return True
        kind = line_kind(event)
        if kind == END_LINE:
            self.finish()
            return True
        if kind == OTHER_LINE:
            self.fail(
                ErrorCode.BAD_REQUEST,
                "a streamed input is piece lines (+<json>) ended by a line holding only '.'; "
                "this line is neither, so the stream is abandoned and the line read as a request.",
            )
            self._release()
            return False
        if self.failed or self.upload is None:
            return True
        try:
            piece = piece_value(event, f"piece {self.upload.pieces + 1}", self.max_depth)
        except WireError as e:
            self.fail(e.code, e.message)
            return True
        self._feed(piece, len(event.strip()))
        return True

    def _feed(self, piece: Any, size: int) -> None:
        """One piece to the upload, then flow control."""
        assert self.upload is not None
        try:
            self.upload.feed(piece, size)
        except WireError as e:
            self.fail(e.code, e.message)
            return
        self._throttle()

    def finish(self) -> None:
        """The ``.`` line."""
        self.done = True
        self._release()
        if self.failed:
            return
        if self.upload is not None:
            try:
                self.upload.end()
            except WireError as e:
                self.fail(e.code, e.message)
                return
        self._accept(self.job)

    def fail(self, code: str, message: str) -> None:
        """Refuse the request once; later pieces are dropped."""
        if self.failed:
            return
        self.failed = True
        if self.upload is not None and not self.upload.ended:
            self.upload.abandon(code, message)
            job, refuse = self.job, self._refuse
            line = format_error(code, f"{message} Job {job.id} was abandoned.")
            # The ERR names the job: it goes out once the job's end is durable (the gate).
            job.wait().addCallbacks(lambda _: refuse(line), lambda f: refuse(refusal_line(f.value)))
        else:
            self._refuse(format_error(code, message))
        self._release()

    def lost(self) -> None:
        """The connection closed mid-stream."""
        if self.upload is not None and not self.upload.ended:
            self.upload.abandon(
                ErrorCode.UPLOAD_INCOMPLETE,
                "the connection closed before the streamed input's '.' line",
            )
        self._release()

    # -- flow control ----------------------------------------------------------------------------

    def _throttle(self) -> None:
        if self.held or self.core.wants_more(self.job):
            return
        self.held = True
        self._hold(True)
        # Room comes back when a result arrives or when workers take queued sub-tasks (they
        # prefetch beyond their slots): waiting for results alone would let the workers drain
        # the queue and idle while the client's next pieces wait in TCP buffers.
        self._unwatch = self.job.watch(self._on_progress)
        self.job.on_take = self._taken

    def _on_progress(self, job: Any) -> None:
        if job.is_final or self.core.wants_more(job):
            self._release()

    def _taken(self) -> None:
        """A sub-task was dispatched: look for room on the next turn, out of the dispatch loop
        (reading more pieces queues and dispatches more)."""
        if self._take_call is None:
            self._take_call = self.core.clock.callLater(0, self._check_room)

    def _check_room(self) -> None:
        self._take_call = None
        if self.held:
            self._on_progress(self.job)

    def _release(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.job is not None and self.job.on_take == self._taken:
            self.job.on_take = None
        if self._take_call is not None:
            if self._take_call.active():
                self._take_call.cancel()
            self._take_call = None
        if self.held:
            self.held = False
            self._hold(False)
