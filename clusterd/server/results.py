"""A sub-task result too long for one line, arriving from a worker in pieces.

A worker whose ``DONE`` line would pass the server's ``--max-line`` sends
``DONE {"id":N,"stream":true,...}``, then ``+<piece>`` lines (JSON arrays, strings or objects),
then ``.`` (docs/PROTOCOL.md, "Streamed values"). The protocol hands each of those lines here; the
pieces are joined and, at the ``.``, the sub-task's Deferred fires with the whole result, or
fails with ``ResultTooLarge`` past ``--max-result-bytes`` (the job then fails, as for any
oversized answer) or ``BadResult`` for a malformed piece (an ordinary failed attempt).

A stream nobody waits for (an id the worker was never given, or one that timed out, was
cancelled or lost a speculative race meanwhile) is read up to its ``.`` line with its pieces
dropped as they arrive: a worker cannot make the server hold memory for an answer it did not ask
for.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from clusterd.core.errors import TaskFailed, task_failed
from clusterd.core.framing import LineTooLong
from clusterd.core.scheduler import TimedResult
from clusterd.core.streaming import END_LINE, OTHER_LINE, Joiner, line_kind, piece_value
from clusterd.core.wire import WireError

__all__ = ["ResultStream"]


class ResultStream:
    """One streamed result from a worker: joins its pieces and fires (or fails) the sub-task's
    Deferred at the ``.`` line."""

    def __init__(self, d: Deferred[Any] | None, seconds: Any, limit: int) -> None:
        self.d = d
        self.seconds = seconds
        self.limit = limit
        self.joiner = Joiner()
        self.size = 0
        self.failure: TaskFailed | None = None
        self.done = False  # the '.' line (or the stream's end by other means) came

    def line(self, event: bytes | LineTooLong) -> bool:
        """Take one line from the worker; False when it is not part of the stream (which is
        then over, its attempt failed), so the caller handles the line as usual."""
        if isinstance(event, LineTooLong):
            self._fail("BadResult", f"a result piece is longer than {event.limit} bytes")
            return True
        kind = line_kind(event)
        if kind == END_LINE:
            self.finish()
            return True
        if kind == OTHER_LINE:
            self._fail("BadResult", "the result's pieces ended without a '.' line")
            self.finish()
            return False
        if self.failure is not None or self.d is None or self.d.called:
            self.joiner = Joiner()  # nobody waits for it (any more): keep nothing
            return True
        self.size += len(event)
        if self.size > self.limit:
            self._fail(
                "ResultTooLarge",
                f"the streamed result passed {self.limit} bytes, the server's --max-result-bytes",
            )
            self.joiner = Joiner()  # what was held is of no use now
            return True
        try:
            self.joiner.add(piece_value(event, "a result piece", 100_000))
        except (WireError, ValueError) as e:
            self._fail("BadResult", f"a result piece is not valid: {e}")
        return True

    def finish(self) -> None:
        """The ``.`` line (or the stream's end by other means): settle the sub-task."""
        self.done = True
        if (
            self.d is None or self.d.called
        ):  # cancelled meanwhile (timed out, job ended, a copy won)
            return
        if self.failure is not None:
            self.d.errback(self.failure)
            return
        value = self.joiner.value()
        if type(self.seconds) is float and self.seconds >= 0:
            self.d.callback(TimedResult(value, self.seconds))
        else:
            self.d.callback(value)

    def _fail(self, kind: str, message: str) -> None:
        if self.failure is None:
            self.failure = task_failed(kind, message)
