"""Per-event costs that must not grow with the number of workers (issue 13, S1 at 10,000)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from clusterd.core.scheduler import Scheduler
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


def test_a_new_job_looks_only_at_workers_with_a_free_slot():
    """With every worker busy, a full dispatch pass for a new job reads no worker (the idle
    index is empty), and an answer puts just its worker back in the index."""
    clock, held = Clock(), []

    def runner(sub):
        d = Deferred()
        held.append(d)
        return d

    core = Scheduler(Registry(TASKS), clock)
    for k in range(200):
        core.add_worker(f"w{k}", ["sum"], 1, runner)
    core.submit("sum", list(range(200)), 200)
    clock.advance(0)
    assert len(held) == 200
    core.submit("sum", [1, 2], 2)  # a full pass: every worker is busy
    clock.advance(0)
    assert core._workers.idle == {}
    assert core._workers.with_free_slots() == []
    held[0].callback(0)
    clock.advance(0)
    assert len(held) == 201  # its worker took a sub-task of the waiting job
    held[1].callback(1)
    assert {w.name for w in core._workers.idle} <= {"w0", "w1"}  # only workers that answered


def test_a_worker_that_registers_is_offered_work_and_one_that_leaves_is_forgotten():
    """A new worker enters the idle index (and gets queued work); a removed one leaves it."""
    clock, held = Clock(), []
    core = Scheduler(Registry(TASKS), clock)
    core.submit("sum", [1, 2, 3], 3)
    core.add_worker("a", ["sum"], 2, lambda sub: held.append(sub) or Deferred())
    clock.advance(0)
    assert len(held) >= 2
    handle = core._workers.get("a")
    core.remove_worker(handle)
    assert handle not in core._workers.idle


def test_the_stall_check_skips_workers_whose_oldest_subtask_is_younger_than_stall_min():
    """check_stalls asks the retry policy only about workers holding a sub-task older than
    stall_min (no deadline is shorter), so a second's check over many busy workers stays cheap;
    a sub-task past its deadline is still taken back."""
    clock, held = Clock(), []

    def runner(sub):
        d = Deferred()
        held.append(d)
        return d

    core = Scheduler(Registry(TASKS), clock, stall_min=60.0, stall_factor=1.0)
    for k in range(50):
        core.add_worker(f"w{k}", ["sum"], 1, runner)
    core.submit("sum", [1], 1)
    clock.advance(0)
    held.pop().callback(1)  # the task's mean run time is now known (0 s)
    core.submit("sum", list(range(50)), 50)
    clock.advance(0)
    asked = []
    policy = core._exec.policy
    real = policy.stalled_on
    policy.stalled_on = lambda worker, now: asked.append(worker) or real(worker, now)
    clock.advance(30)
    assert core.check_stalls() == 0 and asked == []
    clock.advance(31)
    assert core.check_stalls() > 0 and len(asked) == 50
