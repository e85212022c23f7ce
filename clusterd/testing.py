"""Fakes for testing code that uses clusterd, and for clusterd's own tests (as
``twisted.internet.testing`` and ``treq.testing`` ship theirs).

- :class:`FakeWorker` / :func:`add_worker`: a worker as the scheduler sees it (an
  ``IWorkerLink``) whose answers the test gives, for scheduler-level tests.
- :class:`FakePool`: stands in for the worker's process pool; records each run and returns a
  Deferred the test fires.
- :class:`LineConn`: one protocol on a ``StringTransport`` with line-level helpers
  (``send``, ``lines``, ``ask``, ``lose``).
- :class:`LineWorker`: a worker speaking the line protocol to a real server: ``REGISTER``, then
  the DO lines it is sent, answered when the test says.
- :class:`FakeServer`: a real :class:`~clusterd.server.protocol.ServerFactory` and
  :class:`~clusterd.core.scheduler.Scheduler` on a :class:`~twisted.internet.task.Clock`, to
  drive with clients and workers, no reactor and no sockets::

      server = FakeServer(tasks=my_tasks)
      worker = server.worker("w1", tasks=["double"])
      client = server.client()
      client.send('SUBMIT double [1,2] {"chunks":1}\\n')
      worker.answer_all()
      assert client.ask("WAIT j1") == ["RESULT j1 [2,4]"]
      server.close()   # closes every connection, then fails if a timer was left behind

Built only on public names: ``ServerFactory``, ``ConnectionSettings``, ``Scheduler``,
``MemoryJournal``, ``Registry``, ``WorkerLost``; never imports a reactor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from clusterd.core.errors import WorkerLost
from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.core.streaming import text_input
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry, Task

__all__ = [
    "FakePool",
    "FakeServer",
    "FakeWorker",
    "LineConn",
    "LineWorker",
    "add_worker",
    "result_of",
]

DEFAULT_TASKS = ("sum", "sort", "primes")


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred already has; raises its failure, or fails when it has none yet.

    It never waits: advance the Clock or pump the connection first.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has no result yet: advance the Clock or pump first"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


# -- scheduler level ---------------------------------------------------------------------------


class FakeWorker:
    """An ``IWorkerLink`` that records every sub-task sent and hands back a Deferred the test
    fires (:meth:`answer`, :meth:`answer_all`, :meth:`lose_all`).

    Cancelling one of those Deferreds (what the scheduler does on timeout, job end or a lost
    speculative race) is recorded in ``cancelled`` as ``(job, index)``.
    """

    def __init__(
        self,
        name: str,
        registry: Any,
        tasks: Iterable[str] = DEFAULT_TASKS,
        slots: int = 1,
        address: str = "10.0.0.1:1",
    ) -> None:
        self.name = name
        self.registry = registry
        self.tasks = frozenset(tasks)
        self.slots = slots
        self.address = address
        self.calls: list[tuple[Any, Deferred[Any]]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.closed = 0

    def send(self, sub: Any) -> Deferred[Any]:
        """Record the sub-task; the Deferred fires when the test answers it, and cancelling it is
        recorded in ``cancelled``."""
        d: Deferred[Any] = Deferred(lambda _d: self.cancelled.append((sub.job, sub.index)))
        self.calls.append((sub, d))
        return d

    runner = send  # the name add_worker's callers knew

    def close(self) -> None:
        """Count the close: the scheduler dropped this worker."""
        self.closed += 1

    def pending(self) -> list[tuple[Any, Deferred[Any]]]:
        """The sub-tasks sent and not yet answered, with their Deferreds, oldest first."""
        return [(s, d) for s, d in self.calls if not d.called]

    def answer(self, sub: Any, d: Deferred[Any]) -> None:
        """Fire ``d`` with what the real task returns for the sub-task's input."""
        d.callback(self.registry.get(sub.task).run_whole(text_input(sub.input)))

    def answer_next(self) -> Any:
        """Answer the oldest unanswered sub-task with the real task's result, and return it."""
        sub, d = self.pending()[0]
        self.answer(sub, d)
        return sub

    def answer_all(self) -> int:
        """Answer every pending sub-task (and those the answers bring); how many."""
        n = 0
        while self.pending():
            self.answer_next()
            n += 1
        return n

    def lose_all(self) -> None:
        """Every pending sub-task fails with WorkerLost, as when the connection goes."""
        for _sub, d in self.pending():
            d.errback(WorkerLost(self.name))

    def indices(self, job: str | None = None) -> list[int]:
        """Indices of every sub-task dispatched here (of one job), in dispatch order."""
        return [s.index for s, _ in self.calls if job is None or s.job == job]


