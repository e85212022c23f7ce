"""The journal on real faults: a full disk, a file system gone read-only, a second server on the
same journal, and a journal deleted under a running server.

Disk faults use real file systems (``diskfaults``: a 2 MiB tmpfs, a loop-mounted ext4 image);
they skip only where the kernel refuses to mount. Every wait has a deadline and every fill loop a
fixed bound.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from diskfaults import ext4_image, small_tmpfs  # noqa: F401 - fixtures
from helpers import QueueReactor
from twisted.python.failure import Failure

from clusterd.client.errors import ClusterError
from clusterd.core.journal import JobAccepted, JournalError
from clusterd.launch import LocalCluster, twistd_path
from clusterd.server.sqlite_journal import SqliteJournal

pytestmark = pytest.mark.integration

LOOPBACK = "tcp:0:interface=127.0.0.1"


def accepted(job: str, seq: int, input_json: str = "[1]") -> JobAccepted:
    return JobAccepted(job, seq, "sum", input_json, 1, {}, None, 1.0)


def outcome(d) -> Exception | None:
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0].value if isinstance(out[0], Failure) else None


def append_and_wait(j: SqliteJournal, reactor: QueueReactor, record) -> Exception | None:
    """Append one urgent record and wait (bounded) until the writer answered it."""
    d = j.append(record)
    deadline = time.monotonic() + 30
    while not d.called:
        assert time.monotonic() < deadline, "the journal writer did not answer"
        time.sleep(0.005)
        reactor.run_calls()
    return outcome(d)


def close(j: SqliteJournal, reactor: QueueReactor) -> None:
    closed = j.close()
    if j._thread is not None:
        j._thread.join(30)
    reactor.run_calls()
    assert outcome(closed) is None


def fill(directory: Path) -> None:
    """Fill a file system to the last byte (bounded by its size)."""
    with open(directory / "filler", "wb") as f:
        try:
            for _ in range(10_000):
                f.write(b"\0" * 65536)
                f.flush()
            raise AssertionError(f"{directory} never filled up")
        except OSError:
            pass
    with open(directory / "filler-small", "wb", buffering=0) as f:
        try:
            for _ in range(65536):
                f.write(b"\0" * 512)
        except OSError:
            pass


# -- SqliteJournal on real file systems ------------------------------------------------------------


def test_a_journal_filling_a_small_tmpfs_breaks_for_good_with_no_space_left(small_tmpfs):  # noqa: F811
    """On a 2 MiB tmpfs that fills up, the failed write latches ``failure`` with the OS's reason,
    every later append fails at once, and after space is freed a restart recovers exactly the
    committed jobs and hands out no id any of them had."""
    path = str(small_tmpfs.path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0)
    j.start()
    committed = []
    payload = '"' + "x" * 60_000 + '"'
    for seq in range(1, 200):  # 200 x 60 KB is far more than 2 MiB
        error = append_and_wait(j, reactor, accepted(f"j{seq}", seq, payload))
        if error is not None:
            break
        committed.append(f"j{seq}")
    else:
        raise AssertionError("the 2 MiB tmpfs never filled up")
    assert committed, "not even one job fitted"
    assert error is j.failure
    assert "No space left on device" in str(j.failure)
    assert str(j.failure).startswith(f"journal {path} cannot be written: ")
    later = j.append(accepted("late", 999))
    assert later.called and outcome(later) is j.failure
    close(j, reactor)

    small_tmpfs.resize(64 << 20)
    reopened = SqliteJournal(path, QueueReactor())
    recovered = reopened.load()
    assert [r.accepted.job for r in recovered.jobs] == committed
    assert recovered.next_seq == len(committed) + 1
    close(reopened, QueueReactor())


def test_a_full_disk_refuses_the_journal_at_open(small_tmpfs):  # noqa: F811
    """A journal that cannot be written at open (the disk is full) is refused with the OS's
    reason, instead of failing at the first job."""
    fill(small_tmpfs.path)
    with pytest.raises(JournalError, match="No space left on device"):
        SqliteJournal(str(small_tmpfs.path / "journal.db"), QueueReactor())


def test_a_journal_on_a_file_system_gone_read_only_breaks_with_the_os_reason(ext4_image):  # noqa: F811
    """When the file system under a running journal goes read-only, the next write latches
    ``failure`` saying "Read-only file system", later appends fail at once, and the journal
    cannot be opened again there."""
    path = str(ext4_image.path / "journal.db")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0)
    j.start()
    assert append_and_wait(j, reactor, accepted("j1", 1)) is None
    ext4_image.fail_read_only()
    error = append_and_wait(j, reactor, accepted("j2", 2))
    assert error is j.failure
    assert "Read-only file system" in str(j.failure)
    assert "rollback" not in str(j.failure)
    later = j.append(accepted("j3", 3))
    assert later.called and outcome(later) is j.failure
    close(j, reactor)
    with pytest.raises(JournalError, match="Read-only file system"):
        SqliteJournal(path, QueueReactor())


def test_a_read_only_file_system_refuses_the_journal_at_open(ext4_image):  # noqa: F811
    """An existing journal, or a new one, on a file system mounted read-only is refused at open
    with the OS's reason."""
    path = str(ext4_image.path / "journal.db")
    j = SqliteJournal(path, QueueReactor())
    j._write([accepted("j1", 1)])
    close(j, QueueReactor())
    ext4_image.remount_read_only()
    for p in (path, str(ext4_image.path / "new.db")):
        with pytest.raises(JournalError, match="Read-only file system") as refused:
            SqliteJournal(p, QueueReactor())
        assert str(refused.value).startswith(f"journal {p} cannot be written: ")


