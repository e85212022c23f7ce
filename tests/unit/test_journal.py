"""Journal: durability gates, recovery after a restart, idempotent keys, retention, and the
SQLite journal's storage (round trip, group-commit thread, refusal of corrupt or foreign files)."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from helpers import QueueReactor, restart, result_of
from helpers import add_worker as add
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.jobs import JobState
from clusterd.core.journal import (
    ChunksAdded,
    JobAccepted,
    JobEnded,
    JournalError,
    MemoryJournal,
    ResultRecorded,
)
from clusterd.core.scheduler import Scheduler, TaskFailed
from clusterd.core.wire import ErrorCode, WireError
from clusterd.server.protocol import final_reply
from clusterd.server.sqlite_journal import SqliteJournal, _Forget
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS

# -- durability gates ----------------------------------------------------------------------------


def test_submit_appends_the_acceptance_lazily_and_the_end_urgently(registry, clock):
    """Nobody waits for a job's acceptance when it is appended (a RUN's client sees no id before
    the end; a SUBMIT's OK hurries the journal itself), so it may share its end's commit; the
    end is waited for, so it is not lazy."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    add(core, "w1")
    job = core.submit("sum", [1, 2], chunks=1)
    assert [type(r) for r in journal.lazy] == [JobAccepted]
    assert journal.lazy[0].job == job.id
    assert journal.hurried == 0


def test_a_job_is_durable_only_once_its_accepted_record_is_flushed(registry, clock):
    """when_durable fires only once the JobAccepted record is flushed, with every field recorded."""
    journal = MemoryJournal(hold=True)
    core = Scheduler(registry, clock, journal=journal)
    clock.advance(3)
    job = core.submit("sum", [1, 2, 3], chunks=2, options={"key": "k1"}, input_json="[1,2,3]")
    durable = job.when_durable()
    assert not durable.called
    assert journal.jobs == {}
    journal.flush()
    assert result_of(durable) is job
    assert journal.appended == [
        JobAccepted(
            "j1",
            1,
            "sum",
            "",
            2,
            {"timeout": None, "attempts": 3},
            "k1",
            3.0,
            streamed=True,
            cut_json="[[1,2],[3]]",
            sealed=2,
        ),
    ]
    assert result_of(job.when_durable()) is job  # a late subscriber is answered at once
    core.cancel(job.id)
    journal.flush()


def test_a_job_end_is_told_only_once_its_ended_record_is_durable(registry, clock):
    """A finished job's waiters fire only once its JobEnded record is flushed, after its results."""
    journal = MemoryJournal(hold=True)
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1, 2, 3, 4], chunks=2)
    waiter = job.wait()
    w.answer_all()
    assert job.state == JobState.DONE
    assert not waiter.called
    assert not job.settled
    journal.flush()
    assert result_of(waiter) is job
    assert [type(r).__name__ for r in journal.appended] == [
        "JobAccepted",
        "ResultRecorded",
        "ResultRecorded",
        "JobEnded",
    ]
    assert journal.appended[-1] == JobEnded("j1", "done", "10", None, 2, 0.0)
    assert core.stats()["journal"] is True


# -- recovery ------------------------------------------------------------------------------------


