"""The paths that make tiny sub-tasks cheap: prefetching to workers when a job's sub-tasks are
short, run times measured on the worker, batched pipe messages to pool children, and
TCP_NODELAY on every connection."""

from __future__ import annotations

import json

import pytest
from helpers import add_worker as add
from helpers import result_of
from test_pool import FakeReactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from clusterd.core.scheduler import Scheduler, TimedResult
from clusterd.endpoints import no_delay
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.worker.pool import PoolService


@pytest.fixture
def clock():
    c = Clock()
    yield c
    assert c.getDelayedCalls() == []


def _answer(w, seconds: float) -> None:
    sub, d = w.pending()[0]
    d.callback(TimedResult(w.registry.get(sub.task).run(sub.input), seconds))


def test_short_subtasks_are_prefetched_up_to_slots_times_prefetch(clock):
    """Once a job's measured sub-tasks are short, a worker is sent up to slots x prefetch of
    them; until then, and for long ones, no more than its slots."""
    core = Scheduler(Registry(TASKS), clock, prefetch=8)
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1] * 100, chunks=100)
    assert len(w.pending()) == 2  # nothing measured yet: slots only
    _answer(w, 0.0001)
    assert len(w.pending()) == 16  # short: 2 slots x 8
    assert core.workers()[0].describe()["prefetched"] == 14
    while w.pending():
        _answer(w, 0.0001)
    assert job.result == 100


def test_long_subtasks_and_timeouts_are_never_prefetched(clock):
    """A job whose sub-tasks run long, or that has a timeout (timed from dispatch), gets no
    more than the worker's slots at a time."""
    core = Scheduler(Registry(TASKS), clock, prefetch=8)
    w = add(core, "w1", slots=2)
    long_job = core.submit("sum", [1] * 10, chunks=10)
    _answer(w, 0.5)
    assert len(w.pending()) == 2
    while w.pending():
        _answer(w, 0.5)
    assert long_job.result == 10
    timed = core.submit("sum", [1] * 10, chunks=10, options={"timeout": 5})
    _answer(w, 0.0001)
    assert len(w.pending()) == 2
    while w.pending():
        _answer(w, 0.0001)
    assert timed.result == 10


def test_run_times_come_from_the_worker_not_the_wall_clock(clock):
    """A TimedResult's seconds (the task's run time on the worker) feed the job's mean, not the
    time it spent queued."""
    core = Scheduler(Registry(TASKS), clock)
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1, 2], chunks=2)
    clock.advance(7)
    _answer(w, 0.25)
    assert job.mean_duration() == 0.25
    _answer(w, 0.75)
    assert job.result == 3


def test_pool_sends_waiting_runs_to_a_child_as_one_batch():
    """Runs that queued while the child was busy go to it as one JSON array, and each Deferred
    fires with its own answer and run time."""
    reactor = FakeReactor()
    pool = PoolService(1, [], reactor)
    pool.startService()
    [child] = reactor.processes
    first = pool.run("sum", [1])
    rest = [pool.run("sum", [i]) for i in range(2, 5)]
    assert child.written == [{"id": 1, "task": "sum", "input": [1]}]
    child.answer(1)
    assert result_of(first).value == 1
    assert child.written[-1] == [{"id": t, "task": "sum", "input": [t]} for t in (2, 3, 4)]
    replies = [{"id": t, "ok": True, "result": t, "t": 0.001} for t in (2, 3, 4)]
    child.proto.outReceived(json.dumps(replies).encode() + b"\n")
    assert [tuple(result_of(d)) for d in rest] == [
        (2, 0.001),
        (3, 0.001),
        (4, 0.001),
    ]
    assert pool.busy == 0


def test_cancelling_one_run_of_a_batch_drops_its_answer_without_killing_the_child():
    """A run cancelled inside a batch is not killed (its neighbours would die with it): its
    answer is dropped when the batch comes back."""
    reactor = FakeReactor()
    pool = PoolService(1, [], reactor)
    pool.startService()
    [child] = reactor.processes
    first = pool.run("sum", [1])
    a, b = pool.run("sum", [2]), pool.run("sum", [3])
    child.answer(1)
    result_of(first)
    a.cancel()
    with pytest.raises(CancelledError):
        result_of(a)
    assert child.signals == []
    replies = [{"id": 2, "ok": True, "result": 2}, {"id": 3, "ok": True, "result": 3}]
    child.proto.outReceived(json.dumps(replies).encode() + b"\n")
    assert result_of(b).value == 3
    assert pool.busy == 0


class _NoDelayTransport(StringTransport):
    nodelay = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


def test_no_delay_turns_off_nagle_on_tcp_and_on_tls_over_tcp():
    """TCP_NODELAY is set on a TCP transport, on the TCP transport under a TLS one, and a
    transport without it (unix sockets, StringTransport) is left alone."""
    tcp = _NoDelayTransport()
    no_delay(tcp)
    assert tcp.nodelay is True

    class TLS:
        transport = _NoDelayTransport()

    tls = TLS()
    no_delay(tls)
    assert tls.transport.nodelay is True
    no_delay(StringTransport())  # nothing to set, nothing raised


def test_a_new_job_of_a_task_known_to_be_short_is_prefetched_at_once(clock):
    """A stream of one-sub-task jobs is prefetched too: a job with no answers yet is judged by
    its task's recent sub-tasks, while a task never seen gets no more than the slots."""
    core = Scheduler(Registry(TASKS), clock, prefetch=8)
    w = add(core, "w1", slots=1)
    first = [core.submit("sum", [i], chunks=1) for i in range(5)]
    assert len(w.pending()) == 1  # sum never measured: one per slot
    _answer(w, 0.0001)
    assert len(w.pending()) == 4  # sum is short now: the other jobs go out at once
    while w.pending():
        _answer(w, 0.0001)
    assert [j.result for j in first] == [0, 1, 2, 3, 4]
    core.submit("sort", [2, 1], chunks=2)
    assert len(w.pending()) == 1  # sort is another task, still unmeasured
    while w.pending():
        _answer(w, 0.0001)
