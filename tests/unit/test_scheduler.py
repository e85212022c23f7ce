"""Scheduler: dispatch, fairness, failures, requeueing and bookkeeping, with fake workers."""

from __future__ import annotations

import pytest
from helpers import add_worker as add
from helpers import result_of
from twisted.internet.defer import Deferred, succeed

from clusterd.core.jobs import JobState
from clusterd.core.scheduler import Scheduler, SubTask, TaskFailed, WorkerLost
from clusterd.core.wire import ErrorCode, WireError
from clusterd.tasks import Registry, Task, TaskInputError


@pytest.fixture
def core(registry, clock):
    return Scheduler(registry, clock)


def wire_error(fn, *args, **kw) -> WireError:
    with pytest.raises(WireError) as info:
        fn(*args, **kw)
    return info.value


# -- dispatch ------------------------------------------------------------------------------------


def test_dispatch_respects_slots(core, clock):
    """A worker never holds more sub-tasks than it has slots; a finished one frees a slot."""
    w = add(core, "w1", slots=2)
    job = core.submit("sum", list(range(10)), chunks=5)
    assert len(w.calls) == 2
    assert core.workers()[0].busy == 2
    w.answer_next()
    assert len(w.calls) == 3
    assert len(w.pending()) == 2
    w.answer_all()
    assert len(w.calls) == 5
    assert job.state == JobState.DONE
    assert job.result == 45
    assert core.workers()[0].busy == 0


def test_subtask_carries_job_index_task_and_chunk(core, clock):
    """A dispatched SubTask names its job, its index, the task and the chunk's input."""
    w = add(core, "w1", slots=3)
    job = core.submit("sum", [1, 2, 3, 4, 5, 6], chunks=3)
    subs = [s for s, _ in w.calls]
    assert subs == [
        SubTask(job.id, 0, "sum", [1, 2]),
        SubTask(job.id, 1, "sum", [3, 4]),
        SubTask(job.id, 2, "sum", [5, 6]),
    ]
    w.answer_all()


def test_job_is_split_across_several_workers(core, clock):
    """One job's sub-tasks spread over every worker with free slots, and results combine in
    order."""
    w1, w2, w3 = add(core, "w1", slots=2), add(core, "w2", slots=2), add(core, "w3", slots=2)
    job = core.submit("sort", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2], chunks=6)
    assert [len(w.calls) for w in (w1, w2, w3)] == [2, 2, 2]
    # Answer in reverse order of dispatch: the combine must still see chunk order.
    for w in (w3, w2, w1):
        for sub, d in reversed(w.pending()):
            w.answer(sub, d)
    assert result_of(job.wait()).result == list(range(-2, 10))
    assert job.ran_on == {"w1": 2, "w2": 2, "w3": 2}


def test_synchronous_runner_completes_the_job_inside_submit(core, clock, registry):
    """A runner that answers at once (re-entrant dispatch) still runs every sub-task exactly once."""
    seen = []

    def runner(sub):
        seen.append(sub.index)
        return succeed(registry.get(sub.task).run(sub.input))

    core.add_worker("sync", ["sum"], 2, runner)
    job = core.submit("sum", list(range(100)), chunks=10)
    assert job.state == JobState.DONE
    assert job.result == 4950
    assert sorted(seen) == list(range(10))
    assert core.stats()["subtasks_dispatched"] == 10


def test_tasks_only_go_to_workers_that_list_the_task(core, clock):
    """A sub-task is only dispatched to a worker whose task list names its task."""
    sums = add(core, "sums", slots=4, tasks=["sum"])
    sorts = add(core, "sorts", slots=4, tasks=["sort"])
    job = core.submit("sort", [3, 2, 1, 0], chunks=4)
    assert sums.calls == []
    assert [s.task for s, _ in sorts.calls] == ["sort"] * 4
    sorts.answer_all()
    assert job.result == [0, 1, 2, 3]


