"""The journal's writer thread: group commit, lingering lazy records, and delivering the
waiters' answers back on the reactor in commit order, a bounded number per reactor turn.

Why a thread of our own rather than ``deferToThread`` per write: one writer owns the connection,
and every record that queued up while the last transaction was being fsynced goes into the next
one, so a burst of 10,000 results costs a handful of commits, not 10,000.

:class:`GroupCommitWriter` knows nothing of SQLite: a subclass supplies ``_write(records) ->
bool`` (commit them in one transaction; True if housekeeping is worth it), ``_tidy()``,
``_break(error)`` and ``_shut()``. May import Twisted's ``defer`` and ``logger`` only; the reactor
is injected and used only for ``callFromThread`` and ``callLater``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, fail

from clusterd.core.journal import JournalError, ResultRecorded

__all__ = ["FIRE_PER_TURN", "GroupCommitWriter"]

FIRE_PER_TURN = 256  # waiters fired per reactor turn (see GroupCommitWriter._deliver)
_STOP = object()
_HURRY = object()  # wakes a lingering writer: somebody waits for what is queued
# Records nobody waits for: the scheduler ignores a result's Deferred (a crash before its commit
# only runs that sub-task again), and a forget is housekeeping.
_LAZY_TYPES = (ResultRecorded,)


class GroupCommitWriter:
    """Queue records from the reactor thread; one writer thread commits them in batches."""

    failure: JournalError | None
    # Called on the writer thread with the seconds each commit (transaction and sync) took,
    # once per batch of records, never per record (metrics).
    commit_observer: Any = None

    def __init__(self, reactor: Any, batch_max: int, linger: float) -> None:
        self.reactor = reactor
        self.batch_max = batch_max
        self.linger = linger  # seconds a batch of lazy records may wait for an urgent one
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent = threading.Event()  # set when an urgent record is queued
        self._thread: threading.Thread | None = None
        self._closed: Deferred[None] | None = None
        self.failure = None  # set for good by the first failed write
        self._answers: deque[tuple[Deferred[None], JournalError | None]] = deque()
        self._firing: Any = None  # the callLater(0) that fires the next waiters

    # -- the subclass's part -------------------------------------------------------------------

    def _write(self, records: list[Any]) -> bool:
        raise NotImplementedError

    def _tidy(self) -> None:
        raise NotImplementedError

    def _break(self, error: BaseException) -> None:
        raise NotImplementedError

    def _shut(self) -> None:
        """Close the storage (on the writer thread, or the reactor's if it never started)."""
        raise NotImplementedError

    # -- the reactor thread's API --------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (once); appends made before it are written then."""
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

    def note(self, record: Any, then: Any = None) -> None:
        """Queue a record nobody waits for (a sub-task's result): no Deferred; ``then()`` is
        called on the reactor once it is committed (a job's durable progress). A failure to
        write it breaks the journal, so ``then`` is never called and a later record (the
        job's end) fails: nothing is shown."""
        if self.failure is None:
            self._queue.put((record, then, time.monotonic()))

    def hurry(self) -> None:
        """Somebody now waits for what is queued (a SUBMIT's id): commit it without lingering."""
        self._queue.put((_HURRY, None, None))
        self._urgent.set()

    def _put_lazy(self, record: Any) -> None:
        """Queue a record nobody waits for (housekeeping)."""
        self._queue.put((record, None, time.monotonic()))

    def close(self) -> Deferred[None]:
        """Commit everything queued, then close; fires when done."""
        if self._closed is None:
            self._closed = Deferred()
            if self._thread is None:
                self._shut()
                self._closed.callback(None)
            else:
                self._queue.put((_STOP, None, None))
                self._urgent.set()
        return self._closed

    # -- the writer thread ---------------------------------------------------------------------

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
                    began = time.monotonic()
                    tidy = self._write(records)
                    if self.commit_observer is not None and records:
                        self.commit_observer(time.monotonic() - began)
                except Exception as e:  # disk full, read-only, I/O error, file deleted
                    self._break(e)
            waiters = [(d, self.failure) for _, d, _ in batch if d is not None]
            if waiters:
                self.reactor.callFromThread(self._deliver, waiters)
            if tidy and self.failure is None:
                self._tidy()
            if stop:
                self._shut()
                self.reactor.callFromThread(self._deliver, [(self._closed, None)])
                return

    # -- back on the reactor -------------------------------------------------------------------

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
            if type(d) is not Deferred:  # a note's "then": only once durable
                if failure is None:
                    d()
            elif failure is None:
                d.callback(None)
            else:
                d.errback(failure)
        if answers:
            self._firing = self.reactor.callLater(0, self._fire)
