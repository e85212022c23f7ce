"""WorkerProtocol: registration, DO -> DONE/ERROR, refusals, and a full job over iosim."""

from __future__ import annotations

import json

import pytest
from helpers import FakePool, result_of
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from clusterd import PROTOCOL_VERSION
from clusterd.core.framing import DEFAULT_MAX_LINE
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import format_greeting
from clusterd.server.protocol import ServerFactory
from clusterd.tasks import Registry, Task
from clusterd.tasks.builtins import TASKS
from clusterd.worker.pool import ChildDied, PoolService
from clusterd.worker.protocol import WorkerFactory

REGISTRY = Registry(TASKS)
GREETING = (format_greeting("server", 1 << 20) + "\n").encode()


class RegistryPool:
    """A pool that computes at once with the real task registry, as the child processes would."""

    TaskError = PoolService.TaskError

    def __init__(self, registry: Registry = REGISTRY) -> None:
        self.registry = registry
        self.ran: list[str] = []

    def run(self, task: str, value) -> Deferred:
        self.ran.append(task)
        t = self.registry.get(task)
        if t is None:
            return fail(PoolService.TaskError("LookupError", f"no task named {task!r}"))
        try:
            return succeed(t.run(value))
        except Exception as e:
            return fail(PoolService.TaskError(type(e).__name__, str(e)))


_OPEN: list[Worker] = []


class Worker:
    """A WorkerProtocol on a StringTransport, its heartbeat on the test's Clock.

    The ``clock`` fixture closes every Worker still open before it checks for leaked timers.
    """

    def __init__(self, pool, clock, name="w1", tasks=("sum", "sort"), slots=2, **kw) -> None:
        self.factory = WorkerFactory(pool, name, list(tasks), slots, clock=clock, **kw)
        self.proto = self.factory.buildProtocol(None)
        self.tr = StringTransport()
        self.proto.makeConnection(self.tr)
        _OPEN.append(self)

    def lose(self) -> None:
        if not self.proto.lost:
            self.proto.connectionLost(Failure(ConnectionDone()))

    def send(self, data: str | bytes) -> None:
        self.proto.dataReceived(data.encode() if isinstance(data, str) else data)

    def lines(self) -> list[str]:
        out = self.tr.value().decode()
        self.tr.clear()
        return out.splitlines()

    def register(self) -> None:
        self.send(GREETING)
        self.lines()
        self.send(
            'OK REGISTERED {"name":"w1","protocol":1,"heartbeat_interval":5.0,'
            '"heartbeat_timeout":15.0}\n'
        )


def verb_json(line: str) -> tuple[str, dict]:
    verb, _, rest = line.partition(" ")
    return verb, json.loads(rest)


def do_line(ticket: int, task: str, value, job: str = "j1", index: int = 0) -> str:
    msg = {"id": ticket, "job": job, "index": index, "task": task, "input": value}
    return "DO " + json.dumps(msg) + "\n"


@pytest.fixture
def pool():
    return FakePool()


@pytest.fixture
def clock():
    c = Clock()
    yield c
    # As the reactor would at the end: close every connection (stopping its heartbeat); any
    # timer still pending after that is a leak.
    for w in _OPEN:
        w.lose()
    _OPEN.clear()
    assert c.getDelayedCalls() == []


def test_greeting_is_answered_with_register(pool, clock):
    """The server's greeting makes the worker send REGISTER with its name, tasks, slots,
    protocol, the longest line it accepts, and that it takes batches and binary DOs."""
    w = Worker(pool, clock, name="node-7", tasks=["sum", "primes"], slots=3)
    assert w.tr.value() == b""  # the worker speaks only after the server's greeting
    w.send(GREETING)
    [line] = w.lines()
    assert verb_json(line) == (
        "REGISTER",
        {
            "name": "node-7",
            "tasks": ["sum", "primes"],
            "slots": 3,
            "protocol": PROTOCOL_VERSION,
            "max_line": DEFAULT_MAX_LINE,
            "batch": True,
            "parts": True,
            "bytes": True,
        },
    )
    assert not w.proto.registered