def test_finished_jobs_are_retrievable_after_a_restart(registry, clock):
    """Done, failed and cancelled jobs come back from the journal with their answers and errors,
    settled, so WAIT answers at once; nothing is dispatched for them."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=2)
    done = core.submit("sum", [1, 2, 3, 4], chunks=2)
    w.answer_all()
    failed = core.submit("sum", [5], chunks=1, options={"attempts": 1})
    w.calls[-1][1].errback(TaskFailed("ValueError", "bad"))
    cancelled = core.submit("sum", [6], chunks=1)
    core.cancel(cancelled.id)

    core2 = restart(registry, journal)
    assert core2.stats()["jobs_recovered"] == 0
    j = core2.get(done.id)
    assert (j.state, j.result_json, j.total) == (JobState.DONE, "10", 2)
    assert result_of(j.wait()) is j
    assert final_reply(j) == "RESULT j1 10"
    f = core2.get(failed.id)
    assert f.state == JobState.FAILED
    assert f.error == failed.error
    assert final_reply(f) == final_reply(failed)
    assert core2.get(cancelled.id).state == JobState.CANCELLED
    w2 = add(core2, "w2", slots=4)
    assert w2.calls == []
    assert core2.submit("sum", [1], chunks=1).id == "j4"  # ids continue after the journal's
    w2.answer_all()


def test_a_recovered_finished_job_reports_all_its_subtasks_done(registry, clock):
    """After a restart, STATUS of a job that had finished successfully still says done == total."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1, 2, 3, 4], chunks=2)
    w.answer_all()
    before = job.status()
    status = restart(registry, journal).get(job.id).status()
    assert (status["state"], status["done"], status["total"]) == ("done", 2, 2)
    for field in ("submitted", "finished", "elapsed", "running", "queued", "retrying"):
        assert status[field] == before[field], field


def test_an_unfinished_job_resumes_running_only_its_missing_subtasks(registry, clock):
    """After a restart an unfinished job keeps its recorded results, dispatches only the missing
    sub-tasks and combines the right answer."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=4)
    job = core.submit("sum", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], chunks=5)
    w.answer(*w.calls[0])
    w.answer(*w.calls[3])
    # Crash now: sub-tasks 1 and 2 in flight, 4 still queued.

    core2 = restart(registry, journal)
    assert core2.stats()["jobs_recovered"] == 1
    resumed = core2.get(job.id)
    assert resumed.state == JobState.RUNNING
    assert (resumed.done, resumed.recovered) == (2, 2)
    assert resumed.status()["recovered"] == 2
    w2 = add(core2, "w2", slots=4)
    assert w2.indices() == [1, 2, 4]
    assert [s.input for s, _ in w2.calls] == [[3, 4], [5, 6], [9, 10]]
    w2.answer_all()
    assert resumed.result == 55
    assert result_of(resumed.wait()).state == JobState.DONE
    assert resumed.ran_on == {"w2": 3}


def test_a_job_with_every_result_recorded_is_combined_at_recovery(registry, clock):
    """A job whose results were all durable but whose end was not is combined during recovery."""
    journal = MemoryJournal(hold=True)
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=2)
    job = core.submit("sum", [1, 2], chunks=2)
    w.answer_all()
    journal.pending = [(r, d) for r, d in journal.pending if not isinstance(r, JobEnded)]
    journal.flush()  # the crash lost only the JobEnded record
    core2 = restart(registry, journal)
    assert core2.get(job.id).state == JobState.DONE
    assert core2.get(job.id).result == 3
    assert core2.stats()["jobs_recovered"] == 1


def test_a_recovered_job_whose_task_is_gone_fails_with_task_missing(registry, clock):
    """An unfinished job whose task the restarted server no longer has fails with TASK_MISSING."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    job = core.submit("primes", {"stop": 100}, chunks=2)
    only_sum = Registry([t for t in TASKS if t.name == "sum"])
    core2 = restart(only_sum, journal)
    lost = core2.get(job.id)
    assert lost.state == JobState.FAILED
    assert lost.error["code"] == ErrorCode.TASK_MISSING
    assert result_of(lost.wait()) is lost


# -- idempotent keys -----------------------------------------------------------------------------


