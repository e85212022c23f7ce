"""The SQLite journal's file format: schema, its checks and upgrade, row builders, loading, and
the statements one batch of records turns into.

Pure functions over an open ``sqlite3.Connection``: no threads, no reactor, no file locking
(those live in :mod:`clusterd.server.group_commit` and :mod:`clusterd.server.journal_guard`).
May import :mod:`clusterd.core.journal` only.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

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

__all__ = ["SCHEMA_VERSION", "Forget", "check_schema", "load_records", "prove_writable"]

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

_ACCEPTED = "id, seq, task, input, chunks, options, key, submitted, streamed, sealed"
_ENDED = "state, result, error, total, finished"
_INSERT_ACCEPTED = f"INSERT OR REPLACE INTO jobs ({_ACCEPTED}) VALUES ({', '.join('?' * 10)})"
_INSERT_ACCEPTED_ENDED = (
    f"INSERT OR REPLACE INTO jobs ({_ACCEPTED}, {_ENDED}) VALUES ({', '.join('?' * 15)})"
)
_INSERT_INPUT = "INSERT OR IGNORE INTO inputs VALUES (?, ?, ?)"


class Forget:
    """Housekeeping record: delete these jobs' rows entirely (results expired)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids


BIG_RESULT = 16 * 1024  # characters of a result's JSON from which it goes to its job's file
CUT_IN_INPUT = 2  # the jobs.streamed value of a job whose cut is its input column


def _accepted_row(rec: JobAccepted) -> tuple[Any, ...]:
    return (
        rec.job,
        rec.seq,
        rec.task,
        rec.input_json if rec.cut_json is None else rec.cut_json,
        rec.chunks,
        json.dumps(rec.options),
        rec.key,
        rec.submitted,
        # 0: an old-style input to split again; 1: streamed, its cut in the inputs table;
        # 2: its cut is the input column (one JSON array of the sub-task inputs).
        CUT_IN_INPUT if rec.cut_json is not None else int(rec.streamed),
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


# -- opening ---------------------------------------------------------------------------------


def check_schema(conn: sqlite3.Connection, path: str, sync: str, wal_limit: int) -> None:
    """Refuse a corrupt, foreign or newer file; set WAL and create (or upgrade) the schema."""
    check = conn.execute("PRAGMA quick_check").fetchone()
    if not check or check[0] != "ok":
        raise JournalError(
            f"journal {path} is corrupt: {check and check[0]}; move the file away to start empty"
        )
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    if tables and "meta" not in tables:
        raise JournalError(
            f"{path} is an SQLite file but not a clusterd journal; "
            "move the file away to start empty"
        )
    if not tables:
        # Only possible before the first table: freed pages can then go back to the disk.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed record survives power loss too, not only a process crash.
    # NORMAL (in WAL mode) survives a crash of the server process, not of the machine.
    conn.execute(f"PRAGMA synchronous={sync.upper()}")
    # SQLite's own checkpoints trim the WAL back to this size too.
    conn.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")
    _create_or_upgrade(conn, path, "meta" in tables)
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # A journal made before auto_vacuum: converting it takes one VACUUM, once.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")


def _create_or_upgrade(conn: sqlite3.Connection, path: str, has_meta: bool) -> None:
    version = None
    if has_meta:
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
            f"journal {path} has schema {version[0]}; this server reads {SCHEMA_VERSION}"
        )


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is open; the statement's own error is the one to report,
    never a follow-up ROLLBACK's "no transaction is active"."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def prove_writable(conn: sqlite3.Connection) -> None:
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
        rollback_quietly(conn)
        raise


# -- loading ---------------------------------------------------------------------------------


def load_records(conn: sqlite3.Connection, files: Any = None) -> Recovered:
    """Every job the file holds, with the results and inputs of unfinished ones (a text
    chunk kept in an input file is read back from ``files`` as its bytes)."""
    jobs: dict[str, JobRecord] = {}
    max_seq = 0
    for row in conn.execute(
        "SELECT id, seq, task, input, chunks, options, key, submitted, state, result, "
        "error, total, finished, streamed, sealed FROM jobs ORDER BY seq"
    ):
        (job_id, seq, task, inp, chunks, opts, key, submitted) = row[:8]
        state, result, error, total, finished, streamed, sealed = row[8:]
        cut = inp if streamed == CUT_IN_INPUT else None
        accepted = JobAccepted(
            job_id,
            seq,
            task,
            "" if cut is not None else inp,
            chunks,
            json.loads(opts),
            key,
            submitted,
            bool(streamed),
            cut_json=cut,
            sealed=sealed,
        )
        rec = JobRecord(accepted, sealed=sealed)
        if state is not None:
            err = json.loads(error) if error else None
            rec.ended = JobEnded(job_id, state, result, err, total, finished)
        jobs[job_id] = rec
        max_seq = max(max_seq, seq)
    for job_id, idx, result in conn.execute("SELECT job, idx, result FROM results"):
        rec = jobs.get(job_id)
        if rec is not None and rec.ended is None:
            if result.startswith("@"):  # in the job's file (no JSON text starts with @)
                data = None if files is None else files.read(job_id, result)
                if data is None:
                    continue  # lost with its file: that sub-task runs again
                result = data.decode("utf-8", "surrogatepass")
            rec.results[idx] = result
    for job_id, idx, text in conn.execute("SELECT job, idx, input FROM inputs"):
        rec = jobs.get(job_id)
        if rec is not None and rec.ended is None:
            if isinstance(text, str) and text.startswith("@"):
                data = None if files is None else files.read(job_id, text)
                if data is None:
                    continue  # missing: recovery fails the job (JOURNAL_ERROR), nothing else
                text = data
            rec.chunks[idx] = text
    row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    next_seq = max(max_seq + 1, int(row[0]) if row else 1)
    return Recovered(list(jobs.values()), next_seq)