def test_fairness_small_job_is_not_starved_by_a_big_one(core, clock):
    """A 1-sub-task job submitted behind a 10,000-sub-task job is dispatched at the next free slot
    and finishes while the big job is still far from done."""
    w = add(core, "w1", slots=2)
    big = core.submit("sum", list(range(10_000)), chunks=10_000)
    assert big.total == 10_000
    small = core.submit("sum", [40, 2], chunks=1)
    assert [s.job for s, _ in w.calls] == [big.id, big.id]
    w.answer_next()  # the next free slot
    assert w.calls[-1][0].job == small.id
    w.answer(*w.calls[-1])
    assert small.state == JobState.DONE
    assert small.result == 42
    assert big.done <= 2
    assert big.state == JobState.RUNNING
    core.cancel(big.id)
    for sub, d in w.pending():
        w.answer(sub, d)


def test_two_equal_jobs_share_the_slots(core, clock):
    """Two long jobs queued together alternate: neither gets more than one dispatch ahead."""
    w = add(core, "w1", slots=1)
    a = core.submit("sum", list(range(200)), chunks=100)
    b = core.submit("sum", list(range(200)), chunks=100)
    for _ in range(60):
        w.answer_next()
    counts = {a.id: 0, b.id: 0}
    for sub, _d in w.calls:
        counts[sub.job] += 1
    assert abs(counts[a.id] - counts[b.id]) <= 1
    w.answer_all()
    assert a.result == b.result == sum(range(200))


# -- failures ------------------------------------------------------------------------------------


def test_worker_lost_requeues_and_another_worker_completes(core, clock):
    """Sub-tasks that fail with WorkerLost run again on another worker and the answer is right."""
    w1 = add(core, "w1", slots=2)
    job = core.submit("sum", list(range(1, 101)), chunks=4)
    assert len(w1.calls) == 2
    w1.answer_next()
    assert len(w1.pending()) == 2  # chunks 1 and 2 in flight
    handle = core.workers()[0]
    core.remove_worker(handle)
    w1.lose_all()
    assert job.status()["requeued"] == 2
    assert core.stats()["subtasks_requeued"] == 2
    assert len(w1.calls) == 3  # nothing more went to the lost worker
    w2 = add(core, "w2", slots=1)
    w2.answer_all()
    assert job.state == JobState.DONE
    assert job.result == 5050
    assert job.ran_on == {"w1": 1, "w2": 3}
    assert core.stats()["workers_lost"] == 1


def test_worker_lost_subtask_goes_back_first_in_line(core, clock):
    """A requeued sub-task is dispatched before the job's untouched ones."""
    w1 = add(core, "w1", slots=1)
    core.submit("sum", [1, 2, 3, 4], chunks=4)
    (sub0, d0) = w1.calls[0]
    d0.errback(WorkerLost("w1"))
    # The same (still alive) worker is free again and gets index 0 back before index 1.
    assert [s.index for s, _ in w1.calls] == [0, 0]
    w1.answer_all()


def test_task_failed_fails_the_job(core, clock):
    """With one attempt, TaskFailed fails the job at once with TASK_ERROR, the exception's type
    and message, the index, attempts and worker, and cancels the job's other in-flight sub-task."""
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1, 2, 3, 4], chunks=2, options={"attempts": 1})
    waiter = job.wait()
    (sub0, d0), (sub1, d1) = w.calls
    d1.errback(TaskFailed("ZeroDivisionError", "division by zero"))
    assert job.state == JobState.FAILED
    assert job.error == {
        "code": ErrorCode.TASK_ERROR,
        "type": "ZeroDivisionError",
        "message": "division by zero",
        "index": 1,
        "attempts": 1,
        "worker": "w1",
    }
    assert result_of(waiter) is job
    assert job.status()["error"]["type"] == "ZeroDivisionError"
    assert core.workers()[0].failed == 1
    # The other sub-task was cancelled with the job: its slot is free at once.
    assert w.cancelled == [(job.id, 0)]
    assert d0.called  # cancelled (the scheduler consumed the CancelledError)
    assert core.workers()[0].busy == 0
    assert w.pending() == []
    assert core.stats()["results_duplicate"] == 0
    assert core.stats()["jobs_failed"] == 1
    assert core.stats()["jobs_done"] == 0
    assert core.stats()["subtasks_retried"] == 0


