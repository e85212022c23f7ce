"""The scheduler's parts on their own: each policy object's decisions, deterministic (Clock)."""

from __future__ import annotations

import ast
import pathlib

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from clusterd.core import retry as r
from clusterd.core.admission import Admission, default_chunks
from clusterd.core.config import SchedulerConfig
from clusterd.core.dispatch import Dispatcher
from clusterd.core.endings import Backoffs
from clusterd.core.errors import ErrorCode, ResultTooLarge, TaskFailed, WireError, WorkerLost
from clusterd.core.jobs import Job, JobOptions, JobState, Tally
from clusterd.core.journal import (
    IJournal,
    JobAccepted,
    JobEnded,
    JobRecord,
    MemoryJournal,
    NullJournal,
)
from clusterd.core.recovery import ENDED, FAILED, RESUME, restore
from clusterd.core.ring import Prefetch, Ring, TaskTimes
from clusterd.core.scheduler import Scheduler
from clusterd.core.table import JobTable
from clusterd.core.uploads import IUploadSink, Upload
from clusterd.core.workers import Dispatch, WorkerHandle, WorkerRegistry
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


def job(job_id="j1", n=4, task="sum", attempts=3, timeout=None, tally=None) -> Job:
    return Job(job_id, task, list(range(n)), 0.0, JobOptions(timeout, attempts), tally)


def worker(name="w", slots=2, tasks=("sum",)) -> WorkerHandle:
    return WorkerHandle(name, frozenset(tasks), slots, lambda sub: Deferred())


# -- jobs -----------------------------------------------------------------------------------------


def test_job_owns_dispatch_failure_and_backoff_transitions():
    """A Job counts its running copies, failed attempts, lost workers and backoffs itself."""
    j = job()
    disp = Dispatch(j, j.take(), worker(), 0.0)
    assert j.dispatched(disp) == 1 and j.running == 1 and j.inflight == {0: [disp]}
    j.released(disp)
    assert j.running == 0 and j.inflight == {}
    assert j.attempt_failed(0) == 1 and j.attempt_failed(0) == 2 and j.worker_lost(0) == 1
    j.backing_off(0)
    assert j.status()["retrying"] == 1
    assert j.retry_due(0) and j.queued == 4 and j.status()["retrying"] == 0


def test_job_restored_end_is_settled_with_its_answer():
    """restore_end makes a Job the ended job a JobEnded record describes, settled at once."""
    j = job(n=0)
    j.restore_end(JobEnded("j1", JobState.DONE, "10", None, 4, 5.0))
    assert j.is_final and j.settled and j.done == 4 and j.result_json == "10"
    assert j.visible_state == JobState.DONE


# -- admission ------------------------------------------------------------------------------------


def test_admission_refuses_unknown_tasks_big_splits_and_full_queues():
    """Admission raises WireError with the documented codes for each refusal."""
    adm = Admission(Registry(TASKS), SchedulerConfig(max_subtasks=3, max_queued=5))
    cases = [
        (lambda: adm.task("nope"), ErrorCode.UNKNOWN_TASK),
        (lambda: adm.check_chunks(4), ErrorCode.TOO_MANY_SUBTASKS),
        (lambda: adm.split("sum", "not a list", 2), ErrorCode.BAD_INPUT),
        (lambda: adm.check_queue(4, 2), ErrorCode.BUSY),
        (lambda: adm.streamable("primes"), ErrorCode.BAD_REQUEST),
        (lambda: adm.check_journal(OSError("disk")), ErrorCode.JOURNAL_ERROR),
    ]
    for fn, code in cases:
        with pytest.raises(WireError) as e:
            fn()
        assert e.value.code == code
    assert adm.prepare("nope", [1], 2) is None and adm.prepare("sum", [1, 2], 2) == [[1], [2]]


def test_admission_frees_the_key_of_a_job_never_accepted():
    """A key names its job while that job was (or may be) accepted; once it ended unaccepted,
    the key is free, and a key reused for another task is refused."""
    adm = Admission(Registry(TASKS), SchedulerConfig())
    task = adm.task("sum")
    j = adm.new_job("j1", task, [[1]], {"key": "k"}, 0.0, Tally())
    assert adm.keyed("k", "sum") is j
    with pytest.raises(WireError):
        adm.keyed("k", "sort")
    j.finish(JobState.FAILED, 1.0)
    j.not_durable(WireError("X", "never accepted"))
    assert adm.keyed("k", "sum") is None and "k" not in adm.keys


