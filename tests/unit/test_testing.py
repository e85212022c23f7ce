"""clusterd.testing: the fakes users' tests and ours drive the server and scheduler with."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.tasks import Registry, Task
from clusterd.testing import FakePool, FakeServer, LineConn, add_worker, result_of


def _split(xs, n):
    size = max(1, -(-len(xs) // n))
    return [xs[i : i + size] for i in range(0, len(xs), size)]


DOUBLE = Task(
    "double",
    split=_split,
    run=lambda xs: [2 * x for x in xs],
    combine=lambda parts: [x for part in parts for x in part],
)


def test_fake_server_runs_a_job_from_a_client_on_a_line_worker():
    """A job submitted on a FakeServer client runs on its LineWorker and WAIT answers it."""
    server = FakeServer(tasks=[DOUBLE])
    worker = server.worker("w1", tasks=["double"])
    client = server.client()
    assert client.greeting
    assert client.ask('SUBMIT double [1,2,3] {"chunks":1}') == ["OK j1"]
    assert worker.answer_all() == 1
    assert client.ask("WAIT j1") == ["RESULT j1 [2,4,6]"]
    server.close()


def test_fake_server_close_fails_on_a_leaked_timer():
    """FakeServer.close fails when a timer is left on its clock after every connection closed."""
    server = FakeServer()
    server.clock.callLater(5, lambda: None)
    with pytest.raises(AssertionError):
        server.close()


def test_fake_server_holds_replies_until_its_journal_flushes():
    """With MemoryJournal(hold=True) a SUBMIT is answered only once the journal flushes."""
    journal = MemoryJournal(hold=True)
    server = FakeServer(journal=journal)
    client = server.client()
    client.send('SUBMIT sum [1,2] {"chunks": 1}\n')
    assert client.lines() == []
    journal.flush()
    assert client.lines() == ["OK j1"]
    server.close()


def test_fake_worker_attached_to_a_scheduler_answers_with_the_real_task():
    """add_worker attaches a FakeWorker link; answering it completes the job with the real
    task's result."""
    core = Scheduler(Registry([DOUBLE]), Clock())
    w = add_worker(core, "w1", tasks=["double"])
    job = core.submit("double", [1, 2], 1)
    assert w.indices() == [0]
    assert w.answer_all() == 1
    assert result_of(job.wait()).result == [2, 4]


def test_fake_pool_records_runs_and_cancellations():
    """FakePool records each run, returns a Deferred the test fires, and records a cancel."""
    pool = FakePool()
    d = pool.run("sum", [1, 2])
    assert [(t, v) for t, v, _ in pool.pending()] == [("sum", [1, 2])]
    d.cancel()
    d.addErrback(lambda f: None)
    assert pool.cancelled == [0]
    with pytest.raises(AssertionError):
        FakePool(refuse=True).run("sum", [1])


def test_line_conn_speaks_lines_to_a_protocol():
    """LineConn sends a line and returns the whole lines written in answer."""
    server = FakeServer()
    c = LineConn(server.factory)
    assert c.ask("PING") == ["OK PONG"]
    assert json.loads(c.ask("TASKS")[0][3:])
    c.lose()
    c.lose()  # idempotent
    server.close()
