"""The scheduler's side of issue 10: the cut is journaled, keys of unaccepted jobs are free,
counters never drift, and sub-tasks that make no progress are taken back."""

from __future__ import annotations

from helpers import add_worker, deterministic, result_of
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from clusterd.core.jobs import JobState
from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler, TaskFailed
from clusterd.core.wire import ErrorCode
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


def test_recovery_resumes_the_split_its_results_were_computed_for(registry):
    """A job split before a big worker registered (the default chunk count changed) resumes
    after a restart with exactly the journaled cut, so its recorded results combine right."""
    clock, journal = Clock(), MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    small = add_worker(core, "small", slots=1)
    value = list(range(1, 1001))
    pieces = core.prepare("sum", value, core.default_chunks("sum"))  # 4, on a thread
    big = add_worker(core, "big", slots=64)  # registers meanwhile: the default is now 256
    job = core.submit("sum", value, None, input_json="x", pieces=pieces)
    assert job.total == 4
    answered = 0
    for sub, d in small.pending() + big.pending():
        if answered < 3:
            small.answer(sub, d)
            answered += 1
    restarted = Scheduler(registry, Clock(), journal=journal)
    restarted.recover()
    again = restarted.get(job.id)
    assert again.total == 4 and again.done >= 1
    w2 = add_worker(restarted, "w2", slots=64)
    w2.answer_all()
    assert again.state == JobState.DONE
    assert again.result == sum(value)


def test_an_upload_cut_short_by_a_crash_frees_its_key(registry):
    """After a restart, a streamed job whose input never completed fails UPLOAD_INCOMPLETE and
    its key is free: retrying under the same key makes a new job."""
    clock, journal = Clock(), MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    job, upload = core.open_stream("sum", {"key": "K"})
    upload.feed([1, 2, 3], 8)
    restarted = Scheduler(registry, Clock(), journal=journal)
    restarted.recover()
    old = restarted.get(job.id)
    assert old.error["code"] == ErrorCode.UPLOAD_INCOMPLETE
    retry, upload2 = restarted.open_stream("sum", {"key": "K"})
    assert retry is not old and upload2 is not None


def test_a_key_of_an_accepted_job_still_names_it_after_a_restart(registry):
    """Idempotency holds across restarts for accepted jobs: the same key returns the job."""
    clock, journal = Clock(), MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    job = core.submit("sum", [1, 2], chunks=1, options={"key": "K"})
    restarted = Scheduler(registry, Clock(), journal=journal)
    restarted.recover()
    assert restarted.submit("sum", [1, 2], options={"key": "K"}).id == job.id


def _recount(core: Scheduler) -> dict[str, int]:
    live = [j for j in core.jobs() if not j.is_final]
    return {
        "subtasks_queued": sum(j.queued for j in live),
        "jobs_active": len(live),
        "subtasks_running": sum(w.busy for w in core.workers()),
        "slots": sum(w.slots for w in core.workers()),
    }


@deterministic
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_counters_always_equal_a_recount(ops):
    """Whatever happens (submits, answers, failures, cancels, workers coming and going), the
    O(1) counters behind admission and STATS equal a full recount."""
    clock = Clock()
    core = Scheduler(Registry(TASKS), clock, default_attempts=2, retry_base=0.5)
    workers = [add_worker(core, "w0", slots=2)]
    for n, op in enumerate(ops):
        if op == 0:
            core.submit("sum", list(range(n + 3)), chunks=3)
        elif op == 1 and workers and workers[-1].pending():
            workers[-1].answer_next()
        elif op == 2 and workers and workers[-1].pending():
            workers[-1].pending()[0][1].errback(TaskFailed("ValueError", "boom"))
        elif op == 3 and core.jobs():
            core.cancel(core.jobs()[n % len(core.jobs())].id)
        elif op == 4:
            workers.append(add_worker(core, f"x{n}", slots=1 + n % 3))
        elif op == 5 and workers:
            gone = workers.pop(0)
            core.remove_worker(next(h for h in core.workers() if h.name == gone.name))
            gone.lose_all()
        else:
            clock.advance(1)
        stats = core.stats()
        assert {k: stats[k] for k in _recount(core)} == _recount(core)
        assert core.queued_subtasks() == stats["subtasks_queued"]
    for w in workers:
        w.lose_all()
    for job in core.jobs():
        core.cancel(job.id)
    clock.advance(1000)