# -- writing ---------------------------------------------------------------------------------


class _Batch:
    """The statements of one transaction's records (the caller owns BEGIN and COMMIT).

    A job that ends in this transaction needs no result or input rows (its end deletes them),
    and one accepted in it too is written as one finished row."""

    def __init__(self, conn: sqlite3.Connection, records: list[Any], files: Any = None) -> None:
        self.c = conn
        self.records = records
        self.files = files  # InputFiles: where text chunks go (None: BLOBs in the table)
        self.ended = {rec.job: rec for rec in records if isinstance(rec, JobEnded)}
        self.merged: set[str] = set()
        self.deleted = False
        self.max_seq = 0

    def run(self) -> None:
        """Execute the statements for every record in order, skipping rows that a job ending in this
        batch deletes."""
        ended = self.ended
        for rec in self.records:
            if ended and isinstance(rec, (ResultRecorded, ChunksAdded)) and rec.job in ended:
                continue
            if isinstance(rec, ResultRecorded):
                self._result(rec)
            elif isinstance(rec, JobAccepted):
                self._accepted(rec)
            elif isinstance(rec, ChunksAdded):
                self._chunks(rec)
            elif isinstance(rec, JobSealed):
                self.c.execute("UPDATE jobs SET sealed=? WHERE id=?", (rec.total, rec.job))
            elif isinstance(rec, JobEnded):
                self._ended(rec)
            elif isinstance(rec, Forget):
                for job_id in rec.ids:
                    self._delete(job_id, "DELETE FROM jobs WHERE id=?")
                self.deleted = True
        if self.max_seq:
            self.c.execute(
                "INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT(key) DO UPDATE "
                "SET value=MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (str(self.max_seq + 1),),
            )

    def _accepted(self, rec: JobAccepted) -> None:
        end = self.ended.get(rec.job)
        if end is None:
            self.c.execute(_INSERT_ACCEPTED, _accepted_row(rec))
        else:
            # An ended job needs no input: written without it.
            row = _accepted_row(rec)
            row = (*row[:3], "", *row[4:])
            self.c.execute(_INSERT_ACCEPTED_ENDED, row + _ended_row(end))
            self.merged.add(rec.job)
        self.max_seq = max(self.max_seq, rec.seq)

    def _result(self, rec: ResultRecorded) -> None:
        """A sub-task's result: a big one (a word count's dict) goes to its job's input file,
        as text chunks do, rather than through WAL, checkpoint and vacuum."""
        kept: str = rec.result_json
        if self.files is not None and len(kept) >= BIG_RESULT:
            kept = self.files.append(rec.job, kept.encode("utf-8", "surrogatepass"))
        self.c.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?)", (rec.job, rec.index, kept))

    def _chunks(self, rec: ChunksAdded) -> None:
        """Sub-task inputs: JSON text in the row; a text chunk's bytes appended to its job's
        input file (the row names where), or a BLOB when there are no input files."""
        files = self.files
        rows = []
        for i, kept in enumerate(rec.inputs_json, rec.start):
            if files is not None and isinstance(kept, bytes):
                kept = files.append(rec.job, kept)
            rows.append((rec.job, i, kept))
        self.c.executemany(_INSERT_INPUT, rows)

    def _ended(self, rec: JobEnded) -> None:
        if rec.job in self.merged:
            return  # written with its acceptance (a new job has no other rows)
        # Its input, sub-task inputs and partial results are not needed any more.
        self._delete(
            rec.job,
            "UPDATE jobs SET state=?, result=?, error=?, total=?, finished=?, input='' WHERE id=?",
            _ended_row(rec),
        )
        self.deleted = True

    def _delete(self, job_id: str, first: str, args: tuple[Any, ...] = ()) -> None:
        self.c.execute(first, (*args, job_id))
        self.c.execute("DELETE FROM results WHERE job=?", (job_id,))
        self.c.execute("DELETE FROM inputs WHERE job=?", (job_id,))


def write_records(conn: sqlite3.Connection, records: list[Any], files: Any = None) -> bool:
    """Execute ``records``' statements inside the caller's transaction; True if rows were
    deleted (worth giving pages back afterwards). With ``files`` (InputFiles), text chunks go
    to input files, and the jobs this batch ends or forgets are noted in ``files.ended``."""
    batch = _Batch(conn, records, files)
    batch.run()
    if files is not None:
        files.ended.update(batch.ended)
        for rec in records:
            if isinstance(rec, Forget):
                files.ended.update(rec.ids)
    return batch.deleted