def test_registered_reply_marks_the_worker_registered(pool, clock):
    """`OK REGISTERED` marks the connection registered and counts the registration."""
    w = Worker(pool, clock)
    w.register()
    assert w.proto.registered
    assert w.factory.registrations == 1
    assert w.lines() == []


def test_greeting_split_across_reads(pool, clock):
    """A greeting that arrives in pieces is still answered once, with one REGISTER."""
    w = Worker(pool, clock)
    for i in range(len(GREETING)):
        w.send(GREETING[i : i + 1])
    lines = w.lines()
    assert len(lines) == 1
    assert lines[0].startswith("REGISTER ")


def test_do_runs_the_task_and_answers_done(pool, clock):
    """A DO line runs the task in the pool and the result goes back as DONE with the ticket."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(7, "sum", [1, 2, 3], job="j3", index=2))
    [(task, value, d)] = pool.calls
    assert (task, value) == ("sum", [1, 2, 3])
    assert w.lines() == []
    d.callback(6)
    [line] = w.lines()
    assert verb_json(line) == ("DONE", {"id": 7, "job": "j3", "result": 6})


def test_a_repeated_do_id_is_not_run_twice(pool, clock):
    """A DO whose id the worker already holds is ignored: one run, one answer, and the held run
    is the one cancelled when the connection goes."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(7, "sum", [1]))
    w.send(do_line(7, "sum", [2]))
    [(task, value, d)] = pool.calls
    assert value == [1]
    d.callback(1)
    [line] = w.lines()
    assert verb_json(line)[1]["result"] == 1


def test_several_do_lines_answer_in_completion_order(pool, clock):
    """Sub-tasks run concurrently; each DONE goes out when its own pool call finishes."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(1, "sum", [1]) + do_line(2, "sum", [2]))
    assert len(pool.calls) == 2
    pool.calls[1][2].callback(2)
    pool.calls[0][2].callback(1)
    assert [verb_json(line)[1]["id"] for line in w.lines()] == [2, 1]


def test_task_error_answers_error_with_type_and_message(pool, clock):
    """A task that raises in the pool is reported as ERROR with the exception's type and message."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(3, "sum", [1]))
    pool.calls[0][2].errback(PoolService.TaskError("ZeroDivisionError", "division by zero"))
    [line] = w.lines()
    assert verb_json(line) == (
        "ERROR",
        {"id": 3, "job": "j1", "type": "ZeroDivisionError", "message": "division by zero"},
    )


def test_child_died_answers_error_child_died(pool, clock):
    """A pool process dying mid-task is reported as ERROR of type ChildDied."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(4, "sum", [1]))
    pool.calls[0][2].errback(ChildDied("pool process died (signal 9) while running the sub-task"))
    [line] = w.lines()
    verb, msg = verb_json(line)
    assert verb == "ERROR"
    assert msg["id"] == 4
    assert msg["type"] == "ChildDied"
    assert "signal 9" in msg["message"]


def test_other_pool_failure_answers_error_with_its_class_name(pool, clock):
    """Any other pool failure becomes ERROR named after the exception class."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(5, "sum", [1]))
    pool.calls[0][2].errback(RuntimeError("pool broken"))
    [line] = w.lines()
    assert verb_json(line)[1] == {
        "id": 5,
        "job": "j1",
        "type": "RuntimeError",
        "message": "pool broken",
    }


def test_wrong_protocol_version_disconnects(pool, clock):
    """A server speaking another protocol version is left at once, without registering."""
    w = Worker(pool, clock)
    w.send(b'HELLO clusterd 99 {"server":"clusterd/9"}\n')
    assert w.tr.disconnecting
    assert w.lines() == []
    assert not w.proto.registered