# -- real servers ----------------------------------------------------------------------------------


def server(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A server that is expected to refuse to start (bounded)."""
    return subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "clusterd-server", "--listen", LOOPBACK, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_server_on_the_same_journal_refuses_to_start(tmp_path):
    """A second server on a journal another server holds exits 1, naming the file and the
    holder's pid; the first keeps serving."""
    (tmp_path / "one").mkdir()
    with LocalCluster(tmp_path / "one") as cluster:
        cluster.start_server()
        journal = cluster.workdir / "clusterd-journal.sqlite"
        other = tmp_path / "two"
        other.mkdir()
        proc = server(other, "--journal", str(journal))
        assert proc.returncode == 1
        assert (
            f"journal {journal} is in use by another server (pid {cluster.server.pid})"
            in proc.stderr
        )
        assert "Refusing to start" in proc.stderr
        with cluster.client(timeout=10) as client:
            assert client.ping()


def test_a_server_refuses_to_start_on_a_full_disk(small_tmpfs, tmp_path):  # noqa: F811
    """A server whose journal's disk is full exits 1 with the OS's reason."""
    fill(small_tmpfs.path)
    proc = server(tmp_path, "--journal", str(small_tmpfs.path / "journal.db"))
    assert proc.returncode == 1
    assert "No space left on device" in proc.stderr
    assert "Refusing to start" in proc.stderr


def test_a_server_refuses_to_start_on_a_read_only_file_system(ext4_image, tmp_path):  # noqa: F811
    """A server whose journal is on a read-only file system exits 1 with the OS's reason, and
    does not start on it and reuse ids."""
    ext4_image.remount_read_only()
    proc = server(tmp_path, "--journal", str(ext4_image.path / "journal.db"))
    assert proc.returncode == 1
    assert "Read-only file system" in proc.stderr
    assert "Refusing to start" in proc.stderr


def deleted_journal(cluster: LocalCluster) -> str:
    """Run a job, delete the journal under the server, run three more; the server's log."""
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.wait_workers()
    with cluster.client(timeout=30) as client:
        assert client.run("sum", [1, 2, 3], chunks=1) == 6
        os.unlink(cluster.workdir / "clusterd-journal.sqlite")
        outcomes = []
        for _ in range(3):  # the first failure latches; the later jobs meet it at once
            try:
                outcomes.append(client.run("sum", [1, 2], chunks=1))
            except ClusterError as e:
                outcomes.append(str(e))
    return outcomes


def test_a_journal_deleted_under_a_running_server_is_logged_once_as_a_failed_write(tmp_path):
    """Deleting the journal of a running server is a failed write: the journal logs one clear
    line naming the file and saying so, never SQLite's "cannot rollback"."""
    with LocalCluster(tmp_path) as cluster:
        deleted_journal(cluster)
        path = cluster.workdir / "clusterd-journal.sqlite"
        want = (
            f"[clusterd.server.sqlite_journal.SqliteJournal#critical] journal {path} cannot be "
            f"written: {path} was deleted while the server ran; the server takes no new work "
            "until restarted"
        )
        cluster.wait_log("server", re.escape(want), 30)
        log = cluster.log_text("server")
        assert log.count("SqliteJournal#critical") == 1
        assert "cannot rollback" not in log


def test_a_server_whose_journal_was_deleted_shows_no_answer_and_takes_no_new_work(tmp_path):
    """After its journal was deleted, the server answers no job (nothing of it is durable)."""
    with LocalCluster(tmp_path) as cluster:
        outcomes = deleted_journal(cluster)
    assert all("JOURNAL_ERROR" in str(o) for o in outcomes), outcomes
