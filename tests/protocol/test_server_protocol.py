"""ServerProtocol over StringTransport: every verb, every error code, pipelining and losses,
and the reliability features seen from the wire: retries, timeouts, CANCEL lines, durability gates,
recovery, BUSY, heartbeats, DRAIN and speculation."""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from clusterd import PROTOCOL_VERSION, __version__
from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import CLIENT_VERBS
from clusterd.server.protocol import MAX_WORKER_SLOTS, ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.testing import LineConn, LineWorker

REGISTRY = Registry(TASKS)


class Conn(LineConn):
    """One server-side protocol on a StringTransport (its default peer), with line helpers."""

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory, "192.168.1.1", 54321)

    def lose(self, reason=ConnectionDone) -> None:
        """connectionLost, every time it is called (not only the first)."""
        self.closed = True
        self.proto.connectionLost(Failure(reason()))


_OPEN_WORKERS: list[WorkerConn] = []


class WorkerConn(LineWorker):
    """A fake worker speaking the protocol (clusterd.testing.LineWorker) whose REGISTER must be
    answered exactly; the ``clock`` fixture closes every WorkerConn still open before its timer
    check (a registered connection runs a heartbeat on the clock)."""

    def __init__(
        self, factory, name="w1", tasks=("sum", "sort", "primes"), slots=1, max_line=None
    ) -> None:
        super().__init__(
            factory, name, tasks, slots, max_line, REGISTRY, host="192.168.1.1", port=54321
        )
        settings = factory.settings
        assert self.registered == "OK REGISTERED " + json.dumps(
            {
                "name": name,
                "protocol": PROTOCOL_VERSION,
                "heartbeat_interval": settings.heartbeat_interval,
                "heartbeat_timeout": settings.heartbeat_timeout,
            },
            separators=(",", ":"),
        )
        _OPEN_WORKERS.append(self)

    def lose(self, reason=ConnectionDone) -> None:
        self.closed = True
        self.proto.connectionLost(Failure(reason()))


@pytest.fixture
def clock():
    c = Clock()
    yield c
    # What the reactor would do at the end: every worker connection closes (stopping its
    # heartbeat). Any other timer left behind (a retry, a timeout) is a leak and fails here.
    open_workers = [w for w in _OPEN_WORKERS if not w.closed]
    _OPEN_WORKERS.clear()
    for w in open_workers:
        w.lose()
    assert c.getDelayedCalls() == []


@pytest.fixture
def core(clock):
    return Scheduler(Registry(TASKS), clock)


@pytest.fixture
def factory(core):
    return ServerFactory(core)


@pytest.fixture
def client(factory):
    c = Conn(factory)
    yield c
    if not c.proto.gone:  # as the reactor would once a close completes (no timer left behind)
        c.lose()


def ok_json(line: str):
    assert line.startswith("OK "), line
    return json.loads(line[3:])


def err_code(line: str) -> str:
    assert line.startswith("ERR "), line
    return line.split(" ", 2)[1]


# -- greeting and simple verbs -------------------------------------------------------------------


def test_greeting(client):
    """A new connection is greeted with HELLO, the protocol version and a JSON info object."""
    assert len(client.greeting) == 1
    hello, name, version, info = client.greeting[0].split(" ", 3)
    assert (hello, name, int(version)) == ("HELLO", "clusterd", PROTOCOL_VERSION)
    assert json.loads(info) == {
        "server": f"clusterd/{__version__}",
        "role": "server",
        "max_line": 16 * 1024 * 1024,
    }


def test_greeting_announces_configured_max_line(core):
    """The greeting's max_line is the factory's configured limit."""
    conn = Conn(ServerFactory(core, max_line=64))
    assert json.loads(conn.greeting[0].split(" ", 3)[3])["max_line"] == 64


def test_ping(client):
    """PING (any case, either terminator) answers OK PONG."""
    assert client.ask("PING") == ["OK PONG"]
    client.send("ping\r\n")
    assert client.lines() == ["OK PONG"]


def test_blank_lines_are_ignored(client):
    """Blank lines get no reply at all."""
    assert client.ask("") == []
    assert client.ask("   \r") == []
    assert client.ask("PING") == ["OK PONG"]


def test_help_lists_the_client_verbs(client):
    """HELP replies with the protocol version and a description of every client verb."""
    [line] = client.ask("HELP")
    body = ok_json(line)
    assert body["protocol"] == PROTOCOL_VERSION
    assert body["verbs"] == CLIENT_VERBS


def test_quit_replies_then_closes(client):
    """QUIT answers OK BYE, closes the connection and ignores anything after it."""
    client.send("QUIT\nPING\n")
    assert client.lines() == ["OK BYE"]
    assert client.tr.disconnecting
    client.lose()


def test_quit_waits_for_earlier_replies(client):
    """QUIT behind a pending RUN closes only after the RUN's result and the BYE are written."""
    client.send("RUN sum [1,2]\nQUIT\n")
    assert client.lines() == []
    assert not client.tr.disconnecting
    WorkerConn(client.proto.factory).answer_all()
    assert client.lines() == ["RESULT j1 3", "OK BYE"]
    assert client.tr.disconnecting


# -- jobs ----------------------------------------------------------------------------------------


def test_submit_replies_with_the_job_id_at_once(client):
    """SUBMIT answers OK <job-id> without waiting for the job."""
    assert client.ask("SUBMIT sum [1,2,3]") == ["OK j1"]
    assert client.ask('SUBMIT sum [4] {"chunks": 1}') == ["OK j2"]


