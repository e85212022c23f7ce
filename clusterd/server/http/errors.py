"""HTTP answers in JSON: the line protocol's stable error codes mapped to HTTP statuses.

A refusal is ``{"code": ..., "message": ...}`` with the code a line-protocol client would see in
``ERR <code> <sentence>``, so scripts match on the same codes whichever front end they use.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jsoncodec import dumpb

__all__ = ["STATUS_FOR", "send_json", "send_error", "send_wire_error", "error_for"]

JSON = b"application/json"
STATUS_FOR = {
    ErrorCode.UNKNOWN_JOB: 404,
    ErrorCode.UNKNOWN_TASK: 404,
    ErrorCode.NOAUTH: 401,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.BUSY: 503,
    ErrorCode.JOURNAL_ERROR: 503,
    ErrorCode.TOO_MANY_CONNECTIONS: 503,
    ErrorCode.LINE_TOO_LONG: 413,
    ErrorCode.INPUT_TOO_LARGE: 413,
}  # every other code is the client's request: 400


def send_json(request: Request, value: Any, status: int = 200) -> bytes:
    """Set the status and JSON content type; return the body for ``render`` to return."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"cache-control", b"no-store")
    return dumpb(value)


def send_error(request: Request, code: str, message: str, status: int | None = None) -> bytes:
    """The JSON refusal for ``code``, with its HTTP status (400 unless mapped)."""
    if status is None:
        status = STATUS_FOR.get(code, 400)
    if status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="clusterd"')
    return send_json(request, {"code": code, "message": message}, status)


def send_wire_error(request: Request, e: WireError) -> bytes:
    """A :class:`WireError` from :class:`ClientOps` as its JSON refusal."""
    return send_error(request, e.code, e.message)


def error_for(failure_value: BaseException) -> tuple[str, str]:
    """(code, message) for a Deferred's failure waiting on a durable record: the request's own
    code for a refused request, JOURNAL_ERROR for a journal that failed."""
    if isinstance(failure_value, WireError):
        return failure_value.code, failure_value.message
    return ErrorCode.JOURNAL_ERROR, f"{failure_value} (nothing of this request is kept)."
