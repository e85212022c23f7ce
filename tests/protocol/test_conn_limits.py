"""One peer must not stall, fill or lock out the server (issue 10, items 7-11, protocol side):
every close the server decides ends in bounded time (TLS included), a paused connection runs
nothing, the pipelined backlog and JOBS replies are bounded, an unauthenticated peer holds a few
KiB at most, a failed AUTH stops the connection until it is answered and an address's guesses are
budgeted across connections, and a worker's unreadable answer never leaves a sub-task waiting."""

from __future__ import annotations

import json

import pytest
from helpers import LineConn, result_of
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from clusterd.core.auth import proof
from clusterd.core.scheduler import Scheduler
from clusterd.server.protocol import (
    MAX_PENDING_REPLIES,
    PRE_AUTH_MAX_LINE,
    ConnectionSettings,
    ServerFactory,
)
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS

CLIENT_SECRET = b"client-secret-0123456789abcdef"
WORKER_SECRET = b"worker-secret-0123456789abcdef"
BOTH = {"client": CLIENT_SECRET, "worker": WORKER_SECRET}
GRACE = 5.0

_OPEN: list[LineConn] = []


@pytest.fixture
def clock():
    c = Clock()
    yield c
    for conn in _OPEN:
        conn.lose()
    _OPEN.clear()
    assert c.getDelayedCalls() == []


def make_factory(clock: Clock, **settings) -> ServerFactory:
    settings.setdefault("heartbeat_interval", 1000)
    settings.setdefault("heartbeat_timeout", 3000)
    core = Scheduler(Registry(TASKS), clock)
    return ServerFactory(core, settings=ConnectionSettings(**settings), clock=clock)


def connect(factory: ServerFactory, host: str = "10.0.0.1", port: int = 1234) -> LineConn:
    conn = LineConn(factory, host, port)
    _OPEN.append(conn)
    return conn


def auth_line(conn: LineConn, role: str = "client", secret: bytes = CLIENT_SECRET) -> str:
    return f"AUTH {role} {proof(secret, conn.proto.auth.nonce, role)}"


def err_code(line: str) -> str:
    assert line.startswith("ERR "), line
    return line.split(" ", 2)[1]


def ok_json(line: str):
    assert line.startswith("OK "), line
    return json.loads(line[3:])


def register(conn: LineConn, name: str = "w1", slots: int = 1, **extra) -> list[dict]:
    """REGISTER; returns the DOs sent at once (queued work)."""
    info = {"name": name, "tasks": ["sum"], "slots": slots, "protocol": 1, **extra}
    reply, *rest = conn.ask("REGISTER " + json.dumps(info))
    assert reply.startswith("OK REGISTERED "), reply
    return [json.loads(line[3:]) for line in rest if line.startswith("DO ")]


def dos(conn: LineConn) -> list[dict]:
    return [json.loads(line[3:]) for line in conn.lines() if line.startswith("DO ")]


# -- 7. every close the server decides completes in bounded time ---------------------------------


def _close_by(kind: str, clock: Clock) -> LineConn:
    """A connection on which the server has just decided to close, in one of its ways."""
    if kind == "too_many_connections":
        factory = make_factory(clock, max_connections=0)
        return connect(factory)
    if kind == "auth_timeout":
        factory = make_factory(clock, secrets=dict(BOTH), auth_timeout=3)
        conn = connect(factory)
        clock.advance(3)
        return conn
    if kind == "third_failed_auth":
        factory = make_factory(clock, secrets=dict(BOTH), max_auth_failures=1)
        conn = connect(factory)
        conn.send("AUTH client 00\n")
        clock.advance(0.25)
        return conn
    factory = make_factory(clock)
    conn = connect(factory)
    if kind == "quit":
        conn.send("QUIT\n")
    elif kind == "half_close":
        conn.proto.readConnectionLost()
    elif kind == "write_side_lost":
        conn.proto.writeConnectionLost()
    return conn


CLOSES = [
    "too_many_connections",
    "auth_timeout",
    "third_failed_auth",
    "quit",
    "half_close",
    "write_side_lost",
]