def test_server_err_before_registration_disconnects_after_a_backoff(pool, clock):
    """An ERR before registration (a refused REGISTER or AUTH) closes the connection, but only
    after a backoff that grows with each refusal, so a refusing server is not hammered."""
    w = Worker(pool, clock)
    w.send(GREETING)
    w.lines()
    w.send("ERR BAD_REQUEST REGISTER needs 'slots': an integer 1-4096.\n")
    assert not w.tr.disconnecting
    clock.advance(0.99)
    assert not w.tr.disconnecting
    clock.advance(0.01)
    assert w.tr.disconnecting
    assert not w.proto.registered
    assert w.proto.factory.rejections == 1


def test_server_err_after_registration_keeps_the_connection(pool, clock):
    """An ERR after registration is logged, not a reason to drop the connection."""
    w = Worker(pool, clock)
    w.register()
    w.send("ERR WRONG_ROLE something.\n")
    assert not w.tr.disconnecting


def test_connection_loss_cancels_held_subtasks_and_writes_nothing(pool, clock):
    """When the connection goes, every sub-task still running in the pool is cancelled (the
    server requeues it elsewhere) and nothing is written for it."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(1, "sum", [1]) + do_line(2, "sum", [2]))
    w.proto.connectionLost(Failure(ConnectionDone()))
    assert pool.cancelled == [0, 1]
    assert pool.pending() == []
    assert w.proto.running == {}
    assert w.tr.value() == b""


# -- end to end over iosim -----------------------------------------------------------------------


class Client:
    """A client connection to the same core, on a StringTransport."""

    def __init__(self, factory: ServerFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.tr = StringTransport()
        self.proto.makeConnection(self.tr)
        self.tr.clear()

    def ask(self, line: str) -> None:
        self.proto.dataReceived(line.encode() + b"\n")

    def lines(self) -> list[str]:
        out = self.tr.value().decode()
        self.tr.clear()
        return out.splitlines()


class Cluster:
    """A server core and its factory on a Clock, and the iosim worker connections made to it."""

    def __init__(self, registry: Registry = REGISTRY, **core_settings) -> None:
        self.clock = Clock()
        self.core = Scheduler(registry, self.clock, **core_settings)
        self.server_factory = ServerFactory(self.core)
        self.connections: list[tuple[object, object]] = []

    def connect(self, pool, name="w1", tasks=("sum", "primes", "wordcount"), slots=2, **kw):
        """Connect a WorkerProtocol over iosim; returns (worker, server, pump), registered."""
        worker_factory = WorkerFactory(pool, name, list(tasks), slots, clock=self.clock, **kw)
        worker, server, pump = connectedServerAndClient(
            lambda: self.server_factory.buildProtocol(None),
            lambda: worker_factory.buildProtocol(None),
            clock=self.clock,
        )
        pump.flush()
        self.connections.append((worker, pump))
        return worker, server, pump

    def close(self) -> None:
        """Close every connection (both sides see connectionLost), then check for timer leaks."""
        for worker, pump in self.connections:
            if not worker.lost:
                worker.transport.loseConnection()
                pump.flush()
        assert self.clock.getDelayedCalls() == []


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def test_end_to_end_job_over_iosim(cluster):
    """A real ServerProtocol and WorkerProtocol, connected in memory, run a job to its result."""
    core, server_factory = cluster.core, cluster.server_factory
    pool = RegistryPool()
    worker, server, pump = cluster.connect(pool)
    assert worker.registered
    assert [w.name for w in core.workers()] == ["w1"]
    client = Client(server_factory)
    client.ask('RUN primes {"start": 0, "stop": 1000} {"chunks": 8}')
    pump.flush()
    assert client.lines() == ["RESULT j1 168"]
    assert pool.ran == ["primes"] * 8
    client.ask('RUN wordcount "the cat saw the other cat" {"chunks": 3}')
    pump.flush()
    assert client.lines() == ['RESULT j2 {"cat":2,"the":2,"other":1,"saw":1}']


def test_end_to_end_task_error_over_iosim():
    """A task that raises on the worker on every attempt is retried after each backoff, then
    fails the client's RUN with FAILED TASK_ERROR and the attempts made, end to end."""

    def explode(value):
        raise ArithmeticError(f"cannot handle {value}")

    registry = Registry([*TASKS, Task("boom", lambda v, n: [v], explode, lambda rs: rs[0])])
    cluster = Cluster(registry)
    pool = RegistryPool(registry)
    worker, server, pump = cluster.connect(pool, tasks=["boom"])
    client = Client(cluster.server_factory)
    client.ask("RUN boom 7")
    pump.flush()
    assert pool.ran == ["boom"]
    assert client.lines() == []
    cluster.clock.advance(0.5)  # first backoff
    pump.flush()
    assert pool.ran == ["boom"] * 2
    cluster.clock.advance(1.0)  # second backoff, doubled
    pump.flush()
    assert pool.ran == ["boom"] * 3
    [line] = client.lines()
    prefix = "FAILED j1 TASK_ERROR "
    assert line.startswith(prefix)
    assert json.loads(line[len(prefix) :]) == {
        "type": "ArithmeticError",
        "message": "cannot handle 7",
        "index": 0,
        "attempts": 3,
        "worker": "w1",
    }
    cluster.close()


