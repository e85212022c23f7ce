"""Scheduler reliability: retries with backoff, timeouts, poison sub-tasks, lost workers, runners
that raise, cancellation of in-flight work, exactly-once results, speculation, limits, draining
and fairness, all with fake workers on a Clock."""

from __future__ import annotations

import pytest
from helpers import FakeWorker, result_of
from helpers import add_worker as add
from twisted.internet.defer import Deferred

from clusterd.core.errors import task_failed
from clusterd.core.jobs import JobState
from clusterd.core.scheduler import Scheduler, SchedulerConfig, SubTask, TaskFailed
from clusterd.core.wire import ErrorCode, WireError, parse_job_request
from clusterd.tasks import Registry, Task
from clusterd.tasks.builtins import TASKS


@pytest.fixture
def core(registry, clock):
    return Scheduler(registry, clock)


def handle(core: Scheduler, name: str):
    [h] = [w for w in core.workers() if w.name == name]
    return h


# -- retries -------------------------------------------------------------------------------------


def test_failed_attempts_are_retried_with_backoff_then_fail_with_the_last_error(core, clock):
    """A failing sub-task gets default_attempts (3) tries, 0.5 s then 1 s apart, then fails the job
    with the last attempt's error, its index, the attempts made and the worker."""
    assert core.config.default_attempts == 3
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1, 2], chunks=1)
    [(sub, d)] = w.calls
    assert sub.attempt == 1
    d.errback(TaskFailed("ValueError", "first"))
    assert job.state == JobState.RUNNING
    status = job.status()
    assert (status["retrying"], status["queued"], status["running"]) == (1, 0, 0)
    clock.advance(0.4)
    assert len(w.calls) == 1  # still backing off
    clock.advance(0.1)
    assert len(w.calls) == 2
    sub, d = w.calls[1]
    assert (sub.index, sub.attempt) == (0, 2)
    assert job.status()["retrying"] == 0
    d.errback(TaskFailed("ValueError", "second"))
    clock.advance(0.9)
    assert len(w.calls) == 2  # the second backoff is doubled
    clock.advance(0.1)
    sub, d = w.calls[2]
    assert (sub.index, sub.attempt) == (0, 3)
    d.errback(TaskFailed("KeyError", "third"))
    assert job.state == JobState.FAILED
    assert job.error == {
        "code": ErrorCode.TASK_ERROR,
        "type": "KeyError",
        "message": "third",
        "index": 0,
        "attempts": 3,
        "worker": "w1",
    }
    assert len(w.calls) == 3
    assert handle(core, "w1").failed == 3
    stats = core.stats()
    assert (stats["subtasks_retried"], stats["jobs_failed"]) == (2, 1)


def test_retry_backoff_doubles_up_to_the_cap(registry, clock):
    """Retry delays start at retry_base, double per failed attempt and never exceed retry_cap."""
    core = Scheduler(registry, clock, retry_base=10.0, retry_cap=25.0)
    w = add(core, "w1")
    job = core.submit("sum", [1], chunks=1, options={"attempts": 4})
    delays = []
    for _ in range(3):
        w.pending()[0][1].errback(TaskFailed("E", "x"))
        [call] = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [10.0, 20.0, 25.0]
    w.pending()[0][1].errback(TaskFailed("E", "x"))
    assert job.error["attempts"] == 4


def test_a_retry_that_succeeds_gives_the_right_answer(core, clock):
    """A sub-task that fails once and succeeds on its 2nd attempt completes the job with the right
    answer; only the accepted result counts as done on the worker."""
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1, 2, 3, 4], chunks=2)
    (sub0, d0), (sub1, d1) = w.calls
    d1.errback(TaskFailed("OSError", "flaky"))
    w.answer(sub0, d0)
    assert job.state == JobState.RUNNING
    clock.advance(0.5)
    [(sub, d)] = w.pending()
    assert (sub.index, sub.attempt, sub.input) == (1, 2, [3, 4])
    w.answer(sub, d)
    assert job.state == JobState.DONE
    assert result_of(job.wait()).result == 10
    assert job.failures == {}
    h = handle(core, "w1")
    assert (h.done, h.failed, h.busy) == (2, 1, 0)
    assert core.stats()["subtasks_retried"] == 1