def test_cancel_cancels_running_subtasks_and_a_late_answer_is_only_counted(core, clock):
    """Cancelling a job cancels its dispatched sub-task's Deferred and frees the slot at once; an
    answer the worker sends anyway reaches only late_result(): counted, never combined."""
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1, 2, 3], chunks=3)
    [(sub, d)] = w.calls
    core.cancel(job.id)
    assert w.cancelled == [(job.id, 0)]
    assert d.called
    assert core.workers()[0].busy == 0
    core.late_result()  # what the protocol calls for a DONE whose ticket it no longer holds
    assert core.stats()["results_late"] == 1
    assert job.state == JobState.CANCELLED
    assert job.result is None
    assert job.done == 0
    assert core.stats()["results_duplicate"] == 0
    assert core.stats()["subtasks_completed"] == 0
    assert len(w.calls) == 1  # the cancelled job's other chunks were never dispatched


def test_worker_lost_after_cancel_does_not_requeue(core, clock):
    """A sub-task of a cancelled job that comes back with WorkerLost (its connection died as it
    was being cancelled) is not queued again."""
    calls = []

    def runner(sub):
        calls.append(sub)
        return Deferred(lambda d: d.errback(WorkerLost("w1")))

    core.add_worker("w1", ["sum"], 1, runner)
    job = core.submit("sum", [1, 2], chunks=2)
    core.cancel(job.id)
    assert core.stats()["subtasks_requeued"] == 0
    assert job.requeued == 0
    assert len(calls) == 1
    assert core.workers()[0].busy == 0


def test_combine_error_fails_the_job(clock):
    """A combine that raises fails the job with COMBINE_ERROR, type and message."""

    def bad_combine(results):
        raise RuntimeError("cannot combine")

    reg = Registry([Task("bad", lambda v, n: [v], lambda x: x, bad_combine)])
    core = Scheduler(reg, clock)
    w = add(core, "w1", tasks=["bad"])
    job = core.submit("bad", 1)
    w.answer_all()
    assert job.state == JobState.FAILED
    assert job.error == {
        "code": ErrorCode.COMBINE_ERROR,
        "type": "RuntimeError",
        "message": "cannot combine",
    }


def test_combine_result_that_is_not_json_fails_the_job(clock):
    """A combined answer that cannot be encoded as JSON (NaN) fails the job with COMBINE_ERROR."""
    reg = Registry([Task("nan", lambda v, n: [v], lambda x: x, lambda rs: float("nan"))])
    core = Scheduler(reg, clock)
    w = add(core, "w1", tasks=["nan"])
    job = core.submit("nan", 1)
    w.answer_all()
    assert job.state == JobState.FAILED
    assert job.error["code"] == ErrorCode.COMBINE_ERROR


def test_a_task_that_splits_into_nothing_finishes_at_once(clock):
    """A job whose split yields no chunks is combined at submit, without any worker."""
    reg = Registry([Task("none", lambda v, n: [], lambda x: x, lambda rs: len(rs))])
    core = Scheduler(reg, clock)
    job = core.submit("none", 1)
    assert job.state == JobState.DONE
    assert job.result == 0
    assert job.result_json == "0"


# -- cancel --------------------------------------------------------------------------------------


def test_cancel(core, clock):
    """Cancel ends a queued job, fires its waiters, stops its dispatch and is idempotent."""
    job = core.submit("sum", [1, 2, 3], chunks=3)
    waiter = job.wait()
    assert core.cancel(job.id) is job
    assert job.state == JobState.CANCELLED
    assert result_of(waiter) is job
    assert core.cancel(job.id).state == JobState.CANCELLED
    assert core.stats()["jobs_cancelled"] == 1
    w = add(core, "w1", slots=4)
    assert w.calls == []


