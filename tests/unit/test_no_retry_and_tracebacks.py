"""A failed sub-task's traceback travels worker -> server -> client, and a task may mark an
exception as not worth retrying (ERROR ``"retry": false``): the retry policy fails the job at
once, while an ordinary failure is still retried ``attempts`` times."""

from __future__ import annotations

import json

import pytest
from helpers import add_worker as add

from clusterd.client.errors import JobFailed, RemoteTraceback, raise_for
from clusterd.core.errors import NotRetryable, TaskFailed, task_failed
from clusterd.core.jobs import JobState
from clusterd.core.messages import error_body
from clusterd.core.replies import final_reply
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import ErrorCode, ReplyReader
from clusterd.server.worker_session import answer_failure
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.worker.pool import PoolService

TB = 'Traceback (most recent call last):\n  File "m.py", line 3, in f\nValueError: bad\n'


def test_not_retryable_failure_fails_the_job_at_once(clock):
    """A failure the worker marked "retry": false fails its job on the first attempt."""
    core = Scheduler(Registry(TASKS), clock)
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1], chunks=1, options={"attempts": 5})
    [(_, d)] = w.calls
    d.errback(task_failed("ValueError", "bad", TB, retry=False))
    assert job.state == JobState.FAILED
    assert job.error["code"] == ErrorCode.TASK_ERROR
    assert job.error["attempts"] == 1 and job.error["traceback"] == TB
    assert len(w.calls) == 1


def test_ordinary_failure_is_still_retried_and_keeps_the_last_traceback(clock):
    """Without "retry": false a task failure is retried until attempts run out, and the
    FAILED error carries the last attempt's traceback."""
    core = Scheduler(Registry(TASKS), clock)
    w = add(core, "w1", slots=1)
    job = core.submit("sum", [1], chunks=1, options={"attempts": 2})
    w.calls[0][1].errback(task_failed("ValueError", "bad", "tb1"))
    assert job.state != JobState.FAILED
    clock.advance(60)
    w.calls[1][1].errback(task_failed("ValueError", "bad", "tb2"))
    assert job.state == JobState.FAILED
    assert (job.error["attempts"], job.error["traceback"]) == (2, "tb2")
    assert '"traceback":"tb2"' in final_reply(job)


def test_task_failed_kinds():
    """task_failed keeps the special kinds, and "retry": false only makes plain failures final."""
    assert type(task_failed("ValueError", "m")) is TaskFailed
    assert type(task_failed("ValueError", "m", retry=False)) is NotRetryable
    assert task_failed("ChildDied", "m", retry=False).code == ErrorCode.CHILD_DIED
    assert task_failed("E", "m", "tb").traceback == "tb"


def test_server_reads_traceback_and_retry_from_error_and_old_workers_still_work():
    """The server turns ERROR's traceback and "retry": false into the failure; an ERROR
    without them (an older worker) is an ordinary, retried failure with no traceback."""
    new = answer_failure({"id": 1, "type": "E", "message": "m", "traceback": TB, "retry": False})
    assert isinstance(new, NotRetryable) and new.traceback == TB
    old = answer_failure({"id": 1, "type": "E", "message": "m"})
    assert type(old) is TaskFailed and old.traceback == ""
    odd = answer_failure({"id": 1, "type": "E", "message": "m", "traceback": 5, "retry": 0})
    assert type(odd) is TaskFailed and odd.traceback == ""


def test_error_body_sends_traceback_and_retry_only_when_set():
    """ERROR carries traceback and "retry": false only when set, so old servers see no change."""
    body, _ = error_body(1, "j1", "E", "m", 10_000)
    assert json.loads(body) == {"id": 1, "job": "j1", "type": "E", "message": "m"}
    body, _ = error_body(1, "j1", "E", "m", 10_000, TB, retry=False)
    assert json.loads(body)["traceback"] == TB and json.loads(body)["retry"] is False


def test_error_body_shortens_the_traceback_head_first():
    """A traceback too long for the server's line loses its head, keeping the last frames and
    the whole message."""
    tb = "".join(f"  frame {i}\n" for i in range(5000)) + "ValueError: the end\n"
    body, size = error_body(1, "j1", "ValueError", "short", 2000, tb)
    assert size <= 2000
    msg = json.loads(body)
    assert msg["message"] == "short"
    assert msg["traceback"].startswith("(shortened)")
    assert msg["traceback"].endswith("ValueError: the end\n")


def test_pool_error_from_child_reply():
    """The pool turns a child's failure reply into a TaskError with traceback and retry."""
    e = PoolService.TaskError.from_reply({"type": "E", "message": "m", "traceback": TB})
    assert (e.type, e.message, e.traceback, e.retry) == ("E", "m", TB, True)
    assert PoolService.TaskError.from_reply({"retry": False}).retry is False


def test_job_failed_carries_the_remote_traceback():
    """The client's JobFailed names the remote type and message and carries the traceback,
    also as its __cause__ so an uncaught one prints it."""
    reply = ReplyReader().feed(
        'FAILED j3 TASK_ERROR {"type":"ValueError","message":"bad","traceback":'
        + json.dumps(TB)
        + "}"
    )
    with pytest.raises(JobFailed) as e:
        raise_for(reply)
    assert "ValueError: bad" in str(e.value)
    assert e.value.traceback == TB
    assert isinstance(e.value.__cause__, RemoteTraceback)
    assert "in f" in str(e.value.__cause__)