def test_default_chunks_follow_slots():
    """With no workers a job gets 16 chunks, else 4 per slot, at most 256."""
    assert (default_chunks(0), default_chunks(3), default_chunks(1000)) == (16, 12, 256)


def test_upload_drives_a_narrow_sink():
    """An Upload calls only grow/seal/abandon of its IUploadSink: no scheduler needed."""
    from clusterd.core.streaming import Cutter

    calls = []

    class Sink:
        config = SchedulerConfig(max_input_bytes=100)

        def grow(self, job, inputs):
            calls.append(("grow", list(inputs)))

        def seal(self, job):
            calls.append(("seal",))

        def abandon(self, job, code, message):
            calls.append(("abandon", code))

    j = job(n=0)
    up = Upload(Sink(), j, Registry(TASKS).get("sum"), Cutter("list", 2))
    up.feed([1, 2, 3], 7)
    up.end()
    assert calls == [("grow", [[1, 2]]), ("grow", [[3]]), ("seal",)]
    with pytest.raises(WireError) as e:
        up.feed([1], 200)
    assert e.value.code == ErrorCode.INPUT_TOO_LARGE
    assert verifyObject(IUploadSink, Scheduler(Registry(TASKS), Clock()))


# -- ring and prefetch ----------------------------------------------------------------------------


def test_ring_serves_a_newcomer_before_the_job_served_last():
    """A job joining the ring goes just ahead of the job served last (round-robin)."""
    ring, w = Ring(), worker(slots=100)
    big, small = job("j1", n=10), job("j2", n=1)
    ring.add(big)
    assert ring.next_for(w, lambda w, j: 100) is big
    big.take()
    ring.add(small)
    assert ring.next_for(w, lambda w, j: 100) is small
    small.take()
    assert ring.next_for(w, lambda w, j: 100) is big
    assert len(ring) == 2  # small leaves when its turn comes round with nothing queued
    assert ring.next_for(w, lambda w, j: 100) is big and len(ring) == 1


def test_ring_skips_jobs_the_worker_cannot_run_or_hold():
    """next_for passes over jobs of other tasks and jobs whose limit the worker reached."""
    ring, w = Ring(), worker(tasks=("sum",))
    ring.add(job("j1", task="sort"))
    assert ring.next_for(w, lambda w, j: 2) is None
    ring.add(job("j2"))
    w.busy = 2
    assert ring.next_for(w, lambda w, j: 2) is None
    assert ring.next_for(w, lambda w, j: 3).id == "j2"


def test_prefetch_deepens_only_for_short_subtasks_without_timeout():
    """Prefetch: slots for unknown or long sub-tasks or a timeout; slots x depth for short."""
    times = TaskTimes()
    p = Prefetch(SchedulerConfig(), times)
    w = worker(slots=2)
    w.prefetch = 256
    assert p.limit(w, job()) == 2  # nothing known yet
    times.note("sum", 0.001)
    assert p.limit(w, job()) == 2 * 50  # 50 ms window / 1 ms
    assert p.limit(w, job(timeout=5.0)) == 2
    times.note("sum", 1.0)
    assert times.mean("sum") == pytest.approx(0.001 + 0.1 * 0.999)


# -- retry ----------------------------------------------------------------------------------------


def test_retry_policy_decides_by_failure_kind():
    """Cancelled: ignore; WorkerLost: requeue (not an attempt); TaskFailed: retry with
    backoff; ResultTooLarge: fail at once; a timeout: retry, counted as timed out."""
    policy = r.RetryPolicy(SchedulerConfig(), TaskTimes())
    j = job(attempts=3)
    assert policy.on_failure(Failure(CancelledError()), j, 0, "w").action == r.IGNORE
    lost = policy.on_failure(Failure(WorkerLost()), j, 0, "w")
    assert (lost.action, lost.charge) == (r.REQUEUE, r.LOST)
    task = policy.on_failure(Failure(TaskFailed("ValueError", "x")), j, 0, "w")
    assert (task.action, task.delay, task.error["code"]) == (r.RETRY, 0.5, ErrorCode.TASK_ERROR)
    big = policy.on_failure(Failure(ResultTooLarge("ResultTooLarge", "x")), j, 0, "w")
    assert big.action == r.FAIL and big.error["code"] == ErrorCode.RESULT_TOO_LARGE
    assert policy.on_failure(Failure(TimeoutError()), j, 0, "w").why == "timeout"