def test_attempts_come_from_the_job_then_the_task_then_the_config(clock):
    """The job option `attempts` wins over Task.attempts, which wins over default_attempts."""
    reg = Registry(
        [*TASKS, Task("twice", lambda v, n: [v], lambda x: x, lambda rs: rs[0], attempts=2)]
    )
    core = Scheduler(reg, clock, config=SchedulerConfig(default_attempts=5))
    assert core.submit("sum", [1], chunks=1).options.attempts == 5
    assert core.submit("twice", 1).options.attempts == 2
    assert core.submit("twice", 1, options={"attempts": 7}).options.attempts == 7
    for job in core.jobs():
        core.cancel(job.id)


def test_a_null_attempts_option_means_the_default(core, clock):
    """`{"attempts": null}`, which the wire accepts, means the default number of tries (as
    `chunks: null` means the default chunk count): a failed attempt is retried, not a crash."""
    w = add(core, "w1")
    req = parse_job_request('sum [1,2] {"attempts": null}')
    job = core.submit(req.task, req.input, req.chunks, req.options)
    assert job.options.attempts == core.config.default_attempts
    w.calls[0][1].errback(TaskFailed("OSError", "flaky"))
    clock.advance(0.5)
    w.answer_all()
    assert job.result == 3


def test_child_died_on_the_last_attempt_is_code_child_died(core, clock):
    """A sub-task whose pool process died on its last attempt fails the job with CHILD_DIED."""
    w = add(core, "w1")
    job = core.submit("sum", [1], chunks=1, options={"attempts": 1})
    w.calls[0][1].errback(task_failed("ChildDied", "pool process died (signal 9)"))
    assert job.error == {
        "code": ErrorCode.CHILD_DIED,
        "type": "ChildDied",
        "message": "pool process died (signal 9)",
        "index": 0,
        "attempts": 1,
        "worker": "w1",
    }


# -- timeouts ------------------------------------------------------------------------------------


def test_a_subtask_past_its_timeout_is_cancelled_and_retried(core, clock):
    """A sub-task running longer than the job's timeout has its Deferred cancelled (slot freed),
    counts as a failed attempt and runs again after the backoff."""
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1, 2, 3], chunks=1, options={"timeout": 2})
    clock.advance(1.9)
    assert w.cancelled == []
    clock.advance(0.1)
    assert w.cancelled == [(job.id, 0)]
    assert handle(core, "w1").busy == 0
    assert core.stats()["subtasks_timed_out"] == 1
    assert job.status()["retrying"] == 1
    clock.advance(0.5)
    sub, d = w.pending()[0]
    assert sub.attempt == 2
    w.answer(sub, d)  # in time: its timeout timer is cancelled with it
    assert job.result == 6
    assert core.stats()["subtasks_timed_out"] == 1


def test_timing_out_on_every_attempt_fails_the_job_with_timeout(core, clock):
    """A sub-task that times out on every attempt fails its job with code TIMEOUT."""
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1], chunks=1, options={"timeout": 1, "attempts": 2})
    clock.advance(1)  # first attempt times out
    clock.advance(0.5)  # backoff
    clock.advance(1)  # second attempt times out
    assert job.state == JobState.FAILED
    assert job.error == {
        "code": ErrorCode.TIMEOUT,
        "type": "Timeout",
        "message": "sub-task ran longer than 1s",
        "index": 0,
        "attempts": 2,
        "worker": "w1",
    }
    assert w.cancelled == [(job.id, 0), (job.id, 0)]
    assert core.stats()["subtasks_timed_out"] == 2


def test_timeout_comes_from_the_job_then_the_task_then_the_config(clock):
    """The job option `timeout` wins over Task.timeout, which wins over default_timeout."""
    reg = Registry([*TASKS, Task("slow", lambda v, n: [v], lambda x: x, sum, timeout=3.0)])
    core = Scheduler(reg, clock, default_timeout=7.0)
    assert core.submit("sum", [1], chunks=1).options.timeout == 7.0
    assert core.submit("slow", 1).options.timeout == 3.0
    assert core.submit("slow", 1, options={"timeout": 0.5}).options.timeout == 0.5
    assert Scheduler(reg, clock).submit("sum", [1]).options.timeout is None
    for job in core.jobs():
        core.cancel(job.id)


# -- poison sub-tasks and cancellation -----------------------------------------------------------