def test_a_key_makes_submit_idempotent(registry, clock):
    """Submitting again under the same key returns the same job, journals nothing new and
    dispatches nothing new; another key is another job."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=4)
    job = core.submit("sum", [1, 2], chunks=2, options={"key": "batch-1"})
    assert core.submit("sum", [1, 2], chunks=2, options={"key": "batch-1"}) is job
    assert {r.job for r in journal.appended} == {"j1"}  # one job's records, not two
    assert len(w.calls) == 2
    assert core.stats()["jobs_submitted"] == 1
    assert job.status()["key"] == "batch-1"
    other = core.submit("sum", [1, 2], chunks=2, options={"key": "batch-2"})
    assert other is not job
    w.answer_all()
    assert core.submit("sum", [9], options={"key": "batch-1"}) is job  # ended: still the answer
    assert job.result == 3


def test_a_key_is_still_honoured_after_a_restart(registry, clock):
    """A key submitted before a restart returns the recovered job, whether it ended or not."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=1)
    finished = core.submit("sum", [5], chunks=1, options={"key": "a"})
    w.answer_all()
    running = core.submit("sum", [1, 2], chunks=2, options={"key": "b"})
    core2 = restart(registry, journal)
    again = core2.submit("sum", [5], chunks=1, options={"key": "a"})
    assert (again.id, again.state, again.result_json) == (finished.id, JobState.DONE, "5")
    resumed = core2.submit("sum", [1, 2], chunks=2, options={"key": "b"})
    assert resumed.id == running.id
    assert resumed is core2.get(running.id)
    assert len(core2.jobs()) == 2
    add(core2, "w2", slots=2).answer_all()
    assert resumed.result == 3


# -- retention -----------------------------------------------------------------------------------


def test_expire_removes_old_jobs_from_the_journal_too(registry, clock):
    """Expiring an ended job forgets it in the journal, so it does not come back on restart."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal, retention=10)
    w = add(core, "w1")
    old = core.submit("sum", [1], chunks=1, options={"key": "k"})
    w.answer_all()
    clock.advance(5)
    young = core.submit("sum", [2], chunks=1)
    w.answer_all()
    clock.advance(6)
    assert core.expire() == 1
    assert set(journal.jobs) == {young.id}
    core2 = restart(registry, journal, at=11)
    with pytest.raises(WireError) as info:
        core2.get(old.id)
    assert info.value.code == ErrorCode.UNKNOWN_JOB
    assert core2.get(young.id).result_json == "2"
    assert core2.submit("sum", [3], chunks=1, options={"key": "k"}).id != old.id


def test_recovery_forgets_ended_jobs_already_past_retention(registry, clock):
    """Jobs that ended longer ago than the retention time are dropped from the journal at recovery."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal, retention=50)
    w = add(core, "w1")
    job = core.submit("sum", [1], chunks=1)
    w.answer_all()
    core2 = restart(registry, journal, at=51, retention=50)
    assert core2.jobs() == []
    assert journal.jobs == {}
    assert job.id not in journal.jobs


def test_job_ids_are_not_reused_after_expiry_and_a_restart(registry, clock):
    """A job id forgotten by expiry is never handed out again, even after a restart."""
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal, retention=1)
    w = add(core, "w1")
    first = core.submit("sum", [1], chunks=1)
    w.answer_all()
    clock.advance(2)
    assert core.expire() == 1
    core2 = restart(registry, journal)
    assert core2.submit("sum", [1], chunks=1).id != first.id


# -- SqliteJournal -------------------------------------------------------------------------------


def accepted(job: str, seq: int, **kw) -> JobAccepted:
    fields = dict(
        task="sum",
        input_json="[1,2]",
        chunks=2,
        options={"timeout": None, "attempts": 3},
        key=None,
        submitted=1.5,
    )
    fields.update(kw)
    return JobAccepted(job, seq, **fields)