def add_worker(
    core: Scheduler, name: str, slots: int = 1, tasks: Iterable[str] = DEFAULT_TASKS
) -> FakeWorker:
    """Register a FakeWorker with the scheduler under ``name``."""
    w = FakeWorker(name, core.registry, tasks, slots)
    core.attach(w)
    return w


class FakePool:
    """Stands in for the worker's process pool: records each run and returns a Deferred the
    test fires; cancelling one (as the pool would drop or kill it) records its position in
    ``cancelled``. ``refuse=True``: any run fails the test (a pool never asked)."""

    def __init__(self, refuse: bool = False) -> None:
        from clusterd.worker.pool import PoolService

        self.TaskError = PoolService.TaskError
        self.refuse = refuse
        self.calls: list[tuple[str, object, Deferred[Any]]] = []
        self.cancelled: list[int] = []

    def run(self, task: str, value: Any) -> Deferred[Any]:
        """Record a run of ``task`` on ``value``; the Deferred fires when the test fires it."""
        if self.refuse:
            raise AssertionError("no sub-task expected")
        n = len(self.calls)
        d: Deferred[Any] = Deferred(lambda _d: self.cancelled.append(n))
        self.calls.append((task, value, d))
        return d

    def pending(self) -> list[tuple[str, object, Deferred[Any]]]:
        """The runs not yet answered: (task, value, Deferred), oldest first."""
        return [c for c in self.calls if not c[2].called]


# -- line level --------------------------------------------------------------------------------


class LineConn:
    """A protocol from ``factory`` on a StringTransport whose peer is ``host:port``, with
    line-level helpers. What the protocol writes on connecting is kept in ``greeting``."""

    def __init__(self, factory: Any, host: str = "10.0.0.1", port: int = 1234) -> None:
        """``factory``: a protocol factory, or a protocol already built."""
        built = hasattr(factory, "buildProtocol")
        self.proto = factory.buildProtocol(IPv4Address("TCP", host, port)) if built else factory
        self.tr = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.closed = False
        self.proto.makeConnection(self.tr)
        self.greeting = self.lines()

    def send(self, data: str | bytes) -> None:
        """Feed ``data`` to the protocol as if the peer sent it (text is UTF-8 encoded)."""
        self.proto.dataReceived(data.encode() if isinstance(data, str) else data)

    def lines(self) -> list[str]:
        """Lines written since the last call (each must be whole, UTF-8)."""
        out = self.tr.value().decode("utf-8")
        self.tr.clear()
        assert out == "" or out.endswith("\n"), f"partial line written: {out!r}"
        return out.splitlines()

    def ask(self, line: str) -> list[str]:
        """Send one line; the lines written in answer (so far)."""
        self.send(line + "\n")
        return self.lines()

    def lose(self, reason: type[Exception] = ConnectionDone) -> None:
        """The connection ends (as the reactor reports it after loseConnection); idempotent."""
        if not self.closed:
            self.closed = True
            self.proto.connectionLost(Failure(reason()))