def test_a_poison_subtask_fails_its_job_and_stops_its_dispatch_while_another_job_runs(core, clock):
    """A sub-task failing on every attempt fails its job, cancels the job's other in-flight
    sub-tasks and dispatches none of its queued ones, while another job keeps running."""
    w = add(core, "w1", slots=3)
    poison = core.submit("sum", [1, 2, 3, 4, 5, 6, 7, 8], chunks=4, options={"attempts": 2})
    other = core.submit("sum", [10, 20], chunks=2)
    assert w.indices(poison.id) == [0, 1, 2]
    w.calls[1][1].errback(TaskFailed("ValueError", "poison"))
    assert w.indices(other.id) == [0]  # the freed slot serves the other job
    clock.advance(0.5)  # the retry is due, but every slot is busy
    w.answer(*w.calls[3])  # other:0 done; the freed slot takes the retry
    assert w.calls[4][0] == SubTask(poison.id, 1, "sum", [3, 4], attempt=2)
    w.calls[4][1].errback(TaskFailed("ValueError", "poison again"))
    assert poison.state == JobState.FAILED
    assert poison.error["message"] == "poison again"
    assert (poison.error["index"], poison.error["attempts"]) == (1, 2)
    assert w.cancelled == [(poison.id, 0), (poison.id, 2)]
    assert w.indices(poison.id) == [0, 1, 2, 1]  # index 3 never ran
    assert w.indices(other.id) == [0, 1]
    w.answer_all()
    assert other.result == 30
    assert handle(core, "w1").busy == 0


def test_cancel_cancels_running_subtasks_frees_their_slots_and_drops_retry_timers(core, clock):
    """Cancelling a job cancels every in-flight sub-task at once (their slots go to other work
    immediately) and drops its pending retry timers."""
    w = add(core, "w1", slots=3)
    job = core.submit("sum", [1, 2, 3, 4, 5, 6], chunks=3)
    other = core.submit("sum", [7, 8], chunks=2)
    w.calls[2][1].errback(TaskFailed("E", "retry me"))  # index 2 now waits out a backoff
    assert w.calls[3][0].job == other.id
    assert len(clock.getDelayedCalls()) == 1
    core.cancel(job.id)
    assert w.cancelled == [(job.id, 0), (job.id, 1)]
    assert clock.getDelayedCalls() == []
    assert job.status()["retrying"] == 0
    assert w.indices(other.id) == [0, 1]  # a freed slot served the other job at once
    w.answer_all()
    assert other.result == 15
    assert core.stats()["jobs_cancelled"] == 1


# -- lost workers and runners that raise ---------------------------------------------------------


def test_worker_lost_requeues_at_once_without_counting_an_attempt(core, clock):
    """WorkerLost puts the sub-task straight back in line (no backoff) and is not an attempt."""
    w = add(core, "w1")
    job = core.submit("sum", [4], chunks=1, options={"attempts": 1})
    w.lose_all()
    assert job.state == JobState.RUNNING
    assert len(w.calls) == 2
    assert w.calls[1][0].attempt == 1
    w.answer_all()
    assert job.result == 4
    assert core.stats()["subtasks_retried"] == 0
    assert core.stats()["subtasks_requeued"] == 1


def test_a_subtask_losing_its_worker_more_than_max_lost_times_fails_with_worker_lost(core, clock):
    """A sub-task whose worker vanishes more than max_lost (5) times fails its job with
    WORKER_LOST, naming the index and the last worker."""
    assert core.config.max_lost == 5
    w = add(core, "w1")
    job = core.submit("sum", [1, 2], chunks=1)
    for n in range(5):
        w.lose_all()
        assert job.state == JobState.RUNNING
        assert len(w.calls) == n + 2
    w.lose_all()
    assert job.state == JobState.FAILED
    assert job.error == {
        "code": ErrorCode.WORKER_LOST,
        "type": "WorkerLost",
        "message": "sub-task 0 lost its worker 6 times",
        "index": 0,
        "worker": "w1",
    }
    assert len(w.calls) == 6
    assert core.stats()["subtasks_requeued"] == 5


