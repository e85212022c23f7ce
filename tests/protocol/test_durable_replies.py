"""What a client is shown waits for the journal: ids, ends, cancels; a failed journal refuses.

These pin issue 10's items 2, 5 and 6 at the protocol: every reply that names an id or a final
state goes out only after the record behind it is durable, and a record that cannot be made
durable turns into ``ERR JOURNAL_ERROR`` (never the id, never the answer).
"""

from __future__ import annotations

import pytest
from test_server_protocol import _OPEN_WORKERS, Conn, WorkerConn, err_code, ok_json
from twisted.internet.task import Clock

from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.server.protocol import ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


@pytest.fixture
def clock():
    c = Clock()
    yield c
    open_workers = [w for w in _OPEN_WORKERS if not w.closed]
    _OPEN_WORKERS.clear()
    for w in open_workers:
        w.lose()
    assert c.getDelayedCalls() == []


@pytest.fixture
def journal():
    return MemoryJournal(hold=True)


@pytest.fixture
def factory(clock, journal):
    return ServerFactory(Scheduler(Registry(TASKS), clock, journal=journal))


def test_submit_on_a_failing_journal_gets_journal_error_not_an_id(factory, journal):
    """A SUBMIT whose acceptance cannot be committed gets ERR JOURNAL_ERROR with the disk's
    reason, never OK <id>; later SUBMITs are refused at once and use no id."""
    conn = Conn(factory)
    assert conn.ask("SUBMIT sum [1,2,3]") == []
    journal.break_with("journal j.sqlite cannot be written: No space left on device")
    [line] = conn.lines()
    assert err_code(line) == "JOURNAL_ERROR"
    assert "No space left on device" in line
    [line] = conn.ask("SUBMIT sum [4]")
    assert err_code(line) == "JOURNAL_ERROR"
    [line] = conn.ask("RUN sum [4]")
    assert err_code(line) == "JOURNAL_ERROR"
    assert ok_json(conn.ask("STATS")[0])["journal_ok"] is False


def test_a_run_whose_end_cannot_be_committed_gets_no_result(factory, journal):
    """A RUN whose job finished in memory but whose end could not be committed replies
    ERR JOURNAL_ERROR, and STATUS never shows it done."""
    worker = WorkerConn(factory, slots=2)
    conn = Conn(factory)
    assert conn.ask('RUN sum [1,2,3] {"chunks": 2}') == []
    journal.flush()
    worker.answer_all()
    assert conn.lines() == []
    journal.break_with("journal cannot be written: Read-only file system")
    [line] = conn.lines()
    assert err_code(line) == "JOURNAL_ERROR" and "Read-only" in line
    assert ok_json(Conn(factory).ask("STATUS j1")[0])["state"] == "running"


def test_cancel_is_acknowledged_only_once_durable(factory, journal):
    """CANCEL answers OK <job> cancelled only after the cancel record commits, and a waiting
    RUN hears CANCELLED at the same moment, not before."""
    runner, other = Conn(factory), Conn(factory)
    assert runner.ask("RUN sum [1,2,3]") == []
    journal.flush()
    assert other.ask("CANCEL j1") == []
    assert runner.lines() == []
    assert ok_json(Conn(factory).ask("STATUS j1")[0])["state"] == "queued"
    journal.flush()
    assert other.lines() == ["OK j1 cancelled"]
    assert runner.lines() == ["CANCELLED j1"]


def test_cancel_on_a_failing_journal_is_refused(factory, journal):
    """A CANCEL whose record cannot be committed gets ERR JOURNAL_ERROR, so a client never
    believes a job cancelled that a restart would resume."""
    conn = Conn(factory)
    assert conn.ask("SUBMIT sum [1,2,3]") == []
    journal.flush()
    assert conn.lines() == ["OK j1"]
    assert conn.ask("CANCEL j1") == []
    journal.break_with("journal cannot be written: Input/output error")
    [line] = conn.lines()
    assert err_code(line) == "JOURNAL_ERROR"


def test_cancelled_mid_upload_submit_waits_for_the_cancel_to_be_durable(factory, journal):
    """A streamed SUBMIT whose job was cancelled while its input arrived answers its id only
    once that cancel is durable."""
    conn = Conn(factory)
    assert conn.ask("SUBMIT sum @") == []
    journal.flush()
    other = Conn(factory)
    assert other.ask("CANCEL j1") == []
    conn.send("+[1,2]\n.\n")
    assert conn.lines() == []
    journal.flush()
    assert other.lines() == ["OK j1 cancelled"]
    assert conn.lines() == ["OK j1"]


def test_an_abandoned_upload_names_its_job_only_once_its_end_is_durable(factory, journal):
    """The ERR of a stream abandoned mid-way (it names the job) waits for the job's end to
    be durable."""
    conn = Conn(factory)
    assert conn.ask("SUBMIT sum @") == []
    journal.flush()
    assert conn.ask('+"not an array"') == []
    journal.flush()
    [line] = conn.lines()
    assert err_code(line) == "BAD_INPUT" and "j1 was abandoned" in line


def test_a_key_whose_upload_was_abandoned_is_free_for_the_retry(factory, journal):
    """Retrying an upload that was abandoned (here: the connection closed mid-stream) under the
    same key makes a new job, instead of returning the dead one."""
    first = Conn(factory)
    assert first.ask('SUBMIT sum @ {"key": "K"}') == []
    first.send("+[1,2]\n")
    first.lose()
    journal.flush()
    retry = Conn(factory)
    assert retry.ask('SUBMIT sum @ {"key": "K"}') == []
    retry.send("+[1,2]\n+[3]\n.\n")
    journal.flush()
    assert retry.lines() == ["OK j2"]
    assert ok_json(retry.ask("STATUS j2")[0])["key"] == "K"


def test_a_job_not_yet_durable_is_unknown_to_every_other_request(factory, journal):
    """Until its acceptance commits, a job's id exists nowhere a client can see it: STATUS and
    WAIT say UNKNOWN_JOB and JOBS does not list it (its id might never be kept)."""
    conn, other = Conn(factory), Conn(factory)
    assert conn.ask("SUBMIT sum [1,2,3]") == []
    assert err_code(other.ask("STATUS j1")[0]) == "UNKNOWN_JOB"
    assert err_code(other.ask("WAIT j1")[0]) == "UNKNOWN_JOB"
    assert ok_json(other.ask("JOBS")[0]) == []
    journal.flush()
    assert conn.lines() == ["OK j1"]
    assert [j["id"] for j in ok_json(other.ask("JOBS")[0])] == ["j1"]


def test_watch_counts_results_as_they_become_durable_even_when_the_end_comes_with_them(
    factory, journal
):
    """WATCH's PROGRESS lines count only durable results: none while the results wait for
    their commit, then every one of them, then the final line, even when the last results
    commit together with the job's end."""
    worker = WorkerConn(factory, slots=2)
    conn = Conn(factory)
    assert conn.ask('SUBMIT sum [1,2] {"chunks": 2}') == []
    journal.flush()
    assert conn.lines() == ["OK j1"]
    assert conn.ask("WATCH j1") == ['PROGRESS j1 {"done":0,"total":2}']
    worker.answer_all()  # both results and the end wait in the journal together
    assert conn.lines() == []
    assert ok_json(Conn(factory).ask("STATUS j1")[0])["done"] == 0
    journal.flush()
    assert conn.lines() == [
        'PROGRESS j1 {"done":1,"total":2}',
        'PROGRESS j1 {"done":2,"total":2}',
        "RESULT j1 3",
    ]