def test_sqlite_journal_round_trip(tmp_path):
    """Accepted, result and ended records read back as written; a result is kept once, ended jobs
    drop their partial results, forget deletes, and next_seq survives forgetting the newest job."""
    path = str(tmp_path / "journal.db")
    j = SqliteJournal(path, reactor=None)
    ended = JobEnded("j2", "failed", None, {"code": "TASK_ERROR", "index": 0}, 2, 9.25)
    j._write(
        [
            accepted("j1", 1, key="k1", options={"timeout": 2.5, "attempts": 1}),
            ResultRecorded("j1", 1, '{"a":1}'),
            ResultRecorded("j1", 1, "999"),  # a second result for the index is ignored
            accepted("j2", 2),
            ResultRecorded("j2", 0, "3"),
            ended,
            accepted("j3", 3, input_json='"text"', chunks=1),
        ]
    )
    rec = j.load()
    assert rec.next_seq == 4
    by_id = {r.accepted.job: r for r in rec.jobs}
    assert [r.accepted.job for r in rec.jobs] == ["j1", "j2", "j3"]
    assert by_id["j1"].accepted == accepted(
        "j1", 1, key="k1", options={"timeout": 2.5, "attempts": 1}
    )
    assert by_id["j1"].results == {1: '{"a":1}'}
    assert by_id["j1"].ended is None
    assert by_id["j2"].ended == ended
    assert by_id["j2"].results == {}
    assert by_id["j3"].accepted.input_json == '"text"'
    j._write([_Forget(["j3", "j2"])])
    result_of(j.close())

    reopened = SqliteJournal(path, reactor=None)
    rec = reopened.load()
    assert [r.accepted.job for r in rec.jobs] == ["j1"]
    assert rec.next_seq == 4  # j3 is forgotten, its id is not reused
    result_of(reopened.close())


def test_sqlite_journal_writer_thread_commits_and_fires_on_the_reactor(tmp_path):
    """Records appended to a started journal are committed by its thread; their Deferreds and the
    close Deferred fire through callFromThread, and a new journal on the file reads them back."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor)
    j.start()
    ds = [j.append(accepted("j1", 1)), j.append(ResultRecorded("j1", 0, "3"))]
    j.forget(["nothing"])
    closed = j.close()
    j._thread.join(10)
    assert not j._thread.is_alive()
    assert not any(d.called for d in ds)  # nothing fires off the reactor thread
    reactor.run_calls()
    assert [result_of(d) for d in ds] == [None, None]
    assert result_of(closed) is None
    assert j.records == 3
    assert 1 <= j.commits <= 2

    rec = SqliteJournal(path, reactor).load()
    assert [(r.accepted.job, r.results) for r in rec.jobs] == [("j1", {0: "3"})]


def test_a_scheduler_recovers_from_an_sqlite_journal(tmp_path, registry, clock):
    """An unfinished job journaled to SQLite resumes after a restart with only its missing
    sub-tasks."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    journal = SqliteJournal(path, reactor)
    journal.start()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w1", slots=3)
    job = core.submit("sum", [1, 2, 3, 4, 5, 6], chunks=3)
    w.answer(*w.calls[1])
    closed = core.stop()
    journal._thread.join(10)
    reactor.run_calls()
    assert result_of(closed) is None
    assert result_of(job.when_durable()) is job

    journal2 = SqliteJournal(path, QueueReactor())
    core2 = restart(registry, journal2)
    w2 = add(core2, "w2", slots=3)
    assert w2.indices() == [0, 2]
    w2.answer_all()
    assert core2.get(job.id).result == 21
    result_of(journal2.close())


def test_a_corrupt_journal_file_is_refused(tmp_path):
    """A journal file that is not an SQLite database raises JournalError when opened."""
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not a database\x00\xff" * 500)
    with pytest.raises(JournalError) as info:
        SqliteJournal(str(path), reactor=None)
    assert str(path) in str(info.value)


def test_a_foreign_sqlite_database_is_refused(tmp_path):
    """An SQLite database that is not a clusterd journal raises JournalError, untouched."""
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError) as info:
        SqliteJournal(str(path), reactor=None)
    assert "not a clusterd journal" in str(info.value)
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["users"]