def test_a_runner_that_raises_fails_the_job_with_bad_input_and_does_not_loop(core, clock):
    """A sub-task the runner cannot even send (it raises) fails its job at once with BAD_INPUT;
    it is tried exactly once and the worker goes on serving other jobs."""
    sent: list[SubTask] = []

    def runner(sub: SubTask) -> Deferred:
        sent.append(sub)
        if sub.input == [99]:
            raise ValueError("its DO line has 999 bytes; worker w1 accepts 100")
        return Deferred()

    core.add_worker("w1", ["sort"], 2, runner)
    job = core.submit("sort", [99, 1], chunks=2)
    assert job.state == JobState.FAILED
    assert job.error == {
        "code": ErrorCode.BAD_INPUT,
        "type": "ValueError",
        "message": "sub-task 0 cannot be sent to a worker: its DO line has 999 bytes; "
        "worker w1 accepts 100",
        "index": 0,
    }
    assert [(s.job, s.index) for s in sent] == [(job.id, 0)]
    assert handle(core, "w1").busy == 0
    fine = core.submit("sort", [2, 1], chunks=1)
    assert [(s.job, s.index) for s in sent] == [(job.id, 0), (fine.id, 0)]
    core.cancel(fine.id)


# -- exactly-once results ------------------------------------------------------------------------


def test_a_duplicate_result_is_counted_once_and_never_combined(registry, clock):
    """When a losing copy's result races its cancellation, the second result for that index is
    counted as a duplicate and the job combines the first result exactly once."""
    core = Scheduler(registry, clock, speculate=True)
    racing: list[Deferred] = []

    def slow_runner(sub: SubTask) -> Deferred:
        # Cancelling this copy cannot stop its (wrong, if combined) answer: it is on the wire.
        d: Deferred = Deferred(lambda d: d.callback(1000))
        racing.append(d)
        return d

    core.add_worker("slow", ["sum"], 4, slow_runner)
    job = core.submit("sum", [1, 2, 3, 4], chunks=4)
    spare = add(core, "spare", slots=1, tasks=["sum"])
    clock.advance(0.1)
    for d, value in zip(racing[:3], [1, 2, 3], strict=True):
        d.callback(value)
    clock.advance(0.9)
    assert core.speculate() == 1
    spare.answer_next()  # the backup wins; cancelling the slow copy delivers its result too
    assert job.result == 10
    assert job.duplicates == 1
    stats = core.stats()
    assert (stats["results_duplicate"], stats["subtasks_completed"]) == (1, 4)
    assert (handle(core, "slow").done, handle(core, "spare").done) == (3, 1)
    assert core.stats()["jobs_done"] == 1


def test_job_record_accepts_each_index_once():
    """Job.record stores the first result for an index and refuses (and counts) any later one."""
    from clusterd.core.jobs import Job

    job = Job("j1", "sum", [[1], [2]], 0.0)
    assert job.record(0, 1, "w1")
    assert not job.record(0, 99, "w2")
    assert job.results[0] == 1
    assert (job.done, job.duplicates, dict(job.ran_on)) == (1, 1, {"w1": 1})


# -- speculation ---------------------------------------------------------------------------------


def test_speculation_starts_a_backup_copy_on_an_idle_worker_and_the_first_result_wins(
    registry, clock
):
    """A sub-task running speculate_factor times its job's mean (and at least
    speculate_min_seconds) gets a backup copy on another free worker; the first result wins and
    the other copy is cancelled."""
    core = Scheduler(registry, clock, speculate=True)
    slow = add(core, "slow", slots=4)
    job = core.submit("sum", list(range(1, 9)), chunks=4)
    clock.advance(0.1)
    assert core.speculate() == 0  # nothing finished: no mean to compare with
    for _ in range(3):
        slow.answer_next()
    clock.advance(0.8)
    assert core.speculate() == 0  # index 3 has run 0.9 s: under speculate_min_seconds
    clock.advance(0.1)
    assert core.speculate() == 0  # a straggler, but only its own worker has free slots
    spare = add(core, "spare", slots=1)
    assert spare.calls == []
    assert core.speculate() == 1
    [(sub, d)] = spare.calls
    assert sub == SubTask(job.id, 3, "sum", [7, 8])
    assert core.speculate() == 0  # two copies already run
    assert job.status()["running"] == 2
    spare.answer(sub, d)
    assert job.result == 36
    assert slow.cancelled == [(job.id, 3)]
    assert (handle(core, "slow").busy, handle(core, "spare").busy) == (0, 0)
    assert job.ran_on == {"slow": 3, "spare": 1}
    assert core.stats()["subtasks_speculative"] == 1