def test_end_to_end_worker_disconnect_requeues(cluster):
    """When one worker's connection closes mid-job, another worker finishes it correctly."""
    core, server_factory = cluster.core, cluster.server_factory
    slow = FakePool()
    first, _server1, pump1 = cluster.connect(slow, name="first", slots=2)
    client = Client(server_factory)
    client.ask('RUN sum [1,2,3,4,5,6,7,8,9,10] {"chunks": 5}')
    pump1.flush()
    assert len(slow.calls) == 2
    _task, value, d = slow.calls[0]
    d.callback(sum(value))
    pump1.flush()
    assert len(slow.calls) == 3
    first.transport.loseConnection()
    pump1.flush()
    assert [w.name for w in core.workers()] == []
    # The first worker stopped computing what it held: the server runs it elsewhere.
    assert slow.cancelled == [1, 2]
    _second, _server2, pump2 = cluster.connect(RegistryPool(), name="second")
    pump2.flush()
    assert client.lines() == ["RESULT j1 55"]
    assert core.get("j1").status()["ran_on"] == {"first": 1, "second": 4}
    assert core.stats()["results_duplicate"] == 0
    assert core.stats()["results_late"] == 0


# -- heartbeats, CANCEL, drain and result size ---------------------------------------------------


def test_worker_answers_the_servers_ping(pool, clock):
    """A server PING is answered OK PONG; the server's OK PONG to our PING gets no answer."""
    w = Worker(pool, clock)
    w.register()
    w.send("PING\n")
    assert w.lines() == ["OK PONG"]
    w.send("OK PONG\n")
    assert w.lines() == []
    assert not w.tr.disconnecting


def test_worker_pings_a_quiet_server_and_aborts_a_silent_one(pool, clock):
    """The worker pings every heartbeat_interval from connectionMade; a server silent for
    heartbeat_timeout has its connection aborted (ClientService then reconnects)."""
    w = Worker(pool, clock, heartbeat_interval=2.0, heartbeat_timeout=5.0)
    w.register()  # the server spoke at t=0
    w.lines()
    clock.advance(2)
    clock.advance(2)
    assert w.lines() == ["PING", "PING"]
    assert not w.tr.disconnecting
    clock.advance(2)  # 6 s of silence
    assert w.tr.disconnecting
    assert w.lines() == []
    assert clock.getDelayedCalls() == []  # the heartbeat stopped itself


def test_any_line_from_the_server_keeps_the_worker_connected(pool, clock):
    """Each line from the server (a PONG, a DO, a PING) counts as a sign of life."""
    w = Worker(pool, clock, heartbeat_interval=2.0, heartbeat_timeout=5.0)
    w.register()
    for _ in range(10):
        clock.advance(2)
        w.send("OK PONG\n")
    assert not w.tr.disconnecting
    assert w.lines() == ["PING"] * 10