class LineWorker(LineConn):
    """A worker speaking the line protocol: ``REGISTER``, then answers DO lines it is sent.

    Lines the server sends are sorted as they are read: DO into ``todo``, CANCEL ids into
    ``cancels`` (and the cancelled DO dropped from ``todo``), heartbeat PINGs counted in
    ``pings``; anything else fails the test. The server's answer to REGISTER is kept in
    ``registered``. A registered connection runs a heartbeat on the server's clock: close it
    (:meth:`lose`, or :meth:`FakeServer.close`) before checking for leaked timers.
    """

    def __init__(
        self,
        factory: Any,
        name: str = "w1",
        tasks: Iterable[str] = DEFAULT_TASKS,
        slots: int = 1,
        max_line: int | None = None,
        registry: Any = None,
        host: str = "10.0.0.1",
        port: int = 1234,
    ) -> None:
        super().__init__(factory, host, port)
        self.name = name
        self.registry = registry if registry is not None else factory.core.registry
        self.todo: list[dict[str, Any]] = []
        self.cancels: list[int] = []
        self.pings = 0
        info: dict[str, Any] = {"name": name, "tasks": list(tasks), "slots": slots}
        info["protocol"] = 1
        if max_line is not None:
            info["max_line"] = max_line
        reply = self.ask("REGISTER " + json.dumps(info))
        self.registered = reply[0] if reply else ""
        self._collect(reply[1:])

    def _collect(self, lines: list[str]) -> None:
        for line in lines:
            verb, _, rest = line.partition(" ")
            if verb == "DO":
                self.todo.append(json.loads(rest))
            elif verb == "CANCEL":
                ticket = json.loads(rest)["id"]
                self.cancels.append(ticket)
                self.todo = [m for m in self.todo if m["id"] != ticket]
            elif line == "PING":
                self.pings += 1
            else:
                raise AssertionError(f"unexpected line to a worker: {line!r}")

    def dos(self) -> list[dict[str, Any]]:
        """Every DO received and not yet answered (nor cancelled)."""
        self._collect(self.lines())
        return list(self.todo)

    def done(self, msg: dict[str, Any], result: Any = None) -> None:
        """Answer ``msg`` with ``result`` (default: what the real task returns)."""
        if msg in self.todo:
            self.todo.remove(msg)
        if result is None:
            result = self.registry.get(msg["task"]).run_whole(msg["input"])
        self.send(
            "DONE " + json.dumps({"id": msg["id"], "job": msg["job"], "result": result}) + "\n"
        )

    def error(self, msg: dict[str, Any], type_: str, message: str) -> None:
        """Answer ``msg`` with the task's failure."""
        self.todo.remove(msg)
        payload = {"id": msg["id"], "job": msg["job"], "type": type_, "message": message}
        self.send("ERROR " + json.dumps(payload) + "\n")

    def answer_one(self) -> dict[str, Any]:
        """Answer the oldest unanswered DO with DONE (the real task's result), and return its
        message."""
        msg = self.dos()[0]
        self.done(msg)
        return msg

    def answer_all(self) -> int:
        """Answer every DO (and those the answers bring); how many."""
        n = 0
        while self.dos():
            self.answer_one()
            n += 1
        return n


class FakeServer:
    """A real server protocol factory and scheduler on a Clock, driven without a reactor.

    ``tasks``: a :class:`~clusterd.tasks.Registry`, or the Task objects to serve (default: the
    built-in tasks). ``journal``: default a :class:`~clusterd.core.journal.MemoryJournal`
    (``MemoryJournal(hold=True)`` to observe replies held until :meth:`MemoryJournal.flush`).
    Other keywords go to the Scheduler (its config overrides).
    """

    def __init__(
        self,
        tasks: Registry | Iterable[Task] | None = None,
        clock: Clock | None = None,
        journal: Any = None,
        settings: ConnectionSettings | None = None,
        **overrides: Any,
    ) -> None:
        if tasks is None:
            from clusterd.tasks.builtins import TASKS

            tasks = TASKS
        self.registry = tasks if isinstance(tasks, Registry) else Registry(list(tasks))
        self.clock = clock if clock is not None else Clock()
        self.journal = journal if journal is not None else MemoryJournal()
        self.core = Scheduler(self.registry, self.clock, journal=self.journal, **overrides)
        self.factory = ServerFactory(self.core, settings=settings, clock=self.clock)
        self.conns: list[LineConn] = []

    def client(self, host: str = "10.0.0.1", port: int = 1234) -> LineConn:
        """A new client connection (its greeting in ``.greeting``)."""
        c = LineConn(self.factory, host, port)
        self.conns.append(c)
        return c

    def worker(
        self, name: str = "w1", tasks: Iterable[str] = DEFAULT_TASKS, slots: int = 1, **kw: Any
    ) -> LineWorker:
        """A new registered worker connection."""
        w = LineWorker(self.factory, name, tasks, slots, **kw)
        self.conns.append(w)
        return w

    def close(self) -> None:
        """Close every connection still open (as the reactor would at the end), then fail if a
        timer is left behind on the clock (a leak)."""
        for c in self.conns:
            c.lose()
        self.conns.clear()
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()