@pytest.mark.parametrize("kind", CLOSES)
def test_a_close_the_server_decides_is_aborted_after_the_grace_period(clock, kind):
    """Each close the server decides starts with loseConnection and, if the peer has not let
    go (no TLS close_notify, a full write buffer) within the grace period, aborts."""
    conn = _close_by(kind, clock)
    assert conn.tr.disconnecting and not conn.tr.disconnected
    clock.advance(GRACE - 0.01)
    assert not conn.tr.disconnected
    clock.advance(0.01)
    assert conn.tr.disconnected  # StringTransport.abortConnection sets it


@pytest.mark.parametrize("kind", CLOSES)
def test_a_close_that_completes_in_time_leaves_no_abort_timer(clock, kind):
    """A peer that lets go within the grace period cancels the pending abort."""
    conn = _close_by(kind, clock)
    conn.lose()
    assert clock.getDelayedCalls() == []
    assert not conn.tr.disconnected


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that says it is TLS."""

    def getPeerCertificate(self):
        return None


def tls_connect(factory: ServerFactory) -> tuple:
    proto = factory.buildProtocol(None)
    tr = TLSStringTransport()
    proto.makeConnection(tr)
    return proto, tr


@pytest.mark.parametrize("secrets", [{}, BOTH])
def test_a_tls_handshake_that_never_completes_is_closed_in_bounded_time(clock, secrets):
    """A TLS peer that never finishes the handshake (no ClientHello) is closed after the auth
    timeout, secrets or not, and aborted after the grace period; it counts meanwhile."""
    factory = make_factory(clock, secrets=dict(secrets), auth_timeout=4)
    proto, tr = tls_connect(factory)
    assert factory.connections == 1
    clock.advance(3.9)
    assert not tr.disconnecting
    clock.advance(0.1)
    assert tr.disconnecting
    clock.advance(GRACE)
    assert tr.disconnected
    proto.connectionLost(None)
    assert factory.connections == 0
    assert clock.getDelayedCalls() == []


def test_a_completed_handshake_cancels_the_handshake_deadline(clock):
    """Without secrets, a TLS connection whose handshake completes in time is never closed by
    the handshake deadline."""
    factory = make_factory(clock, auth_timeout=4)
    proto, tr = tls_connect(factory)
    proto.handshakeCompleted()
    clock.advance(100)
    assert not tr.disconnecting
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


# -- 8. a paused connection runs nothing; the backlog and JOBS are bounded -----------------------


class FillingTransport(StringTransport):
    """A transport whose write buffer is 'full' after ``room`` bytes: it pauses its producer as
    a TCP transport does, and resumes it when the test drains it."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.room and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        out = self.value()
        self.clear()
        self.producer.resumeProducing()
        return out


def test_a_paused_connection_runs_none_of_the_requests_already_read(clock):
    """1000 JOBS pipelined in one read: once the transport's buffer is full (pauseProducing),
    not one more JOBS is executed until it is resumed, then the rest run in order."""
    factory = make_factory(clock)
    for _ in range(5):
        factory.core.submit("sum", [1, 2], 1)
    calls = []
    real = factory.core.list_jobs
    factory.core.list_jobs = lambda *a: calls.append(a) or real(*a)
    proto = factory.buildProtocol(None)
    tr = FillingTransport(room=1000)
    proto.makeConnection(tr)
    tr.clear()
    proto.dataReceived(b"JOBS\n" * 1000)
    ran = len(calls)
    assert ran < 10, ran  # a few replies fill 1000 bytes; nothing after the pause
    assert tr.producerState == "paused"
    clock.advance(60)
    assert len(calls) == ran  # still nothing while paused
    replies = tr.drain().splitlines()
    assert len(replies) == ran
    for _ in range(2000):  # bounded: each round lets a few more JOBS run
        if tr.producerState != "paused" and not tr.value():
            break
        replies += tr.drain().splitlines()
    assert len(replies) == len(calls) == 1000
    assert tr.producerState == "producing"
    proto.connectionLost(None)


