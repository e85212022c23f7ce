"""The HTTP API's handlers, driven with treq's StubTreq over a scheduler on a Clock: the same
ClientOps calls as the line protocol, JSON refusals with its codes, the durability gate, SSE,
bearer auth and the body limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import ManualOffload
from treq.testing import StubTreq
from twisted.internet.task import Clock

from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.server.http.site import build_site
from clusterd.server.limits import ConnectionSettings
from clusterd.tasks.builtins import TASKS
from clusterd.tasks.registry import Registry
from clusterd.testing import add_worker, result_of

URL = "http://127.0.0.1:7421"


class Api:
    """A scheduler on a Clock, its HTTP site under StubTreq, and helpers answering at once."""

    def __init__(
        self, secret: bytes | None = None, hold: bool = False, offload: Any = None, **settings: Any
    ) -> None:
        self.clock = Clock()
        self.journal = MemoryJournal(hold=hold)
        self.core = Scheduler(Registry(TASKS), self.clock, journal=self.journal, offload=offload)
        secrets = {"client": secret} if secret else {}
        self.site = build_site(self.core, ConnectionSettings(secrets=secrets, **settings))
        self.stub = StubTreq(self.site.resource)

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """One request; (status, decoded JSON body or text)."""
        d = self.stub.request(method, URL + path, **kw)
        self.stub.flush()
        response = result_of(d)
        body = result_of(self.stub.content(response)).decode()
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        return response.code, json.loads(body) if "json" in ctype else body

    def run_job(self, value: list[int]) -> str:
        status, body = self.call("POST", "/api/v1/jobs", json={"task": "sum", "input": value})
        assert status == 201, body
        return body["id"]


def test_submit_answers_201_with_the_id_once_durable() -> None:
    """POST /api/v1/jobs answers 201 with the id only after the journal committed the job."""
    api = Api(hold=True)
    d = api.stub.post(URL + "/api/v1/jobs", json={"task": "sum", "input": [1, 2, 3]})
    api.stub.flush()
    got: list[Any] = []
    d.addBoth(got.append)
    assert got == []  # the journal has not committed: no answer yet
    api.journal.flush()
    api.stub.flush()
    assert got[0].code == 201
    assert json.loads(result_of(api.stub.content(got[0]))) == {"id": "j1"}


def test_job_status_progress_and_why_it_waits() -> None:
    """GET /api/v1/jobs/{id} shows state, progress and that no worker can run it; then the
    result once a worker ran it."""
    api = Api()
    job_id = api.run_job([1, 2, 3])
    status, body = api.call("GET", f"/api/v1/jobs/{job_id}")
    assert status == 200 and body["state"] == "queued" and body["waiting_for_worker"] is True
    assert "no connected worker" in body["note"]
    add_worker(api.core, "w1", slots=4).answer_all()
    status, body = api.call("GET", f"/api/v1/jobs/{job_id}")
    assert body["state"] == "done" and body["result"] == 6 and body["done"] == body["total"]


def test_errors_are_json_with_the_line_protocols_codes() -> None:
    """Unknown jobs are 404 UNKNOWN_JOB; bad bodies, tasks and options are 400 with the code
    SUBMIT would give; an unknown route is 404 and a wrong method 405."""
    api = Api()
    assert api.call("GET", "/api/v1/jobs/j999") == (
        404,
        {"code": "UNKNOWN_JOB", "message": "no job 'j999' (never submitted, or expired)."},
    )
    assert api.call("GET", "/api/v1/jobs/nope")[1]["code"] == "UNKNOWN_JOB"
    status, body = api.call("POST", "/api/v1/jobs", data=b"{not json")
    assert status == 400 and body["code"] == "BAD_JSON"
    status, body = api.call("POST", "/api/v1/jobs", json={"task": "nope", "input": 1})
    assert status == 404 and body["code"] == "UNKNOWN_TASK"
    status, body = api.call("POST", "/api/v1/jobs", json={"task": "sum", "input": "x"})
    assert status == 400 and body["code"] == "BAD_INPUT"
    bad = {"task": "sum", "input": [1], "options": {"chunks": 0}}
    assert api.call("POST", "/api/v1/jobs", json=bad)[1]["code"] == "BAD_REQUEST"
    assert api.call("GET", "/api/v1/jobs?limit=0")[1]["code"] == "BAD_REQUEST"
    assert api.call("GET", "/api/v1/nothing")[0] == 404
    assert api.call("DELETE", "/api/v1/jobs")[0] == 405


def test_busy_and_journal_error_are_503() -> None:
    """Past --max-client-jobs the API answers 503 BUSY; a broken journal refuses with 503
    JOURNAL_ERROR and /healthz turns 503."""
    api = Api(max_client_jobs=1)
    api.run_job([1])
    status, body = api.call("POST", "/api/v1/jobs", json={"task": "sum", "input": [2]})
    assert (status, body["code"]) == (503, "BUSY")
    api = Api(hold=True)
    d = api.stub.post(URL + "/api/v1/jobs", json={"task": "sum", "input": [1]})
    api.stub.flush()
    api.journal.break_with("disk gone")
    api.stub.flush()
    response = result_of(d)
    assert response.code == 503
    assert json.loads(result_of(api.stub.content(response)))["code"] == "JOURNAL_ERROR"
    assert api.call("GET", "/healthz")[0] == 503


def test_cancel_answers_the_durable_end() -> None:
    """POST /api/v1/jobs/{id}/cancel answers the job's end once durable."""
    api = Api()
    job_id = api.run_job([1, 2])
    assert api.call("POST", f"/api/v1/jobs/{job_id}/cancel") == (
        200,
        {"id": job_id, "state": "cancelled"},
    )
    assert api.call("GET", f"/api/v1/jobs/{job_id}")[1]["state"] == "cancelled"


