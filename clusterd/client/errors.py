"""Exceptions the client library raises, shared by the Deferred API and the blocking helper."""

from __future__ import annotations

from typing import Any

from clusterd.core.wire import Reply

__all__ = [
    "ClusterError",
    "RequestRefused",
    "JobFailed",
    "RemoteTraceback",
    "JobCancelled",
    "InputUnreadable",
    "ServerTimeout",
    "raise_for",
]


class ClusterError(Exception):
    """Base class for every error this library raises about the cluster."""


class ServerTimeout(ClusterError):
    """The server did not accept the connection, greet, or answer within the client's timeout
    (a port that accepts and never speaks, a firewall that drops packets, a stuck server)."""


class RequestRefused(ClusterError):
    """The server answered ``ERR <code> <sentence>``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteTraceback(Exception):
    """The worker's formatted traceback of a failed sub-task, as a :class:`JobFailed`'s
    ``__cause__``: an uncaught JobFailed prints it above its own, as
    :mod:`concurrent.futures.process` does for a child's exception."""

    def __str__(self) -> str:
        return "\n\n" + str(self.args[0]).rstrip("\n")


class JobFailed(ClusterError):
    """The job ended FAILED: ``code`` says why, ``error`` has the exception type and message
    (and the sub-task's index, attempts and worker); ``traceback`` is the worker's formatted
    traceback of the remote exception ("" when there is none, as for a timeout)."""

    def __init__(self, job: str, code: str, error: dict[str, Any]) -> None:
        detail = f"{error.get('type', '')}: {error.get('message', '')}".strip(": ")
        super().__init__(f"job {job} failed ({code}) {detail}".rstrip())
        self.job = job
        self.code = code
        self.error = error
        tb = error.get("traceback")
        self.traceback: str = tb if isinstance(tb, str) else ""
        if self.traceback:
            self.__cause__ = RemoteTraceback(self.traceback)


class InputUnreadable(ClusterError):
    """The input being streamed could not be read (bad UTF-8 or JSON, an I/O error). The
    connection is closed, so the server drops the half-sent job (UPLOAD_INCOMPLETE)."""


class JobCancelled(ClusterError):
    """The job was cancelled (by CANCEL, from any client) before it finished."""

    def __init__(self, job: str) -> None:
        super().__init__(f"job {job} was cancelled")
        self.job = job


def raise_for(reply: Reply) -> Reply:
    """Turn ERR, FAILED and CANCELLED replies into exceptions; return anything else."""
    if reply.kind == "ERR":
        raise RequestRefused(reply.code or "", reply.text)
    if reply.kind == "FAILED":
        raise JobFailed(reply.job or "", reply.code or "", reply.value or {})
    if reply.kind == "CANCELLED":
        raise JobCancelled(reply.job or "")
    return reply