def test_cancel_cancels_the_pool_run_and_sends_nothing(pool, clock):
    """`CANCEL {"id":N}` cancels that sub-task's pool Deferred; no DONE or ERROR is sent for it,
    and the other sub-tasks carry on."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(1, "sum", [1]) + do_line(2, "sum", [2]))
    w.send('CANCEL {"id": 1}\n')
    assert pool.cancelled == [0]
    assert list(w.proto.running) == [2]
    assert w.lines() == []
    w.send('CANCEL {"id": 77}\n')  # unknown (already answered): ignored
    assert pool.cancelled == [0]
    pool.calls[1][2].callback(2)
    [line] = w.lines()
    assert verb_json(line) == ("DONE", {"id": 2, "job": "j1", "result": 2})


def test_drain_sends_drain_and_fires_once_held_subtasks_are_answered(pool, clock):
    """drain() sends DRAIN; its Deferred fires only once the server acknowledged (OK DRAINING)
    and every sub-task held was answered, and those answers are still sent."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(1, "sum", [1]) + do_line(2, "sum", [2]))
    d = w.proto.drain()
    assert w.lines() == ["DRAIN"]
    assert w.proto.drain() is d  # asking again sends nothing more
    assert w.lines() == []
    w.send("OK DRAINING\n")
    pool.calls[0][2].callback(1)
    assert not d.called
    pool.calls[1][2].callback(2)
    assert result_of(d) is None
    assert [verb_json(line)[0] for line in w.lines()] == ["DONE", "DONE"]


def test_drain_holding_nothing_fires_on_the_servers_acknowledgement(pool, clock):
    """With nothing held, drain() fires as soon as the server answers OK DRAINING: any DO sent
    before the server saw DRAIN has arrived by then."""
    w = Worker(pool, clock)
    w.register()
    d = w.proto.drain()
    assert not d.called
    w.send(do_line(5, "sum", [5]) + "OK DRAINING\n")  # a DO that crossed our DRAIN
    assert not d.called
    pool.calls[0][2].callback(5)
    assert result_of(d) is None
    assert w.lines() == ["DRAIN", 'DONE {"id":5,"job":"j1","result":5}']


def test_a_stopping_worker_drains_as_soon_as_it_registers(pool, clock):
    """A worker whose factory is stopping sends DRAIN right after OK REGISTERED."""
    w = Worker(pool, clock)
    w.factory.stopping = True
    w.register()
    assert w.lines() == ["DRAIN"]


def test_a_result_too_long_for_the_server_is_sent_as_result_too_large(pool, clock):
    """A DONE line longer than the max_line the server announced is streamed in pieces when the
    result can be cut (an array here), or replaced by an ERROR of type ResultTooLarge when it
    cannot (a number with more digits than a line holds); one that fits is sent as DONE."""
    w = Worker(pool, clock)
    w.send((format_greeting("server", 60) + "\n").encode())
    w.lines()
    w.send(do_line(1, "sort", [1]) + do_line(2, "sort", [2]) + do_line(3, "sum", [3]))
    pool.calls[0][2].callback(list(range(30)))
    pool.calls[1][2].callback([2])
    pool.calls[2][2].callback(10**80)
    lines = w.lines()
    verb, head = verb_json(lines[0])
    assert (verb, head["id"], head["stream"]) == ("DONE", 1, True)
    end = lines.index(".")
    assert [x for line in lines[1:end] for x in json.loads(line[1:])] == list(range(30))
    assert all(len(line) <= 60 for line in lines[: end + 1])
    small, big = lines[end + 1 :]
    assert small == 'DONE {"id":2,"job":"j1","result":[2]}'
    verb, msg = verb_json(big)
    assert (verb, msg["id"], msg["type"]) == ("ERROR", 3, "ResultTooLarge")
    assert msg["message"] == ""  # a 60-byte line has no room left for any of it


