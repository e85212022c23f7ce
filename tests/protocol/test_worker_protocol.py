"""WorkerProtocol: registration, DO -> DONE/ERROR, refusals, and a full job over iosim."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from clusterd import PROTOCOL_VERSION
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import format_greeting
from clusterd.server.protocol import ServerFactory
from clusterd.tasks import Registry, Task
from clusterd.tasks.builtins import TASKS
from clusterd.worker.pool import ChildDied, PoolService
from clusterd.worker.protocol import WorkerFactory

REGISTRY = Registry(TASKS)
GREETING = (format_greeting("server", 1 << 20) + "\n").encode()


class FakePool:
    """Stands in for PoolService: records each run and returns a Deferred the test fires."""

    TaskError = PoolService.TaskError

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, Deferred]] = []

    def run(self, task: str, value) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((task, value, d))
        return d


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


class Worker:
    """A WorkerProtocol on a StringTransport."""

    def __init__(self, pool, name="w1", tasks=("sum", "sort"), slots=2) -> None:
        self.factory = WorkerFactory(pool, name, list(tasks), slots)
        self.proto = self.factory.buildProtocol(None)
        self.tr = StringTransport()
        self.proto.makeConnection(self.tr)

    def send(self, data: str | bytes) -> None:
        self.proto.dataReceived(data.encode() if isinstance(data, str) else data)

    def lines(self) -> list[str]:
        out = self.tr.value().decode()
        self.tr.clear()
        return out.splitlines()

    def register(self) -> None:
        self.send(GREETING)
        self.lines()
        self.send('OK REGISTERED {"name":"w1","protocol":1}\n')


def verb_json(line: str) -> tuple[str, dict]:
    verb, _, rest = line.partition(" ")
    return verb, json.loads(rest)


def do_line(ticket: int, task: str, value, job: str = "j1", index: int = 0) -> str:
    msg = {"id": ticket, "job": job, "index": index, "task": task, "input": value}
    return "DO " + json.dumps(msg) + "\n"


@pytest.fixture
def pool():
    return FakePool()


def test_greeting_is_answered_with_register(pool):
    """The server's greeting makes the worker send REGISTER with its name, tasks, slots and
    protocol."""
    w = Worker(pool, name="node-7", tasks=["sum", "primes"], slots=3)
    assert w.tr.value() == b""  # the worker speaks only after the server's greeting
    w.send(GREETING)
    [line] = w.lines()
    assert verb_json(line) == (
        "REGISTER",
        {"name": "node-7", "tasks": ["sum", "primes"], "slots": 3, "protocol": PROTOCOL_VERSION},
    )
    assert not w.proto.registered


def test_registered_reply_marks_the_worker_registered(pool):
    """`OK REGISTERED` marks the connection registered and counts the registration."""
    w = Worker(pool)
    w.register()
    assert w.proto.registered
    assert w.factory.registrations == 1
    assert w.lines() == []


def test_greeting_split_across_reads(pool):
    """A greeting that arrives in pieces is still answered once, with one REGISTER."""
    w = Worker(pool)
    for i in range(len(GREETING)):
        w.send(GREETING[i : i + 1])
    lines = w.lines()
    assert len(lines) == 1
    assert lines[0].startswith("REGISTER ")


def test_do_runs_the_task_and_answers_done(pool):
    """A DO line runs the task in the pool and the result goes back as DONE with the ticket."""
    w = Worker(pool)
    w.register()
    w.send(do_line(7, "sum", [1, 2, 3], job="j3", index=2))
    [(task, value, d)] = pool.calls
    assert (task, value) == ("sum", [1, 2, 3])
    assert w.lines() == []
    d.callback(6)
    [line] = w.lines()
    assert verb_json(line) == ("DONE", {"id": 7, "job": "j3", "result": 6})


def test_several_do_lines_answer_in_completion_order(pool):
    """Sub-tasks run concurrently; each DONE goes out when its own pool call finishes."""
    w = Worker(pool)
    w.register()
    w.send(do_line(1, "sum", [1]) + do_line(2, "sum", [2]))
    assert len(pool.calls) == 2
    pool.calls[1][2].callback(2)
    pool.calls[0][2].callback(1)
    assert [verb_json(line)[1]["id"] for line in w.lines()] == [2, 1]


def test_task_error_answers_error_with_type_and_message(pool):
    """A task that raises in the pool is reported as ERROR with the exception's type and message."""
    w = Worker(pool)
    w.register()
    w.send(do_line(3, "sum", [1]))
    pool.calls[0][2].errback(PoolService.TaskError("ZeroDivisionError", "division by zero"))
    [line] = w.lines()
    assert verb_json(line) == (
        "ERROR",
        {"id": 3, "job": "j1", "type": "ZeroDivisionError", "message": "division by zero"},
    )


