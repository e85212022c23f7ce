"""Batched worker messages (docs/PROTOCOL.md §5): a worker that registers with ``"batch": true``
gets the DO objects of one reactor turn as one ``DO [...]`` line, within its max_line, and may
answer with ``DONE [...]`` / ``ERROR [...]`` arrays; the bundled worker does both. Workers that
do not ask keep one object per line."""

from __future__ import annotations

import json

import pytest
from helpers import FakePool, LineConn, result_of
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import WireError, format_greeting, parse_json_objects
from clusterd.server.protocol import ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.worker.pool import PoolService
from clusterd.worker.protocol import WorkerFactory

REGISTRY = Registry(TASKS)


class Line(LineConn):
    """A raw protocol connection on a StringTransport (clusterd.testing.LineConn)."""

    def __init__(self, proto) -> None:
        super().__init__(proto)

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def server():
    clock = Clock()
    core = Scheduler(REGISTRY, clock)
    factory = ServerFactory(core)
    conns: list[Line] = []

    def connect(name="w1", slots=4, batch=True, max_line=None) -> Line:
        c = Line(factory.buildProtocol(None))
        c.lines()
        info = {"name": name, "tasks": ["sum"], "slots": slots}
        if batch:
            info["batch"] = True
        if max_line is not None:
            info["max_line"] = max_line
        c.send("REGISTER " + json.dumps(info) + "\n")
        [reply] = c.lines()
        registered = json.loads(reply.removeprefix("OK REGISTERED "))
        assert registered.get("batch", False) is batch
        conns.append(c)
        return c

    yield clock, core, connect
    for c in conns:
        if not c.proto.gone:
            c.lose()
    assert clock.getDelayedCalls() == []


