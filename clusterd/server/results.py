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

A *parts* stream (``DONE {..., "stream":true, "parts":true}``: a task's ``run`` yielded its result
in parts, sent as they were produced) of a task that declares ``merge`` is folded piece by piece
into one per-attempt partial; the partial is what the sub-task's Deferred fires with at the
``.``, and only then is it merged into the job. An attempt that fails or is lost before its
``.`` drops its partial: nothing of it reaches the job. While a stream is open the worker may
still send ``PING`` and ``OK PONG`` (a slow generator must not look like a silent worker), and an
``ERROR`` line for the streamed ticket ends the stream with that error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from clusterd.core.errors import TaskFailed, task_failed
from clusterd.core.framing import LineTooLong
from clusterd.core.scheduler import TimedResult
from clusterd.core.streaming import END_LINE, OTHER_LINE, Joiner, line_kind, piece_value
from clusterd.core.wire import WireError, parse_json_object

__all__ = ["ResultStream", "part_merge"]

_HEARTBEAT = (b"PING", b"OK PONG")


def part_merge(registry: Any, msg: dict[str, Any]) -> Callable[[Any, Any], Any] | None:
    """The merge of the task a parts stream's ``DONE`` names (``"task"``), or None: not a parts
    stream, or a task without merge (its pieces are then joined as usual). The worker names
    the task the server sent it; one that names another only spoils its own result, as any
    wrong result it sends would."""
    if msg.get("parts") is not True:
        return None
    task = registry.get(msg.get("task")) if isinstance(msg.get("task"), str) else None
    return None if task is None else task.merge


class ResultStream:
    """One streamed result from a worker: joins its pieces and fires (or fails) the sub-task's
    Deferred at the ``.`` line."""

    def __init__(
        self,
        d: Deferred[Any] | None,
        seconds: Any,
        limit: int,
        merge: Callable[[Any, Any], Any] | None = None,
        ticket: Any = None,
    ) -> None:
        self.d = d
        self.seconds = seconds
        self.limit = limit
        self.ticket = ticket
        self.joiner: Joiner | Partial = Joiner() if merge is None else Partial(merge)
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
            return self._other(event)
        if self.failure is not None or self.d is None or self.d.called:
            self._drop()  # nobody waits for it (any more): keep nothing
            return True
        self.size += len(event)
        if self.size > self.limit:
            self._fail(
                "ResultTooLarge",
                f"the streamed result passed {self.limit} bytes, the server's --max-result-bytes",
            )
            self._drop()  # what was held is of no use now
            return True
        try:
            self.joiner.add(piece_value(event, "a result piece", 100_000))
        except (WireError, ValueError) as e:
            self._fail("BadResult", f"a result piece is not valid: {e}")
        except Exception as e:  # the task's merge raised: this attempt's result is unusable
            self._fail("BadResult", f"merging a result part failed: {type(e).__name__}: {e}")
            self._drop()
        return True

    def _drop(self) -> None:
        """Drop the pieces (or the partial) held: nobody will read the value."""
        if isinstance(self.joiner, Partial):
            self.joiner.clear()
        else:
            self.joiner = Joiner()

    def _other(self, line: bytes) -> bool:
        """A line that is neither a piece nor the end: a heartbeat passes (False, the stream
        stays open); an ERROR for this ticket ends it with that error (True: consumed);
        anything else ends it as a BadResult and is handled as usual (False)."""
        stripped = line.strip()
        if stripped in _HEARTBEAT:
            return False
        if stripped.startswith(b"ERROR {") and self.ticket is not None:
            try:
                msg = parse_json_object(stripped[6:].decode("utf-8"), "ERROR", 100_000)
            except (WireError, UnicodeDecodeError):
                msg = {}
            if msg.get("id") == self.ticket:
                tb = msg.get("traceback")
                retry = msg.get("retry") is not False
                kind, message = str(msg.get("type", "Error")), str(msg.get("message", ""))
                self.failure = task_failed(kind, message, tb if isinstance(tb, str) else "", retry)
                self.finish()
                return True
        self._fail("BadResult", "the result's pieces ended without a '.' line")
        self.finish()
        return False

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
        try:
            value = self.joiner.value()
        except ValueError as e:
            self.d.errback(task_failed("BadResult", str(e)))
            return
        if type(self.seconds) is float and self.seconds >= 0:
            self.d.callback(TimedResult(value, self.seconds))
        else:
            self.d.callback(value)

    def _fail(self, kind: str, message: str) -> None:
        if self.failure is None:
            self.failure = task_failed(kind, message)


class Partial:
    """The pieces of a merge task's parts stream, folded into one value as they arrive: the
    per-attempt partial, held until the attempt's ``.``."""

    __slots__ = ("merge", "acc", "n")

    def __init__(self, merge: Callable[[Any, Any], Any]) -> None:
        self.merge = merge
        self.acc: Any = None
        self.n = 0

    def add(self, piece: Any) -> None:
        """Fold one part in (any JSON value the task's merge takes)."""
        self.acc = piece if self.n == 0 else self.merge(self.acc, piece)
        self.n += 1

    def clear(self) -> None:
        """Drop what was folded (nobody waits for it)."""
        self.acc, self.n = None, 0

    def value(self) -> Any:
        """The merged parts; a stream without any is a BadResult (a merge has no empty
        value to give)."""
        if self.n == 0:
            raise ValueError("a merge task's streamed result had no part")
        return self.acc