def test_run_with_a_registered_worker(factory, client):
    """RUN dispatches DO lines to a registered worker and replies RESULT once it answers."""
    worker = WorkerConn(factory, slots=2)
    assert client.ask('RUN sum [1,2,3,4,5,6,7,8,9,10] {"chunks": 3}') == []
    dos = worker.dos()
    assert len(dos) == 2
    assert {d["job"] for d in dos} == {"j1"}
    assert {d["task"] for d in dos} == {"sum"}
    assert sorted(d["index"] for d in dos) == [0, 1]
    assert dos[0]["input"] == [1, 2, 3, 4]
    assert worker.answer_all() == 3
    assert client.lines() == ["RESULT j1 55"]


def test_run_waits_for_a_worker_to_register(factory, client):
    """A RUN submitted before any worker exists completes once a capable worker registers."""
    assert client.ask("RUN sort [3,1,2]") == []
    worker = WorkerConn(factory, slots=4)
    worker.answer_all()
    assert client.lines() == ["RESULT j1 [1,2,3]"]


def test_wait(factory, client):
    """WAIT on a running job replies with its result when it ends; on an ended one, at once."""
    assert client.ask('SUBMIT sum [1,2] {"chunks": 2}') == ["OK j1"]
    assert client.ask("WAIT j1") == []
    worker = WorkerConn(factory, slots=2)
    worker.answer_all()
    assert client.lines() == ["RESULT j1 3"]
    assert client.ask("WAIT j1") == ["RESULT j1 3"]


def test_status_shows_waiting_for_worker(factory, client):
    """STATUS reports a job's state and progress, and flags a job no worker can run."""
    client.ask('SUBMIT primes {"stop": 10} {"chunks": 2}')
    status = ok_json(client.ask("STATUS j1")[0])
    assert status["id"] == "j1"
    assert status["task"] == "primes"
    assert status["state"] == "queued"
    assert status["queued"] == 2
    assert status["waiting_for_worker"] is True
    assert "primes" in status["note"]
    worker = WorkerConn(factory, slots=1, tasks=["primes"])
    status = ok_json(client.ask("STATUS j1")[0])
    assert status["state"] == "running"
    assert (status["running"], status["queued"], status["done"]) == (1, 1, 0)
    assert "waiting_for_worker" not in status
    worker.answer_all()
    status = ok_json(client.ask("STATUS j1")[0])
    assert status["state"] == "done"
    assert status["done"] == status["total"] == 2
    assert status["ran_on"] == {"w1": 2}


def test_watch_sends_progress_then_result(factory, client):
    """WATCH streams PROGRESS lines as sub-tasks finish, then the final RESULT."""
    worker = WorkerConn(factory, slots=1)
    client.ask('SUBMIT sum [1,2,3,4] {"chunks": 4}')
    assert client.ask("WATCH j1") == ['PROGRESS j1 {"done":0,"total":4}']
    worker.answer_one()
    assert client.lines() == ['PROGRESS j1 {"done":1,"total":4}']
    worker.answer_all()
    assert client.lines() == [
        'PROGRESS j1 {"done":2,"total":4}',
        'PROGRESS j1 {"done":3,"total":4}',
        'PROGRESS j1 {"done":4,"total":4}',
        "RESULT j1 10",
    ]
    assert client.ask("PING") == ["OK PONG"]


def test_watch_sends_at_most_one_progress_line_per_percent(factory, client):
    """WATCH on a job of many sub-tasks sends at most ~100 PROGRESS lines."""
    worker = WorkerConn(factory, slots=50)
    client.ask(f'SUBMIT sum {json.dumps(list(range(1000)))} {{"chunks": 1000}}')
    lines = client.ask("WATCH j1")
    worker.answer_all()
    lines += client.lines()
    assert lines[-1] == f"RESULT j1 {sum(range(1000))}"
    assert len(lines) - 1 == 101  # 0%, 1%, ..., 100%
    assert all(line.startswith("PROGRESS j1 ") for line in lines[:-1])


def test_watch_a_finished_job_gives_its_result_and_keeps_no_watcher(factory, client, core):
    """WATCH on an ended job answers its final line at once and leaves no watcher on the job."""
    worker = WorkerConn(factory)
    client.ask("RUN sum [5]")
    worker.answer_all()
    assert client.lines() == ["RESULT j1 5"]
    assert client.ask("WATCH j1") == ["RESULT j1 5"]
    assert core.get("j1")._watchers == []


def test_cancel_ends_a_waiting_run(factory):
    """CANCEL from another connection makes a pending RUN reply CANCELLED."""
    runner, other = Conn(factory), Conn(factory)
    assert runner.ask("RUN sum [1,2,3]") == []
    assert other.ask("CANCEL j1") == ["OK j1 cancelled"]
    assert runner.lines() == ["CANCELLED j1"]
    assert other.ask("CANCEL j1") == ["OK j1 cancelled"]
    assert ok_json(other.ask("STATUS j1")[0])["state"] == "cancelled"


def test_cancel_of_a_done_job_reports_done(factory, client):
    """CANCEL of a job that already finished leaves it done."""
    worker = WorkerConn(factory)
    client.ask("RUN sum [1]")
    worker.answer_all()
    client.lines()
    assert client.ask("CANCEL j1") == ["OK j1 done"]


def test_jobs_lists_every_job_briefly(factory, client):
    """JOBS lists each job with id, task, state, done and total, newest first."""
    client.ask('SUBMIT sum [1,2] {"chunks": 2}')
    client.ask("SUBMIT sort [2,1]")
    client.ask("CANCEL j2")
    assert ok_json(client.ask("JOBS")[0]) == [
        {"id": "j2", "task": "sort", "state": "cancelled", "done": 0, "total": 2},
        {"id": "j1", "task": "sum", "state": "queued", "done": 0, "total": 2},
    ]