def test_cancel_of_a_finished_job_keeps_its_result(core, clock):
    """Cancelling a job that already finished leaves it done with its answer."""
    w = add(core, "w1")
    job = core.submit("sum", [1, 2], chunks=1)
    w.answer_all()
    assert core.cancel(job.id).state == JobState.DONE
    assert job.result == 3
    assert core.stats()["jobs_cancelled"] == 0


def test_cancel_unknown_job(core, clock):
    """Cancelling or getting a job id that does not exist is UNKNOWN_JOB."""
    assert wire_error(core.cancel, "j99").code == ErrorCode.UNKNOWN_JOB
    assert wire_error(core.get, "j99").code == ErrorCode.UNKNOWN_JOB


def test_cancelled_waiter_is_forgotten(core, clock):
    """Cancelling a waiter's Deferred removes it from the job, so nothing leaks."""
    job = core.submit("sum", [1], chunks=1)
    d = job.wait()
    d.addErrback(lambda f: None)
    d.cancel()
    assert job._ended._ds == {}
    core.cancel(job.id)


# -- workers -------------------------------------------------------------------------------------


def test_waiting_for_worker_until_a_capable_worker_registers(core, clock):
    """A job no connected worker can run waits, says so in its status, and starts on register."""
    job = core.submit("primes", {"stop": 100}, chunks=2)
    assert core.waiting_for_worker(job)
    status = core.job_status(job)
    assert status["waiting_for_worker"] is True
    assert "primes" in status["note"]
    other = add(core, "sorter", slots=2, tasks=["sort"])
    assert other.calls == []
    assert core.waiting_for_worker(job)
    w = add(core, "primer", slots=2, tasks=["primes"])
    assert len(w.calls) == 2
    assert not core.waiting_for_worker(job)
    assert "waiting_for_worker" not in core.job_status(job)
    w.answer_all()
    assert job.result == 25


def test_finished_job_is_not_waiting_for_worker(core, clock):
    """A finished job is never reported as waiting for a worker."""
    job = core.submit("sum", [1], chunks=1)
    core.cancel(job.id)
    assert not core.waiting_for_worker(job)


def test_reregistering_replaces_the_old_handle(core, clock):
    """A worker registering again under its name closes the old connection and is counted once."""
    old = add(core, "w", slots=1)
    job = core.submit("sum", [1, 2, 3, 4], chunks=2)
    assert len(old.calls) == 1
    new = add(core, "w", slots=2)
    assert old.closed == 1
    assert new.closed == 0
    assert len(core.workers()) == 1
    assert core.workers()[0].slots == 2
    assert core.stats()["workers"] == 1
    assert core.stats()["slots"] == 2
    assert core.stats()["workers_registered"] == 2
    # The new registration takes the queued chunk; the old connection's chunk comes back when
    # that connection finally goes, and runs on the new registration.
    assert len(new.calls) == 1
    old.lose_all()
    new.answer_all()
    assert job.result == 10
    assert job.ran_on == {"w": 2}


def test_remove_worker_is_idempotent(core, clock):
    """Removing a worker twice counts one loss."""
    add(core, "w1")
    handle = core.workers()[0]
    core.remove_worker(handle)
    core.remove_worker(handle)
    assert core.workers() == []
    assert core.stats()["workers_lost"] == 1
    assert handle.free == 0


def test_worker_describe(core, clock):
    """A worker's description lists its name, address, sorted tasks and slot use."""
    clock.advance(5)
    add(core, "w1", slots=3, tasks=["sum", "primes"])
    assert core.workers()[0].describe() == {
        "name": "w1",
        "address": "10.0.0.1:1",
        "tasks": ["primes", "sum"],
        "slots": 3,
        "busy": 0,
        "prefetched": 0,
        "done": 0,
        "failed": 0,
        "draining": False,
        "connected": 5.0,
        "last_seen": 5.0,
    }