def test_a_wedged_worker_is_dropped_and_its_subtasks_run_elsewhere(registry):
    """A worker that takes sub-tasks and never answers any (yet answers PING) is dropped once
    the task's measured run time says they are overdue, and every sub-task it held runs on
    another worker, so the job finishes."""
    clock = Clock()
    core = Scheduler(registry, clock, stall_min=60.0, stall_factor=20.0)
    good = add_worker(core, "good", slots=1)
    wedged = add_worker(core, "wedged", slots=16)
    job = core.submit("sum", list(range(64)), chunks=16)
    assert len(wedged.pending()) >= 14
    good.answer_next()  # the task's run time is now known (about 0 s)
    clock.advance(59)
    assert core.check_stalls() == 0
    clock.advance(2)
    taken = core.check_stalls()
    assert taken >= 14 and wedged.closed == 1
    assert "wedged" not in {w.name for w in core.workers()}
    good.answer_all()
    assert job.state == JobState.DONE and job.result == sum(range(64))


def test_one_stalled_subtask_on_a_live_worker_fails_its_attempt(registry):
    """On a worker that keeps answering, a single sub-task far past its task's run time fails
    its attempt (TIMEOUT, type Stalled) and is retried; the worker stays."""
    clock = Clock()
    core = Scheduler(
        registry, clock, stall_min=10.0, stall_factor=2.0, default_attempts=2, retry_base=1.0
    )
    w = add_worker(core, "w", slots=2)
    job = core.submit("sum", list(range(30)), chunks=3)
    stuck_sub, _ = w.pending()[0]
    w.answer(*w.pending()[1])
    clock.advance(5)
    w.answer(*w.pending()[1])  # w answered 5 s ago: it is alive
    clock.advance(6)
    assert core.check_stalls() == 1
    assert w.closed == 0 and job.failures == {stuck_sub.index: 1}
    clock.advance(1)  # the retry's backoff
    w.answer_all()
    assert result_of(job.wait()).result == sum(range(30))


def test_nothing_stalls_before_a_task_has_a_measured_run_time(registry):
    """With no answer yet for a task (its run time unknown), nothing counts as stalled."""
    clock = Clock()
    core = Scheduler(registry, clock, stall_min=1.0)
    w = add_worker(core, "w", slots=4)
    core.submit("sum", list(range(8)), chunks=4)
    clock.advance(3600)
    assert core.check_stalls() == 0 and w.closed == 0
    w.lose_all()


def test_progress_counts_a_result_only_once_it_is_durable(registry):
    """STATUS's done (and WATCH's progress) counts a result only after its journal record
    commits, so progress a client saw never goes back after a crash; without a journal it
    counts at once."""
    journal = MemoryJournal(hold=True)
    core = Scheduler(registry, Clock(), journal=journal)
    worker = add_worker(core, "w1", slots=4)
    job = core.submit("sum", [1, 2, 3, 4], 4)
    journal.flush()
    seen: list[int] = []
    job.watch(lambda j: seen.append(j.progress()["done"]))
    for sub, d in worker.pending()[:3]:  # three of the four answered: the job goes on
        worker.answer(sub, d)
    assert job.done == 3 and core.job_status(job)["done"] == 0 and max(seen, default=0) == 0
    journal.flush()
    assert core.job_status(job)["done"] == 3 and seen[-1] == 3 and seen == sorted(seen)
    bare = Scheduler(registry, Clock())  # no journal: nothing to wait for
    w2 = add_worker(bare, "w2", slots=4)
    job2 = bare.submit("sum", [1, 2], 2)
    w2.answer_all()
    assert bare.job_status(job2)["done"] == 2