def test_jobs_are_paged_newest_first() -> None:
    """GET /api/v1/jobs pages with limit and before; ``next`` is the next page's cursor."""
    api = Api()
    ids = [api.run_job([i]) for i in range(5)]
    status, body = api.call("GET", "/api/v1/jobs?limit=2")
    assert [j["id"] for j in body["jobs"]] == ids[:-3:-1] and body["next"] == ids[3]
    body = api.call("GET", f"/api/v1/jobs?limit=10&before={body['next']}")[1]
    assert [j["id"] for j in body["jobs"]] == ids[2::-1]


def test_workers_tasks_stats_and_health() -> None:
    """Workers, tasks, stats and the health probe answer the line protocol's objects."""
    api = Api()
    add_worker(api.core, "w1", slots=3)
    workers = api.call("GET", "/api/v1/workers")[1]
    assert workers[0]["name"] == "w1" and workers[0]["slots"] == 3
    assert "sum" in [t["name"] for t in api.call("GET", "/api/v1/tasks")[1]]
    assert api.call("GET", "/api/v1/stats")[1]["slots"] == 3
    assert api.call("GET", "/healthz") == (200, {"status": "ok"})


def test_events_stream_progress_then_the_end() -> None:
    """GET /api/v1/jobs/{id}/events sends progress events as sub-tasks finish, then ``end``
    with the result, and closes; streams past the limit get 503 BUSY."""
    api = Api()
    job_id = api.run_job(list(range(40)))
    worker = add_worker(api.core, "w1", slots=1)
    chunks: list[bytes] = []
    d = api.stub.get(URL + f"/api/v1/jobs/{job_id}/events", unbuffered=True)
    api.stub.flush()
    response = result_of(d)
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    done = api.stub.collect(response, chunks.append)
    worker.answer_all()
    api.stub.flush()
    result_of(done)
    text = b"".join(chunks).decode()
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    assert names[0] == "progress" and names[-1] == "end" and names.count("progress") > 2
    assert json.loads(events[-1][1].removeprefix("data: "))["result"] == sum(range(40))
    assert api.site.resource.root.children[b"api"].children[b"v1"].streams.open_count == 0