def test_workers_lists_registered_workers(factory, client, clock):
    """WORKERS lists connected workers with their tasks, slots, use and last heartbeat."""
    assert ok_json(client.ask("WORKERS")[0]) == []
    clock.advance(3)
    alpha = WorkerConn(factory, name="alpha", tasks=["sum"], slots=2)
    [w] = ok_json(client.ask("WORKERS")[0])
    assert w == {
        "name": "alpha",
        "address": "192.168.1.1:54321",
        "tasks": ["sum"],
        "slots": 2,
        "busy": 0,
        "prefetched": 0,
        "done": 0,
        "failed": 0,
        "draining": False,
        "connected": 3.0,
        "last_seen": 3.0,
    }
    clock.advance(4)
    alpha.send("PING\n")  # any line from the worker is a heartbeat
    [w] = ok_json(client.ask("WORKERS")[0])
    assert (w["connected"], w["last_seen"]) == (3.0, 7.0)


def test_tasks_lists_tasks_and_capacity(factory, client):
    """TASKS lists every known task with how many workers and slots can run it."""
    WorkerConn(factory, tasks=["sum"], slots=3)
    tasks = {t["name"]: t for t in ok_json(client.ask("TASKS")[0])}
    assert set(tasks) == {"sum", "primes", "wordcount", "sort", "sleep"}
    assert (tasks["sum"]["workers"], tasks["sum"]["slots"]) == (1, 3)
    assert (tasks["sort"]["workers"], tasks["sort"]["slots"]) == (0, 0)


def test_stats(factory, client):
    """STATS replies with the scheduler's counters."""
    worker = WorkerConn(factory, slots=2)
    client.ask("RUN sum [1,2,3]")
    worker.answer_all()
    client.lines()
    stats = ok_json(client.ask("STATS")[0])
    assert stats["jobs_submitted"] == 1
    assert stats["jobs_done"] == 1
    assert stats["workers"] == 1
    assert stats["slots"] == 2
    assert stats["subtasks_completed"] == stats["subtasks_dispatched"] >= 1


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, code",
    [
        ("FROB", "UNKNOWN_VERB"),
        ("do_PING", "UNKNOWN_VERB"),
        ("RUN", "BAD_REQUEST"),
        ("RUN sum", "BAD_REQUEST"),
        ("SUBMIT", "BAD_REQUEST"),
        ("WAIT", "BAD_REQUEST"),
        ("WAIT j1 j2", "BAD_REQUEST"),
        ("STATUS", "BAD_REQUEST"),
        ('RUN sum [1] {"chunks": 0}', "BAD_REQUEST"),
        ('RUN sum [1] {"colour": "red"}', "BAD_REQUEST"),
        ("RUN sum [1,", "BAD_JSON"),
        ("RUN sum [1] trailing", "BAD_JSON"),
        ("RUN sum [NaN]", "BAD_JSON"),
        ("RUN nope [1]", "UNKNOWN_TASK"),
        ("WAIT j42", "UNKNOWN_JOB"),
        ("STATUS j42", "UNKNOWN_JOB"),
        ("WATCH j42", "UNKNOWN_JOB"),
        ("CANCEL j42", "UNKNOWN_JOB"),
        ('RUN sum {"a": 1}', "BAD_INPUT"),
        ('SUBMIT primes {"stop": -1, "start": 5}', "BAD_INPUT"),
        ('RUN sum [1] {"attempts": 0}', "BAD_REQUEST"),
        ('RUN sum [1] {"timeout": -1}', "BAD_REQUEST"),
        ('SUBMIT sum [1] {"key": ""}', "BAD_REQUEST"),
        ("DONE {}", "WRONG_ROLE"),
        ("DRAIN", "WRONG_ROLE"),
        ('ERROR {"id": 1}', "WRONG_ROLE"),
    ],
)
def test_error_codes(client, line, code):
    """Each bad request gets `ERR <code> <sentence>` and the connection keeps working."""
    [reply] = client.ask(line)
    assert err_code(reply) == code
    assert len(reply.split(" ", 2)[2]) > 5
    assert client.ask("PING") == ["OK PONG"]


def test_bad_encoding(client):
    """A line that is not UTF-8 is ERR BAD_ENCODING."""
    client.send(b"PING \xff\n")
    [reply] = client.lines()
    assert err_code(reply) == "BAD_ENCODING"


def test_too_many_subtasks(clock):
    """Asking for more chunks than the server allows is ERR TOO_MANY_SUBTASKS."""
    conn = Conn(ServerFactory(Scheduler(Registry(TASKS), clock, max_subtasks=5)))
    [reply] = conn.ask('RUN sum [1,2,3,4,5,6] {"chunks": 6}')
    assert err_code(reply) == "TOO_MANY_SUBTASKS"
    assert conn.ask('SUBMIT sum [1,2,3,4,5,6] {"chunks": 5}') == ["OK j1"]


def test_line_too_long_then_connection_still_usable(core):
    """An overlong line is ERR LINE_TOO_LONG, is never run, and later lines work normally."""
    conn = Conn(ServerFactory(core, max_line=32))
    conn.send("SUBMIT sum [" + ",".join(["1"] * 100) + "]\nPING\n")
    [err, pong] = conn.lines()
    assert err_code(err) == "LINE_TOO_LONG"
    assert "32" in err
    assert pong == "OK PONG"
    assert core.jobs() == []
    # The same again, arriving in small pieces.
    for i in range(0, 300, 7):
        conn.send(("x" * 300)[i : i + 7])
    conn.send("\nSUBMIT sum [1]\n")
    [err, ok] = conn.lines()
    assert err_code(err) == "LINE_TOO_LONG"
    assert ok == "OK j1"


