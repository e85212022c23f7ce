"""A job whose input is arriving in pieces: feed it, end it, or abandon it.

The protocol hands each decoded piece to :meth:`Upload.feed`; the :class:`~clusterd.core.streaming.Cutter`
turns pieces into sub-task inputs, which the scheduler queues (and dispatches) at once. So a
200 MB input is never held whole, never held twice, and its first sub-tasks run while the rest is
still on the wire. Pure: no sockets, no reactor.

An upload does not know the scheduler: it drives an :class:`IUploadSink` (the scheduler
provides one), so ``uploads`` imports nothing that imports it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.streaming import ByteCutter, Cutter

if TYPE_CHECKING:
    from clusterd.core.jobs import Job
    from clusterd.tasks.registry import Task

__all__ = ["Upload", "IUploadSink"]


class IUploadSink(Interface):
    """Where an :class:`Upload` puts what it cut (the scheduler)."""

    config = Attribute("has ``max_input_bytes``: the most a streamed input's pieces may total.")

    def grow(job, inputs):  # noqa: N805 - zope interface methods take no self
        """Queue sub-task inputs cut from ``job``'s input. Raises WireError (bad input, a
        limit); the upload's caller then abandons it."""

    def seal(job):  # noqa: N805
        """``job``'s input is complete."""

    def abandon(job, code, message):  # noqa: N805
        """The input went wrong: ``job`` fails with ``code`` and never counts as accepted."""


class Upload:
    """One streamed input in progress: feeds its pieces to the cutter and the resulting sub-task
    inputs to the scheduler."""

    def __init__(
        self, scheduler: IUploadSink, job: Job, task: Task, cutter: Cutter | ByteCutter
    ) -> None:
        self.scheduler = scheduler
        self.job = job
        self.task = task
        self.cutter = cutter
        self.pieces = 0
        self.bytes = 0
        self.ended = False

    def feed(self, piece: Any, size: int) -> None:
        """One piece (``size``: its line's length in bytes): a JSON value, or the raw bytes of
        a ``$<n>`` frame. Raises WireError when the piece
        is of the wrong type, breaks the task's input rules, or passes a limit; the caller then
        abandons the upload."""
        self.pieces += 1
        self.bytes += size
        limit = self.scheduler.config.max_input_bytes
        if self.bytes > limit:
            raise WireError(
                ErrorCode.INPUT_TOO_LARGE,
                f"the streamed input passed {limit} bytes, the most this server takes "
                "(--max-input-bytes).",
            )
        if self.job.is_final:  # cancelled while arriving: read the rest, keep nothing
            return
        if isinstance(self.cutter, ByteCutter):
            inputs = self._feed_text(piece)
        else:
            try:
                inputs = self.cutter.feed(piece)
            except TypeError as e:
                raise WireError(ErrorCode.BAD_INPUT, f"piece {self.pieces}: {e}.") from None
        self.job.input_size = self.cutter.size
        if inputs:
            self.scheduler.grow(self.job, inputs)

    def _feed_text(self, piece: Any) -> list[bytes]:
        """A text stream's piece to the byte cutter: a frame's bytes as they came, a JSON
        string encoded to UTF-8, so one cutter serves both."""
        if isinstance(piece, str):
            try:
                piece = piece.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError(
                    ErrorCode.BAD_INPUT, f"piece {self.pieces} holds a lone surrogate, not text."
                ) from None
        elif not isinstance(piece, bytes):
            raise WireError(
                ErrorCode.BAD_INPUT,
                f"piece {self.pieces}: each piece of this input must be a JSON string.",
            )
        try:
            return self.cutter.feed(piece)
        except UnicodeDecodeError as e:
            raise _bad_encoding(e) from None

    def end(self) -> None:
        """The ``.`` line: the last sub-task is cut and the job sealed. The upload counts as
        ended only once that worked: if cutting or queueing the last sub-task raises (bad
        UTF-8, a limit), the caller abandons the job, which needs the upload still open."""
        if self.job.is_final:  # cancelled while arriving: that end is what SUBMIT reports,
            # once it is durable (a restart must not resume a job shown as cancelled).
            self.ended = True
            job = self.job
            job.wait().addCallbacks(lambda _: job.mark_durable(), job.not_durable_failure)
            return
        try:
            last = self.cutter.finish()
        except UnicodeDecodeError as e:
            raise _bad_encoding(e) from None
        self.scheduler.grow(self.job, last)
        self.ended = True
        self.scheduler.seal(self.job)

    def abandon(self, code: str, message: str) -> None:
        """End the upload early: the scheduler fails the job with ``code`` and ``message``."""
        self.ended = True
        self.scheduler.abandon(self.job, code, message)


def _bad_encoding(e: UnicodeDecodeError) -> WireError:
    return WireError(ErrorCode.BAD_ENCODING, f"the streamed text is not valid UTF-8 ({e.reason}).")
