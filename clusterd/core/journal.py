"""Journal records and the journal interface, with no I/O.

The scheduler writes three kinds of record: a job was accepted, a sub-task's result arrived, a job
ended. A job whose input is streamed adds two more: sub-task inputs were cut from it (they cannot
be split again from an input the server never held whole), and its input was complete.
:class:`IJournal` states the contract. ``append`` returns a Deferred that fires once the record is durable; records become durable
in the order they were appended. :class:`MemoryJournal` keeps them in a dict, for tests (it can be
"recovered" into a second scheduler to simulate a restart); the SQLite journal a server uses is
:class:`clusterd.server.sqlite_journal.SqliteJournal`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface, implementer

from clusterd.core.errors import JournalError

__all__ = [
    "JobAccepted",
    "ResultRecorded",
    "JobEnded",
    "ChunksAdded",
    "JobSealed",
    "JobRecord",
    "Recovered",
    "IJournal",
    "Journal",
    "NullJournal",
    "MemoryJournal",
    "JournalError",
]


@dataclass(frozen=True)
class JobAccepted:
    """A job was accepted: its task, input, options and key, and, for a whole input, its cut."""

    job: str
    seq: int
    task: str
    input_json: str
    chunks: int
    options: dict[str, Any]
    key: str | None
    submitted: float
    streamed: bool = False  # input_json is empty; the sub-task inputs are journaled as cut
    # A job whose input came whole carries its cut here, one JSON array of its sub-task inputs
    # (one value to store, not a row each), and is sealed with their count in the same record;
    # a streamed one gets ChunksAdded and JobSealed later.
    cut_json: str | None = None
    sealed: int | None = None


@dataclass(frozen=True)
class ChunksAdded:
    """Sub-task inputs ``start``, ``start+1``, ... of a streamed job: each JSON text (``str``),
    or a text stream's chunk kept as its UTF-8 ``bytes`` (a BLOB in SQLite; no JSON)."""

    job: str
    start: int
    inputs_json: tuple[str | bytes, ...]


@dataclass(frozen=True)
class JobSealed:
    """A streamed job's input ended: it has ``total`` sub-tasks."""

    job: str
    total: int


@dataclass(frozen=True)
class ResultRecorded:
    """Sub-task ``index`` of ``job`` produced a result (encoded JSON)."""

    job: str
    index: int
    result_json: str


@dataclass(frozen=True)
class JobEnded:
    """A job ended: its final state, its answer or error, and when it finished."""

    job: str
    state: str
    result_json: str | None
    error: dict[str, Any] | None
    total: int
    finished: float


Record = JobAccepted | ResultRecorded | JobEnded | ChunksAdded | JobSealed


@dataclass
class JobRecord:
    """One job as the journal holds it."""

    accepted: JobAccepted
    results: dict[int, str] = field(default_factory=dict)
    ended: JobEnded | None = None
    # streamed jobs: encoded inputs (JSON text, or a text chunk's bytes)
    chunks: dict[int, str | bytes] = field(default_factory=dict)
    sealed: int | None = None  # streamed jobs: the total, once the input was complete


@dataclass
class Recovered:
    """What a journal's ``load`` reads back: the jobs it holds and the next job sequence number."""

    jobs: list[JobRecord]
    next_seq: int


class IJournal(Interface):
    """Where the scheduler makes records durable. Records become durable in the order they
    were appended.

    ``failure`` is None while the journal is healthy; once a write fails it holds that
    :class:`JournalError` (with the operating system's reason) for good, and every append from
    then on fails with it at once."""

    durable = Attribute("bool: whether records survive a restart (False: NullJournal).")
    failure = Attribute("JournalError | None: set for good once a write failed.")

    def start():  # noqa: N805 - zope interface methods take no self
        """Begin writing (the server calls it from ``startService``)."""

    def stop():  # noqa: N805
        """The same as :meth:`close`: flush what was appended and release the storage; the
        Deferred fires once that is done (it never fails: a failed flush sets ``failure``)."""

    def append(record, lazy=False):  # noqa: N805
        """A Deferred that fires with None once ``record`` is durable, or fails with the
        :class:`JournalError` that broke the journal (at once, if it is already broken).
        ``lazy``: nobody waits for it yet (a RUN's acceptance), so the journal may hold it
        briefly to commit it with a later record."""

    def hurry():  # noqa: N805
        """Somebody now waits for what was appended: make it durable without holding it."""

    def load():  # noqa: N805
        """The :class:`Recovered` jobs, read back (raises JournalError if unreadable)."""

    def note(record, then=None):  # noqa: N805
        """Queue a record nobody waits for (a sub-task's result), with no Deferred; ``then``,
        if given, is called on the reactor once it is durable (never if it cannot be: then the
        journal breaks, ``failure``, and every record appended after it fails, the job's end
        included: the gate still holds)."""

    def forget(job_ids):  # noqa: N805
        """Drop these ended jobs' records (retention ran out)."""

    def close():  # noqa: N805
        """Flush and close; a Deferred that fires with None once done."""


# The name the scheduler's signature has always used.
Journal = IJournal


