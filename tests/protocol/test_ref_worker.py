"""The worker's side of inputs by reference: a DO's "ref" reaches the pool as a typed range (a
file) or is fetched first (a URL), a malformed one answers ERROR; and the http range reader's
checks (206, Content-Range, size, length), over a fake request function."""

from __future__ import annotations

import json

import pytest
from helpers import FakePool
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from clusterd.core.refs import RefError, RefRange
from clusterd.core.wire import format_greeting
from clusterd.worker import runs as worker_runs
from clusterd.worker.protocol import WorkerFactory
from clusterd.worker.refs import fetch_range

GREETING = (format_greeting("server", 1 << 20) + "\n").encode()
REGISTERED = (
    'OK REGISTERED {"name":"w1","protocol":1,"heartbeat_interval":5.0,"heartbeat_timeout":15.0}\n'
)


@pytest.fixture
def worker():
    clock = Clock()
    pool = FakePool()
    factory = WorkerFactory(pool, "w1", ["wordcount", "sum"], 2, clock=clock)
    factory.ref_roots = ("/data/", "http://h/")
    proto = factory.buildProtocol(None)
    tr = StringTransport()
    proto.makeConnection(tr)
    proto.dataReceived(GREETING)
    proto.dataReceived(REGISTERED.encode())
    tr.clear()
    yield proto, tr, pool
    proto.connectionLost(Failure(ConnectionDone()))


def _do(ref: dict) -> bytes:
    msg = {"id": 4, "job": "j1", "index": 0, "task": "wordcount", "attempt": 1, "ref": ref}
    return ("DO " + json.dumps(msg) + "\n").encode()


def test_file_ref_goes_to_the_pool_as_a_range(worker):
    """A DO naming a file range hands the pool a RefRange, for its child to read."""
    proto, tr, pool = worker
    rng = RefRange("/data/a.txt", 100, 10, 60, "text")
    proto.dataReceived(_do(rng.wire()))
    [(task, value, d)] = pool.calls
    assert (task, value) == ("wordcount", rng)
    d.callback({"a": 1})
    assert json.loads(tr.value().decode().split(" ", 1)[1])["result"] == {"a": 1}


def test_malformed_ref_answers_error(worker):
    """A DO whose ref is not a valid range is answered ERROR RefError, and runs nothing."""
    proto, tr, pool = worker
    proto.dataReceived(_do({"url": "/data/a.txt", "size": 5, "start": 3, "end": 9}))
    assert pool.calls == []
    verb, body = tr.value().decode().split(" ", 1)
    assert verb == "ERROR" and json.loads(body)["type"] == "RefError"


def test_url_ref_is_fetched_then_run(worker, monkeypatch):
    """A DO naming a URL range is fetched by the worker; the pool gets the decoded text."""
    proto, tr, pool = worker
    fetched = []

    def fake_fetch(rng):
        fetched.append(rng)
        return succeed("some words")

    monkeypatch.setattr(worker_runs, "fetch_range", fake_fetch)
    rng = RefRange("http://h/a.txt", 100, 0, 50, "text")
    proto.dataReceived(_do(rng.wire()))
    assert fetched == [rng]
    [(task, value, _)] = pool.calls
    assert (task, value) == ("wordcount", "some words")


class FakeResponse:
    """An IResponse enough for treq.collect: code, headers, and a body delivered at once."""

    def __init__(self, code: int, body: bytes, content_range: str | None = None) -> None:
        self.code = code
        self.body = body
        self.length = len(body)
        self.headers = Headers(
            {b"content-range": [content_range.encode()]} if content_range else {}
        )

    def deliverBody(self, protocol) -> None:  # noqa: N802
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


def _server(data: bytes, mode: str = "ok"):
    """A request function answering Range requests on ``data`` as ``mode`` says."""
    asked = []

    def request(method, url, headers, timeout):
        first, last = map(int, headers[b"Range"][0].decode().split("=")[1].split("-"))
        asked.append((first, last))
        body = data[first : last + 1]
        if mode == "whole":
            return succeed(FakeResponse(200, data))
        if mode == "shifted":
            return succeed(FakeResponse(206, body, f"bytes {first + 1}-{last + 1}/{len(data)}"))
        if mode == "long":
            return succeed(FakeResponse(206, body + b"xx", f"bytes {first}-{last}/{len(data)}"))
        return succeed(FakeResponse(206, body, f"bytes {first}-{last}/{len(data)}"))

    return request, asked


def _result(d):
    out = []
    d.addBoth(out.append)
    (r,) = out
    return r


def test_fetch_range_aligns_with_read_ahead():
    """The http reader asks [s-1, e) then reads ahead past e to finish the last word."""
    data = b"alpha beta gamma delta epsilon"
    request, asked = _server(data)
    assert _result(fetch_range(RefRange("http://h/x", len(data), 8, 14, "text"), request)) == (
        "gamma"
    )
    assert asked[0] == (7, 13) and len(asked) == 2


@pytest.mark.parametrize(
    "mode, fragment",
    [("whole", "HTTP 200"), ("shifted", "asked bytes"), ("long", "longer than")],
)
def test_fetch_range_refuses_answers_that_are_not_the_range(mode, fragment):
    """A 200 to a range request, a Content-Range for other bytes, or a longer body: RefError."""
    data = b"alpha beta gamma delta epsilon"
    request, _ = _server(data, mode)
    r = _result(fetch_range(RefRange("http://h/x", len(data), 0, 10, "text"), request))
    assert isinstance(r, Failure) and r.check(RefError) and fragment in str(r.value)