def test_line_exactly_at_max_line_is_accepted(core):
    """A request exactly max_line bytes long is accepted."""
    line = "SUBMIT sum [1]" + " " * 18
    assert len(line) == 32
    conn = Conn(ServerFactory(core, max_line=32))
    assert conn.ask(line) == ["OK j1"]


# -- pipelining ----------------------------------------------------------------------------------


def test_pipelined_replies_keep_request_order(factory, client):
    """`RUN ...\\nPING\\n` in one write: PONG is written only after the RUN's RESULT."""
    client.send("RUN sum [1,2,3]\nPING\n")
    assert client.lines() == []
    worker = WorkerConn(factory, slots=4)
    worker.answer_all()
    assert client.lines() == ["RESULT j1 6", "OK PONG"]


def test_pipelined_runs_reply_in_request_order(factory, client):
    """Two pipelined RUNs reply in request order even when the second finishes first; a STATUS
    behind them shows the job as it was when the STATUS was read."""
    worker = WorkerConn(factory, slots=2)
    client.send('RUN sum [1] {"chunks": 1}\nRUN sum [2] {"chunks": 1}\nSTATUS j1\n')
    first, second = worker.dos()
    assert (first["job"], second["job"]) == ("j1", "j2")
    worker.done(second)
    assert client.lines() == []
    worker.done(first)
    lines = client.lines()
    assert lines[:2] == ["RESULT j1 1", "RESULT j2 2"]
    assert ok_json(lines[2])["state"] == "running"


def test_pipelined_watch_progress_is_held_until_its_turn(factory, client):
    """A WATCH behind a pending RUN keeps its PROGRESS lines until the RUN has replied."""
    worker = WorkerConn(factory, slots=1)
    client.send('RUN sum [7] {"chunks": 1}\nSUBMIT sum [1,2] {"chunks": 2}\nWATCH j2\n')
    assert client.lines() == []
    worker.answer_one()  # j1
    assert client.lines() == ["RESULT j1 7", "OK j2", 'PROGRESS j2 {"done":0,"total":2}']
    worker.answer_all()
    assert client.lines() == [
        'PROGRESS j2 {"done":1,"total":2}',
        'PROGRESS j2 {"done":2,"total":2}',
        "RESULT j2 3",
    ]


# -- worker role ---------------------------------------------------------------------------------


def test_worker_error_fails_the_job(factory, client):
    """A worker's ERROR line on the last attempt fails the job: the client gets
    FAILED <job> TASK_ERROR {json} with type, message, index, attempts and worker."""
    worker = WorkerConn(factory, slots=1)
    client.send('RUN sum [1,2] {"chunks": 1, "attempts": 1}\n')
    [msg] = worker.dos()
    worker.error(msg, "OverflowError", "too big")
    [line] = client.lines()
    prefix = "FAILED j1 TASK_ERROR "
    assert line.startswith(prefix)
    assert json.loads(line[len(prefix) :]) == {
        "type": "OverflowError",
        "message": "too big",
        "index": 0,
        "attempts": 1,
        "worker": "w1",
    }


def test_worker_lost_mid_job_requeues_to_another_worker(factory, client, core):
    """When a worker's connection drops mid-job its sub-tasks run on another worker."""
    first = WorkerConn(factory, name="first", slots=2)
    client.send('RUN sum [1,2,3,4,5,6,7,8] {"chunks": 4}\n')
    first.answer_one()
    assert len(first.dos()) == 2
    first.lose(ConnectionLost)
    assert [w.name for w in core.workers()] == []
    second = WorkerConn(factory, name="second", slots=1)
    assert second.answer_all() == 3
    assert client.lines() == ["RESULT j1 36"]
    status = core.get("j1").status()
    assert status["ran_on"] == {"first": 1, "second": 3}
    assert status["requeued"] == 2


def test_worker_ping(factory):
    """A registered worker's PING is answered OK PONG; its `OK ...` lines (answers to our PINGs)
    get no reply at all."""
    worker = WorkerConn(factory)
    assert worker.ask("PING") == ["OK PONG"]
    assert worker.ask("OK PONG") == []
    assert worker.ask("ok") == []


def test_worker_sending_a_client_verb_is_wrong_role(factory):
    """Once registered, a connection may only send worker verbs."""
    worker = WorkerConn(factory)
    [reply] = worker.ask("RUN sum [1]")
    assert err_code(reply) == "WRONG_ROLE"


def test_worker_answer_for_unknown_subtask_is_ignored(factory, client, core):
    """A DONE or ERROR for a sub-task the server never sent is counted in results_late, without
    a reply and without harming the job."""
    worker = WorkerConn(factory)
    client.send("RUN sum [4]\n")
    assert len(worker.dos()) == 1
    assert worker.ask('DONE {"id": 999, "result": 1}') == []
    assert worker.ask('DONE {"id": "1", "result": 1}') == []
    assert worker.ask('ERROR {"id": 998, "type": "X", "message": "y"}') == []
    assert core.stats()["results_late"] == 3
    worker.answer_all()
    assert client.lines() == ["RESULT j1 4"]
    assert core.stats()["results_late"] == 3
    assert core.stats()["results_duplicate"] == 0


def test_worker_bad_done_json(factory):
    """A worker's DONE that is not a JSON object gets an error reply, not a crash (with nothing
    in flight on it, nothing can be left waiting, so the connection stays)."""
    worker = WorkerConn(factory)
    assert err_code(worker.ask("DONE [1]")[0]) == "BAD_REQUEST"
    assert err_code(worker.ask("DONE {")[0]) == "BAD_JSON"


