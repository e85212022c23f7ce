"""The server's durable journal: SQLite in WAL mode, written by one thread with group commit.

Why a thread of our own rather than ``deferToThread`` per write: one writer owns the connection,
and every record that queued up while the last transaction was being fsynced goes into the next
one, so a burst of 10,000 results costs a handful of commits, not 10,000. Appends return Deferreds
fired on the reactor thread (``callFromThread``) once their transaction is committed.

A record nobody waits for yet may wait a little for company (``linger``, 2 ms by default): the
``JobAccepted`` of a ``RUN`` (its client sees no id before the end) and every ``ResultRecorded``.
The writer holds such a batch until a record somebody waits for arrives (a ``JobEnded``, the
``JobAccepted`` of a ``SUBMIT`` after :meth:`SqliteJournal.hurry`) or the linger runs out, so a
short ``RUN`` pays one commit, its acceptance and its end together, instead of two in a row. A job
accepted and ended in the same transaction is written as one row, without its sub-task results.

Opening checks the file (``PRAGMA quick_check`` and our own schema marker) so a corrupt,
foreign or unreadable file stops the server with a clear error instead of a silent empty start,
and proves it can be written (a real write transaction), so a read-only file or file system or a
full disk stops the server at start rather than at its first job.

One journal serves one server: opening takes an exclusive ``flock`` on ``<path>.lock`` and holds it
until :meth:`SqliteJournal.close`. Why a lock file and ``flock`` rather than SQLite's
``locking_mode=EXCLUSIVE``: the kernel drops a ``flock`` when its holder dies, even by SIGKILL;
``flock`` locks belong to an open file, so a second journal object in the same process is refused
too (POSIX ``fcntl`` locks, which SQLite uses, would not see it); the lock file carries the
holder's pid for the refusal message; and readers such as a backup can still open the journal.

A failed write *breaks* the journal for good (:attr:`SqliteJournal.failure`): that batch's
records, every record queued after it and every later append fail with one
:class:`JournalError` naming the operating system's reason, logged once. A later batch never
commits after an earlier one was lost, so what a restart recovers is always a prefix of what was
appended. Each batch also checks that the journal file (and its WAL and lock file) is still the
one opened: a file deleted or replaced while running counts as a failed write, because nothing
committed to it would survive a restart.

The journal stays proportional to unfinished work plus retained results: a job's end drops its
input, its sub-task inputs and partial results; freed pages go back to the file system
(``auto_vacuum=INCREMENTAL``, then ``incremental_vacuum``) and the WAL is checkpointed and
truncated once it has grown past ``wal_limit``. The writer thread does this after firing the
batch's waiters, so nobody waits for it.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from clusterd.core.journal import IJournal, JournalError, Recovered
from clusterd.server.group_commit import FIRE_PER_TURN, GroupCommitWriter
from clusterd.server.journal_guard import FileGuard
from clusterd.server.sqlite_inputs import InputFiles
from clusterd.server.sqlite_schema import (
    Forget,
    check_schema,
    load_records,
    prove_writable,
    rollback_quietly,
    write_records,
)

__all__ = ["FIRE_PER_TURN", "SqliteJournal"]

_Forget = Forget  # the old private name, still imported by tests


@implementer(IJournal)
class SqliteJournal(GroupCommitWriter):
    """The durable journal: opens and checks the file (sqlite_schema), guards it
    (journal_guard), and commits on its writer thread (group_commit)."""

    durable = True
    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any,
        batch_max: int = 20_000,
        sync: str = "full",
        linger: float = 0.002,
        wal_limit: int = 64 << 20,
        vacuum_min: int = 4 << 20,
    ) -> None:
        if sync not in ("full", "normal"):
            raise JournalError(f"journal sync must be 'full' or 'normal', not {sync!r}")
        super().__init__(reactor, batch_max, linger)
        self.sync = sync
        self.path = os.path.abspath(path)  # messages name the file wherever the server runs
        self.wal_limit = wal_limit  # bytes of WAL after which it is checkpointed and truncated
        self.vacuum_min = vacuum_min  # bytes of free pages worth giving back to the file system
        self.commits = 0
        self.records = 0
        self.checkpoints = 0
        self.vacuums = 0
        self._tidy_warned = False
        self._guard = FileGuard(self.path)
        self.lock_path = self._guard.lock_path
        self._conn = self._open()
        self.inputs = InputFiles(self.path, sync=sync == "full")  # text chunks (sqlite_inputs)

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self._guard.take_lock()
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            check_schema(conn, self.path, self.sync, self.wal_limit)
            prove_writable(conn)
            self._guard.identify()
            return conn
        except (sqlite3.Error, JournalError, OSError) as e:
            if conn is not None:
                conn.close()
            self._guard.release_lock()
            if isinstance(e, JournalError):
                raise
            if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
                raise JournalError(
                    f"cannot use journal {self.path}: {e}; move the file away to start empty"
                ) from e
            raise JournalError(
                f"journal {self.path} cannot be written: {self._guard.reason(e)}"
            ) from e

    def stop(self) -> Deferred[None]:
        """:meth:`close`, under the name :class:`~clusterd.core.journal.IJournal` gives it."""
        return self.close()

    def load(self) -> Recovered:
        """Read everything back (at startup, before the writer thread runs)."""
        try:
            recovered = load_records(self._conn, self.inputs)
        except (sqlite3.DatabaseError, ValueError, TypeError) as e:
            raise JournalError(f"cannot read journal {self.path}: {e}") from e
        self.inputs.sweep({r.accepted.job for r in recovered.jobs if r.ended is None})
        return recovered

    def forget(self, job_ids: list[str]) -> None:
        """Queue the deletion of these ended jobs' rows as a record nobody waits for
        (housekeeping)."""
        self._put_lazy(Forget(job_ids))

    # -- the writer thread's part --------------------------------------------------------------

    def _write(self, records: list[Any]) -> bool:
        """Commit ``records`` in one transaction; True if it deleted rows or grew the WAL past
        ``wal_limit`` (worth a :meth:`_tidy`)."""
        if not records:
            return False
        c = self._conn
        c.execute("BEGIN")
        try:
            deleted = write_records(c, records, self.inputs)
            self.inputs.flush()  # the chunks are durable before the rows naming them commit
            self._guard.verify()  # never commit into a file no restart will read
            c.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may have rolled back already: rollback_quietly.
            rollback_quietly(c)
            self.inputs.ended.clear()  # those ends did not commit: their files stay
            raise
        self.inputs.committed()  # the input files of jobs this batch ended go
        wal = self._guard.verify()  # deleted during the commit: not durable either
        self.commits += 1
        self.records += len(records)
        return deleted or (wal is not None and wal.st_size > self.wal_limit)

    def _tidy(self) -> None:
        """After a batch that deleted rows: give free pages back to the file system and
        checkpoint a grown WAL, truncating it. Housekeeping only: a failure here loses nothing
        (the batch is committed), so it is logged once and the next commit tells the truth."""
        c = self._conn
        try:
            free = c.execute("PRAGMA freelist_count").fetchone()[0]
            page = c.execute("PRAGMA page_size").fetchone()[0]
            vacuumed = free * page >= self.vacuum_min
            if vacuumed:
                # executescript steps it to the end; execute() would free one page per call.
                c.executescript("PRAGMA incremental_vacuum;")
                self.vacuums += 1
            wal = os.stat(self.path + "-wal").st_size if self._guard.files else 0
            if vacuumed or wal > self.wal_limit:
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                self.checkpoints += 1
        except (sqlite3.Error, OSError) as e:
            rollback_quietly(c)
            if not self._tidy_warned:
                self._tidy_warned = True
                self.reactor.callFromThread(
                    self.log.warn,
                    "journal {path}: cannot give space back ({reason})",
                    path=self.path,
                    reason=self._guard.reason(e),
                )

    def _break(self, error: BaseException) -> None:
        """Latch the first failed write: it, every record queued after it and every later
        append fail with one error that names the operating system's reason; logged once."""
        failure = JournalError(
            f"journal {self.path} cannot be written: {self._guard.reason(error)}; "
            "the server takes no new work until restarted"
        )
        self.failure = failure
        self.reactor.callFromThread(self._report, failure)

    def _report(self, failure: JournalError) -> None:
        self.log.critical("{failure}", failure=str(failure))

    def _shut(self) -> None:
        self.inputs.close()
        self._conn.close()
        self._guard.release_lock()