def test_the_pipelined_backlog_stops_reading_at_max_pending_replies(clock):
    """Requests whose replies wait (WAIT on a running job) fill at most MAX_PENDING_REPLIES
    slots: then the connection reads and runs nothing more until replies drain."""
    factory = make_factory(clock)
    conn = connect(factory)
    assert conn.ask("SUBMIT sum [1,2]") == ["OK j1"]
    conn.send("WAIT j1\n" * (MAX_PENDING_REPLIES + 50) + "PING\n")
    assert len(conn.proto.replies) == MAX_PENDING_REPLIES
    assert conn.tr.producerState == "paused"
    assert conn.lines() == []
    worker = connect(factory)
    todo = register(worker)
    while todo:
        worker.send("DONE " + json.dumps({"id": todo[0]["id"], "result": sum(todo[0]["input"])}))
        worker.send("\n")
        todo = dos(worker)
    clock.advance(1)  # the job's end is recorded
    lines = conn.lines()
    assert lines == ["RESULT j1 3"] * (MAX_PENDING_REPLIES + 50) + ["OK PONG"]
    assert not conn.proto.replies
    assert conn.tr.producerState == "producing"


def test_a_half_close_while_paused_still_answers_every_line_already_read(clock):
    """When the peer half-closes while lines it sent still wait (the connection was paused),
    those lines run and are answered when it resumes, and only then does the server close."""
    factory = make_factory(clock)
    proto = factory.buildProtocol(None)
    tr = FillingTransport(room=10)
    proto.makeConnection(tr)
    tr.clear()
    proto.dataReceived(b"PING\n" * 50)
    proto.readConnectionLost()
    assert not tr.disconnecting
    replies = []
    for _ in range(100):  # bounded: each round frees the buffer and lets a few more run
        if tr.disconnecting:
            break
        replies += tr.drain().splitlines()
    replies += tr.value().splitlines()
    assert replies == [b"OK PONG"] * 50
    assert tr.disconnecting
    proto.connectionLost(None)


def test_a_connections_job_count_follows_job_ends_without_recounting(clock):
    """The unfinished-job count for max_client_jobs drops when a job ends (not by rescanning on
    the next SUBMIT), and a connection that goes forgets its jobs' waiters."""
    factory = make_factory(clock, max_client_jobs=2)
    conn = connect(factory)
    assert conn.ask("SUBMIT sum [1]") == ["OK j1"]
    assert conn.ask("SUBMIT sum [2]") == ["OK j2"]
    assert err_code(conn.ask("SUBMIT sum [3]")[0]) == "BUSY"
    assert len(conn.proto.session.ops.open_jobs) == 2
    conn.ask("CANCEL j1")
    assert len(conn.proto.session.ops.open_jobs) == 1  # counted down by the job's end, at once
    assert conn.ask("SUBMIT sum [3]") == ["OK j3"]
    job = factory.core.get("j3")
    conn.lose()
    assert job._ended._ds == {}


def test_jobs_is_paged_newest_first_with_a_cursor(clock):
    """JOBS gives the newest 100 by default; {"limit": N} and {"before": id} page backwards,
    the last id of a page being the cursor for the next."""
    factory = make_factory(clock)
    conn = connect(factory)
    for n in range(250):
        factory.core.submit("sum", [n], 1)
    first = ok_json(conn.ask("JOBS")[0])
    assert [j["id"] for j in first] == [f"j{n}" for n in range(250, 150, -1)]
    page = ok_json(conn.ask('JOBS {"limit": 3, "before": "j151"}')[0])
    assert [j["id"] for j in page] == ["j150", "j149", "j148"]
    tail = ok_json(conn.ask('JOBS {"limit": 1000, "before": "j3"}')[0])
    assert [j["id"] for j in tail] == ["j2", "j1"]
    assert ok_json(conn.ask('JOBS {"before": "j1"}')[0]) == []


@pytest.mark.parametrize(
    "options",
    [
        '{"limit": 0}',
        '{"limit": 1001}',
        '{"limit": "5"}',
        '{"before": 3}',
        '{"after": "j1"}',
        "[1]",
    ],
)
def test_jobs_refuses_bad_paging_options(clock, options):
    """JOBS options outside the documented ones are BAD_REQUEST, naming what is allowed."""
    conn = connect(make_factory(clock))
    assert err_code(conn.ask("JOBS " + options)[0]) == "BAD_REQUEST"


