"""Every error type clusterd's core and line protocol share, and the stable error codes.

A client may match on a code, so a code is never renamed. The core raises :class:`WireError`
(a refusal with a code and a sentence, which the protocol writes as ``ERR <code> <sentence>``);
a sub-task's failure reaches the scheduler as a :class:`TaskFailed` (or one of its kinds, which
the scheduler's policy tells apart by type, never by a string); a worker that will not answer
is :class:`WorkerLost`; a journal that cannot be opened, read or written is
:class:`JournalError`.
"""

from __future__ import annotations

__all__ = [
    "ErrorCode",
    "WireError",
    "TaskFailed",
    "ChildDied",
    "ResultTooLarge",
    "BadResult",
    "NotRetryable",
    "task_failed",
    "WorkerLost",
    "JournalError",
]


class ErrorCode:
    """Stable error codes: clients may match on these, so never rename one."""

    UNKNOWN_VERB = "UNKNOWN_VERB"
    BAD_REQUEST = "BAD_REQUEST"
    BAD_JSON = "BAD_JSON"
    BAD_ENCODING = "BAD_ENCODING"
    LINE_TOO_LONG = "LINE_TOO_LONG"
    UNKNOWN_TASK = "UNKNOWN_TASK"
    UNKNOWN_JOB = "UNKNOWN_JOB"
    BAD_INPUT = "BAD_INPUT"
    TOO_MANY_SUBTASKS = "TOO_MANY_SUBTASKS"
    WRONG_ROLE = "WRONG_ROLE"
    BUSY = "BUSY"
    NOAUTH = "NOAUTH"
    AUTH_FAILED = "AUTH_FAILED"
    AUTH_TIMEOUT = "AUTH_TIMEOUT"
    JSON_TOO_DEEP = "JSON_TOO_DEEP"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    # Codes a FAILED reply carries (why a job failed):
    TASK_ERROR = "TASK_ERROR"
    TIMEOUT = "TIMEOUT"
    CHILD_DIED = "CHILD_DIED"
    WORKER_LOST = "WORKER_LOST"
    COMBINE_ERROR = "COMBINE_ERROR"
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"
    JOURNAL_ERROR = "JOURNAL_ERROR"
    TASK_MISSING = "TASK_MISSING"
    UPLOAD_INCOMPLETE = "UPLOAD_INCOMPLETE"


class WireError(Exception):
    """A request the server refuses: becomes ``ERR <code> <sentence>`` on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TaskFailed(Exception):
    """A sub-task's attempt failed on its worker: the task function raised (``type`` and
    ``message`` are the exception's). Its subclasses are the failures the scheduler treats
    differently; build one from a worker's report with :func:`task_failed`."""

    code = ErrorCode.TASK_ERROR  # the FAILED code its job ends with, once attempts run out

    def __init__(self, type: str, message: str, traceback: str = "") -> None:
        super().__init__(type, message)
        self.type = type
        self.message = message
        self.traceback = traceback  # the worker's formatted traceback, "" when it sent none


class ChildDied(TaskFailed):
    """The pool process running the sub-task died (segfault, ``os._exit``, OOM kill)."""

    code = ErrorCode.CHILD_DIED


class ResultTooLarge(TaskFailed):
    """The sub-task's result is longer than the server accepts: retrying cannot help."""

    code = ErrorCode.RESULT_TOO_LARGE


class BadResult(TaskFailed):
    """The worker's answer could not be read (bad JSON, too deep, a misplaced stream)."""


class NotRetryable(TaskFailed):
    """The task raised an exception it marked as not worth retrying (``Task.no_retry``; the
    worker's ERROR says ``"retry": false``): the job fails at once, whatever its attempts."""


_KINDS: dict[str, type[TaskFailed]] = {
    "ChildDied": ChildDied,
    "ResultTooLarge": ResultTooLarge,
    "BadResult": BadResult,
}


def task_failed(type: str, message: str, traceback: str = "", retry: bool = True) -> TaskFailed:
    """The failure a worker reported as ``ERROR {"type": type, "message": message,
    "traceback": ..., "retry": ...}``: the one place where the wire's type names (and its
    ``retry`` flag) become the kinds the scheduler's policy checks."""
    kind = _KINDS.get(type, TaskFailed if retry else NotRetryable)
    return kind(type, message, traceback)


class WorkerLost(Exception):
    """A dispatched sub-task will get no answer from this worker; it runs again elsewhere."""


class JournalError(Exception):
    """The journal cannot be opened, read or written. At open, the server refuses to start on
    it; once a write has failed, the journal is *broken*: its ``failure`` is set, and every
    later append fails with it too (a later commit must never succeed while an earlier batch of
    records was lost), so the server takes no new work until it is restarted."""