# -- reliability end to end over iosim -----------------------------------------------------------


def test_end_to_end_timeout_cancels_the_pool_run_and_retries(cluster):
    """Over real protocols, a sub-task past its timeout is cancelled in the worker's pool (no
    answer sent for it) and its retry completes the job."""
    pool = FakePool()
    worker, server, pump = cluster.connect(pool, slots=1)
    client = Client(cluster.server_factory)
    client.ask('RUN sum [1,2,3] {"chunks": 1, "timeout": 3}')
    pump.flush()
    assert len(pool.calls) == 1
    cluster.clock.advance(3)
    pump.flush()
    assert pool.cancelled == [0]
    cluster.clock.advance(0.5)
    pump.flush()
    _task, value, d = pool.calls[1]
    d.callback(sum(value))
    pump.flush()
    assert client.lines() == ["RESULT j1 6"]
    assert cluster.core.stats()["results_late"] == 0


def test_end_to_end_drain_finishes_held_work_and_gets_no_more(cluster):
    """Over real protocols, a draining worker finishes what it holds, is sent nothing new, and
    its drain() fires; another worker runs the rest."""
    pool = FakePool()
    worker, server, pump = cluster.connect(pool, name="leaving", slots=2)
    client = Client(cluster.server_factory)
    client.ask('RUN sum [1,2,3,4,5,6] {"chunks": 3}')
    pump.flush()
    assert len(pool.calls) == 2
    drained = worker.drain()
    pump.flush()
    assert cluster.core.workers()[0].draining
    for _task, value, d in list(pool.calls):
        d.callback(sum(value))
    pump.flush()
    assert result_of(drained) is None
    assert len(pool.calls) == 2
    cluster.connect(RegistryPool(), name="staying")
    assert client.lines() == ["RESULT j1 21"]
    assert cluster.core.get("j1").ran_on == {"leaving": 2, "staying": 1}


def test_end_to_end_heartbeats_keep_an_idle_connection_up(cluster):
    """An idle worker and server exchange PINGs and PONGs, so neither drops the other."""
    worker, server, pump = cluster.connect(RegistryPool())
    for _ in range(20):
        cluster.clock.advance(5)
        pump.flush()
    assert not worker.lost
    assert [w.name for w in cluster.core.workers()] == ["w1"]


def test_an_error_message_too_long_for_the_server_is_shortened(pool, clock):
    """A task's exception text longer than the server's line is cut to fit (and says so): an
    ERROR the server would refuse as LINE_TOO_LONG would leave the sub-task unanswered."""
    w = Worker(pool, clock)
    w.send((format_greeting("server", 200) + "\n").encode())
    w.lines()
    w.send(do_line(1, "sort", [1]) + do_line(2, "sort", [2]))
    pool.calls[0][2].errback(PoolService.TaskError("ValueError", "é" * 1000))
    pool.calls[1][2].errback(PoolService.TaskError("ValueError", "short"))
    long, short = w.lines()
    assert len(long.encode()) <= 200
    verb, msg = verb_json(long)
    assert (verb, msg["id"], msg["type"]) == ("ERROR", 1, "ValueError")
    assert msg["message"].startswith("éé") and msg["message"].endswith("(shortened)")
    assert verb_json(short)[1]["message"] == "short"


def test_task_error_sends_traceback_and_retry_false(pool, clock):
    """A pool TaskError's traceback and no-retry mark go out in the worker's ERROR."""
    w = Worker(pool, clock)
    w.register()
    w.send(do_line(3, "sum", [1]))
    pool.calls[0][2].errback(PoolService.TaskError("ValueError", "bad", "Traceback ...", False))
    [line] = w.lines()
    assert verb_json(line) == (
        "ERROR",
        {
            "id": 3,
            "job": "j1",
            "type": "ValueError",
            "message": "bad",
            "traceback": "Traceback ...",
            "retry": False,
        },
    )