# -- submit checks -------------------------------------------------------------------------------


def test_default_chunk_count(core, clock):
    """Without a chunk count a job gets 16 chunks with no capable worker, else 4 per slot, <= 256."""
    assert core.submit("sum", list(range(1000))).total == 16
    add(core, "sorter", slots=50, tasks=["sort"])
    assert core.submit("sum", list(range(1000))).total == 16
    w = add(core, "w1", slots=3, tasks=["sum"])
    w.answer_all()
    for job in core.jobs():
        assert job.is_final
    job = core.submit("sum", list(range(1000)))
    assert job.total == 12
    w.answer_all()
    big = add(core, "w2", slots=100, tasks=["sum"])
    job = core.submit("sum", list(range(1000)))
    assert job.total == 256
    big.answer_all()
    w.answer_all()
    assert job.result == sum(range(1000))


def test_default_chunk_count_never_exceeds_items(core, clock):
    """A small input gets no more chunks than it has items."""
    assert core.submit("sum", [1, 2, 3]).total == 3


def test_too_many_subtasks(registry, clock):
    """Asking for more chunks than the server allows is TOO_MANY_SUBTASKS; the limit itself is
    fine."""
    core = Scheduler(registry, clock, max_subtasks=10)
    err = wire_error(core.submit, "sum", list(range(100)), 11)
    assert err.code == ErrorCode.TOO_MANY_SUBTASKS
    assert "10" in err.message
    assert core.submit("sum", list(range(100)), 10).total == 10
    assert core.stats()["jobs_submitted"] == 1


def test_split_into_too_many_pieces(clock):
    """A task whose split yields more pieces than allowed is TOO_MANY_SUBTASKS."""
    reg = Registry([Task("explode", lambda v, n: [1] * 50, lambda x: x, sum)])
    core = Scheduler(reg, clock, max_subtasks=10)
    assert wire_error(core.submit, "explode", 0, 2).code == ErrorCode.TOO_MANY_SUBTASKS
    assert core.jobs() == []


def test_unknown_task(core, clock):
    """Submitting a task the registry lacks is UNKNOWN_TASK, listing the known tasks."""
    err = wire_error(core.submit, "nope", [1])
    assert err.code == ErrorCode.UNKNOWN_TASK
    assert "'nope'" in err.message
    assert "sum" in err.message
    assert core.jobs() == []


def test_bad_input(core, clock):
    """An input the task's split refuses is BAD_INPUT and no job is created."""
    err = wire_error(core.submit, "sum", {"not": "a list"})
    assert err.code == ErrorCode.BAD_INPUT
    assert core.jobs() == []
    assert core.stats()["jobs_submitted"] == 0


def test_split_that_crashes_is_bad_input(clock):
    """A user task whose split raises any exception gives BAD_INPUT naming the exception."""

    def split(value, n):
        raise KeyError("k")

    def split_tie(value, n):
        raise TaskInputError("needs a tie")

    reg = Registry(
        [Task("crash", split, lambda x: x, sum), Task("tie", split_tie, lambda x: x, sum)]
    )
    core = Scheduler(reg, clock)
    err = wire_error(core.submit, "crash", 1)
    assert err.code == ErrorCode.BAD_INPUT
    assert "KeyError" in err.message
    err = wire_error(core.submit, "tie", 1)
    assert err.code == ErrorCode.BAD_INPUT
    assert err.message == "needs a tie."


# -- housekeeping --------------------------------------------------------------------------------


