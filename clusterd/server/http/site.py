"""The HTTP front end's site: the resource tree, bearer-token auth, bounded request bodies.

``/api/v1/...`` (api.py), ``/metrics`` (metrics.py), ``/healthz`` (for probes) and the live
dashboard at ``/`` (dashboard.py). With a client secret configured, everything but ``/healthz``
(the probes) and the dashboard's static files (no data in them) needs
``Authorization: Bearer <client secret>`` (compared in constant time); the dashboard's snapshot
stream ``/api/v1/events`` also takes it as a ``token`` query parameter, because a browser's
EventSource cannot send headers.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from clusterd.core.errors import ErrorCode
from clusterd.server.client_ops import ClientOps
from clusterd.server.http.api import ApiResource, encode, job_view
from clusterd.server.http.dashboard import LiveStreams, Page, live_routes
from clusterd.server.http.errors import send_error, send_json
from clusterd.server.http.metrics import Metrics, MetricsResource
from clusterd.server.http.openapi import document_bytes
from clusterd.server.http.sse import DEFAULT_MAX_STREAMS, EventStreams
from clusterd.server.limits import ConnectionSettings

__all__ = ["build_site", "BoundedRequest", "ApiSite"]

OPEN_PATHS = {b"healthz", b"", b"dashboard"}  # probes and the page's static files: no token
TOKEN_IN_QUERY = b"/api/v1/events"  # EventSource cannot send headers


class BoundedRequest(Request):
    """A request that stops storing its body past the site's ``max_body`` bytes (--max-line):
    the rest is read and dropped, and :class:`Guard` answers 413 LINE_TOO_LONG."""

    too_big = False
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        """Store the chunk unless the body has passed the limit."""
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            if not self.too_big:
                self.too_big = True
                self.content.seek(0)
                self.content.truncate()
            return
        super().handleContentChunk(data)


class _Refusal(Resource):
    """Answers every request with one JSON refusal."""

    isLeaf = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__()
        self.code, self.message = code, message

    def render(self, request: Request) -> bytes:
        """The refusal (the connection closes after a body that was too long)."""
        if self.code == ErrorCode.LINE_TOO_LONG:
            request.setHeader(b"connection", b"close")
        return send_error(request, self.code, self.message)


class Guard(Resource):
    """The root: refuses a body over ``max_body`` and, with a client secret, a request without
    ``Authorization: Bearer <secret>`` (constant-time compare), before any route runs."""

    def __init__(self, root: Resource, max_body: int, secret: bytes | None) -> None:
        super().__init__()
        self.root, self.max_body, self.secret = root, max_body, secret

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        """The route's resource, or a refusal."""
        content = request.content
        size = content.seek(0, 2) if content is not None else 0
        if content is not None:
            content.seek(0)
        if getattr(request, "too_big", False) or size > self.max_body:
            message = f"the request body is longer than {self.max_body} bytes."
            return _Refusal(ErrorCode.LINE_TOO_LONG, message)
        if self.secret is not None and path not in OPEN_PATHS:
            given = request.getHeader(b"authorization") or b""
            scheme, _, token = given.partition(b" ")
            if request.path == TOKEN_IN_QUERY and not given:
                scheme, token = b"bearer", (request.args.get(b"token") or [b""])[0]
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.secret):
                message = "send the client secret as 'Authorization: Bearer <secret>'."
                return _Refusal(ErrorCode.NOAUTH, message)
        return self.root.getChildWithDefault(path, request)


class ApiSite(Site):
    """The site, with its limits and secret; no access log line per request."""

    requestFactory = BoundedRequest

    def __init__(self, root: Guard) -> None:
        super().__init__(root)
        self.max_body = root.max_body
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        """No access log: one line per request would drown the server's own log."""


class Health(Resource):
    """``/healthz``: 200 while the server takes work, 503 JOURNAL_ERROR once its journal broke."""

    isLeaf = True

    def __init__(self, core: Any) -> None:
        super().__init__()
        self.core = core

    def render_GET(self, request: Request) -> bytes:
        """The probe's answer, O(1)."""
        if self.core.journal.failure is not None:
            return send_error(
                request, ErrorCode.JOURNAL_ERROR, "the journal failed; restart the server."
            )
        return send_json(request, {"status": "ok"})


def build_site(
    core: Any,
    settings: ConnectionSettings,
    metrics: Metrics | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
) -> ApiSite:
    """The HTTP API over ``core``: one :class:`ClientOps` for all HTTP clients (so
    --max-client-jobs bounds the API's unfinished jobs together)."""
    ops = ClientOps(core, settings)
    streams = EventStreams(lambda job: encode(job_view(ops, job)), max_streams)
    root = Resource()
    api = Resource()
    root.putChild(b"api", api)
    v1 = ApiResource(ops, streams, document_bytes())
    for method, pattern, handler in live_routes(ops, LiveStreams(ops, max_streams)):
        v1.routes.append((method, re.compile(pattern), handler))
    api.putChild(b"v1", v1)
    page = Page()
    root.putChild(b"", page)
    root.putChild(b"dashboard", page)
    root.putChild(b"healthz", Health(core))
    root.putChild(b"metrics", MetricsResource(metrics or Metrics(core)))
    return ApiSite(Guard(root, settings.max_line, settings.secrets.get("client")))