def test_speculation_original_copy_winning_cancels_the_backup(registry, clock):
    """When the original copy answers before its backup, the backup is the one cancelled."""
    core = Scheduler(registry, clock, speculate=True, speculate_min_done=1)
    slow = add(core, "slow", slots=2)
    job = core.submit("sum", [1, 2], chunks=2)
    spare = add(core, "spare", slots=1)
    clock.advance(0.5)
    slow.answer_next()
    clock.advance(1.0)
    assert core.speculate() == 1
    slow.answer_next()
    assert job.result == 3
    assert spare.cancelled == [(job.id, 1)]
    assert handle(core, "spare").busy == 0


def test_speculation_goes_on_to_other_jobs_when_a_straggler_has_no_spare_worker(registry, clock):
    """A straggler no other free worker can run does not stop speculation for the other jobs'
    stragglers in the same pass."""
    core = Scheduler(registry, clock, speculate=True)
    slow = add(core, "slow", slots=8, tasks=["primes", "sum"])
    a = core.submit("primes", {"start": 0, "stop": 400}, chunks=4)
    b = core.submit("sum", list(range(1, 9)), chunks=4)
    spare = add(core, "spare", slots=1, tasks=["sum"])  # cannot run primes
    clock.advance(0.1)
    for sub, d in slow.pending():
        if sub.index != 3:
            slow.answer(sub, d)
    clock.advance(0.9)
    assert core.speculate() == 1
    [(sub, d)] = spare.calls
    assert (sub.job, sub.index) == (b.id, 3)
    spare.answer(sub, d)
    slow.answer_all()
    assert (a.result, b.result) == (78, 36)


def test_speculation_is_off_by_default(core, clock):
    """Without speculate=True no backup copies are started, however slow a sub-task is."""
    slow = add(core, "slow", slots=4)
    core.submit("sum", [1, 2, 3, 4], chunks=4)
    add(core, "spare", slots=1)
    for _ in range(3):
        slow.answer_next()
    clock.advance(1000)
    assert core.speculate() == 0
    slow.answer_all()


# -- limits, draining, fairness ------------------------------------------------------------------


def test_submit_is_busy_once_max_queued_subtasks_are_waiting(registry, clock):
    """A submit that would take the queued sub-tasks past max_queued is refused with BUSY (and no
    job or id is used up); the limit itself is fine, and dispatched work no longer counts."""
    core = Scheduler(registry, clock, max_queued=4)
    core.submit("sum", [1, 2, 3], chunks=3)
    with pytest.raises(WireError) as info:
        core.submit("sum", [1, 2], chunks=2)
    assert info.value.code == ErrorCode.BUSY
    assert "4" in info.value.message
    assert len(core.jobs()) == 1
    assert core.submit("sum", [1], chunks=1).id == "j2"
    w = add(core, "w1", slots=4)
    assert core.queued_subtasks() == 0
    job = core.submit("sum", [1, 2, 3, 4], chunks=4)
    w.answer_all()
    assert job.result == 10


def test_a_draining_worker_gets_nothing_new_but_finishes_what_it_holds(core, clock):
    """drain_worker stops new dispatches to a worker; the sub-task it holds still completes."""
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1, 2, 3, 4], chunks=4)
    h = handle(core, "w1")
    core.drain_worker(h)
    assert h.describe()["draining"] is True
    assert h.free == 0
    w.answer_next()
    w.answer_next()
    assert len(w.calls) == 2  # nothing new went to the draining worker
    assert job.done == 2
    other = add(core, "w2", slots=2)
    other.answer_all()
    assert job.result == 10


def test_a_newly_queued_job_is_served_before_the_job_served_last_gets_another_turn(core, clock):
    """A job queued while others run joins the ring just ahead of the job served last."""
    w = add(core, "w1", slots=1)
    a = core.submit("sum", list(range(10)), chunks=10)
    b = core.submit("sum", list(range(10)), chunks=10)
    w.answer_next()  # a:0 -> b:0 is served next
    c = core.submit("sum", list(range(10)), chunks=10)
    for _ in range(3):
        w.answer_next()
    order = [(s.job, s.index) for s, _ in w.calls]
    assert order == [(a.id, 0), (b.id, 0), (a.id, 1), (c.id, 0), (b.id, 1)]
    for job in (a, b, c):
        core.cancel(job.id)


def test_fake_worker_records_cancellation():
    """The FakeWorker helper records which sub-tasks the scheduler cancelled."""
    w = FakeWorker("w", Registry(TASKS))
    d = w.runner(SubTask("j1", 4, "sum", [1]))
    d.addErrback(lambda f: None)
    d.cancel()
    assert w.cancelled == [("j1", 4)]
