"""The JSON API under ``/api/v1``: each route makes the same :class:`ClientOps` call as the line
protocol's verb (JOBS, STATUS, SUBMIT, CANCEL, WATCH, WORKERS, TASKS, STATS).

Why a small route table over twisted.web rather than klein: a dozen fixed routes, two with a
job id, fit one regex table that reads top to bottom, and klein would be one more dependency
for no route it could express more clearly. A Deferred answer (submit, cancel) is finished
once the record is durable; a client that hangs up first cancels its wait, never the job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jobs import Job
from clusterd.core.jsontext import dumps, parse_json_object
from clusterd.core.wire import JobRequest, parse_job_request
from clusterd.server.client_ops import ClientOps
from clusterd.server.http.errors import error_for, send_error, send_json, send_wire_error
from clusterd.server.http.sse import EventStreams
from clusterd.server.limits import JOBS_DEFAULT_LIMIT, OFFLOAD_LINE

__all__ = ["ApiResource", "job_view", "body_request"]

_ID = r"(j[0-9]{1,18})"
Handler = Callable[..., Any]


def body_request(body: bytes, depth: int) -> JobRequest:
    """A POST /api/v1/jobs body as the SUBMIT it stands for, checked by the line protocol's own
    parser. Pure: safe on another thread."""
    doc = parse_json_object(body.decode("utf-8", "replace") or "null", "the request body", depth)
    unknown = sorted(set(doc) - {"task", "input", "options"})
    if unknown:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"unknown field {unknown[0][:40]!r}; known fields: input, options, task.",
        )
    task, options = doc.get("task"), doc.get("options", {})
    if not isinstance(task, str) or not task or any(c.isspace() for c in task):
        raise WireError(ErrorCode.BAD_REQUEST, "'task' must be a task name, e.g. \"sum\".")
    if "input" not in doc or not isinstance(options, dict):
        raise WireError(
            ErrorCode.BAD_REQUEST, "give 'input' (any JSON) and 'options' as an object."
        )
    return parse_job_request(f"{task} {dumps(doc['input'])} {dumps(options)}", "SUBMIT", depth + 1)


def job_view(ops: ClientOps, job: Job) -> dict[str, Any]:
    """The job's STATUS object (state, progress, why it waits), plus its result once its end
    is durable: what ``GET /api/v1/jobs/{id}`` and the event stream's ``end`` event carry."""
    out = ops.core.job_status(job)
    if job.settled and out["state"] == "done" and job.result_json is not None:
        out["result"] = _Raw(job.result_json)
    return out


class _Raw(str):
    """A JSON text already encoded (a job's result): spliced in by :func:`encode`."""


def encode(value: dict[str, Any]) -> bytes:
    """``value`` as JSON; a :class:`_Raw` result is spliced in as it was journaled, never
    decoded and encoded again (a result may be megabytes)."""
    raw = value.pop("result", None)
    text = dumps(value)
    if raw is not None:
        text = text[:-1] + ',"result":' + raw + "}"
    return text.encode("utf-8")


def _query_int(request: Request, name: str, default: int) -> Any:
    values = request.args.get(name.encode())
    if not values:
        return default
    text = values[0].decode("utf-8", "replace")
    return int(text) if text.isdigit() and len(text) < 10 else text  # ClientOps refuses text