def test_reregistering_worker_replaces_the_old_connection(factory, client, core):
    """A worker registering again under its name closes its old connection and counts once."""
    old = WorkerConn(factory, name="w", slots=1)
    client.send('RUN sum [1,2] {"chunks": 2}\n')
    assert len(old.dos()) == 1
    new = WorkerConn(factory, name="w", slots=1)
    assert old.tr.disconnecting
    assert len(core.workers()) == 1
    # The old connection now really goes; its sub-task runs on the new registration.
    old.lose()
    assert len(core.workers()) == 1
    assert core.stats()["workers_lost"] == 1
    new.answer_all()
    assert client.lines() == ["RESULT j1 3"]


@pytest.mark.parametrize(
    "payload, code",
    [
        ("", "BAD_JSON"),
        ("{", "BAD_JSON"),
        ("[1]", "BAD_REQUEST"),
        ('{"tasks": ["sum"], "slots": 1}', "BAD_REQUEST"),
        ('{"name": "", "tasks": ["sum"], "slots": 1}', "BAD_REQUEST"),
        ('{"name": "a b", "tasks": ["sum"], "slots": 1}', "BAD_REQUEST"),
        ('{"name": 7, "tasks": ["sum"], "slots": 1}', "BAD_REQUEST"),
        ('{"name": "' + "n" * 201 + '", "tasks": ["sum"], "slots": 1}', "BAD_REQUEST"),
        ('{"name": "w", "slots": 1}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": "sum", "slots": 1}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": [1], "slots": 1}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"]}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": 0}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": 1.5}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": true}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": "2"}', "BAD_REQUEST"),
        (f'{{"name": "w", "tasks": ["sum"], "slots": {MAX_WORKER_SLOTS + 1}}}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": 1, "protocol": 2}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": 1, "protocol": true}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": 1, "protocol": "1"}', "BAD_REQUEST"),
        ('{"name": "w", "tasks": ["sum"], "slots": 1, "protocol": 1.0}', "BAD_REQUEST"),
    ],
)
def test_register_validation(client, core, payload, code):
    """A malformed REGISTER is refused with an error and the connection stays a client."""
    [reply] = client.ask(f"REGISTER {payload}")
    assert err_code(reply) == code
    assert core.workers() == []
    assert client.ask("PING") == ["OK PONG"]
    assert client.proto.session.__class__.__name__ == "ClientSession"


def test_register_limits_are_inclusive(factory, core):
    """A 200-character name and MAX_WORKER_SLOTS slots are accepted."""
    WorkerConn(factory, name="n" * 200, slots=MAX_WORKER_SLOTS)
    assert core.workers()[0].slots == MAX_WORKER_SLOTS


def test_register_while_a_request_is_pending_is_refused(client, core):
    """REGISTER behind a pending RUN is refused, so one connection never mixes roles."""
    client.send("RUN sum [1]\n")
    client.send('REGISTER {"name": "w", "tasks": ["sum"], "slots": 1}\n')
    assert core.workers() == []
    client.proto.core.cancel("j1")
    [cancelled, reply] = client.lines()
    assert cancelled == "CANCELLED j1"
    assert err_code(reply) == "BAD_REQUEST"


# -- connection loss -----------------------------------------------------------------------------


def test_client_lost_while_run_pending_leaks_nothing(factory, client, core):
    """A client that disconnects during RUN leaves no waiter; the job still finishes quietly."""
    client.send("RUN sum [1,2,3]\n")
    job = core.get("j1")
    assert len(job._ended._ds) == 2  # the RUN's reply, and the connection's count of its jobs
    client.lose(ConnectionLost)
    assert job._ended._ds == {}
    assert len(client.proto.replies) == 0
    WorkerConn(factory, slots=4).answer_all()
    assert job.result == 6
    assert client.tr.value() == b""


def test_client_lost_while_watching_leaks_nothing(factory, client, core):
    """A client that disconnects during WATCH is unsubscribed from the job's progress."""
    client.ask('SUBMIT sum [1,2] {"chunks": 2}')
    client.ask("WATCH j1")
    job = core.get("j1")
    assert len(job._watchers) == 1
    client.lose()
    assert job._watchers == []
    assert job._ended._ds == {}
    WorkerConn(factory, slots=4).answer_all()
    assert job.result == 3
    assert client.tr.value() == b""


def test_half_close_answers_pending_requests_then_disconnects(factory, client):
    """After the peer half-closes, pending requests are still answered, then the server closes."""
    client.send("RUN sum [2,3]\nPING\n")
    client.proto.readConnectionLost()
    assert not client.tr.disconnecting
    WorkerConn(factory).answer_all()
    assert client.lines() == ["RESULT j1 5", "OK PONG"]
    assert client.tr.disconnecting


def test_half_close_with_nothing_pending_disconnects_at_once(client):
    """After a half-close with every request answered, the server closes immediately."""
    assert client.ask("PING") == ["OK PONG"]
    client.proto.readConnectionLost()
    assert client.tr.disconnecting


def test_write_side_lost_closes_the_connection(client):
    """When the peer stops reading (write side lost) the server closes the connection."""
    client.proto.writeConnectionLost()
    assert client.tr.disconnecting


def test_no_writes_after_disconnecting(factory, client):
    """Once the transport is disconnecting nothing more is written to it."""
    client.send("RUN sum [1]\n")
    client.tr.loseConnection()
    WorkerConn(factory).answer_all()
    assert client.tr.value() == b""
    client.lose()