def test_a_journal_of_another_schema_version_is_refused(tmp_path):
    """A clusterd journal written with another schema version raises JournalError."""
    path = str(tmp_path / "journal.db")
    result_of(SqliteJournal(path, reactor=None).close())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError) as info:
        SqliteJournal(path, reactor=None)
    assert "schema 99" in str(info.value)


@pytest.mark.parametrize("sync, pragma", [("full", 2), ("normal", 1)])
def test_journal_sync_sets_sqlite_synchronous(tmp_path, sync, pragma):
    """--journal-sync picks SQLite's synchronous level (FULL=2 survives power loss, NORMAL=1 a
    process crash); anything else is refused."""
    j = SqliteJournal(str(tmp_path / "j.sqlite"), reactor=None, sync=sync)
    try:
        assert j._conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
    finally:
        j._conn.close()
    with pytest.raises(JournalError):
        SqliteJournal(str(tmp_path / "k.sqlite"), reactor=None, sync="sometimes")


def _commits_reach(j: SqliteJournal, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while j.commits < n and time.monotonic() < deadline:
        time.sleep(0.005)


def _run_job_in_one_commit(j: SqliteJournal) -> list:
    j.start()
    ds = [j.append(accepted("j1", 1, chunks=1), lazy=True)]
    ds.append(j.append(ResultRecorded("j1", 0, "3")))  # lazy by its type
    time.sleep(0.2)
    assert j.commits == 0  # nothing anybody waits for yet: the batch lingers
    ds.append(j.append(JobEnded("j1", "done", "3", None, 1, 2.0)))
    _commits_reach(j, 1)
    return ds


def test_a_lazy_acceptance_waits_for_its_end_and_shares_one_commit(tmp_path):
    """A RUN's acceptance and result linger until the end arrives; the three records are one
    transaction, written as one finished row without result rows."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=30.0)
    ds = _run_job_in_one_commit(j)
    assert j.commits == 1
    assert j.records == 3
    closed = j.close()
    j._thread.join(10)
    reactor.run_calls()
    assert [result_of(d) for d in ds] == [None, None, None]
    assert result_of(closed) is None
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM results").fetchone() == (0,)
    conn.close()
    rec = SqliteJournal(path, QueueReactor()).load()
    # An ended job's input is not kept: its row says so with an empty input.
    assert [(r.accepted, r.ended, r.results) for r in rec.jobs] == [
        (accepted("j1", 1, chunks=1, input_json=""), JobEnded("j1", "done", "3", None, 1, 2.0), {})
    ]
    assert rec.next_seq == 2


def test_a_lazy_record_is_committed_once_the_linger_runs_out(tmp_path):
    """With nothing urgent behind it, a lazy record is committed after ``linger`` anyway."""
    reactor = QueueReactor()
    j = SqliteJournal(str(tmp_path / "journal.db"), reactor, linger=0.05)
    j.start()
    d = j.append(accepted("j1", 1), lazy=True)
    _commits_reach(j, 1)
    assert j.commits == 1
    reactor.run_calls()
    assert result_of(d) is None
    result_of_close(j, reactor)


def test_hurry_commits_lazy_records_at_once(tmp_path):
    """hurry() (a SUBMIT waits for its id) ends the linger: the acceptance commits now."""
    reactor = QueueReactor()
    j = SqliteJournal(str(tmp_path / "journal.db"), reactor, linger=30.0)
    j.start()
    j.append(accepted("j1", 1), lazy=True)
    time.sleep(0.1)
    assert j.commits == 0
    j.hurry()
    _commits_reach(j, 1)
    assert j.commits == 1
    result_of_close(j, reactor)


def test_an_end_in_a_later_transaction_still_drops_the_jobs_results(tmp_path):
    """Only a job accepted in the same transaction skips the deletes; one accepted earlier has
    its result rows removed by its end, and results of a job ending in the same transaction are
    not written at all."""
    path = str(tmp_path / "journal.db")
    j = SqliteJournal(path, reactor=None)
    j._write([accepted("j1", 1), ResultRecorded("j1", 0, "1"), accepted("j2", 2)])
    j._write(
        [
            ResultRecorded("j1", 1, "2"),
            JobEnded("j1", "done", "3", None, 2, 4.0),
            ResultRecorded("j2", 0, "5"),
        ]
    )
    rows = j._conn.execute("SELECT job, idx FROM results ORDER BY job, idx").fetchall()
    assert rows == [("j2", 0)]
    by_id = {r.accepted.job: r for r in j.load().jobs}
    assert by_id["j1"].ended == JobEnded("j1", "done", "3", None, 2, 4.0)
    assert by_id["j2"].results == {0: "5"}
    result_of(j.close())


def result_of_close(j: SqliteJournal, reactor: QueueReactor) -> None:
    closed = j.close()
    j._thread.join(10)
    assert not j._thread.is_alive()
    reactor.run_calls()
    assert result_of(closed) is None


# -- a broken journal: failed writes, a second server, a deleted file ------------------------------


class FailingCommit:
    """Wraps the journal's connection: COMMITs fail as on a full disk. Like SQLite after some
    failed commits, it has already rolled the transaction back when it raises."""

    def __init__(self, conn: sqlite3.Connection, after: int = 0) -> None:
        self.conn = conn
        self.after = after  # COMMITs that still succeed

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            if self.after > 0:
                self.after -= 1
            else:
                self.conn.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def _logged(j: SqliteJournal) -> list[dict]:
    events: list[dict] = []
    j.log = Logger(namespace="test", observer=events.append)
    return events


def _settle(d) -> Exception | None:
    """What a fired Deferred carried: None on success, the exception on failure."""
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0].value if isinstance(out[0], Failure) else None


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_failed_commit_breaks_the_journal_for_good_with_the_commits_own_error(tmp_path):
    """A failed COMMIT fails its batch with the commit's own error (never a follow-up ROLLBACK's
    "no transaction is active"), logs it once, fails what was queued after it and every later
    append at once, and nothing appended after it is ever committed."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0)
    events = _logged(j)
    j._conn = FailingCommit(j._conn, after=1)
    j.start()
    first = j.append(accepted("j1", 1))
    _wait_for(lambda: j.commits == 1)
    lost = j.append(accepted("j2", 2))
    _wait_for(lambda: j.failure is not None)
    later = j.append(accepted("j3", 3))
    assert later.called  # at once, without touching the disk
    result_of_close(j, reactor)
    assert _settle(first) is None
    err = _settle(lost)
    assert isinstance(err, JournalError)
    assert err is j.failure
    assert _settle(later) is j.failure
    message = str(j.failure)
    assert message.startswith(f"journal {path} cannot be written: ")
    assert "database or disk is full" in message
    assert "no new work until restarted" in message
    assert "rollback" not in message
    assert [e["failure"] for e in events if e["log_level"].name == "critical"] == [message]
    reopened = SqliteJournal(path, QueueReactor())
    assert [r.accepted.job for r in reopened.load().jobs] == ["j1"]
    result_of(reopened.close())