def test_list_jobs_skips_jobs_no_longer_held_and_sees_new_ones(clock):
    """Scheduler.list_jobs pages correctly across forgotten jobs (expired) and jobs submitted
    after an earlier call, and forgets an id only once."""
    core = Scheduler(Registry(TASKS), clock)
    for n in range(10):
        core.submit("sum", [n], 1)
    assert [j.id for j in core.list_jobs(3)] == ["j10", "j9", "j8"]
    for n in (9, 8, 5, 4):
        del core._jobs[f"j{n}"]
    core.submit("sum", [0], 1)
    assert [j.id for j in core.list_jobs(4)] == ["j11", "j10", "j7", "j6"]
    assert [j.id for j in core.list_jobs(4, "j6")] == ["j3", "j2", "j1"]
    assert core._seq_index == [1, 2, 3, 6, 7, 10, 11]


# -- 9. unauthenticated peers hold a few KiB at most ---------------------------------------------


def test_an_unauthenticated_peer_sending_megabytes_without_a_newline_holds_nothing(clock):
    """Before AUTH a line may be PRE_AUTH_MAX_LINE bytes: 15 MiB with no newline leaves the
    framer holding under 8 KiB and gets one ERR LINE_TOO_LONG, then the connection still works."""
    factory = make_factory(clock, secrets=dict(BOTH))
    conn = connect(factory)
    chunk = b"x" * 65536
    for _ in range(15 * 16):
        conn.send(chunk)
        assert conn.proto.framer.buffered < 8192
        assert not conn.proto._raw
    conn.send(b"\n")
    [reply] = conn.lines()
    assert err_code(reply) == "LINE_TOO_LONG" and str(PRE_AUTH_MAX_LINE) in reply
    assert conn.ask("PING") == ["OK PONG"]


def test_a_request_pipelined_behind_a_good_auth_gets_the_full_line_limit(clock):
    """AUTH and a longer request in the same write: the limit rises as soon as the AUTH is
    granted, so the request behind it is read whole."""
    factory = make_factory(clock, secrets=dict(BOTH))
    conn = connect(factory)
    numbers = json.dumps(list(range(3000)))  # ~14 KB
    assert len(numbers) > 2 * PRE_AUTH_MAX_LINE
    conn.send(auth_line(conn) + "\nSUBMIT sum " + numbers[:5000])
    conn.send(numbers[5000:] + "\n")
    assert conn.lines() == ["OK AUTHENTICATED client", "OK j1"]


def test_an_open_role_has_the_full_line_limit_from_the_start(clock):
    """With only a worker secret, clients are open: no pre-AUTH limit applies to them."""
    conn = connect(make_factory(clock, secrets={"worker": WORKER_SECRET}))
    assert conn.ask("SUBMIT sum " + json.dumps(list(range(3000)))) == ["OK j1"]


# -- 10. a failed AUTH stops the connection; the address has a budget ----------------------------


def test_nothing_behind_a_failed_auth_runs_before_its_answer(clock):
    """A SUBMIT pipelined behind a failed and a good AUTH does not run until the failure has
    been answered: the delay delays work, not just replies."""
    factory = make_factory(clock, secrets=dict(BOTH))
    conn = connect(factory)
    conn.send("AUTH client 00\n" + auth_line(conn) + "\nSUBMIT sum [1,2]\n")
    assert factory.core.jobs() == []
    assert conn.tr.producerState == "paused"
    clock.advance(0.24)
    assert factory.core.jobs() == [] and "client" not in conn.proto.auth.roles
    clock.advance(0.01)
    [failed, ok, submitted] = conn.lines()
    assert err_code(failed) == "AUTH_FAILED"
    assert (ok, submitted) == ("OK AUTHENTICATED client", "OK j1")
    assert conn.tr.producerState == "producing"