def test_child_died_answers_error_child_died(pool):
    """A pool process dying mid-task is reported as ERROR of type ChildDied."""
    w = Worker(pool)
    w.register()
    w.send(do_line(4, "sum", [1]))
    pool.calls[0][2].errback(ChildDied("pool process died (signal 9) while running the sub-task"))
    [line] = w.lines()
    verb, msg = verb_json(line)
    assert verb == "ERROR"
    assert msg["id"] == 4
    assert msg["type"] == "ChildDied"
    assert "signal 9" in msg["message"]


def test_other_pool_failure_answers_error_with_its_class_name(pool):
    """Any other pool failure becomes ERROR named after the exception class."""
    w = Worker(pool)
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


def test_wrong_protocol_version_disconnects(pool):
    """A server speaking another protocol version is left at once, without registering."""
    w = Worker(pool)
    w.send(b'HELLO clusterd 99 {"server":"clusterd/9"}\n')
    assert w.tr.disconnecting
    assert w.lines() == []
    assert not w.proto.registered


def test_server_err_before_registration_disconnects(pool):
    """An ERR from the server before registration (a refused REGISTER) closes the connection."""
    w = Worker(pool)
    w.send(GREETING)
    w.lines()
    w.send("ERR BAD_REQUEST REGISTER needs 'slots': an integer 1-4096.\n")
    assert w.tr.disconnecting
    assert not w.proto.registered


def test_server_err_after_registration_keeps_the_connection(pool):
    """An ERR after registration is logged, not a reason to drop the connection."""
    w = Worker(pool)
    w.register()
    w.send("ERR WRONG_ROLE something.\n")
    assert not w.tr.disconnecting


def test_no_answer_is_written_after_the_connection_is_lost(pool):
    """A result that arrives after the connection went is dropped, not written."""
    w = Worker(pool)
    w.register()
    w.send(do_line(1, "sum", [1]))
    w.proto.connectionLost(Failure(ConnectionDone()))
    pool.calls[0][2].callback(1)
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


@pytest.fixture
def cluster():
    clock = Clock()
    core = Scheduler(Registry(TASKS), clock)
    server_factory = ServerFactory(core)
    yield core, server_factory
    assert clock.getDelayedCalls() == []


def connect_worker(server_factory, pool, name="w1", tasks=("sum", "primes", "wordcount"), slots=2):
    worker_factory = WorkerFactory(pool, name, list(tasks), slots)
    worker, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: worker_factory.buildProtocol(None)
    )
    pump.flush()
    return worker, server, pump


def test_end_to_end_job_over_iosim(cluster):
    """A real ServerProtocol and WorkerProtocol, connected in memory, run a job to its result."""
    core, server_factory = cluster
    pool = RegistryPool()
    worker, server, pump = connect_worker(server_factory, pool)
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
    """A task that raises on the worker fails the client's RUN with FAILED TASK_ERROR, end to
    end."""

    def explode(value):
        raise ArithmeticError(f"cannot handle {value}")

    registry = Registry([*TASKS, Task("boom", lambda v, n: [v], explode, lambda rs: rs[0])])
    clock = Clock()
    server_factory = ServerFactory(Scheduler(registry, clock))
    worker, server, pump = connect_worker(server_factory, RegistryPool(registry), tasks=["boom"])
    client = Client(server_factory)
    client.ask("RUN boom 7")
    pump.flush()
    [line] = client.lines()
    prefix = "FAILED j1 TASK_ERROR "
    assert line.startswith(prefix)
    assert json.loads(line[len(prefix) :]) == {
        "type": "ArithmeticError",
        "message": "cannot handle 7",
        "index": 0,
        "worker": "w1",
    }
    assert clock.getDelayedCalls() == []


def test_end_to_end_worker_disconnect_requeues(cluster):
    """When one worker's connection closes mid-job, another worker finishes it correctly."""
    core, server_factory = cluster
    slow = FakePool()
    first, _server1, pump1 = connect_worker(server_factory, slow, name="first", slots=2)
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
    _second, _server2, pump2 = connect_worker(server_factory, RegistryPool(), name="second")
    pump2.flush()
    assert client.lines() == ["RESULT j1 55"]
    assert core.get("j1").status()["ran_on"] == {"first": 1, "second": 4}
    # The first worker's late answers go nowhere: its connection is gone.
    for _task, value, d in slow.calls[1:]:
        d.callback(sum(value))
    pump1.flush()
    assert core.stats()["results_duplicate"] == 0