def test_retry_policy_fails_the_job_when_attempts_or_lost_run_out():
    """The last attempt fails the job with index and attempts; so does one loss too many."""
    policy = r.RetryPolicy(SchedulerConfig(max_lost=1, retry_cap=0.7), TaskTimes())
    j = job(attempts=2)
    j.attempt_failed(1)
    last = policy.on_failure(Failure(TaskFailed("E", "m")), j, 1, "w")
    assert last.action == r.FAIL and last.error["attempts"] == 2 and last.error["index"] == 1
    j.worker_lost(2)
    gone = policy.on_failure(Failure(WorkerLost()), j, 2, "w")
    assert gone.action == r.FAIL and gone.error["code"] == ErrorCode.WORKER_LOST
    assert [policy.backoff(n) for n in (1, 2, 3)] == [0.5, 0.7, 0.7]


def test_stall_choice_takes_back_a_subtask_or_the_wedged_worker():
    """stalled_on: nothing before the deadline, the sub-task when the worker answers
    otherwise, everything it holds when it answered nothing for the deadline."""
    times = TaskTimes()
    times.note("sum", 1.0)
    policy = r.RetryPolicy(SchedulerConfig(stall_min=10.0, stall_factor=2.0), times)
    w, j = worker(), job()
    disp = Dispatch(j, j.take(), w, 0.0)
    w.dispatches[disp] = None
    assert policy.stall_limit(j) == 10.0 and policy.stalled_on(w, 9.0) is None
    w.last_answer = 5.0
    assert policy.stalled_on(w, 12.0) == ("subtask", [disp])
    assert policy.stalled_on(w, 15.0) == ("worker", [disp])
    assert policy.on_stall(j, disp.index, "w", "worker").action == r.REQUEUE


def test_straggler_choice_needs_a_trusted_mean_and_a_spare_worker():
    """straggling names only copies that ran speculate_factor x the mean once the job has
    nothing queued; spare_for picks the freest other worker that runs the task."""
    policy = r.RetryPolicy(SchedulerConfig(speculate_min_done=1), TaskTimes())
    slow, idle = worker("slow"), worker("idle", slots=3)
    j = job(n=2)
    first, second = Dispatch(j, j.take(), slow, 0.0), Dispatch(j, j.take(), slow, 0.0)
    j.dispatched(first), j.dispatched(second)
    j.record(first.index, 1, "slow", 1.0)
    j.released(first)
    assert policy.straggling(j, 2.0) == [] and policy.straggling(j, 3.0) == [(1, slow)]
    assert policy.spare_for([slow, idle], "sum", slow) is idle
    assert policy.spare_for([slow], "sum", slow) is None


# -- backoffs and dispatch ------------------------------------------------------------------------


def test_backoffs_fire_on_the_clock_and_die_with_the_job():
    """A retry timer calls back after its delay; a job's end cancels the rest."""
    clock, due = Clock(), []
    b, j = Backoffs(clock), job()
    b.start(j, 0, 1.0, lambda job, i: due.append(i))
    b.start(j, 1, 2.0, lambda job, i: due.append(i))
    clock.advance(1.0)
    b.cancel(j)
    clock.advance(5.0)
    assert due == [0] and not clock.getDelayedCalls()


def test_dispatcher_yields_through_next_turn_after_the_per_turn_budget():
    """The loop sends at most dispatch_per_turn, then continues when next_turn runs."""
    turns, sent = [], []
    ring, reg = Ring(), WorkerRegistry()
    reg.add(worker(slots=5))
    ring.add(job(n=5))

    def send(w, j, i):
        w.busy += 1
        sent.append(i)

    d = Dispatcher(ring, reg, lambda w, j: w.slots, send, turns.append, SchedulerConfig())
    d.config.dispatch_per_turn = 2
    d.pump()
    assert sent == [0, 1] and len(turns) == 1
    turns.pop()()
    assert sent == [0, 1, 2, 3] and len(turns) == 1