def test_an_address_out_of_auth_budget_is_refused_unchecked_across_connections(clock):
    """After max_address_auth_failures recent failures from an address, an AUTH from it is
    refused and closed without being checked, even a correct one on a new connection; another
    address is unaffected, and the budget returns after the window."""
    factory = make_factory(
        clock, secrets=dict(BOTH), max_address_auth_failures=4, auth_failure_window=60
    )
    conns = [connect(factory, "10.0.0.9", n) for n in range(4)]
    for conn in conns:  # four connections guessing at once: four checked guesses
        conn.send("AUTH client 00\n")
    clock.advance(1)
    late = connect(factory, "10.0.0.9", 99)
    [reply] = late.ask(auth_line(late))
    assert err_code(reply) == "AUTH_FAILED" and "too many failed AUTHs" in reply
    assert late.tr.disconnecting and "client" not in late.proto.auth.roles
    other = connect(factory, "10.0.0.8", 1)
    assert other.ask(auth_line(other)) == ["OK AUTHENTICATED client"]
    clock.advance(60)
    again = connect(factory, "10.0.0.9", 100)
    assert again.ask(auth_line(again)) == ["OK AUTHENTICATED client"]


def test_the_failure_table_forgets_the_stalest_address_first(clock):
    """The per-address failure table is bounded by dropping the address whose last failure is
    oldest, not by forgetting every address at once."""
    factory = make_factory(clock, secrets=dict(BOTH))
    factory.auth_failed("10.9.9.9")
    for n in range(10_000):
        factory.auth_failed(f"10.1.{n // 256}.{n % 256}")
    assert "10.9.9.9" not in factory.failures
    factory.auth_failed("10.1.0.0")  # refreshed: now the newest
    for n in range(5):
        factory.auth_failed(f"10.2.0.{n}")
    assert "10.1.0.0" in factory.failures and len(factory.failures) == 10_000


# -- 11. a worker's unreadable answer never leaves a sub-task waiting ----------------------------


def _worker_with_a_subtask(clock, **register_extra):
    factory = make_factory(clock)
    worker = connect(factory, "10.0.0.5", 5)
    register(worker, **register_extra)
    job = factory.core.submit("sum", [1, 2], 1, {"attempts": 2})
    clock.advance(0)
    lines = worker.lines()
    [do] = [json.loads(line[3:]) for line in lines if line.startswith("DO ")]
    return factory, worker, job, do


def _redispatched(factory, clock, job_id: str) -> LineConn:
    """A second worker, which must now be given the sub-task; it answers it."""
    other = connect(factory, "10.0.0.6", 6)
    [do] = register(other, name="w2") or (clock.advance(1) or dos(other))
    assert do["job"] == job_id
    other.send("DONE " + json.dumps({"id": do["id"], "result": 3}) + "\n")
    return other


@pytest.mark.parametrize(
    "body",
    [
        '{{"id":{id},"job":"j1","result":' + "[" * 5000 + "]" * 5000 + "}}",  # JSON_TOO_DEEP
        '{{"id":{id},"job":"j1","result":[1,}}',  # BAD_JSON
    ],
)
def test_an_unparseable_done_with_a_readable_id_fails_that_attempt(clock, body):
    """A DONE that cannot be parsed, whose ticket id can still be read, fails that attempt at
    once (retried, here on the other worker), keeping the worker connected."""
    factory, worker, job, do = _worker_with_a_subtask(clock)
    worker.send("DONE " + body.format(id=do["id"]) + "\n")
    assert err_code(worker.lines()[0]) in ("JSON_TOO_DEEP", "BAD_JSON")
    assert not worker.tr.disconnecting
    assert worker.proto.session.inflight == {}
    clock.advance(1)  # the retry's backoff
    [retry] = dos(worker)  # its slot is free again: the retry may come back here
    assert retry["attempt"] == 2
    worker.send("DONE " + json.dumps({"id": retry["id"], "result": 3}) + "\n")
    assert result_of(job.wait()).result == 3


def test_an_invalid_utf8_done_with_a_readable_id_fails_that_attempt(clock):
    """A DONE that is not UTF-8 but starts with its ticket id fails that attempt."""
    factory, worker, job, do = _worker_with_a_subtask(clock)
    worker.send(b'DONE {"id":%d,"result":"\xff"}\n' % do["id"])
    assert err_code(worker.lines()[0]) == "BAD_ENCODING"
    assert worker.proto.session.inflight == {}
    assert factory.core.stats()["subtasks_retried"] == 1
    clock.advance(1)
    [retry] = dos(worker)
    worker.send("DONE " + json.dumps({"id": retry["id"], "result": 3}) + "\n")
    assert result_of(job.wait()).result == 3


