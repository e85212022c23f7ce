"""Behaviours fixed after review of the reliability work: queue limits ignore ended jobs, keys
are bound to a task, oversized results are not retried, journal failures are not silent, and
any whitespace separates a task from its input."""

from __future__ import annotations

import pytest
from helpers import add_worker as add
from twisted.internet.defer import fail

from clusterd.core.errors import task_failed
from clusterd.core.jobs import JobState
from clusterd.core.journal import JobAccepted, MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import ErrorCode, WireError, parse_job_request
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


def test_cancelled_jobs_do_not_count_towards_the_queue_limit(clock):
    """Undispatched sub-tasks of a cancelled job no longer count against max_queued."""
    core = Scheduler(Registry(TASKS), clock, max_queued=5)
    job = core.submit("sum", [1, 2, 3, 4, 5], chunks=5)
    with pytest.raises(WireError) as e:
        core.submit("sum", [1], chunks=1)
    assert e.value.code == ErrorCode.BUSY
    core.cancel(job.id)
    assert core.queued_subtasks() == 0
    assert core.submit("sum", [1, 2], chunks=2).total == 2


def test_a_key_names_one_task(clock):
    """Reusing a key for another task is refused rather than answered with an unrelated job."""
    core = Scheduler(Registry(TASKS), clock)
    first = core.submit("sum", [1], chunks=1, options={"key": "k"})
    assert core.submit("sum", [1], chunks=1, options={"key": "k"}) is first
    with pytest.raises(WireError) as e:
        core.submit("sort", [2, 1], chunks=1, options={"key": "k"})
    assert e.value.code == ErrorCode.BAD_REQUEST
    assert first.id in e.value.message


def test_result_too_large_fails_at_once_without_retries(clock):
    """A sub-task whose result cannot fit a line fails its job at once: retrying cannot help."""
    core = Scheduler(Registry(TASKS), clock)
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1], chunks=1, options={"attempts": 5})
    [(_, d)] = w.calls
    d.errback(task_failed("ResultTooLarge", "the result needs a 99-byte line"))
    assert job.state == JobState.FAILED
    assert job.error["code"] == ErrorCode.RESULT_TOO_LARGE
    assert len(w.calls) == 1


class _BrokenJournal(MemoryJournal):
    def append(self, record, lazy=False):
        if isinstance(record, JobAccepted):
            self.appended.append(record)
            return fail(OSError("disk full"))
        return super().append(record)


def test_a_job_the_journal_cannot_record_is_refused_never_shown(clock):
    """If the journal cannot record a job, the job fails with JOURNAL_ERROR, and whoever waits
    for its id or its end gets the journal's error, never the id or an answer."""
    core = Scheduler(Registry(TASKS), clock, journal=_BrokenJournal())
    job = core.submit("sum", [1, 2], chunks=1)
    assert job.state == JobState.FAILED
    assert job.error["code"] == ErrorCode.JOURNAL_ERROR
    durable: list = []
    job.when_durable().addErrback(durable.append)
    ended: list = []
    job.wait().addErrback(ended.append)
    assert [f.getErrorMessage() for f in durable + ended] == ["disk full", "disk full"]
    assert not job.accepted
    assert job.status()["state"] == JobState.QUEUED  # its end was never durable: not shown


def test_any_whitespace_separates_task_and_input():
    """A tab between the task name and its input is accepted like a space."""
    req = parse_job_request("sum\t[1,2]")
    assert (req.task, req.input) == ("sum", [1, 2])