def test_scheduler_takes_an_injected_next_turn():
    """Scheduler(next_turn=...) yields through it instead of a callLater(0) on its clock."""
    clock, turns = Clock(), []
    core = Scheduler(Registry(TASKS), clock, next_turn=turns.append, dispatch_per_turn=1)
    core.add_worker("w", ["sum"], 4, lambda sub: Deferred())
    core.submit("sum", [1, 2, 3], 3)
    assert core.stats()["subtasks_running"] == 1 and len(turns) == 1
    assert not clock.getDelayedCalls()


def test_worker_registry_counts_slots_per_task():
    """The registry keeps slots and workers per task as workers come and go."""
    reg, a, b = WorkerRegistry(), worker("a", 2, ("sum", "sort")), worker("b", 3)
    reg.add(a), reg.add(b)
    assert (reg.slots, reg.task_slots["sum"], reg.task_workers["sort"]) == (5, 5, 1)
    reg.remove(a)
    assert (reg.slots, reg.task_slots["sum"], "sort" in reg.task_workers) == (3, 3, False)


# -- recovery, table, journal ---------------------------------------------------------------------


def accepted(job_id="j1", streamed=True, inputs=("[1]", "[2]")) -> JobAccepted:
    return JobAccepted(
        job_id,
        1,
        "sum",
        "",
        len(inputs),
        {"attempts": 2},
        None,
        0.0,
        streamed,
        sealed=len(inputs),
    )


def test_restore_resumes_ended_failed_and_expired_jobs():
    """restore: an unfinished job resumes with its results; an ended one is settled; one
    ended before the horizon is dropped; a missing task fails with TASK_MISSING."""
    split = Admission(Registry(TASKS), SchedulerConfig()).split
    rec = JobRecord(accepted(), results={0: "1"}, chunks={0: "[1]", 1: "[2]"}, sealed=2)
    back = restore(rec, 0.0, lambda t: True, split, Tally())
    assert back.action == RESUME and back.job.done == 1 and back.job.queued == 1
    assert restore(rec, 0.0, lambda t: False, split, Tally()).error["code"] == (
        ErrorCode.TASK_MISSING
    )
    rec.ended = JobEnded("j1", JobState.DONE, "3", None, 2, 5.0)
    assert restore(rec, 0.0, lambda t: True, split, Tally()).action == ENDED
    assert restore(rec, 6.0, lambda t: True, split, Tally()) is None
    rec.ended, rec.sealed = None, None
    failed = restore(rec, 0.0, lambda t: True, split, Tally())
    assert failed.action == FAILED and failed.error["code"] == ErrorCode.UPLOAD_INCOMPLETE


def test_job_table_pages_newest_first_and_expires_settled_jobs():
    """page(limit, before) lists recorded jobs newest first; expired() takes settled old ones."""
    t = JobTable()
    for n in range(1, 5):
        j = t.jobs[f"j{n}"] = job(f"j{n}")
        j.recorded = True
    assert [j.id for j in t.page(2)] == ["j4", "j3"]
    assert [j.id for j in t.page(5, "j3")] == ["j2", "j1"]
    t.jobs["j1"].finish(JobState.DONE, 1.0)
    t.jobs["j1"].settle()
    assert [j.id for j in t.expired(2.0)] == ["j1"] and "j1" not in t.jobs


def test_journals_provide_ijournal(tmp_path):
    """Null, Memory and SQLite journals provide the IJournal zope interface, stop included."""
    from clusterd.server.sqlite_journal import SqliteJournal

    sqlite = SqliteJournal(str(tmp_path / "j.db"), Clock())
    for journal in (NullJournal(), MemoryJournal(), sqlite):
        assert verifyObject(IJournal, journal)
        assert journal.stop().called


def test_core_modules_stay_small():
    """Every module under clusterd/core (but the wire layer's) and clusterd/tasks is under
    400 lines, every function under 60."""
    root = pathlib.Path(__file__).resolve().parents[2] / "clusterd"
    wire = {"wire.py", "framing.py", "streaming.py", "jsoncodec.py", "auth.py"}
    paths = [p for p in (root / "core").glob("*.py") if p.name not in wire]
    for path in paths + list((root / "tasks").glob("*.py")):
        src = path.read_text()
        assert src.count("\n") < 400, path
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, (path, node.name)
