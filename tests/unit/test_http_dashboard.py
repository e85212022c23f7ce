"""The dashboard's routes under StubTreq over a scheduler on a Clock: the page at ``/``, the
snapshot and task-stream JSON, the server-wide snapshot stream (bounded, one timer), the
``token`` query parameter on that stream only, and the core's bounded task-stream ring."""

from __future__ import annotations

import json
from pathlib import Path

from test_http_api import URL, Api

from clusterd.core.taskstream import TaskStream
from clusterd.testing import add_worker, result_of


def test_root_serves_the_dashboard_page_and_its_files() -> None:
    """``/`` is the page, ``/dashboard/dashboard.js`` its script; an unknown file is 404."""
    api = Api()
    status, body = api.call("GET", "/")
    assert status == 200 and "<title>clusterd dashboard</title>" in body
    status, body = api.call("GET", "/dashboard/dashboard.js")
    assert status == 200 and "EventSource" in body
    assert api.call("GET", "/dashboard/nope.js")[0] == 404


def test_snapshot_and_taskstream_show_workers_jobs_and_recent_runs() -> None:
    """The snapshot carries stats, workers and jobs; the task stream each answered sub-task's
    worker, job, start and end."""
    api = Api()
    job_id = api.run_job([1, 2, 3, 4])
    worker = add_worker(api.core, "w1", slots=2)
    api.clock.advance(1.5)
    worker.answer_all()
    status, snap = api.call("GET", "/api/v1/snapshot")
    assert status == 200
    assert [w["name"] for w in snap["workers"]] == ["w1"]
    assert snap["jobs"][0]["id"] == job_id and snap["stats"]["subtasks_completed"] >= 1
    status, stream = api.call("GET", "/api/v1/taskstream?since=0")
    runs = stream["runs"]
    assert runs and {r["worker"] for r in runs} == {"w1"} and {r["job"] for r in runs} == {job_id}
    assert all(r["ok"] for r in runs) and runs[0]["end"] - runs[0]["start"] == 1.5
    assert api.call("GET", "/api/v1/taskstream?since=9999")[1]["runs"] == []


def test_task_stream_ring_is_bounded() -> None:
    """The ring keeps only the last ``size`` runs, oldest dropped first."""
    stream = TaskStream(size=3)
    for i in range(10):
        stream.note("w", "j1", i, i, i + 1, True)
    assert [r["index"] for r in stream.view()] == [7, 8, 9]


def _live(api: Api):  # the LiveStreams behind /api/v1/events
    v1 = api.site.resource.root.children[b"api"].children[b"v1"]
    return next(h for m, p, h in v1.routes if p.pattern == "events").__self__


def test_events_stream_sends_a_snapshot_each_second_and_stops_its_timer() -> None:
    """``/api/v1/events`` sends a snapshot at once and one per second from one shared timer
    (skipped while the client is behind), which stops when the last stream closes; past the
    limit the answer is 503 BUSY."""
    api = Api()
    live = _live(api)
    chunks: list[bytes] = []
    d = api.stub.get(URL + "/api/v1/events", unbuffered=True)
    api.stub.flush()
    response = result_of(d)
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    collected = api.stub.collect(response, chunks.append)
    collected.addErrback(lambda _: None)  # the stream never ends by itself; we cut it below
    api.clock.advance(1)
    api.clock.advance(1)
    api.stub.flush()
    blocks = b"".join(chunks).decode().strip().split("\n\n")
    assert len(blocks) == 3 and all(b.startswith("event: snapshot\n") for b in blocks)
    assert "workers" in json.loads(blocks[-1].split("\n")[1].removeprefix("data: "))
    feed = next(iter(live.requests.values()))
    feed.pauseProducing()  # the client's socket buffer is full: snapshots are skipped
    api.clock.advance(1)
    api.stub.flush()
    assert len(b"".join(chunks).decode().strip().split("\n\n")) == 3
    feed.resumeProducing()
    api.clock.advance(1)
    api.stub.flush()
    assert len(b"".join(chunks).decode().strip().split("\n\n")) == 4
    live.limit = 1
    status, body = api.call("GET", "/api/v1/events")
    assert (status, body["code"]) == (503, "BUSY")
    assert live.timer.running
    for request in list(live.requests):
        request.loseConnection()
    api.stub.flush()
    assert not live.requests and not live.timer.running


def test_events_stream_takes_the_token_as_a_query_parameter_only_there() -> None:
    """With a client secret the page is open, ``/api/v1/events`` accepts ``?token=``, and no
    other route does."""
    api = Api(secret=b"s3cret")
    assert api.call("GET", "/")[0] == 200
    assert api.call("GET", "/dashboard/dashboard.css")[0] == 200
    assert api.call("GET", "/api/v1/events?token=wrong")[0] == 401
    assert api.call("GET", "/api/v1/snapshot?token=s3cret")[0] == 401
    d = api.stub.get(URL + "/api/v1/events?token=s3cret", unbuffered=True)
    api.stub.flush()
    assert result_of(d).code == 200


def test_ci_runs_the_readmes_test_command_which_installs_chromium() -> None:
    """.ci/run's last line is the README's test command, and it installs chromium (the
    dashboard's browser test needs it) before the tests."""
    root = Path(__file__).resolve().parents[2]
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (root / "README.md").read_text()
    assert f"```sh\n{ci}\n```" in readme
    assert ci.index("apt-get install -y chromium") < ci.index("pytest")