def test_ids_are_never_reused_after_a_failed_write_and_a_restart(tmp_path, registry):
    """A restart after a failed write hands out no id that was ever committed, even when the
    newest committed jobs were forgotten before the failure."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0)
    j._write([accepted("j1", 1), accepted("j2", 2), accepted("j3", 3)])
    j._write([_Forget(["j2", "j3"])])
    j._conn = FailingCommit(j._conn)
    j.start()
    lost = j.append(accepted("j4", 4))
    _wait_for(lambda: j.failure is not None)
    result_of_close(j, reactor)
    assert isinstance(_settle(lost), JournalError)
    reopened = SqliteJournal(path, QueueReactor())
    core = restart(registry, reopened)
    assert core.submit("sum", [1], chunks=1).id == "j4"  # j1-j3 were committed; j4 never was
    result_of(reopened.close())


def test_a_second_journal_on_the_same_file_is_refused_naming_the_holder(tmp_path):
    """One journal serves one server: a second SqliteJournal on the path is refused with the
    lock file and the holder's pid, and the file is free again once the first is closed."""
    path = str(tmp_path / "journal.db")
    first = SqliteJournal(path, QueueReactor())
    with pytest.raises(JournalError) as refused:
        SqliteJournal(path, QueueReactor())
    assert str(refused.value) == (
        f"journal {path} is in use by another server (pid {os.getpid()}), which holds its lock "
        f"file {path}.lock; a journal serves one server at a time"
    )
    result_of(first.close())
    result_of(SqliteJournal(path, QueueReactor()).close())