def test_expire_after_retention(registry, clock):
    """Finished jobs are forgotten once older than the retention time; running ones never are."""
    core = Scheduler(registry, clock, retention=100)
    w = add(core, "w1", slots=1)
    done = core.submit("sum", [1], chunks=1)
    w.answer_all()
    running = core.submit("sum", [1], chunks=1)
    clock.advance(100)
    assert core.expire() == 0
    clock.advance(1)
    assert core.expire() == 1
    assert wire_error(core.get, done.id).code == ErrorCode.UNKNOWN_JOB
    assert core.get(running.id) is running
    clock.advance(10_000)
    assert core.expire() == 0
    w.answer_all()
    clock.advance(101)
    assert core.expire() == 1
    assert core.jobs() == []


def test_job_ids_are_unique_and_sequential(core, clock):
    """Job ids are j1, j2, ... and are never reused, even after expiry."""
    ids = [core.submit("sum", [1], chunks=1).id for _ in range(3)]
    assert ids == ["j1", "j2", "j3"]


def test_status_times_come_from_the_clock(core, clock):
    """A job's submitted, finished and elapsed times come from the injected clock."""
    clock.advance(10)
    w = add(core, "w1")
    job = core.submit("sum", [1, 2], chunks=1)
    clock.advance(2.5)
    w.answer_all()
    status = job.status()
    assert status["submitted"] == 10
    assert status["finished"] == 12.5
    assert status["elapsed"] == 2.5
    assert status["state"] == JobState.DONE
    assert status["running"] == 0
    assert status["queued"] == 0


def test_stats_counters(core, clock):
    """stats() counts jobs, sub-tasks and workers as they come and go."""
    clock.advance(7)
    w = add(core, "w1", slots=2)
    ok = core.submit("sum", [1, 2, 3, 4], chunks=4)
    failed = core.submit("sum", [1], chunks=1, options={"attempts": 1})
    cancelled = core.submit("sum", [1, 2], chunks=2)
    s = core.stats()
    assert s["jobs_submitted"] == 3
    assert s["jobs_active"] == 3
    assert s["subtasks_dispatched"] == 2
    assert s["subtasks_running"] == 2
    assert s["slots_busy"] == 2
    assert s["subtasks_queued"] == 5
    assert s["uptime"] == 7
    core.cancel(cancelled.id)
    while w.pending():
        sub, d = w.pending()[0]
        if sub.job == failed.id:
            d.errback(TaskFailed("ValueError", "bad"))
        else:
            w.answer(sub, d)
    assert ok.result == 10
    assert failed.state == JobState.FAILED
    assert cancelled.state == JobState.CANCELLED
    assert core.stats() == {
        "jobs_submitted": 3,
        "jobs_done": 1,
        "jobs_failed": 1,
        "jobs_cancelled": 1,
        "jobs_recovered": 0,
        "subtasks_dispatched": 5,
        "subtasks_completed": 4,
        "subtasks_requeued": 0,
        "subtasks_retried": 0,
        "subtasks_timed_out": 0,
        "subtasks_speculative": 0,
        "results_duplicate": 0,
        "results_late": 0,
        "workers_registered": 1,
        "workers_lost": 0,
        "jobs_active": 0,
        "jobs_held": 3,
        "subtasks_queued": 0,
        "subtasks_running": 0,
        "workers": 1,
        "slots": 2,
        "slots_busy": 0,
        "journal": False,
        "journal_ok": True,
        "uptime": 7,
    }


def test_tasks_view_counts_capable_workers(core, clock):
    """tasks_view lists each task with how many workers and slots can run it."""
    add(core, "a", slots=2, tasks=["sum", "sort"])
    add(core, "b", slots=3, tasks=["sum"])
    view = {t["name"]: t for t in core.tasks_view()}
    assert set(view) == {"sum", "primes", "wordcount", "sort", "sleep"}
    assert (view["sum"]["workers"], view["sum"]["slots"]) == (2, 5)
    assert (view["sort"]["workers"], view["sort"]["slots"]) == (1, 2)
    assert (view["primes"]["workers"], view["primes"]["slots"]) == (0, 0)
    assert view["wordcount"]["input"] == "text"