@implementer(IJournal)
class NullJournal:
    """No journal: every record is "durable" at once, and nothing survives a restart."""

    durable = False
    failure: JournalError | None = None

    def start(self) -> None:
        """Nothing to start."""
        pass

    def append(self, record: Record, lazy: bool = False) -> Deferred[None]:
        """The record is durable at once: a Deferred already fired with None."""
        return succeed(None)

    def hurry(self) -> None:
        """Nothing is held, so nothing to hurry."""
        pass

    def load(self) -> Recovered:
        """Nothing was kept: no jobs, and numbering starts at 1."""
        return Recovered([], 1)

    def stop(self) -> Deferred[None]:
        """The same as :meth:`close`: a Deferred already fired with None."""
        return self.close()

    def note(self, record: Record, then: Callable[[], None] | None = None) -> None:
        """Nothing is kept (and nothing is ever durable: ``then`` is not called)."""

    def forget(self, job_ids: list[str]) -> None:
        """Nothing is kept, so nothing to forget."""

    def close(self) -> Deferred[None]:
        """Nothing to close: a Deferred already fired with None."""
        return succeed(None)


@implementer(IJournal)
class MemoryJournal:
    """Records kept in memory. ``hold=True`` keeps appends pending until :meth:`flush`, so tests
    can observe what a client sees before and after a record becomes durable."""

    durable = True

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.failure: JournalError | None = None
        self.jobs: dict[str, JobRecord] = {}
        # Each record with its Deferred, or a note's "then" callable, or None.
        self.pending: list[tuple[Record, Any]] = []
        self.appended: list[Record] = []
        self.next_seq = 1  # never lowered by forget(): ids are not reused
        self.lazy: list[Record] = []  # records appended with lazy=True
        self.hurried = 0  # hurry() calls

    def start(self) -> None:
        """Nothing to start: memory is ready."""
        pass

    def break_with(self, message: str) -> None:
        """Fault injection: the disk fails now. Every pending record and every later append
        fails with ``JournalError(message)``, as a real journal's do after a failed commit."""
        self.failure = JournalError(message)
        pending, self.pending = self.pending, []
        for _, d in pending:
            if isinstance(d, Deferred):  # a note's "then" is never called: not durable
                d.errback(self.failure)

    def append(self, record: Record, lazy: bool = False) -> Deferred[None]:
        """Keep ``record``; the Deferred fires with None once it is flushed (at once unless
        ``hold``), or fails with the injected JournalError."""
        if self.failure is not None:
            return fail(self.failure)
        d: Deferred[None] = Deferred()
        self.appended.append(record)
        if lazy:
            self.lazy.append(record)
        self.pending.append((record, d))
        if not self.hold:
            self.flush()
        return d

    def note(self, record: Record, then: Callable[[], None] | None = None) -> None:
        """Keep ``record`` like :meth:`append`, with no Deferred (dropped once broken);
        ``then()`` once it is flushed."""
        if self.failure is None:
            self.appended.append(record)
            self.pending.append((record, then))
            if not self.hold:
                self.flush()

    def flush(self) -> None:
        """Apply every pending record to the kept jobs, then fire their Deferreds in append
        order."""
        pending, self.pending = self.pending, []
        for record, _ in pending:
            apply_record(self.jobs, record)
            if isinstance(record, JobAccepted):
                self.next_seq = max(self.next_seq, record.seq + 1)
        for _, d in pending:
            if isinstance(d, Deferred):
                d.callback(None)
            elif d is not None:
                d()  # a note's "then"

    def hurry(self) -> None:
        """Count the call, so tests can check who asked for durability at once."""
        self.hurried += 1

    def load(self) -> Recovered:
        """The kept jobs and the next sequence number, as a restarted server would read them
        back."""
        return Recovered(list(self.jobs.values()), self.next_seq)

    def forget(self, job_ids: list[str]) -> None:
        """Drop these jobs' records (their sequence numbers stay used)."""
        for j in job_ids:
            self.jobs.pop(j, None)

    def close(self) -> Deferred[None]:
        """Flush what is pending; a Deferred already fired with None."""
        self.flush()
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """The same as :meth:`close`."""
        return self.close()


def apply_record(jobs: dict[str, JobRecord], record: Record) -> None:
    """Fold one record into a job table (how any journal reads back what it wrote)."""
    if isinstance(record, JobAccepted):
        jobs[record.job] = JobRecord(record, sealed=record.sealed)
    elif isinstance(record, ResultRecorded):
        rec = jobs.get(record.job)
        if rec is not None and rec.ended is None:
            rec.results.setdefault(record.index, record.result_json)
    elif isinstance(record, ChunksAdded):
        rec = jobs.get(record.job)
        if rec is not None and rec.ended is None:
            for i, text in enumerate(record.inputs_json, record.start):
                rec.chunks[i] = text
    elif isinstance(record, JobSealed):
        rec = jobs.get(record.job)
        if rec is not None and rec.ended is None:
            rec.sealed = record.total
    elif isinstance(record, JobEnded):
        rec = jobs.get(record.job)
        if rec is not None:
            rec.ended = record
            # Inputs and partial results are not needed once the job has ended.
            rec.results.clear()
            rec.chunks.clear()
