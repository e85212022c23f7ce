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

import errno
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from clusterd.core.journal import (
    ChunksAdded,
    IJournal,
    JobAccepted,
    JobEnded,
    JobRecord,
    JobSealed,
    JournalError,
    Recovered,
    ResultRecorded,
)

__all__ = ["SqliteJournal"]

SCHEMA_VERSION = "2"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, task TEXT NOT NULL, input TEXT NOT NULL,
    chunks INTEGER NOT NULL, options TEXT NOT NULL, key TEXT, submitted REAL NOT NULL,
    state TEXT, result TEXT, error TEXT, total INTEGER, finished REAL,
    streamed INTEGER NOT NULL DEFAULT 0, sealed INTEGER);
CREATE TABLE IF NOT EXISTS results (
    job TEXT NOT NULL, idx INTEGER NOT NULL, result TEXT NOT NULL, PRIMARY KEY (job, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inputs (
    job TEXT NOT NULL, idx INTEGER NOT NULL, input TEXT NOT NULL, PRIMARY KEY (job, idx)
) WITHOUT ROWID;
"""
# Schema 1 (before streamed inputs) lacks the two jobs columns; the inputs table is created by
# _SCHEMA. Upgrading in place keeps every job a schema-1 server journaled.
_UPGRADE_1_TO_2 = """
ALTER TABLE jobs ADD COLUMN streamed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN sealed INTEGER;
"""
_STOP = object()
FIRE_PER_TURN = 256  # waiters fired per reactor turn (see SqliteJournal._deliver)

_ACCEPTED = "id, seq, task, input, chunks, options, key, submitted, streamed, sealed"
_ENDED = "state, result, error, total, finished"
_INSERT_ACCEPTED = f"INSERT OR REPLACE INTO jobs ({_ACCEPTED}) VALUES ({', '.join('?' * 10)})"
_INSERT_ACCEPTED_ENDED = (
    f"INSERT OR REPLACE INTO jobs ({_ACCEPTED}, {_ENDED}) VALUES ({', '.join('?' * 15)})"
)


def _accepted_row(rec: JobAccepted) -> tuple[Any, ...]:
    return (
        rec.job,
        rec.seq,
        rec.task,
        rec.input_json,
        rec.chunks,
        json.dumps(rec.options),
        rec.key,
        rec.submitted,
        int(rec.streamed),
        rec.sealed,
    )


def _ended_row(rec: JobEnded) -> tuple[Any, ...]:
    return (
        rec.state,
        rec.result_json,
        json.dumps(rec.error) if rec.error is not None else None,
        rec.total,
        rec.finished,
    )


class _Lost(Exception):
    """The journal file, its WAL or its lock file is no longer the one this journal opened."""


_HURRY = object()  # wakes a lingering writer: somebody waits for what is queued
# Records nobody waits for: the scheduler ignores a result's Deferred (a crash before its commit
# only runs that sub-task again), and a forget is housekeeping.
_LAZY_TYPES = (ResultRecorded,)


class _Forget:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids


@implementer(IJournal)
class SqliteJournal:
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
        self.sync = sync
        self.path = os.path.abspath(path)  # messages name the file wherever the server runs
        self.reactor = reactor
        self.batch_max = batch_max
        self.linger = linger  # seconds a batch of lazy records may wait for an urgent one
        self.wal_limit = wal_limit  # bytes of WAL after which it is checkpointed and truncated
        self.vacuum_min = vacuum_min  # bytes of free pages worth giving back to the file system
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent = threading.Event()  # set when an urgent record is queued
        self._thread: threading.Thread | None = None
        self._closed: Deferred[None] | None = None
        self.failure: JournalError | None = None  # set for good by the first failed write
        self._answers: deque[tuple[Deferred[None], JournalError | None]] = deque()
        self._firing: Any = None  # the callLater(0) that fires the next waiters
        self.commits = 0
        self.records = 0
        self.checkpoints = 0
        self.vacuums = 0
        self._tidy_warned = False
        self.lock_path = self.path + ".lock"
        self._lock: BinaryIO | None = None
        self._files: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino) as opened
        self._conn = self._open()

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self._lock = self._take_lock()
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._check(conn)
            self._prove_writable(conn)
            self._files = self._identify()
            return conn
        except (sqlite3.Error, JournalError, OSError) as e:
            if conn is not None:
                conn.close()
            self._release_lock()
            if isinstance(e, JournalError):
                raise
            if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
                raise JournalError(
                    f"cannot use journal {self.path}: {e}; move the file away to start empty"
                ) from e
            raise JournalError(f"journal {self.path} cannot be written: {self._reason(e)}") from e

    def _take_lock(self) -> BinaryIO:
        """Hold ``<path>.lock`` exclusively for this journal's life: one journal, one server."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(
                f"journal {self.path} cannot be written: cannot open its lock file "
                f"{self.lock_path}: {e.strerror}"
            ) from None
        lock = os.fdopen(fd, "r+b", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read(64).decode("ascii", "replace").strip()
            lock.close()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise JournalError(
                f"journal {self.path} is in use by another server{pid}, which holds its lock "
                f"file {self.lock_path}; a journal serves one server at a time"
            ) from None
        except OSError as e:
            lock.close()
            raise JournalError(
                f"cannot lock journal {self.path} (lock file {self.lock_path}): {e.strerror}"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            lock.close()
            raise JournalError(
                f"journal {self.path} cannot be written: cannot write its lock file "
                f"{self.lock_path}: {e.strerror}"
            ) from None
        return lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def _check(self, conn: sqlite3.Connection) -> None:
        """Refuse a corrupt, foreign or newer file; set WAL and create the schema."""
        check = conn.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise JournalError(
                f"journal {self.path} is corrupt: {check and check[0]}; "
                "move the file away to start empty"
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if tables and "meta" not in tables:
            raise JournalError(
                f"{self.path} is an SQLite file but not a clusterd journal; "
                "move the file away to start empty"
            )
        if not tables:
            # Only possible before the first table: freed pages can then go back to the disk.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed record survives power loss too, not only a process crash.
        # NORMAL (in WAL mode) survives a crash of the server process, not of the machine.
        conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
        # SQLite's own checkpoints trim the WAL back to this size too.
        conn.execute(f"PRAGMA journal_size_limit={int(self.wal_limit)}")
        version = None
        if "meta" in tables:
            version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is not None and version[0] == "1":
            # One transaction: new columns and new version commit together, so a crash in
            # between cannot leave columns added under the old version (never upgradable).
            conn.executescript(
                "BEGIN;"
                + _UPGRADE_1_TO_2
                + f"UPDATE meta SET value='{SCHEMA_VERSION}' WHERE key='schema';COMMIT;"
            )
            version = (SCHEMA_VERSION,)
        conn.executescript(_SCHEMA)
        if version is None:
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif version[0] != SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema {version[0]}; this server reads {SCHEMA_VERSION}"
            )
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            # A journal made before auto_vacuum: converting it takes one VACUUM, once.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")

    def _prove_writable(self, conn: sqlite3.Connection) -> None:
        """A real write transaction at open: a read-only file or file system, or a full disk,
        refuses the start instead of the first job."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO meta VALUES ('opened', '1') ON CONFLICT(key) DO UPDATE "
                "SET value=CAST(value AS INTEGER) + 1"
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the statement's own error is the one to report
            raise

    def _identify(self) -> dict[str, tuple[int, int]]:
        """The journal file and its WAL as opened, to notice them deleted or replaced."""
        files = {}
        for p in (self.path, self.path + "-wal"):
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue  # no WAL: SQLite fell back to a rollback journal on this file system
            files[p] = (st.st_dev, st.st_ino)
        return files

    def _verify_files(self) -> os.stat_result | None:
        """Raise :class:`_Lost` if the journal, its WAL or its lock file was deleted or replaced
        since it was opened (commits would go to a file no restart reads); the WAL's stat."""
        wal = None
        for p, ident in self._files.items():
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise _Lost(f"{p} was deleted while the server ran") from None
            if (st.st_dev, st.st_ino) != ident:
                raise _Lost(f"{p} was replaced by another file while the server ran")
            if p.endswith("-wal"):
                wal = st
        if self._lock is not None:
            held = os.fstat(self._lock.fileno())
            try:
                st = os.stat(self.lock_path)
            except FileNotFoundError:
                raise _Lost(
                    f"its lock file {self.lock_path} was deleted while the server ran"
                ) from None
            if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
                raise _Lost(f"its lock file {self.lock_path} was replaced while the server ran")
        return wal

    def _reason(self, error: BaseException) -> str:
        """The operating system's reason a write failed, with SQLite's words for it: SQLite
        reports "disk I/O error" or "database or disk is full", never the errno behind it."""
        if isinstance(error, _Lost):
            return str(error)
        sqlite_says = str(error)
        name = getattr(error, "sqlite_errorname", None)
        if name:
            sqlite_says = f"{sqlite_says}, {name}"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        os_says = self._os_reason()
        if os_says is None:
            return f"SQLite: {sqlite_says}"
        return f"{os_says} (SQLite: {sqlite_says})"

    def _os_reason(self) -> str | None:
        """Ask the file system directly: read-only, not writable, or full (a page-sized write
        beside the journal, into its lock file, undone at once)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            vfs = os.statvfs(directory)
        except OSError as e:
            return e.strerror
        if vfs.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
        for p in (self.path, self.path + "-wal"):
            if os.path.exists(p) and not os.access(p, os.W_OK):
                return f"{p}: {os.strerror(errno.EACCES)}"
        if self._lock is not None:
            fd = self._lock.fileno()
            try:
                size = os.fstat(fd).st_size
                try:
                    written = os.pwrite(fd, b"\0" * 65536, 4096)
                    os.fsync(fd)
                finally:
                    os.ftruncate(fd, size)
            except OSError as e:
                return e.strerror
            if written < 65536:
                return os.strerror(errno.ENOSPC)
        if vfs.f_bfree == 0:
            return os.strerror(errno.ENOSPC)
        return None

    def load(self) -> Recovered:
        """Read everything back (at startup, before the writer thread runs)."""
        try:
            return self._load()
        except (sqlite3.DatabaseError, ValueError, TypeError) as e:
            raise JournalError(f"cannot read journal {self.path}: {e}") from e

    def _load(self) -> Recovered:
        conn = self._conn
        jobs: dict[str, JobRecord] = {}
        max_seq = 0
        for row in conn.execute(
            "SELECT id, seq, task, input, chunks, options, key, submitted, state, result, "
            "error, total, finished, streamed, sealed FROM jobs ORDER BY seq"
        ):
            (job_id, seq, task, inp, chunks, opts, key, submitted) = row[:8]
            state, result, error, total, finished, streamed, sealed = row[8:]
            rec = JobRecord(
                JobAccepted(
                    job_id, seq, task, inp, chunks, json.loads(opts), key, submitted, bool(streamed)
                ),
                sealed=sealed,
            )
            if state is not None:
                err = json.loads(error) if error else None
                rec.ended = JobEnded(job_id, state, result, err, total, finished)
            jobs[job_id] = rec
            max_seq = max(max_seq, seq)
        for job_id, idx, result in conn.execute("SELECT job, idx, result FROM results"):
            rec = jobs.get(job_id)
            if rec is not None and rec.ended is None:
                rec.results[idx] = result
        for job_id, idx, text in conn.execute("SELECT job, idx, input FROM inputs"):
            rec = jobs.get(job_id)
            if rec is not None and rec.ended is None:
                rec.chunks[idx] = text
        row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        next_seq = max(max_seq + 1, int(row[0]) if row else 1)
        return Recovered(list(jobs.values()), next_seq)

    # -- writing -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="clusterd-journal", daemon=True)
            self._thread.start()

    def append(self, record: Any, lazy: bool = False) -> Deferred[None]:
        """Queue ``record``; the Deferred fires once it is committed. ``lazy``: nobody waits for
        it yet, so it may wait up to ``linger`` for a record somebody does wait for."""
        if self.failure is not None:
            return fail(self.failure)  # broken for good: nothing may commit after a lost batch
        d: Deferred[None] = Deferred()
        if lazy or isinstance(record, _LAZY_TYPES):
            self._queue.put((record, d, time.monotonic()))
        else:
            self._queue.put((record, d, None))
            self._urgent.set()
        return d

    def hurry(self) -> None:
        """Somebody now waits for what is queued (a SUBMIT's id): commit it without lingering."""
        self._queue.put((_HURRY, None, None))
        self._urgent.set()

    def forget(self, job_ids: list[str]) -> None:
        self._queue.put((_Forget(job_ids), None, time.monotonic()))

    def close(self) -> Deferred[None]:
        """Commit everything queued, then close; fires when done."""
        if self._closed is None:
            self._closed = Deferred()
            if self._thread is None:
                self._conn.close()
                self._release_lock()
                self._closed.callback(None)
            else:
                self._queue.put((_STOP, None, None))
                self._urgent.set()
        return self._closed

    def stop(self) -> Deferred[None]:
        """:meth:`close`, under the name :class:`~clusterd.core.journal.IJournal` gives it."""
        return self.close()

    def _take(self, batch: list[Any]) -> bool:
        """Add what is queued to ``batch``; True if any of it is urgent (somebody waits)."""
        urgent = False
        get = self._queue.get_nowait
        while len(batch) < self.batch_max:
            try:
                item = get()
            except queue.Empty:
                break
            batch.append(item)
            urgent = urgent or not item[2]
        return urgent

    def _gather(self) -> list[Any]:
        """The next transaction's records: all that is queued, and if none of it is urgent, what
        comes within ``linger`` of the oldest, until an urgent record arrives. The writer sleeps
        on ``_urgent`` meanwhile, so a stream of lazy records does not wake it once each."""
        first = self._queue.get()
        batch = [first]
        if self._take(batch) or first[2] is None or self.linger <= 0:
            return batch
        deadline = first[2] + self.linger
        while len(batch) < self.batch_max:
            # Cleared before looking again: an urgent record appended from now on sets it.
            self._urgent.clear()
            if self._take(batch):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._urgent.wait(left)
        self._take(batch)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            stop = any(rec is _STOP for rec, _, _ in batch)
            tidy = False
            if self.failure is None:
                records = [rec for rec, _, _ in batch if rec is not _STOP and rec is not _HURRY]
                try:
                    tidy = self._write(records)
                except Exception as e:  # disk full, read-only, I/O error, file deleted
                    self._break(e)
            waiters = [(d, self.failure) for _, d, _ in batch if d is not None]
            if waiters:
                self.reactor.callFromThread(self._deliver, waiters)
            if tidy and self.failure is None:
                self._tidy()
            if stop:
                self._conn.close()
                self._release_lock()
                self.reactor.callFromThread(self._deliver, [(self._closed, None)])
                return

    def _break(self, error: BaseException) -> None:
        """Latch the first failed write: it, every record queued after it and every later
        append fail with one error that names the operating system's reason; logged once."""
        failure = JournalError(
            f"journal {self.path} cannot be written: {self._reason(error)}; "
            "the server takes no new work until restarted"
        )
        self.failure = failure
        self.reactor.callFromThread(self._report, failure)

    def _report(self, failure: JournalError) -> None:
        self.log.critical("{failure}", failure=str(failure))

    def _deliver(self, waiters: list[tuple[Deferred[None], JournalError | None]]) -> None:
        """On the reactor: queue a committed (or failed) batch's waiters to be fired, in commit
        order, at most FIRE_PER_TURN per reactor turn. One commit can hold 20,000 records (a
        flood of SUBMITs), and answering them all in one turn would stall every other
        connection for a fifth of a second; this way a PING waits behind a few ms at most."""
        self._answers.extend(waiters)
        if self._firing is None:
            self._fire()

    def _fire(self) -> None:
        self._firing = None
        answers = self._answers
        for _ in range(min(FIRE_PER_TURN, len(answers))):
            d, failure = answers.popleft()
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)
        if answers:
            self._firing = self.reactor.callLater(0, self._fire)

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
            wal = os.stat(self.path + "-wal").st_size if self._files else 0
            if vacuumed or wal > self.wal_limit:
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                self.checkpoints += 1
        except (sqlite3.Error, OSError) as e:
            if c.in_transaction:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if not self._tidy_warned:
                self._tidy_warned = True
                self.reactor.callFromThread(
                    self.log.warn,
                    "journal {path}: cannot give space back ({reason})",
                    path=self.path,
                    reason=self._reason(e),
                )

    def _write(self, records: list[Any]) -> bool:
        """Commit ``records`` in one transaction; True if it deleted rows or grew the WAL past
        ``wal_limit`` (worth a :meth:`_tidy`)."""
        if not records:
            return False
        c = self._conn
        # A job that ends in this transaction needs no result or input rows (its end deletes
        # them), and one accepted in it too is written as one finished row.
        ended = {rec.job: rec for rec in records if isinstance(rec, JobEnded)}
        merged: set[str] = set()
        deleted = False
        c.execute("BEGIN")
        try:
            max_seq = 0
            for rec in records:
                if ended and isinstance(rec, (ResultRecorded, ChunksAdded)) and rec.job in ended:
                    continue
                if isinstance(rec, ResultRecorded):
                    c.execute(
                        "INSERT OR IGNORE INTO results VALUES (?, ?, ?)",
                        (rec.job, rec.index, rec.result_json),
                    )
                elif isinstance(rec, JobAccepted):
                    end = ended.get(rec.job)
                    if end is None:
                        c.execute(_INSERT_ACCEPTED, _accepted_row(rec))
                        if rec.inputs_json:
                            c.executemany(
                                "INSERT OR IGNORE INTO inputs VALUES (?, ?, ?)",
                                [(rec.job, i, t) for i, t in enumerate(rec.inputs_json)],
                            )
                    else:
                        # An ended job needs no input: written without it.
                        row = _accepted_row(rec)
                        row = (*row[:3], "", *row[4:])
                        c.execute(_INSERT_ACCEPTED_ENDED, row + _ended_row(end))
                        merged.add(rec.job)
                    max_seq = max(max_seq, rec.seq)
                elif isinstance(rec, ChunksAdded):
                    c.executemany(
                        "INSERT OR IGNORE INTO inputs VALUES (?, ?, ?)",
                        [(rec.job, i, t) for i, t in enumerate(rec.inputs_json, rec.start)],
                    )
                elif isinstance(rec, JobSealed):
                    c.execute("UPDATE jobs SET sealed=? WHERE id=?", (rec.total, rec.job))
                elif isinstance(rec, JobEnded):
                    if rec.job in merged:
                        continue  # written with its acceptance (a new job has no other rows)
                    # Its input, sub-task inputs and partial results are not needed any more.
                    c.execute(
                        "UPDATE jobs SET state=?, result=?, error=?, total=?, finished=?, "
                        "input='' WHERE id=?",
                        (*_ended_row(rec), rec.job),
                    )
                    c.execute("DELETE FROM results WHERE job=?", (rec.job,))
                    c.execute("DELETE FROM inputs WHERE job=?", (rec.job,))
                    deleted = True
                elif isinstance(rec, _Forget):
                    for job_id in rec.ids:
                        c.execute("DELETE FROM jobs WHERE id=?", (job_id,))
                        c.execute("DELETE FROM results WHERE job=?", (job_id,))
                        c.execute("DELETE FROM inputs WHERE job=?", (job_id,))
                    deleted = True
            if max_seq:
                c.execute(
                    "INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT(key) DO UPDATE "
                    "SET value=MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    (str(max_seq + 1),),
                )
            self._verify_files()  # never commit into a file no restart will read
            c.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may have rolled back already; its own error is the one to report,
            # never a follow-up ROLLBACK's "no transaction is active".
            if c.in_transaction:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        wal = self._verify_files()  # deleted during the commit: not durable either
        self.commits += 1
        self.records += len(records)
        return deleted or (wal is not None and wal.st_size > self.wal_limit)
