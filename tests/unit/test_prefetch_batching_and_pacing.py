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


def _answer(w, seconds: float) -> None:
    sub, d = w.pending()[0]
    d.callback(TimedResult(w.registry.get(sub.task).run(sub.input), seconds))


def test_short_subtasks_are_prefetched_up_to_slots_times_prefetch(clock):
    """Once a job's measured sub-tasks are short, a worker may hold up to slots x prefetch of
    them, reached one step per answer (each answer grants up to two); until then, and for long
    ones, no more than its slots."""
    core = Scheduler(Registry(TASKS), clock, prefetch=8)
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1] * 100, chunks=100)
    assert len(w.pending()) == 2  # nothing measured yet: slots only
    held = []
    for _ in range(16):
        _answer(w, 0.0001)
        held.append(len(w.pending()))
    assert held == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 16, 16]  # 2 slots x 8
    assert core.workers()[0].describe()["prefetched"] == 14
    while w.pending():
        _answer(w, 0.0001)
    assert job.result == 100


def test_a_new_job_fills_free_slots_only_even_when_its_task_is_known_short(clock):
    """A job arriving at idle workers gets them their slots' worth, not slots x prefetch at
    once: the prefetch grows from the answers, so a new job is not one big burst of DO lines."""
    core = Scheduler(Registry(TASKS), clock, prefetch=8)
    w1, w2 = add(core, "w1", slots=2), add(core, "w2", slots=1)
    core.submit("sum", [1], chunks=1)
    _answer(w1, 0.0001)  # sum is known short now
    job = core.submit("sum", [1] * 50, chunks=50)
    assert (len(w1.pending()), len(w2.pending())) == (2, 1)
    _answer(w2, 0.0001)
    assert (len(w1.pending()), len(w2.pending())) == (2, 2)
    for w in (w1, w2):
        while w.pending():
            _answer(w, 0.0001)
    assert job.result == 50


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
    assert [tuple(result_of(d))[:2] for d in rest] == [
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


def test_a_new_job_of_a_task_known_to_be_short_is_prefetched(clock):
    """A stream of one-sub-task jobs is prefetched too: a job with no answers yet is judged by
    its task's recent sub-tasks, while a task never seen gets no more than the slots."""
    core = Scheduler(Registry(TASKS), clock, prefetch=8)
    w = add(core, "w1", slots=1)
    first = [core.submit("sum", [i], chunks=1) for i in range(5)]
    assert len(w.pending()) == 1  # sum never measured: one per slot
    _answer(w, 0.0001)
    assert len(w.pending()) == 2  # sum is short now: the answer's refill prefetches one more
    _answer(w, 0.0001)
    assert len(w.pending()) == 3  # the other jobs have no answers yet, but their task is short
    while w.pending():
        _answer(w, 0.0001)
    assert [j.result for j in first] == [0, 1, 2, 3, 4]
    core.submit("sort", [2, 1], chunks=2)
    assert len(w.pending()) == 1  # sort is another task, still unmeasured
    while w.pending():
        _answer(w, 0.0001)


def _next_turn(clock: Clock) -> None:
    """Run the calls due now but not the ones they schedule, as one reactor turn does (a
    Clock's advance(0) would run the whole chain of callLater(0) continuations at once)."""
    due = [c for c in clock.calls if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def test_dispatch_sends_at_most_dispatch_per_turn_lines_then_resumes_next_turn(clock):
    """With dispatch_per_turn, a pass stops after that many sub-tasks and goes on in the next
    reactor turn (a callLater(0) on the clock), where it stopped, until every slot is full."""
    core = Scheduler(Registry(TASKS), clock, dispatch_per_turn=3)
    workers = [add(core, f"w{i}", slots=2) for i in range(4)]
    job = core.submit("sum", [1] * 20, chunks=20)
    assert [len(w.pending()) for w in workers] == [1, 1, 1, 0]
    _next_turn(clock)
    assert [len(w.pending()) for w in workers] == [2, 2, 1, 1]  # w3 first: its turn was next
    _next_turn(clock)
    assert [len(w.pending()) for w in workers] == [2, 2, 2, 2]
    clock.advance(0)
    assert clock.getDelayedCalls() == []  # every slot is full: nothing is left to resume
    while any(w.pending() for w in workers):
        for w in workers:
            if w.pending():
                w.answer_next()
        clock.advance(0)
    assert job.result == 20


def test_refills_owed_during_a_pause_go_out_next_turn_in_answer_order(clock):
    """Answers that arrive once the turn's budget is spent are owed their refills; the next turn
    serves them in the order the answers came, and jobs still alternate (fairness holds)."""
    core = Scheduler(Registry(TASKS), clock, dispatch_per_turn=2)
    a = core.submit("sum", [1] * 6, chunks=6)
    b = core.submit("sum", [2] * 6, chunks=6)
    w1, w2 = add(core, "w1"), add(core, "w2")
    assert [s.job for w in (w1, w2) for s, _ in w.pending()] == [a.id, b.id]
    w2.answer_next()
    w1.answer_next()  # the budget is spent: both refills wait for the next turn
    assert w1.pending() == [] and w2.pending() == []
    _next_turn(clock)
    assert [s.job for s, _ in w2.calls] == [b.id, a.id]  # w2 answered first, served first
    assert [s.job for s, _ in w1.calls] == [a.id, b.id]
    while w1.pending() or w2.pending():
        for w in (w1, w2):
            if w.pending():
                w.answer_next()
        clock.advance(0)
    assert (a.result, b.result) == (6, 12)


def test_a_paused_pass_fills_only_the_slots_free_when_it_began(clock):
    """A full pass resumed in a later turn does not take over slots freed by answers meanwhile:
    those answers' refills fill them, in answer order, after the pass has fed the idle workers."""
    core = Scheduler(Registry(TASKS), clock, dispatch_per_turn=2)
    workers = [add(core, f"w{i}") for i in range(4)]
    job = core.submit("sum", [1] * 20, chunks=20)
    w0, w1, w2, w3 = workers
    assert [s.index for w in workers for s, _ in w.pending()] == [0, 1]
    w1.answer_next()
    w0.answer_next()
    _next_turn(clock)
    assert [s.index for w in (w2, w3) for s, _ in w.pending()] == [2, 3]  # idle workers first
    assert w0.pending() == [] and w1.pending() == []
    _next_turn(clock)
    assert (w1.pending()[0][0].index, w0.pending()[0][0].index) == (4, 5)  # w1 answered first
    while any(w.pending() for w in workers):
        for w in workers:
            if w.pending():
                w.answer_next()
        clock.advance(0)
    assert job.result == 20


def test_prefetch_depth_is_about_fifty_ms_of_work_per_slot(clock):
    """The prefetch limit is --prefetch per slot for tiny sub-tasks, but only about 50 ms of
    work per slot for longer ones (at least 2), so no worker hoards the end of a job."""
    core = Scheduler(Registry(TASKS), clock, prefetch=256)
    add(core, "w", slots=2, tasks=("sum",))
    handle = core.workers()[0]
    job = core.submit("sum", list(range(10)), 10)
    core._task_mean["sum"] = 0.000_02  # 20 µs: the cap
    job.durations_sum, job.durations_n = 0.000_02, 1
    assert core._limit(handle, job) == 2 * 256
    job.durations_sum = 0.005  # 5 ms: 10 per slot
    assert core._limit(handle, job) == 2 * 10
    job.durations_sum = 0.009  # 9 ms: 5 per slot
    assert core._limit(handle, job) == 2 * 5
    job.durations_sum = 0.04  # long: slots only
    assert core._limit(handle, job) == 2