# -- retries, timeouts and CANCEL lines ----------------------------------------------------------


def failed_payload(line: str, job: str, code: str) -> dict:
    prefix = f"FAILED {job} {code} "
    assert line.startswith(prefix), line
    return json.loads(line[len(prefix) :])


def test_worker_error_is_retried_after_backoff_and_status_shows_it(factory, client, clock):
    """An ERROR on a non-final attempt is not the client's business: the sub-task is sent again
    (attempt 2) after the backoff, STATUS shows it retrying, and the RUN gets the right RESULT."""
    worker = WorkerConn(factory)
    client.send('RUN sum [1,2] {"chunks": 1}\n')
    [msg] = worker.dos()
    assert msg["attempt"] == 1
    worker.error(msg, "OSError", "flaky disk")
    assert client.lines() == []
    status = ok_json(Conn(factory).ask("STATUS j1")[0])
    assert (status["retrying"], status["queued"], status["running"]) == (1, 0, 0)
    clock.advance(0.5)
    [again] = worker.dos()
    assert (again["index"], again["attempt"], again["id"]) == (0, 2, 2)
    worker.done(again)
    assert client.lines() == ["RESULT j1 3"]


def test_timeout_writes_cancel_to_the_worker_and_the_retry_runs_elsewhere(factory, client, clock):
    """A sub-task past its timeout gets `CANCEL {"id":N}` on its worker's connection, frees that
    slot, and after the backoff runs again on the worker that is free; the first worker's late
    DONE is only counted."""
    slow = WorkerConn(factory, name="slow")
    client.send('RUN sum [1,2,3] {"chunks": 1, "timeout": 2, "attempts": 2}\n')
    [first] = slow.dos()
    spare = WorkerConn(factory, name="spare")
    clock.advance(1.9)
    assert slow.tr.value() == b""
    clock.advance(0.1)
    assert slow.tr.value() == b'CANCEL {"id":1}\n'
    assert slow.dos() == []
    assert slow.cancels == [1]
    other = Conn(factory)
    assert other.ask('SUBMIT sum [5] {"chunks": 1}') == ["OK j2"]
    [busy] = slow.dos()  # the freed slot took the other job
    assert busy["job"] == "j2"
    clock.advance(0.5)
    [retry] = spare.dos()
    assert (retry["job"], retry["index"], retry["attempt"]) == ("j1", 0, 2)
    spare.done(retry)
    assert client.lines() == ["RESULT j1 6"]
    slow.done(first)  # finally answers the cancelled copy
    assert core_stats(factory)["results_late"] == 1
    assert core_stats(factory)["subtasks_timed_out"] == 1
    slow.done(busy)
    assert ok_json(other.ask("STATUS j2")[0])["state"] == "done"


def core_stats(factory) -> dict:
    return factory.core.stats()


def test_a_subtask_failing_every_attempt_fails_the_run_with_the_last_error(factory, client, clock):
    """When every attempt fails, RUN gets FAILED with the last error and the attempts made."""
    worker = WorkerConn(factory)
    client.send('RUN sum [1] {"attempts": 2}\n')
    worker.error(worker.dos()[0], "ValueError", "first")
    clock.advance(0.5)
    worker.error(worker.dos()[0], "KeyError", "second")
    [line] = client.lines()
    assert failed_payload(line, "j1", "TASK_ERROR") == {
        "type": "KeyError",
        "message": "second",
        "index": 0,
        "attempts": 2,
        "worker": "w1",
    }


def test_client_cancel_sends_cancel_for_running_subtasks_and_frees_their_slots(factory, client):
    """CANCEL of a job writes a CANCEL line for each of its running sub-tasks, and the freed
    slots take other work at once."""
    worker = WorkerConn(factory, slots=2)
    client.send('RUN sum [1,2,3,4] {"chunks": 4}\n')
    assert [m["id"] for m in worker.dos()] == [1, 2]
    other = Conn(factory)
    assert other.ask('SUBMIT sum [7,8] {"chunks": 2}') == ["OK j2"]
    assert other.ask("CANCEL j1") == ["OK j1 cancelled"]
    todo = worker.dos()
    assert worker.cancels == [1, 2]
    assert [(m["job"], m["index"]) for m in todo] == [("j2", 0), ("j2", 1)]
    assert client.lines() == ["CANCELLED j1"]
    worker.answer_all()
    assert other.ask("WAIT j2") == ["RESULT j2 15"]


def test_a_late_done_after_cancel_is_counted_in_results_late(factory, client, core):
    """A DONE for a sub-task whose job was cancelled is counted in results_late and changes
    nothing: the job stays cancelled with nothing done, and no reply is written."""
    worker = WorkerConn(factory)
    client.send("RUN sum [1,2]\n")
    [msg] = worker.dos()
    client2 = Conn(factory)
    client2.ask("CANCEL j1")
    assert worker.dos() == []
    worker.done(msg)
    assert worker.lines() == []
    stats = core.stats()
    assert (stats["results_late"], stats["results_duplicate"]) == (1, 0)
    assert (stats["subtasks_completed"], core.get("j1").done) == (0, 0)
    assert client.lines() == ["CANCELLED j1"]


