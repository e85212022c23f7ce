"""PoolService with fake child processes: running, queueing, cancelling, and a dying child."""

from __future__ import annotations

import json

import pytest
from helpers import result_of
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from clusterd.worker.pool import ChildDied, PoolService


class FakeProcess:
    """The transport of one fake child: records stdin lines, signals and stdin closing."""

    def __init__(self, proto) -> None:
        self.proto = proto
        self.written: list[dict] = []
        self.signals: list[str] = []
        self.stdin_closed = False
        proto.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.written.extend(json.loads(line) for line in data.splitlines())

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def answer(self, result) -> None:
        """The child prints the answer to the last request it was sent."""
        ticket = self.written[-1]["id"]
        self.proto.outReceived(json.dumps({"id": ticket, "ok": True, "result": result}).encode())
        self.proto.outReceived(b"\n")

    def exit(self, reason: Exception) -> None:
        self.proto.processEnded(Failure(reason))


class FakeReactor(Clock):
    """A Clock that also "spawns" processes as FakeProcess transports."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, proto, executable, args, env=None):
        assert env is None  # the child inherits our environment
        self.processes.append(FakeProcess(proto))
        return self.processes[-1]


@pytest.fixture
def reactor():
    r = FakeReactor()
    yield r
    assert r.getDelayedCalls() == []


@pytest.fixture
def pool(reactor):
    p = PoolService(1, ["mytasks"], reactor)
    p.startService()
    return p


def test_run_sends_the_task_to_an_idle_child_and_fires_with_its_answer(pool, reactor):
    """run() writes the task to a free child and fires with the result the child prints."""
    [child] = reactor.processes
    d = pool.run("sum", [1, 2])
    assert child.written == [{"id": 1, "task": "sum", "input": [1, 2]}]
    assert pool.busy == 1
    child.answer(3)
    assert result_of(d).value == 3
    assert pool.busy == 0


def test_cancelling_a_queued_run_drops_it(pool, reactor):
    """Cancelling a run still waiting for a child removes it: it is never sent."""
    [child] = reactor.processes
    first = pool.run("sum", [1])
    queued = pool.run("sum", [2])
    assert pool.busy == 2
    queued.cancel()
    with pytest.raises(CancelledError):
        result_of(queued)
    assert pool.busy == 1
    child.answer(1)
    assert result_of(first).value == 1
    assert [w["id"] for w in child.written] == [1]
    assert child.signals == []


def test_cancelling_a_running_task_kills_its_child_and_a_new_child_takes_the_queue(pool, reactor):
    """Cancelling a run in progress kills its child (no ChildDied reported for it); a new child
    is spawned in its place and takes the next queued run."""
    [child] = reactor.processes
    running = pool.run("sum", [1])
    queued = pool.run("sum", [2])
    running.cancel()
    with pytest.raises(CancelledError):
        result_of(running)
    assert child.signals == ["KILL"]
    child.exit(ProcessTerminated(signal=9))
    new = reactor.processes[-1]
    assert new is not child
    assert new.written == [{"id": 2, "task": "sum", "input": [2]}]
    new.answer(2)
    assert result_of(queued).value == 2


def test_a_child_dying_mid_task_fails_it_with_child_died(pool, reactor):
    """A child that exits while running a task fails that task with ChildDied and is replaced."""
    [child] = reactor.processes
    d = pool.run("sum", [1])
    child.exit(ProcessTerminated(exitCode=None, signal=9))
    with pytest.raises(ChildDied, match="signal 9"):
        result_of(d)
    assert len(reactor.processes) == 2
    after = pool.run("sum", [3])
    reactor.processes[-1].answer(3)
    assert result_of(after).value == 3


def test_stop_closes_stdin_and_fails_what_is_left(pool, reactor):
    """Stopping closes every child's stdin and waits for them to end; the run a child held when
    it ended and the runs still queued fail with ChildDied, and nothing is respawned."""
    [child] = reactor.processes
    running = pool.run("sum", [1])
    queued = pool.run("sum", [2])
    stopped = pool.stopService()
    assert child.stdin_closed
    assert not stopped.called
    child.exit(ProcessDone(0))
    result_of(stopped)
    with pytest.raises(ChildDied, match="exit code 0"):
        result_of(running)
    with pytest.raises(ChildDied, match="worker is stopping"):
        result_of(queued)
    assert len(reactor.processes) == 1