def _query_str(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


class ApiResource(Resource):
    """``/api/v1/...``: one route table, every route one ClientOps call."""

    isLeaf = True
    log = Logger(namespace="clusterd.server.http")

    def __init__(self, ops: ClientOps, streams: EventStreams, openapi: bytes) -> None:
        super().__init__()
        self.ops = ops
        self.streams = streams
        self.openapi = openapi
        self.routes: list[tuple[bytes, re.Pattern[str], Handler]] = [
            (b"GET", re.compile(r"jobs"), self.list_jobs),
            (b"POST", re.compile(r"jobs"), self.submit),
            (b"GET", re.compile("jobs/" + _ID), self.job),
            (b"POST", re.compile("jobs/" + _ID + "/cancel"), self.cancel),
            (b"GET", re.compile("jobs/" + _ID + "/events"), self.events),
            (b"GET", re.compile(r"workers"), lambda r: send_json(r, self.ops.workers())),
            (b"GET", re.compile(r"tasks"), lambda r: send_json(r, self.ops.tasks())),
            (b"GET", re.compile(r"stats"), lambda r: send_json(r, self.ops.stats())),
            (b"GET", re.compile(r"openapi\.json"), self.openapi_doc),
        ]

    def render(self, request: Request) -> Any:
        """Find the route for the path under ``/api/v1/`` and run it; a refusal is JSON."""
        path = "/".join(p.decode("utf-8", "replace") for p in request.postpath)
        allowed = []
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            allowed.append(method)
            if method == request.method:
                try:
                    return handler(request, *match.groups())
                except WireError as e:
                    return send_wire_error(request, e)
        if allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            return send_error(request, ErrorCode.BAD_REQUEST, "method not allowed here.", 405)
        if path.startswith("jobs/"):
            return send_error(request, ErrorCode.UNKNOWN_JOB, "no such job (ids look like j42).")
        return send_error(request, ErrorCode.BAD_REQUEST, f"no route /api/v1/{path[:60]}.", 404)

    # -- routes --------------------------------------------------------------------------------

    def list_jobs(self, request: Request) -> bytes:
        """JOBS: one page, newest first; the last id is the next page's ``before``."""
        page = self.ops.jobs(
            _query_int(request, "limit", JOBS_DEFAULT_LIMIT), _query_str(request, "before")
        )
        return send_json(request, {"jobs": page, "next": page[-1]["id"] if page else None})

    def job(self, request: Request, job_id: str) -> bytes:
        """STATUS: state, progress, why it waits; the result once done."""
        job = self.ops.get(job_id)
        send_json(request, None)
        return encode(job_view(self.ops, job))

    def submit(self, request: Request) -> Any:
        """SUBMIT: ``{"task", "input", "options"}``; 201 with the id once it is durable. A body
        over OFFLOAD_LINE is parsed and split on the server's thread, as a long RUN line is:
        megabytes of JSON must not stall every other connection."""
        self.ops.check_capacity()
        body = request.content.read() if request.content else b""
        depth = self.ops.settings.max_json_depth
        offload = self.ops.core.offload
        if len(body) <= OFFLOAD_LINE or offload is None:
            job = self.ops.submit(body_request(body, depth))
            d = self.ops.accepted(job)
        else:
            d = offload(body_request, body, depth)
            d.addCallback(self._prepare, offload).addCallback(self._submit_prepared)
        return self._when(request, d, lambda j: send_json(request, {"id": j.id}, 201))

    def _prepare(self, req: JobRequest, offload: Any) -> Deferred[Any]:
        """Back on the reactor: the default chunk count (it depends on the workers), then the
        split and its journal encoding on the thread again."""
        chunks = self.ops.core.default_chunks(req.task)
        return offload(lambda: (req, self.ops.prepare(req, chunks)))

    def _submit_prepared(self, out: tuple[JobRequest, Any]) -> Deferred[Job]:
        req, (pieces, encoded) = out
        return self.ops.accepted(self.ops.submit(req, pieces, encoded))

    def cancel(self, request: Request, job_id: str) -> Any:
        """CANCEL: answers once the cancel (or the end it already had) is durable."""
        d = self.ops.cancel(job_id)
        return self._when(request, d, lambda j: send_json(request, {"id": j.id, "state": j.state}))

    def events(self, request: Request, job_id: str) -> Any:
        """WATCH as server-sent events: ``progress`` per whole percent, then ``end``."""
        return self.streams.open(request, self.ops.get(job_id))

    def openapi_doc(self, request: Request) -> bytes:
        """The OpenAPI 3 document (docs/openapi.json)."""
        send_json(request, None)
        return self.openapi

    def _when(self, request: Request, d: Deferred[Job], answer: Callable[[Job], bytes]) -> Any:
        """Answer with ``answer(job)`` once ``d`` fires; its failure is a JSON refusal. A client
        that hangs up first cancels the wait (the job goes on)."""
        gone = request.notifyFinish()
        gone.addErrback(lambda _: d.cancel())

        def fired(job: Job) -> None:
            if not request.finished and not request._disconnected:
                request.write(answer(job))
                request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError) or request._disconnected:
                return
            code, message = error_for(failure.value)
            request.write(send_error(request, code, message))
            request.finish()

        d.addCallbacks(fired, failed)
        return NOT_DONE_YET