def test_a_subtask_too_long_for_its_worker_fails_the_run_with_bad_input(factory, client, core):
    """A sub-task whose DO line exceeds the max_line the worker registered with is never sent:
    RUN fails with BAD_INPUT at once, and the worker keeps serving other jobs."""
    worker = WorkerConn(factory, max_line=100)
    client.send(f'RUN sum {json.dumps(list(range(100)))} {{"chunks": 1}}\n')
    [line] = client.lines()
    payload = failed_payload(line, "j1", "BAD_INPUT")
    assert payload["index"] == 0
    assert "accepts 100" in payload["message"]
    assert worker.dos() == []
    assert core.stats()["subtasks_dispatched"] == 1
    client.send("RUN sum [1,2]\n")
    worker.answer_all()
    assert client.lines() == ["RESULT j2 3"]


# -- durability ----------------------------------------------------------------------------------


@pytest.fixture
def journal():
    return MemoryJournal(hold=True)


@pytest.fixture
def journaled(clock, journal):
    """A factory whose core journals to a MemoryJournal that holds records until flush()."""
    return ServerFactory(Scheduler(Registry(TASKS), clock, journal=journal))


def test_submit_reply_is_held_until_the_job_is_durable(journaled, journal):
    """SUBMIT replies OK <id> only once the job's acceptance is flushed; a pipelined PING waits
    behind it."""
    conn = Conn(journaled)
    conn.send('SUBMIT sum [1,2] {"chunks": 1}\nPING\n')
    assert conn.lines() == []
    journal.flush()
    assert conn.lines() == ["OK j1", "OK PONG"]


def test_submit_hurries_the_journal_and_run_does_not(journaled, journal):
    """A SUBMIT's id waits for the acceptance's commit, so it asks the journal not to linger; a
    RUN's client sees nothing before the end, so its acceptance may wait for company."""
    conn = Conn(journaled)
    conn.send('RUN sum [1,2] {"chunks": 1}\n')
    assert journal.hurried == 0
    conn.send('SUBMIT sum [1,2] {"chunks": 1}\n')
    assert journal.hurried == 1
    journal.flush()
    assert conn.lines() == []  # the RUN is not answered yet: no worker; it holds back OK j2
    conn.send('SUBMIT sum [1,2] {"chunks": 1, "key": "k"}\n')
    journal.flush()
    assert journal.hurried == 2
    conn.send('SUBMIT sum [3] {"key": "k"}\n')
    assert journal.hurried == 2  # the repeated key's job is durable already


def test_run_result_is_held_until_the_job_end_is_durable(journaled, journal):
    """RUN and WAIT reply with the result only once the job's end is flushed, although the job
    is already done in memory."""
    worker = WorkerConn(journaled, slots=2)
    conn = Conn(journaled)
    conn.send('RUN sum [1,2,3] {"chunks": 2}\n')
    journal.flush()
    assert conn.lines() == []
    waiter = Conn(journaled)
    assert waiter.ask("WAIT j1") == []
    worker.answer_all()
    # Done in memory, not yet durable: STATUS shows it still running (the gate).
    assert ok_json(Conn(journaled).ask("STATUS j1")[0])["state"] == "running"
    assert conn.lines() == []
    assert waiter.lines() == []
    journal.flush()
    assert conn.lines() == ["RESULT j1 6"]
    assert waiter.lines() == ["RESULT j1 6"]
    assert ok_json(Conn(journaled).ask("STATUS j1")[0])["state"] == "done"


def test_results_are_retrievable_from_a_restarted_server(clock):
    """After a restart over the same journal, WAIT on a finished job answers its result at once
    and an unfinished one resumes with only its missing sub-tasks."""
    journal = MemoryJournal()
    first = ServerFactory(Scheduler(Registry(TASKS), clock, journal=journal))
    worker = WorkerConn(first, slots=2)
    conn = Conn(first)
    conn.send('RUN sum [1,2,3] {"chunks": 1}\nSUBMIT sum [1,2,3,4] {"chunks": 2}\n')
    worker.answer_one()
    worker.done(worker.dos()[0])  # j2's first half
    assert conn.lines() == ["RESULT j1 6", "OK j2"]
    worker.lose()  # the server goes down

    restarted = ServerFactory(Scheduler(Registry(TASKS), clock, journal=journal))
    assert restarted.core.recover() == 1
    conn = Conn(restarted)
    assert conn.ask("WAIT j1") == ["RESULT j1 6"]
    assert ok_json(conn.ask("STATUS j2")[0])["recovered"] == 1
    conn.send("WAIT j2\n")
    worker = WorkerConn(restarted, name="w2", slots=2)
    assert [(m["job"], m["index"]) for m in worker.dos()] == [("j2", 1)]
    worker.answer_all()
    assert conn.lines() == ["RESULT j2 10"]


def test_submit_with_a_key_is_idempotent(factory, client):
    """SUBMIT with the same key names the same job again, and STATUS shows the key."""
    assert client.ask('SUBMIT sum [1,2] {"key": "nightly-7"}') == ["OK j1"]
    assert Conn(factory).ask('SUBMIT sum [1,2] {"key": "nightly-7"}') == ["OK j1"]
    assert client.ask('SUBMIT sum [1,2] {"key": "nightly-8"}') == ["OK j2"]
    assert ok_json(client.ask("STATUS j1")[0])["key"] == "nightly-7"
    assert [j["id"] for j in ok_json(client.ask("JOBS")[0])] == ["j2", "j1"]


# -- BUSY ----------------------------------------------------------------------------------------


def test_submit_is_busy_when_the_server_queue_is_full(clock):
    """A job that would take the queued sub-tasks past max_queued gets ERR BUSY."""
    conn = Conn(ServerFactory(Scheduler(Registry(TASKS), clock, max_queued=3)))
    assert conn.ask('SUBMIT sum [1,2] {"chunks": 2}') == ["OK j1"]
    [reply] = conn.ask('RUN sum [1,2] {"chunks": 2}')
    assert err_code(reply) == "BUSY"
    assert conn.ask('SUBMIT sum [1] {"chunks": 1}') == ["OK j2"]


