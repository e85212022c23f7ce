"""The live dashboard: the page at ``/`` (static files shipped in the package), the server-wide
snapshot stream ``GET /api/v1/events`` and the task stream ``GET /api/v1/taskstream``.

One timer (a ``LoopingCall`` on the core's clock, once a second) writes one ``snapshot`` event
to every open stream, and runs only while a stream is open; streams are counted against their
own limit (more get 503 BUSY), like the per-job streams. A snapshot is bounded: the stats, the
workers, the newest :data:`SNAPSHOT_JOBS` jobs and the task stream's last :data:`WINDOW` seconds
(itself at most 2,000 runs).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from clusterd.core.errors import ErrorCode
from clusterd.core.jsontext import dumps
from clusterd.server.client_ops import ClientOps
from clusterd.server.http.errors import send_error, send_json
from clusterd.server.http.sse import DEFAULT_MAX_STREAMS, event

__all__ = ["Page", "LiveStreams", "snapshot", "taskstream"]

SNAPSHOT_JOBS = 20
WINDOW = 120.0  # seconds of task stream a snapshot carries
INTERVAL = 1.0  # seconds between snapshots
TYPES = {"html": b"text/html; charset=utf-8", "js": b"text/javascript", "css": b"text/css"}


def taskstream(ops: ClientOps, since: float | None = None) -> dict[str, Any]:
    """The recent sub-task runs (worker, job, index, start, end, ok), oldest first."""
    now = ops.core.clock.seconds()
    cut = now - WINDOW if since is None else since
    return {"now": now, "runs": ops.core.task_stream.view(cut)}


def snapshot(ops: ClientOps) -> dict[str, Any]:
    """What the dashboard draws: stats, workers, the newest jobs and the task stream."""
    return {
        **taskstream(ops),
        "stats": ops.stats(),
        "workers": ops.workers(),
        "jobs": ops.jobs(SNAPSHOT_JOBS),
    }


@implementer(IPushProducer)
class _Feed:
    """A stream's producer: the channel pauses it while the client's socket buffer is full, and
    a paused stream skips snapshots (the next one carries the whole state), so a client that
    reads slowly costs at most one socket buffer, never a growing queue."""

    paused = False

    def pauseProducing(self) -> None:
        """The client is behind: skip snapshots until it catches up."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The client caught up."""
        self.paused = False

    def stopProducing(self) -> None:
        """The connection is going away (``notifyFinish`` forgets the stream)."""
        self.paused = True


class LiveStreams:
    """The open ``/api/v1/events`` streams and the one timer that feeds them."""

    def __init__(self, ops: ClientOps, limit: int = DEFAULT_MAX_STREAMS) -> None:
        self.ops = ops
        self.limit = limit
        self.requests: dict[Request, _Feed] = {}
        self.timer = LoopingCall(self.tick)
        self.timer.clock = ops.core.clock

    def open(self, request: Request) -> Any:
        """Start a snapshot stream on ``request`` (a snapshot at once, then each second)."""
        if len(self.requests) >= self.limit:
            message = f"{len(self.requests)} dashboard streams are open, the most allowed."
            return send_error(request, ErrorCode.BUSY, message)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        self.requests[request] = feed = _Feed()
        request.registerProducer(feed, True)
        request.notifyFinish().addBoth(lambda _: self.close(request))
        if not self.timer.running:
            self.timer.start(INTERVAL, now=False)
        request.write(event("snapshot", dumps(snapshot(self.ops))))
        return NOT_DONE_YET

    def close(self, request: Request) -> None:
        """The client went away: forget it; stop the timer with the last stream."""
        self.requests.pop(request, None)
        if not self.requests and self.timer.running:
            self.timer.stop()

    def tick(self) -> None:
        """One snapshot, encoded once, to every open stream."""
        data = event("snapshot", dumps(snapshot(self.ops)))
        for request, feed in list(self.requests.items()):
            if request._disconnected:
                self.close(request)
            elif not feed.paused:
                request.write(data)


def query_float(request: Request, name: str) -> float | None:
    """A float query parameter, or None when absent or not a number."""
    values = request.args.get(name.encode())
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None


def live_routes(ops: ClientOps, live: LiveStreams) -> list[tuple[bytes, str, Any]]:
    """The dashboard's API routes, for :class:`~clusterd.server.http.api.ApiResource`."""
    return [
        (b"GET", r"events", live.open),
        (b"GET", r"snapshot", lambda r: send_json(r, snapshot(ops))),
        (b"GET", r"taskstream", lambda r: send_json(r, taskstream(ops, query_float(r, "since")))),
    ]


class Page(Resource):
    """``/`` and ``/dashboard/{file}``: the page's static files, read once from the package."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        folder = resources.files("clusterd.server.http") / "static"
        self.files = {
            f.name: f.read_bytes() for f in folder.iterdir() if f.name.split(".")[-1] in TYPES
        }

    def render_GET(self, request: Request) -> bytes:
        """The file asked for (``index.html`` for ``/``), or 404."""
        name = "/".join(p.decode("utf-8", "replace") for p in request.postpath) or "index.html"
        body = self.files.get(name)
        if body is None:
            return send_error(request, ErrorCode.BAD_REQUEST, "no such page.", 404)
        request.setHeader(b"content-type", TYPES[name.rsplit(".", 1)[-1]])
        request.setHeader(b"cache-control", b"no-cache")
        return body