@pytest.mark.parametrize(
    "line",
    ["DONE [1]", "DONE null", 'ERROR [{"id": 1}, 7]', "DONE " + "x" * 80, b"DONE \xff"],
)
def test_an_unreadable_answer_naming_no_ticket_drops_the_worker(clock, line):
    """An answer from which no ticket can be recovered, while sub-tasks are in flight, means
    the connection is broken: it is aborted and its sub-tasks run elsewhere."""
    factory, worker, job, do = _worker_with_a_subtask(clock)
    line = line.encode() if isinstance(line, str) else line
    worker.send(line + b"\nDONE " + json.dumps({"id": do["id"], "result": 99}).encode() + b"\n")
    assert worker.tr.disconnected  # aborted; the answer read behind it is not believed
    worker.lose()
    _redispatched(factory, clock, job.id)
    assert result_of(job.wait()).result == 3


def test_an_overlong_worker_line_with_sub_tasks_in_flight_drops_the_worker(clock):
    """A worker line over the server's max line cannot be matched to its ticket: the worker
    is aborted so its sub-task moves."""
    factory = make_factory(clock, max_line=1024)
    worker = connect(factory, "10.0.0.5", 5)
    register(worker)
    job = factory.core.submit("sum", [1, 2], 1)
    clock.advance(0)
    assert dos(worker)
    worker.send("DONE " + "9" * 4000 + "\n")
    assert worker.tr.disconnected
    worker.lose()
    _redispatched(factory, clock, job.id)
    assert result_of(job.wait()).result == 3


def test_a_done_whose_id_is_not_an_integer_matches_no_ticket(clock):
    """An id that is not an integer matches no ticket (true is not ticket 1): it is counted
    late, and the real ticket still waits for its own answer."""
    factory, worker, job, do = _worker_with_a_subtask(clock)
    assert do["id"] == 1
    worker.send("DONE " + json.dumps({"id": True, "result": 5}) + "\n")
    assert do["id"] in worker.proto.session.inflight and not job.is_final
    assert factory.core.stats()["results_late"] == 1
    worker.send("DONE " + json.dumps({"id": do["id"], "result": 3}) + "\n")
    assert result_of(job.wait()).result == 3


def test_a_streamed_done_for_an_unknown_id_keeps_none_of_its_pieces(clock):
    """A streamed DONE for an id the worker was never given is read to its '.' with each piece
    dropped as it arrives; the worker's real sub-task is unaffected."""
    factory, worker, job, do = _worker_with_a_subtask(clock)
    worker.send('DONE {"id": 999, "stream": true}\n')
    stream = worker.proto.session.result_stream
    piece = "+" + json.dumps(["x" * 1000] * 100) + "\n"
    for _ in range(200):
        worker.send(piece)
        assert stream.joiner._parts == [] and stream.size == 0
    worker.send(".\n")
    assert worker.proto.session.result_stream is None
    assert factory.core.stats()["results_late"] == 1
    assert worker.lines() == []
    worker.send("DONE " + json.dumps({"id": do["id"], "result": 3}) + "\n")
    assert result_of(job.wait()).result == 3


def test_a_streamed_done_whose_sub_task_was_cancelled_midway_drops_the_rest(clock):
    """Pieces arriving after the sub-task was cancelled (job cancelled) are no longer kept."""
    factory, worker, job, do = _worker_with_a_subtask(clock)
    worker.send("DONE " + json.dumps({"id": do["id"], "stream": True}) + "\n+[1]\n")
    stream = worker.proto.session.result_stream
    assert stream.joiner._parts == [[1]]
    factory.core.cancel(job.id)
    worker.send("+[2]\n+[3]\n")
    assert stream.joiner._parts == []
    worker.send(".\n")
    assert worker.proto.session.result_stream is None
