"""Helpers shared by the test suites: ``from helpers import result_of, deterministic``."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, settings
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import eventAsText, globalLogPublisher
from twisted.python.failure import Failure

from clusterd.core.scheduler import Scheduler, SubTask, WorkerLost

__all__ = [
    "result_of",
    "deterministic",
    "FakeWorker",
    "add_worker",
    "no_errors_logged",
    "LineConn",
]


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


# Hypothesis: the same examples on every run, no example database written into the repository,
# and no per-example deadline (a slow CI machine must not turn into a flaky failure).
deterministic = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)


class FakeWorker:
    """A scheduler runner that records every SubTask and hands back a Deferred the test fires.

    Cancelling one of those Deferreds (what the scheduler does on timeout, job end or a lost
    speculative race) is recorded in ``cancelled`` as ``(job, index)``.
    """

    def __init__(self, name: str, registry: Any) -> None:
        self.name = name
        self.registry = registry
        self.calls: list[tuple[SubTask, Deferred[Any]]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.closed = 0

    def runner(self, sub: SubTask) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _d: self.cancelled.append((sub.job, sub.index)))
        self.calls.append((sub, d))
        return d

    def close(self) -> None:
        self.closed += 1

    def pending(self) -> list[tuple[SubTask, Deferred[Any]]]:
        return [(s, d) for s, d in self.calls if not d.called]

    def answer(self, sub: SubTask, d: Deferred[Any]) -> None:
        d.callback(self.registry.get(sub.task).run(sub.input))

    def answer_next(self) -> SubTask:
        sub, d = self.pending()[0]
        self.answer(sub, d)
        return sub

    def answer_all(self) -> int:
        n = 0
        while self.pending():
            self.answer_next()
            n += 1
        return n

    def lose_all(self) -> None:
        for _sub, d in self.pending():
            d.errback(WorkerLost(self.name))

    def indices(self, job: str | None = None) -> list[int]:
        """Indices of every sub-task dispatched here (of one job), in dispatch order."""
        return [s.index for s, _ in self.calls if job is None or s.job == job]


def add_worker(
    core: Scheduler, name: str, slots: int = 1, tasks: Any = ("sum", "sort", "primes")
) -> FakeWorker:
    """Register a FakeWorker with the scheduler under ``name``."""
    w = FakeWorker(name, core.registry)
    core.add_worker(name, tasks, slots, w.runner, w.close, address="10.0.0.1:1")
    return w


@contextmanager
def no_errors_logged() -> Iterator[list[dict]]:
    """The autouse ``no_logged_errors`` fixture for one block, e.g. one hypothesis example, so
    that a logged error fails (and is shrunk to) the example that caused it. Collects garbage at
    the end, so an unhandled Deferred error dropped inside the block is seen too."""
    seen: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        # Collected even when the block failed, so that its garbage cannot log an error into
        # whichever test happens to run the next collection.
        gc.collect()
        # What is still alive is not this block's garbage: freeze it (as conftest does after
        # collection), so that the next block's collection stays cheap.
        gc.freeze()
        globalLogPublisher.removeObserver(observer)
    assert not seen, eventAsText(seen[0])


class LineConn:
    """A protocol from ``factory`` on a StringTransport whose peer is ``host:port``, with
    line-level helpers. What the protocol writes on connecting is kept in ``greeting``."""

    def __init__(self, factory: Any, host: str = "10.0.0.1", port: int = 1234) -> None:
        self.proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.tr = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.closed = False
        self.proto.makeConnection(self.tr)
        self.greeting = self.lines()

    def send(self, data: str | bytes) -> None:
        self.proto.dataReceived(data.encode() if isinstance(data, str) else data)

    def lines(self) -> list[str]:
        """Lines written since the last call (each must be whole, UTF-8)."""
        out = self.tr.value().decode("utf-8")
        self.tr.clear()
        assert out == "" or out.endswith("\n"), f"partial line written: {out!r}"
        return out.splitlines()

    def ask(self, line: str) -> list[str]:
        self.send(line + "\n")
        return self.lines()

    def lose(self) -> None:
        """The connection ends (as the reactor reports it after loseConnection); idempotent."""
        if not self.closed:
            self.closed = True
            self.proto.connectionLost(Failure(ConnectionDone()))
