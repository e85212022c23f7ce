"""The OpenAPI 3 document of the HTTP API, built here and kept in ``docs/openapi.json`` (a test
checks the two are the same; ``python -m clusterd.server.http.openapi > docs/openapi.json``
writes it). Served at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from clusterd.server.limits import JOBS_MAX_LIMIT

__all__ = ["document", "document_bytes"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "pattern": "^j[0-9]{1,18}$"}
_COUNT = {"type": "integer", "minimum": 0}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Bad request (BAD_REQUEST, BAD_JSON, BAD_INPUT, UNKNOWN_TASK, ...)",
        401: "NOAUTH: the bearer token is missing or wrong",
        404: "UNKNOWN_JOB",
        413: "LINE_TOO_LONG: the body is over --max-line",
        503: "BUSY or JOURNAL_ERROR",
    }
    return {str(s): _json(_ERROR, text[s]) for s in (401, *statuses)}


def _job_id_param() -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True, "schema": _ID}


def _op(summary: str, ok: dict[str, Any], *errors: int, **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {**ok, **_errors(*errors)}, **extra}


def _schemas() -> dict[str, Any]:
    job_row = {
        "type": "object",
        "required": ["id", "task", "state", "done", "total"],
        "properties": {
            "id": _ID,
            "task": {"type": "string"},
            "state": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
            "done": _COUNT,
            "total": _COUNT,
        },
    }
    status = {
        "allOf": [job_row],
        "type": "object",
        "properties": {
            "running": _COUNT,
            "queued": _COUNT,
            "waiting_for_worker": {"type": "boolean"},
            "note": {"type": "string", "description": "why the job waits"},
            "error": {"type": "object"},
            "result": {"description": "the job's result, once done"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
        "JobRow": job_row,
        "JobStatus": status,
        "Submit": {
            "type": "object",
            "required": ["task", "input"],
            "properties": {
                "task": {"type": "string", "example": "sum"},
                "input": {"example": [1, 2, 3]},
                "options": {
                    "type": "object",
                    "description": "chunks, timeout, attempts, key (docs/PROTOCOL.md)",
                },
            },
        },
    }


def _paths() -> dict[str, Any]:
    page = {
        "type": "object",
        "required": ["jobs", "next"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobRow"}},
            "next": {"oneOf": [_ID, {"type": "null"}]},
        },
    }
    paging = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": JOBS_MAX_LIMIT},
        },
        {"name": "before", "in": "query", "schema": _ID},
    ]
    status = {"$ref": "#/components/schemas/JobStatus"}
    ended = {"type": "object", "required": ["id", "state"], "properties": {"id": _ID}}
    return {
        "/api/v1/jobs": {
            "get": _op(
                "Jobs, newest first", {"200": _json(page, "One page")}, 400, parameters=paging
            ),
            "post": _op(
                "Submit a job; 201 once it is durably accepted",
                {
                    "201": _json(
                        {"type": "object", "required": ["id"], "properties": {"id": _ID}},
                        "Accepted",
                    )
                },
                400,
                404,
                413,
                503,
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submit"}}
                    },
                },
            ),
        },
        **_job_paths(status, ended),
    }


def _job_paths(status: dict[str, Any], ended: dict[str, Any]) -> dict[str, Any]:
    any_json = _json({}, "OK")
    return {
        "/api/v1/jobs/{id}": {
            "get": _op(
                "A job's state, progress, why it waits",
                {"200": _json(status, "OK")},
                404,
                parameters=[_job_id_param()],
            ),
        },
        "/api/v1/jobs/{id}/cancel": {
            "post": _op(
                "Cancel; answers once durable",
                {"200": _json(ended, "Its end")},
                404,
                503,
                parameters=[_job_id_param()],
            ),
        },
        "/api/v1/jobs/{id}/events": {
            "get": _op(
                "Server-sent events: progress, then end",
                {
                    "200": {
                        "description": "event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                404,
                503,
                parameters=[_job_id_param()],
            ),
        },
        "/api/v1/workers": {"get": _op("Connected workers", {"200": any_json})},
        "/api/v1/tasks": {"get": _op("Tasks and who can run them", {"200": any_json})},
        "/api/v1/stats": {"get": _op("The scheduler's counters", {"200": any_json})},
        "/api/v1/snapshot": {"get": _op("The dashboard's snapshot", {"200": any_json})},
        "/api/v1/taskstream": {
            "get": _op(
                "Recent sub-task runs (the dashboard's task stream)",
                {"200": any_json},
                parameters=[{"name": "since", "in": "query", "schema": {"type": "number"}}],
            ),
        },
        "/healthz": {"get": _op("Probe", {"200": any_json}, 503, security=[])},
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3 document, as a dict."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "clusterd HTTP API", "version": "1"},
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def document_bytes() -> bytes:
    """The document as docs/openapi.json holds it (sorted keys, indented, newline at end)."""
    return (json.dumps(document(), indent=2, sort_keys=True) + "\n").encode("utf-8")


if __name__ == "__main__":  # pragma: no cover - regenerates docs/openapi.json
    import sys

    sys.stdout.write(document_bytes().decode("utf-8"))