def test_submit_is_busy_when_the_connection_has_too_many_unfinished_jobs(core):
    """A connection with max_client_jobs unfinished jobs gets ERR BUSY for more, while another
    connection may still submit; once one of its jobs ends it may submit again."""
    factory = ServerFactory(core, settings=ConnectionSettings(max_client_jobs=2))
    conn = Conn(factory)
    assert conn.ask("SUBMIT sum [1]") == ["OK j1"]
    assert conn.ask("SUBMIT sum [2]") == ["OK j2"]
    [reply] = conn.ask("SUBMIT sum [3]")
    assert err_code(reply) == "BUSY"
    assert err_code(conn.ask("RUN sum [3]")[0]) == "BUSY"
    assert Conn(factory).ask("SUBMIT sum [4]") == ["OK j3"]
    assert conn.ask("CANCEL j1") == ["OK j1 cancelled"]
    assert conn.ask("SUBMIT sum [5]") == ["OK j4"]


# -- heartbeats ----------------------------------------------------------------------------------


def test_a_silent_worker_is_pinged_then_dropped_and_its_subtasks_requeued(factory, client, clock):
    """A registered worker that sends nothing gets PING every heartbeat_interval; after
    heartbeat_timeout of silence its connection is aborted, and once it is gone its sub-task
    runs on another worker."""
    silent = WorkerConn(factory, name="silent")
    client.send("RUN sum [4,5]\n")
    assert len(silent.dos()) == 1
    clock.advance(5)
    clock.advance(5)
    assert silent.tr.value() == b"PING\nPING\n"
    assert not silent.tr.disconnecting
    healthy = WorkerConn(factory, name="healthy")  # registered at t=10: its clock starts now
    clock.advance(5)
    assert silent.tr.disconnecting  # aborted at t=15, with no third PING
    assert silent.tr.value() == b"PING\nPING\n"
    silent.lose(ConnectionLost)  # what the reactor reports after abortConnection
    assert [w.name for w in factory.core.workers()] == ["healthy"]
    healthy.answer_all()
    assert client.lines() == ["RESULT j1 9"]
    assert not healthy.tr.disconnecting


def test_any_line_from_a_worker_keeps_it_alive(factory, clock):
    """A worker answering each PING (or sending anything) is never declared lost."""
    worker = WorkerConn(factory)
    for _ in range(12):
        clock.advance(5)
        worker.dos()
        worker.send("OK PONG\n")
    assert worker.pings == 12
    assert not worker.tr.disconnecting
    assert [w.name for w in factory.core.workers()] == ["w1"]


def test_heartbeat_settings_are_announced_and_used(core, clock):
    """OK REGISTERED carries the connection's heartbeat settings, and they are the ones used."""
    factory = ServerFactory(
        core, settings=ConnectionSettings(heartbeat_interval=1.0, heartbeat_timeout=2.5)
    )
    worker = WorkerConn(factory)  # checks the announced values
    clock.advance(1)
    clock.advance(1)
    assert worker.dos() == []
    assert worker.pings == 2
    assert not worker.tr.disconnecting
    clock.advance(1)  # 3 s of silence >= 2.5
    assert worker.tr.disconnecting


# -- DRAIN ---------------------------------------------------------------------------------------


def test_drain_stops_new_dispatches_but_held_subtasks_complete(factory, client, core):
    """DRAIN is answered OK DRAINING; the worker gets no new DO lines, what it holds still
    completes and counts, and WORKERS shows it draining."""
    worker = WorkerConn(factory, slots=2)
    client.send('RUN sum [1,2,3,4] {"chunks": 4}\n')
    held = worker.dos()
    assert len(held) == 2
    assert worker.ask("DRAIN") == ["OK DRAINING"]
    [described] = ok_json(Conn(factory).ask("WORKERS")[0])
    assert described["draining"] is True
    for msg in held:
        worker.done(msg)
    assert worker.dos() == []
    assert core.get("j1").done == 2
    fresh = WorkerConn(factory, name="w2", slots=2)
    assert fresh.answer_all() == 2
    assert client.lines() == ["RESULT j1 10"]
    assert core.get("j1").ran_on == {"w1": 2, "w2": 2}


# -- speculation ---------------------------------------------------------------------------------


def test_speculation_sends_a_backup_copy_and_cancels_the_loser(clock):
    """With speculation on, a straggling sub-task gets a backup DO on an idle worker; the first
    DONE wins, the slow copy gets a CANCEL line, and its late DONE is only counted."""
    core = Scheduler(Registry(TASKS), clock, speculate=True)
    factory = ServerFactory(core)
    slow = WorkerConn(factory, name="slow", slots=4)
    client = Conn(factory)
    client.send('RUN sum [1,2,3,4,5,6,7,8] {"chunks": 4}\n')
    dos = slow.dos()
    spare = WorkerConn(factory, name="spare")
    clock.advance(0.1)
    for msg in dos[:3]:
        slow.done(msg)
    clock.advance(0.9)
    assert core.speculate() == 1
    [backup] = spare.dos()
    assert (backup["job"], backup["index"], backup["input"]) == ("j1", 3, [7, 8])
    spare.done(backup)
    assert client.lines() == ["RESULT j1 36"]
    assert slow.dos() == []
    assert slow.cancels == [dos[3]["id"]]
    slow.done(dos[3])
    stats = core.stats()
    assert (stats["subtasks_speculative"], stats["results_late"]) == (1, 1)
    assert core.get("j1").ran_on == {"slow": 3, "spare": 1}