def do_objects(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        verb, _, rest = line.partition(" ")
        assert verb == "DO", line
        value = json.loads(rest)
        out.extend(value if isinstance(value, list) else [value])
    return out


def test_a_batch_workers_dos_of_one_turn_go_out_as_one_array_line(server):
    """A batch worker gets the DOs of one reactor turn as one DO array line at the end of the turn,
    and may answer them in arrays or single objects."""
    clock, core, connect = server
    w = connect(slots=4)
    job = core.submit("sum", [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert w.lines() == []  # nothing until the end of the turn
    clock.advance(0)
    [line] = w.lines()
    assert line.startswith("DO [")
    dos = do_objects([line])
    assert [d["id"] for d in dos] == [1, 2, 3, 4]
    assert [d["index"] for d in dos] == [0, 1, 2, 3]
    answers = [{"id": d["id"], "result": sum(d["input"])} for d in dos]
    w.send("DONE " + json.dumps(answers[:3]) + "\n")
    w.send("DONE " + json.dumps(answers[3]) + "\n")  # one object is still fine
    assert result_of(job.wait()).result == 36
    clock.advance(0)
    assert w.lines() == []


def test_a_plain_worker_still_gets_one_object_per_line_at_once(server):
    """A worker without batch still gets one DO object per line at once, beside a batch worker that
    gets an array at the end of the turn."""
    clock, core, connect = server
    plain = connect("plain", slots=2, batch=False)
    batch = connect("batch", slots=2)
    job = core.submit("sum", [1, 2, 3, 4], 4)
    plain_lines = plain.lines()
    assert len(plain_lines) == 2 and all(x.startswith("DO {") for x in plain_lines)
    assert batch.lines() == []
    clock.advance(0)
    [line] = batch.lines()
    assert len(do_objects([line])) == 2
    for c, lines in ((plain, plain_lines), (batch, [line])):
        for d in do_objects(lines):
            c.send("DONE " + json.dumps({"id": d["id"], "result": sum(d["input"])}) + "\n")
    assert result_of(job.wait()).result == 10


def test_a_plain_worker_may_not_answer_with_an_array(server):
    """A plain worker's DONE array is refused and names no ticket it can be matched to: the
    worker is dropped, so the sub-task it held runs elsewhere instead of waiting for ever."""
    clock, core, connect = server
    plain = connect("plain", slots=1, batch=False)
    job = core.submit("sum", [1, 2], 1)
    [do] = do_objects(plain.lines())
    other = connect("other", slots=1, batch=False)
    plain.send("DONE " + json.dumps([{"id": do["id"], "result": 3}]) + "\n")
    assert plain.tr.disconnected  # aborted, not a graceful close
    plain.lose()
    clock.advance(0)
    [again] = do_objects(other.lines())
    assert (again["job"], again["index"]) == (do["job"], do["index"])
    other.send("DONE " + json.dumps({"id": again["id"], "result": 3}) + "\n")
    assert result_of(job.wait()).result == 3


def test_dos_are_split_into_lines_within_the_workers_max_line(server):
    """DO arrays are split into several lines, each within the worker's max_line, keeping the ids
    in order."""
    clock, core, connect = server
    w = connect(slots=10, max_line=300)
    core.submit("sum", list(range(20)), 10)
    clock.advance(0)
    lines = w.lines()
    assert len(lines) > 1
    assert all(len(x.encode()) <= 300 for x in lines)
    assert all(x.startswith("DO [") for x in lines)
    assert [d["id"] for d in do_objects(lines)] == list(range(1, 11))


def test_a_do_too_long_even_alone_fails_the_job(server):
    """A DO longer than the worker's max_line even on its own fails the job with BAD_INPUT."""
    clock, core, connect = server
    connect(slots=1, max_line=60)
    job = core.submit("sum", list(range(50)), 1)
    clock.advance(0)
    assert job.error["code"] == "BAD_INPUT"


def test_errors_answers_and_unknown_ids_in_one_array(server):
    """One DONE array may mix answers with an unknown id (counted late) and an ERROR array fails
    its sub-task's attempt."""
    clock, core, connect = server
    w = connect(slots=3)
    job = core.submit("sum", [1, 2, 3], 3, {"attempts": 2})
    clock.advance(0)
    dos = do_objects(w.lines())
    late = core.counters["results_late"]
    w.send(
        "DONE "
        + json.dumps([{"id": 999, "result": 0}] + [{"id": d["id"], "result": 1} for d in dos[:2]])
        + "\n"
    )
    assert core.counters["results_late"] == late + 1
    w.send("ERROR " + json.dumps([{"id": dos[2]["id"], "type": "E", "message": "m"}]) + "\n")
    assert job.failures == {2: 1}
    clock.advance(1)  # the retry's backoff
    [retry] = do_objects(w.lines())
    assert retry["attempt"] == 2
    w.send("DONE " + json.dumps([{"id": retry["id"], "result": 1}]) + "\n")
    assert result_of(job.wait()).result == 3


def test_an_array_with_a_non_object_is_refused_whole(server):
    """A DONE array holding a non-object is refused whole: nothing in it is recorded, the worker is
    dropped and its sub-task moves to another worker."""
    clock, core, connect = server
    w = connect(slots=1)
    job = core.submit("sum", [1], 1)
    clock.advance(0)
    [do] = do_objects(w.lines())
    w.send("DONE " + json.dumps([{"id": do["id"], "result": 1}, 5]) + "\n")
    assert not job.is_final  # nothing in that line was recorded
    # No ticket can be matched to the refused line: the worker is dropped, its sub-task moves.
    assert w.tr.disconnected
    other = connect("w2", slots=1)
    w.lose()
    clock.advance(0)
    [again] = do_objects(other.lines())
    other.send("DONE " + json.dumps([{"id": again["id"], "result": 1}]) + "\n")
    assert result_of(job.wait()).result == 1


def test_a_cancel_before_the_flush_sends_nothing_after_it_a_cancel(server):
    """A job cancelled while its DO is still in the outbox sends nothing; one cancelled after the
    flush sends a CANCEL line."""
    clock, core, connect = server
    w = connect(slots=2)
    j1 = core.submit("sum", [1], 1)
    core.cancel(j1.id)  # its DO is still in the outbox: it never goes out
    j2 = core.submit("sum", [2], 1)
    clock.advance(0)
    [line] = w.lines()
    [do] = do_objects([line])
    assert do["job"] == j2.id and do["id"] == 2
    core.cancel(j2.id)
    assert w.lines() == ['CANCEL {"id":2}']


def test_lines_written_in_the_same_turn_follow_the_dos(server):
    """A PING or OK DRAINING written while DOs wait goes out after them: the bundled worker
    relies on every DO sent before OK DRAINING arriving before it."""
    clock, core, connect = server
    w = connect(slots=2)
    core.submit("sum", [1, 2], 2)
    w.send("DRAIN\n")
    lines = w.lines()
    assert lines[0].startswith("DO [") and lines[1] == "OK DRAINING"
    clock.advance(0)
    assert w.lines() == []


def test_a_lost_batch_worker_leaves_no_timer_and_requeues(server):
    """A batch worker lost before its flush leaves no timer behind and its sub-tasks wait to be
    dispatched again."""
    clock, core, connect = server
    w = connect(slots=2)
    job = core.submit("sum", [1, 2], 2)
    w.lose()
    assert clock.getDelayedCalls() == []
    assert job.has_pending() and not job.is_final


# -- the bundled worker --------------------------------------------------------------------


@pytest.fixture
def worker():
    clock = Clock()
    made = []

    def make(batch=True, server_max_line=1 << 20, **kw):
        pool = FakePool()
        factory = WorkerFactory(pool, "w1", ["sum"], 4, clock=clock, **kw)
        c = Line(factory.buildProtocol(None))
        c.send(format_greeting("server", server_max_line) + "\n")
        [register] = c.lines()
        assert json.loads(register.removeprefix("REGISTER "))["batch"] is True
        info = {"name": "w1", "protocol": 1, "heartbeat_interval": 5.0, "heartbeat_timeout": 15.0}
        if batch:
            info["batch"] = True
        c.send("OK REGISTERED " + json.dumps(info) + "\n")
        made.append(c)
        return c, pool

    yield clock, make
    for c in made:
        if not c.proto.lost:
            c.lose()
    assert clock.getDelayedCalls() == []


def dos(*ids: int) -> str:
    objs = [{"id": i, "job": "j1", "index": i, "task": "sum", "input": [i]} for i in ids]
    return "DO " + json.dumps(objs) + "\n"


def test_the_worker_runs_an_array_and_answers_one_line_per_turn(worker):
    """The worker runs every DO of an array and answers the results of one turn in one DONE array
    line."""
    clock, make = worker
    c, pool = make()
    c.send(dos(1, 2, 3))
    assert [v for _, v, _ in pool.calls] == [[1], [2], [3]]
    pool.calls[0][2].callback(10)
    pool.calls[2][2].callback(30)
    assert c.lines() == []
    clock.advance(0)
    [line] = c.lines()
    assert line.startswith("DONE [")
    assert [(m["id"], m["result"]) for m in json.loads(line[5:])] == [(1, 10), (3, 30)]
    pool.calls[1][2].errback(PoolService.TaskError("ValueError", "no"))
    clock.advance(0)
    [line] = c.lines()
    assert line.startswith("ERROR [")
    assert json.loads(line[6:])[0]["type"] == "ValueError"


def test_done_and_error_of_one_turn_make_one_line_per_run_of_a_verb(worker):
    """Answers of one turn keep their order, one line per run of DONE or ERROR."""
    clock, make = worker
    c, pool = make()
    c.send(dos(1, 2, 3))
    pool.calls[0][2].callback(1)
    pool.calls[1][2].errback(PoolService.TaskError("E", "m"))
    pool.calls[2][2].callback(3)
    clock.advance(0)
    assert [x.split(" ", 1)[0] for x in c.lines()] == ["DONE", "ERROR", "DONE"]


def test_a_server_without_batch_gets_single_objects_at_once(worker):
    """A worker whose server did not accept batch answers each result as a single object at
    once."""
    clock, make = worker
    c, pool = make(batch=False)
    c.send(dos(1, 2))  # a server may still send arrays; answers follow what it accepts
    pool.calls[0][2].callback(1)
    [line] = c.lines()
    assert line.startswith("DONE {")


def test_a_repeated_id_in_an_array_is_not_run_twice(worker):
    """A DO id repeated in an array, or sent again, is run only once."""
    clock, make = worker
    c, pool = make()
    c.send(dos(1, 1))
    assert len(pool.calls) == 1
    c.send(dos(1))
    assert len(pool.calls) == 1


def test_answers_are_split_within_the_servers_max_line(worker):
    """The worker splits its answer arrays into lines within the server's max_line, keeping the ids
    in order."""
    clock, make = worker
    c, pool = make(server_max_line=120)
    c.send(dos(*range(1, 11)))
    for i, (_, _, d) in enumerate(pool.calls):
        d.callback(i)
    clock.advance(0)
    lines = c.lines()
    assert len(lines) > 1 and all(len(x) <= 120 for x in lines)
    ids = [m["id"] for x in lines for m in json.loads(x.split(" ", 1)[1])]
    assert ids == list(range(1, 11))


def test_a_result_too_long_for_a_batch_line_is_result_too_large(worker):
    """A number cannot be cut into pieces: too long for a line, it is ResultTooLarge."""
    clock, make = worker
    c, pool = make(server_max_line=200)
    c.send(dos(1))
    pool.calls[0][2].callback(10**250)
    clock.advance(0)
    [line] = c.lines()
    assert line.startswith("ERROR [")
    assert json.loads(line[6:])[0]["type"] == "ResultTooLarge"


def test_a_long_result_that_can_be_cut_is_streamed(worker):
    """A string, array or object result too long for a line goes as DONE {..."stream":true}
    on its own line, + pieces within the line limit, and '.'."""
    clock, make = worker
    c, pool = make(server_max_line=200)
    c.send(dos(1))
    pool.calls[0][2].callback("x" * 500)
    clock.advance(0)
    lines = c.lines()
    head = json.loads(lines[0][5:])
    assert lines[0].startswith("DONE {") and head["stream"] is True and head["id"] == 1
    assert lines[-1] == "."
    assert all(len(x) <= 200 for x in lines)
    assert "".join(json.loads(x[1:]) for x in lines[1:-1]) == "x" * 500


def test_drain_sends_the_last_answers_before_it_fires(worker):
    """The worker's drain flushes its last answers at once, before its Deferred fires, without
    waiting for the turn."""
    clock, make = worker
    c, pool = make()
    c.send(dos(1))
    idle = c.proto.drain()
    assert c.lines() == ["DRAIN"]
    c.send("OK DRAINING\n")
    pool.calls[0][2].callback(5)
    assert result_of(idle) is None
    [line] = c.lines()  # flushed before the caller disconnects, without waiting for the turn
    assert json.loads(line[5:])[0]["result"] == 5
    clock.advance(0)
    assert c.lines() == []


def test_cancel_of_one_in_an_array(worker):
    """A CANCEL of one DO of an array cancels that run only; the other's answer still goes out."""
    clock, make = worker
    c, pool = make()
    c.send(dos(1, 2))
    c.send('CANCEL {"id":1}\n')
    assert pool.calls[0][2].called  # cancelled
    pool.calls[1][2].callback(2)
    clock.advance(0)
    [line] = c.lines()
    assert [m["id"] for m in json.loads(line[5:])] == [2]


# -- parsing -------------------------------------------------------------------------------


def test_parse_json_objects_forms():
    """parse_json_objects takes one object or an array of objects, refuses anything else with
    BAD_REQUEST, and does not count the array's level against the depth limit."""
    assert parse_json_objects('{"id":1}', "DONE") == [{"id": 1}]
    assert parse_json_objects(' [{"id":1},{"id":2}]', "DONE") == [{"id": 1}, {"id": 2}]
    assert parse_json_objects("[]", "DONE") == []
    for bad in ("[1]", "5", '[{"id":1}, []]'):
        with pytest.raises(WireError) as e:
            parse_json_objects(bad, "DONE")
        assert e.value.code == "BAD_REQUEST"
    # The array's own level is not counted against the depth limit.
    deep = '{"a":' * 3 + "1" + "}" * 3
    assert parse_json_objects("[" + deep + "]", "DO", max_depth=3)
    with pytest.raises(WireError):
        parse_json_objects("[[" + deep + "]]", "DO", max_depth=3)


@given(
    sizes=st.lists(st.integers(1, 150), min_size=1, max_size=40),
    max_line=st.integers(160, 600),
)
def test_flushed_do_lines_keep_order_and_fit(sizes, max_line):
    """Flushed DO lines keep the sub-tasks' order and each fits the worker's max_line, whatever the
    sizes."""
    clock = Clock()
    core = Scheduler(REGISTRY, clock)
    c = Line(ServerFactory(core).buildProtocol(None))
    c.lines()
    c.send(
        json.dumps({"name": "w", "tasks": [], "slots": 1, "batch": True}).join(("REGISTER ", "\n"))
    )
    c.lines()
    p = c.proto
    p = p.session  # the worker session (worker_session.py)
    p.max_line = max_line
    bodies = {
        i: json.dumps({"id": i, "pad": "x" * n}, separators=(",", ":")) for i, n in enumerate(sizes)
    }
    # send() refuses a DO that does not fit alone; every other one must be sent.
    bodies = {i: b for i, b in bodies.items() if len(b) + 5 <= max_line}
    p.outbox = {i: (b, len(b)) for i, b in bodies.items()}
    p.flush()
    lines = c.lines()
    assert all(len(x) <= max_line for x in lines)
    got = [m["id"] for x in lines for m in json.loads(x.removeprefix("DO "))]
    assert got == list(bodies)
    c.lose()
    assert clock.getDelayedCalls() == []