@pytest.mark.parametrize("what", ["delete", "replace", "delete-wal", "delete-lock"])
def test_a_journal_deleted_or_replaced_while_running_breaks_it(tmp_path, what):
    """A journal file (or its WAL or lock file) deleted or replaced while the server runs is a
    failed write: the next batch fails, loudly, instead of committing to a file no restart
    reads."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0)
    events = _logged(j)
    j.start()
    first = j.append(accepted("j1", 1))
    _wait_for(lambda: j.commits == 1)
    if what == "replace":
        (tmp_path / "other.db").write_bytes(b"")
        os.replace(tmp_path / "other.db", path)
    else:
        os.unlink(
            {"delete": path, "delete-wal": path + "-wal", "delete-lock": path + ".lock"}[what]
        )
    lost = j.append(accepted("j2", 2))
    _wait_for(lambda: j.failure is not None)
    result_of_close(j, reactor)
    assert _settle(first) is None
    assert _settle(lost) is j.failure
    assert ("replaced" if what == "replace" else "deleted while the server ran") in str(j.failure)
    assert len([e for e in events if e["log_level"].name == "critical"]) == 1


def _size(path: str) -> int:
    """The journal's bytes on disk: the file, its WAL, and its jobs' input files (big results)."""
    files = [path, path + "-wal"]
    if os.path.isdir(path + "-inputs"):
        files += [os.path.join(path + "-inputs", n) for n in os.listdir(path + "-inputs")]
    return sum(os.path.getsize(p) for p in files if os.path.exists(p))


def test_a_finished_jobs_space_is_given_back_to_the_file_system(tmp_path):
    """A big job's input, sub-task inputs and results are dropped at its end, the free pages are
    returned and the WAL is truncated: the journal shrinks back to a small bound."""
    path = str(tmp_path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0, wal_limit=4 << 20)
    j.start()
    small = j.append(accepted("j1", 1, input_json="[1]", chunks=1))  # stays: it is unfinished
    big = "x" * (1 << 20)
    j.append(accepted("j2", 2, input_json=f'"{big * 10}"', chunks=10))
    j.append(ChunksAdded("j2", 0, tuple(f'"{big}"' for _ in range(10))))
    for i in range(10):
        j.append(ResultRecorded("j2", i, f'"{big}"'))
    j.hurry()
    _wait_for(lambda: j.records == 13)
    grown = _size(path)
    assert grown > 30 << 20
    checkpoints = j.checkpoints
    end = j.append(JobEnded("j2", "done", "1", None, 10, 3.0))
    _wait_for(lambda: j.vacuums == 1 and j.checkpoints > checkpoints)
    shrunk = _size(path)
    result_of_close(j, reactor)
    assert _settle(small) is None and _settle(end) is None
    assert shrunk < 1 << 20, (grown, shrunk)
    reopened = SqliteJournal(path, QueueReactor())
    jobs = {r.accepted.job: r for r in reopened.load().jobs}
    assert jobs["j1"].accepted.input_json == "[1]"
    assert jobs["j2"].accepted.input_json == ""
    assert jobs["j2"].ended.result_json == "1"
    result_of(reopened.close())


def test_a_journal_made_without_auto_vacuum_is_converted_once_on_open(tmp_path):
    """A journal file from before auto_vacuum gets it (one VACUUM at open), keeping its jobs."""
    path = str(tmp_path / "journal.db")
    j = SqliteJournal(path, QueueReactor())
    j._write([accepted("j1", 1)])
    result_of(j.close())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum=NONE")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    conn.close()
    reopened = SqliteJournal(path, QueueReactor())
    assert reopened._conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)
    assert [r.accepted.job for r in reopened.load().jobs] == ["j1"]
    result_of(reopened.close())


def test_a_big_commit_answers_its_waiters_a_few_hundred_per_reactor_turn(tmp_path):
    """A commit of 600 records fires its waiters in commit order, at most FIRE_PER_TURN per
    reactor turn, so answering a flood of SUBMITs never stalls other connections."""
    from clusterd.server.sqlite_journal import FIRE_PER_TURN

    class TurnReactor(QueueReactor, Clock):
        def __init__(self) -> None:
            QueueReactor.__init__(self)
            Clock.__init__(self)

    reactor = TurnReactor()
    j = SqliteJournal(str(tmp_path / "journal.db"), reactor=reactor)
    fired: list[int] = []
    ds = [j.append(accepted(f"j{n}", n)) for n in range(1, 601)]
    for n, d in enumerate(ds, 1):
        d.addCallback(lambda _, n=n: fired.append(n))
    j.start()
    closed = j.close()
    j._thread.join(10)
    reactor.run_calls()
    assert fired == list(range(1, FIRE_PER_TURN + 1))  # this turn's share
    assert len(reactor.getDelayedCalls()) == 1 and not closed.called  # the rest: next turns
    reactor.advance(0)
    assert fired == list(range(1, 601))
    assert result_of(closed) is None  # fired after every waiter, in order


def test_a_whole_inputs_cut_is_one_value_read_back_as_written(tmp_path, registry):
    """A job whose input came whole is journaled with its cut as one JSON array, and a restart
    resumes exactly that cut (not a new split) with its recorded results."""
    path = str(tmp_path / "journal.db")
    j = SqliteJournal(path, reactor=None)
    rec = JobAccepted(
        "j1",
        1,
        "sum",
        "",
        3,
        {"attempts": 1},
        None,
        0.0,
        True,
        cut_json="[[1,2],[3],[4]]",
        sealed=3,
    )
    j._write([rec, ResultRecorded("j1", 0, "3")])
    [back] = j.load().jobs
    assert back.accepted == rec and back.sealed == 3
    result_of(j.close())
    j2 = SqliteJournal(path, reactor=None)
    core = Scheduler(registry, Clock(), journal=j2)
    core.recover()
    job = core.get("j1")
    assert (job.total, job.done) == (3, 1)
    w = add(core, "w1", slots=2)
    w.answer_all()
    assert job.result == 10
    core.stop()


def test_a_note_calls_then_on_the_reactor_once_committed_and_never_if_it_failed(tmp_path):
    """A noted record's ``then`` runs on the reactor after its commit (a job's durable
    progress), and never for a record the journal failed to write."""
    reactor = QueueReactor()
    j = SqliteJournal(str(tmp_path / "journal.db"), reactor)
    j.start()
    seen: list[str] = []
    j.append(accepted("j1", 1))
    j.note(ResultRecorded("j1", 0, "3"), lambda: seen.append("r0"))
    closed = j.close()
    j._thread.join(10)
    assert seen == []  # nothing runs off the reactor thread
    reactor.run_calls()
    assert seen == ["r0"] and result_of(closed) is None
    broken = SqliteJournal(str(tmp_path / "other.db"), QueueReactor())
    broken.failure = JournalError("disk full")
    broken.note(ResultRecorded("j1", 1, "4"), lambda: seen.append("r1"))
    assert seen == ["r0"]