def test_event_streams_are_bounded() -> None:
    """More event streams than the limit are refused with 503 BUSY."""
    api = Api()
    job_id = api.run_job([1])
    streams = api.site.resource.root.children[b"api"].children[b"v1"].streams
    streams.limit = 1
    api.stub.get(URL + f"/api/v1/jobs/{job_id}/events", unbuffered=True)
    api.stub.flush()
    status, body = api.call("GET", f"/api/v1/jobs/{job_id}/events")
    assert (status, body["code"]) == (503, "BUSY")


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic czNjcmV0", "Bearer s3cre"])
def test_bearer_token_is_required_with_a_client_secret(header: str | None) -> None:
    """With a client secret, every route but /healthz needs it as a bearer token: 401 NOAUTH."""
    api = Api(secret=b"s3cret")
    headers = {"Authorization": header} if header else {}
    status, body = api.call("GET", "/api/v1/jobs", headers=headers)
    assert (status, body["code"]) == (401, "NOAUTH")
    assert api.call("GET", "/metrics", headers=headers)[0] == 401
    assert api.call("GET", "/healthz")[0] == 200
    ok = api.call("GET", "/api/v1/jobs", headers={"Authorization": "Bearer s3cret"})
    assert ok[0] == 200


def test_request_bodies_are_limited_to_max_line() -> None:
    """A body over --max-line is refused with 413 LINE_TOO_LONG and submits nothing."""
    api = Api(max_line=1000)
    status, body = api.call("POST", "/api/v1/jobs", json={"task": "sum", "input": [1] * 1000})
    assert (status, body["code"]) == (413, "LINE_TOO_LONG")
    assert api.core.stats()["jobs_submitted"] == 0


def test_docs_openapi_json_is_the_served_document() -> None:
    """docs/openapi.json is byte for byte the document the server serves."""
    from pathlib import Path

    from clusterd.server.http.openapi import document_bytes

    docs = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    assert docs.read_bytes() == document_bytes()
    api = Api()
    assert api.call("GET", "/api/v1/openapi.json")[1] == json.loads(document_bytes())


def test_http_option_binds_loopback_and_refuses_an_open_exposed_api() -> None:
    """--http adds a listener (loopback unless an interface is named), and none without it; an
    exposed API without a client secret is refused at start unless --insecure."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.threadpool import ThreadPool
    from twisted.python.usage import UsageError

    from clusterd.server.tap import Options, makeService

    class Reactor(MemoryReactorClock):
        def getThreadPool(self) -> ThreadPool:
            return ThreadPool()

    def described(*args: str) -> list[str]:
        options = Options()
        options.parseOptions(["--journal", "none", *args])
        top = makeService(options, Reactor())
        return [s.endpoint.description for s in top if hasattr(s, "endpoint")]

    assert "tcp:0:interface=127.0.0.1" in described("--http", "tcp:0")
    assert described() == ["tcp:7420:interface=127.0.0.1"]
    with pytest.raises(UsageError, match="client secret"):
        described("--http", "tcp:0:interface=0.0.0.0")
    assert "tcp:0:interface=0.0.0.0" in described("--http", "tcp:0:interface=0.0.0.0", "--insecure")


def test_a_big_submit_body_is_parsed_and_split_off_the_reactor() -> None:
    """A POST body over OFFLOAD_LINE is parsed and split on the server's thread (the offload),
    as a long RUN line is; the answer and the job are the same as for a small body."""
    offload = ManualOffload()
    api = Api(offload=offload)
    value = list(range(300_000))  # about 2 MB of JSON
    d = api.stub.post(URL + "/api/v1/jobs", json={"task": "sum", "input": value})
    api.stub.flush()
    got: list[Any] = []
    d.addBoth(got.append)
    assert got == [] and api.core.list_jobs(10) == []  # nothing parsed on the reactor yet
    # The parse, then (back on the reactor for the default chunk count) the split and the
    # journal's encoding of the cut.
    assert offload.run_all() == 2
    api.stub.flush()
    assert got[0].code == 201
    job_id = json.loads(result_of(api.stub.content(got[0])))["id"]
    worker = add_worker(api.core, "w1", slots=4)
    for _ in range(50):  # bounded: every sub-task answered, then the combine (maybe offloaded)
        worker.answer_all()
        offload.run_all()
        api.clock.advance(0)
    assert result_of(api.core.get(job_id).wait()).result == sum(value)
