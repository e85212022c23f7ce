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
foreign or unreadable file stops the server with a clear error instead of a silent empty start.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clusterd.core.journal import (
    ChunksAdded,
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

_ACCEPTED = "id, seq, task, input, chunks, options, key, submitted, streamed"
_ENDED = "state, result, error, total, finished"
_INSERT_ACCEPTED = f"INSERT OR REPLACE INTO jobs ({_ACCEPTED}) VALUES ({', '.join('?' * 9)})"
_INSERT_ACCEPTED_ENDED = (
    f"INSERT OR REPLACE INTO jobs ({_ACCEPTED}, {_ENDED}) VALUES ({', '.join('?' * 14)})"
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
    )


def _ended_row(rec: JobEnded) -> tuple[Any, ...]:
    return (
        rec.state,
        rec.result_json,
        json.dumps(rec.error) if rec.error is not None else None,
        rec.total,
        rec.finished,
    )


_HURRY = object()  # wakes a lingering writer: somebody waits for what is queued
# Records nobody waits for: the scheduler ignores a result's Deferred (a crash before its commit
# only runs that sub-task again), and a forget is housekeeping.
_LAZY_TYPES = (ResultRecorded,)


class _Forget:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids


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
    ) -> None:
        if sync not in ("full", "normal"):
            raise JournalError(f"journal sync must be 'full' or 'normal', not {sync!r}")
        self.sync = sync
        self.path = path
        self.reactor = reactor
        self.batch_max = batch_max
        self.linger = linger  # seconds a batch of lazy records may wait for an urgent one
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent = threading.Event()  # set when an urgent record is queued
        self._thread: threading.Thread | None = None
        self._closed: Deferred[None] | None = None
        self.failure: JournalError | None = None  # set for good by the first failed write
        self.commits = 0
        self.records = 0
        self._conn = self._open()

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            return self._check(conn)
        except (sqlite3.DatabaseError, JournalError) as e:
            if conn is not None:
                conn.close()
            if isinstance(e, JournalError):
                raise
            raise JournalError(f"cannot use journal {self.path}: {e}") from e

    def _check(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        """Refuse a corrupt, foreign or newer file; set WAL and create the schema."""
        check = conn.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise JournalError(f"journal {self.path} is corrupt: {check and check[0]}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if tables and "meta" not in tables:
            raise JournalError(f"{self.path} is an SQLite file but not a clusterd journal")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed record survives power loss too, not only a process crash.
        # NORMAL (in WAL mode) survives a crash of the server process, not of the machine.
        conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
        version = None
        if "meta" in tables:
            version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is not None and version[0] == "1":
            conn.executescript("BEGIN;" + _UPGRADE_1_TO_2 + "COMMIT;")
            conn.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,))
            version = (SCHEMA_VERSION,)
        conn.executescript(_SCHEMA)
        if version is None:
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif version[0] != SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema {version[0]}; this server reads {SCHEMA_VERSION}"
            )
        return conn

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
                self._closed.callback(None)
            else:
                self._queue.put((_STOP, None, None))
                self._urgent.set()
        return self._closed

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
            try:
                self._write([rec for rec, _, _ in batch if rec is not _STOP and rec is not _HURRY])
                error = None
            except Exception as e:  # disk full, I/O error: callers must not think it durable
                error = e
            waiters = [d for _, d, _ in batch if d is not None]
            self.reactor.callFromThread(self._fire, waiters, error)
            if stop:
                self._conn.close()
                self.reactor.callFromThread(self._closed.callback, None)
                return

    def _fire(self, waiters: list[Deferred[None]], error: Exception | None) -> None:
        if error is not None:
            self.log.error("journal write failed: {error}", error=repr(error))
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                d.errback(JournalError(f"journal write failed: {error}"))

    def _write(self, records: list[Any]) -> None:
        if not records:
            return
        c = self._conn
        # A job that ends in this transaction needs no result or input rows (its end deletes
        # them), and one accepted in it too is written as one finished row.
        ended = {rec.job: rec for rec in records if isinstance(rec, JobEnded)}
        merged: set[str] = set()
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
                    else:
                        c.execute(_INSERT_ACCEPTED_ENDED, _accepted_row(rec) + _ended_row(end))
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
                    c.execute(
                        "UPDATE jobs SET state=?, result=?, error=?, total=?, finished=? "
                        "WHERE id=?",
                        (*_ended_row(rec), rec.job),
                    )
                    c.execute("DELETE FROM results WHERE job=?", (rec.job,))
                    c.execute("DELETE FROM inputs WHERE job=?", (rec.job,))
                elif isinstance(rec, _Forget):
                    for job_id in rec.ids:
                        c.execute("DELETE FROM jobs WHERE id=?", (job_id,))
                        c.execute("DELETE FROM results WHERE job=?", (job_id,))
                        c.execute("DELETE FROM inputs WHERE job=?", (job_id,))
            if max_seq:
                c.execute(
                    "INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT(key) DO UPDATE "
                    "SET value=MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    (str(max_seq + 1),),
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.commits += 1
        self.records += len(records)
