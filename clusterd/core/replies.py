"""Reply lines: format and parse ERR, RESULT, FAILED, CANCELLED and PROGRESS.

The server formats a job's final line here (:func:`final_reply`, :func:`final_lines` for an
answer streamed as piece lines); both client libraries parse replies with :func:`parse_reply` /
:class:`ReplyReader`. Pure: imports only ``errors``, ``states``, ``streaming`` and
``jsontext`` (not ``jobs``, which loads Twisted: the blocking client parses replies without it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jsontext import dumps, parse_json
from clusterd.core.states import JobState
from clusterd.core.streaming import (
    END,
    END_LINE,
    OTHER_LINE,
    STREAM_MARK,
    Joiner,
    line_kind,
    piece_lines,
    piece_value,
)

if TYPE_CHECKING:  # jobs loads Twisted's Deferred; clients parse replies without it
    from clusterd.core.jobs import Job


__all__ = [
    "format_error",
    "refusal_line",
    "final_reply",
    "final_lines",
    "progress_line",
    "Reply",
    "parse_reply",
    "ReplyReader",
]


def format_error(code: str, message: str) -> str:
    """An ``ERR <code> <message>`` line."""
    return f"ERR {code} {message}"


def final_reply(job: Job) -> str:
    """The line that ends a RUN, WAIT or WATCH: RESULT, FAILED or CANCELLED."""
    if job.state == JobState.DONE:
        return f"RESULT {job.id} {job.result_json}"
    if job.state == JobState.CANCELLED:
        return f"CANCELLED {job.id}"
    err = dict(job.error or {})
    code = err.pop("code", ErrorCode.TASK_ERROR)
    return f"FAILED {job.id} {code} {dumps(err)}"


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
        """The answer's piece lines, then the ``.`` that ends them."""
        yield from pieces
        yield END

    return f"RESULT {job.id} {STREAM_MARK}", lines()


def progress_line(job: Job) -> str:
    """A WATCH's ``PROGRESS <job> {...}`` line."""
    return f"PROGRESS {job.id} {dumps(job.progress())}"


@dataclass(frozen=True)
class Reply:
    """One reply line, parsed: ``kind`` is OK, ERR, RESULT, FAILED, CANCELLED or PROGRESS."""

    kind: str
    job: str | None = None
    code: str | None = None
    text: str = ""
    value: Any = None

    @property
    def final(self) -> bool:
        """True unless this is a PROGRESS line (which more lines follow)."""
        return self.kind != "PROGRESS"


def parse_reply(line: str) -> Reply:
    """Parse a server reply; the client library and the blocking helper share this."""
    kind, _, rest = line.partition(" ")
    if kind == "OK":
        return Reply("OK", text=rest)
    if kind == "ERR":
        code, _, message = rest.partition(" ")
        return Reply("ERR", code=code, text=message)
    if kind in ("RESULT", "PROGRESS"):
        job, _, payload = rest.partition(" ")
        # Results are the task's, of any depth; the request depth limit is the server's guard.
        return Reply(kind, job=job, value=parse_json(payload, f"the {kind} payload", 100_000))
    if kind == "FAILED":
        job, _, rest = rest.partition(" ")
        code, _, payload = rest.partition(" ")
        return Reply(
            "FAILED", job=job, code=code, value=parse_json(payload or "{}", "FAILED", 100_000)
        )
    if kind == "CANCELLED":
        return Reply("CANCELLED", job=rest.strip())
    raise WireError(ErrorCode.BAD_REQUEST, f"unexpected reply from server: {line[:80]!r}")


class ReplyReader:
    """Turns reply lines into :class:`Reply` objects, reassembling a streamed answer
    (``RESULT <job> @``, ``+<piece>`` lines, ``.``) into one RESULT. ``feed`` returns None
    while a streamed answer is still arriving."""

    def __init__(self) -> None:
        self._job: str | None = None
        self._joiner: Joiner | None = None

    def feed(self, line: str) -> Reply | None:
        """Take one reply line: the Reply it completes, or None while a streamed RESULT's pieces are
        still arriving; raises WireError on a bad piece line."""
        if self._joiner is not None:
            kind = line_kind(line)
            if kind == END_LINE:
                value, job = self._joiner.value(), self._job
                self._joiner = self._job = None
                return Reply("RESULT", job=job, value=value)
            if kind == OTHER_LINE:
                raise WireError(ErrorCode.BAD_REQUEST, f"expected a piece line, got {line[:80]!r}")
            try:
                self._joiner.add(piece_value(line, "a RESULT piece", 100_000))
            except ValueError as e:
                raise WireError(ErrorCode.BAD_REQUEST, str(e)) from None
            return None
        kind, _, rest = line.partition(" ")
        job, _, payload = rest.partition(" ")
        if kind == "RESULT" and payload.strip() == STREAM_MARK:
            self._job, self._joiner = job, Joiner()
            return None
        return parse_reply(line)


def refusal_line(error: BaseException) -> str:
    """The ``ERR`` line for a record that could not be made durable: the request's own code
    for a refused upload, JOURNAL_ERROR for a journal that failed."""
    if isinstance(error, WireError):
        return format_error(error.code, error.message)
    return format_error(ErrorCode.JOURNAL_ERROR, f"{error} (nothing of this request is kept).")
