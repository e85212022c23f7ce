"""A job's progress as server-sent events (``GET /api/v1/jobs/{id}/events``): the HTTP form of
WATCH. ``progress`` events carry ``{"done", "total"}`` once per whole percent (at most ~100 per
job, whatever its size), then one ``end`` event with the job's STATUS object (and result) once
its end is durable, and the response ends.

Streams are bounded: at most ``limit`` open at once (more get 503 BUSY), and each holds only a
watcher on its job; a client that goes away unsubscribes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from clusterd.core.errors import ErrorCode
from clusterd.core.jobs import Job
from clusterd.core.jsontext import dumps
from clusterd.server.http.errors import error_for, send_error

__all__ = ["EventStreams", "DEFAULT_MAX_STREAMS"]

DEFAULT_MAX_STREAMS = 64


def event(name: str, data: bytes | str) -> bytes:
    """One SSE event; ``data`` is one line of JSON (JSON never holds a raw newline)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class EventStreams:
    """The open event streams, counted against their own small limit."""

    def __init__(self, view: Callable[[Job], bytes], limit: int = DEFAULT_MAX_STREAMS) -> None:
        self.view = view  # the job's end as JSON (api.job_view, encoded)
        self.limit = limit
        self.open_count = 0

    def open(self, request: Request, job: Job) -> Any:
        """Start the stream for ``job`` on ``request``, or refuse with 503 BUSY."""
        if self.open_count >= self.limit:
            return send_error(
                request,
                ErrorCode.BUSY,
                f"{self.open_count} event streams are open, the most allowed; try again later.",
            )
        self.open_count += 1
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        last = [-1]

        def progress(j: Job) -> None:
            pct = j.shown_done * 100 // j.total if j.total else 100
            if pct != last[0] and not j.settled and not request._disconnected:
                last[0] = pct
                request.write(event("progress", dumps(j.progress())))

        unsubscribe: Callable[[], None] = lambda: None  # noqa: E731
        if not job.is_final:
            progress(job)
            unsubscribe = job.watch(progress)
        ended = job.wait()
        closed = [False]

        def close() -> None:
            if not closed[0]:
                closed[0] = True
                self.open_count -= 1
                unsubscribe()

        def gone(_: Any) -> None:
            close()
            ended.cancel()

        def end(j: Job) -> None:
            close()
            if not request._disconnected:
                request.write(event("end", self.view(j)))
                request.finish()

        def failed(failure: Failure) -> None:
            close()
            if failure.check(CancelledError) or request._disconnected:
                return
            code, message = error_for(failure.value)
            request.write(event("error", dumps({"code": code, "message": message})))
            request.finish()

        request.notifyFinish().addBoth(gone)
        ended.addCallbacks(end, failed)
        return NOT_DONE_YET
