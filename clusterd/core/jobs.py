"""A job and its sub-tasks: the state machine, with no I/O.

A job is split once, at submit (and again, identically, when a journal is recovered), or, when
its input is streamed, grows sub-task by sub-task as the input arrives until it is *sealed*. Its
sub-tasks are numbered 0..n-1; ``next_index`` hands out fresh ones lazily and ``retry`` holds
indices handed back, so a queued sub-task costs no object of its own. Only dispatched sub-tasks
have state (:attr:`inflight`), and only failed ones a counter (:attr:`failures`, :attr:`lost`).
The job owns these transitions (:meth:`dispatched`, :meth:`released`, :meth:`attempt_failed`,
:meth:`worker_lost`, :meth:`backing_off`, :meth:`retry_due`); the scheduler owns the Deferreds
and the timers (a retry's backoff) and only calls them.

Each result is recorded exactly once: a duplicate or late result (the job already has it, or the
job has ended) is ignored and counted. Results are kept by index, or, for a task that declares
``merge``, folded into one accumulator as they are recorded (:mod:`clusterd.core.folding`). A job's waiters are told of its end only once the end is
durable (``settle``), so an answer a client saw is never lost by a crash.

That is the one gate between the core and anything a client is shown: an id waits for
:meth:`Job.when_durable`, an end (an answer, a failure, a cancel) for :meth:`Job.wait`, and
:meth:`Job.status` shows a final state only once it is settled. When the journal cannot make a
record durable, those Deferreds fail with the journal's error instead of firing, so no path (an
error handler included) can show what a restart would not find.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from clusterd.core.folding import Merge, results_for
from clusterd.core.joboptions import JobOptions, Tally
from clusterd.core.states import JobState
from clusterd.core.waiters import Waiters

__all__ = ["Job", "JobState", "JobOptions", "Tally"]


class Job:
    """One job: its sub-tasks, its results, and the two gates (durable, ended) clients wait on."""

    def __init__(
        self,
        job_id: str,
        task: str,
        chunks: list[Any],
        submitted: float,
        options: JobOptions | None = None,
        tally: Tally | None = None,
        key: str | None = None,
        sealed: bool = True,
        merge: Merge | None = None,
    ) -> None:
        self.id = job_id
        self.tally = tally if tally is not None else Tally()
        self.tally.queued += len(chunks)
        self.task = task
        self.chunks = chunks
        self.total = len(chunks)
        self.sealed = sealed  # False while a streamed input is still arriving
        self.input_size = 0  # streamed jobs: items (list inputs) or bytes (text) received
        self.ref: dict[str, Any] | None = None  # an input by reference: its url, size, format
        self.options = options or JobOptions(None, 1)
        self.results = results_for(self.total, merge)  # by index, or folded (merge)
        self.done = 0  # results recorded (what completion counts)
        self.shown_done = 0  # of those, results known durable: the progress clients see
        self.running = 0
        self.next_index = 0
        self.retry: deque[int] = deque()
        self.state = JobState.QUEUED
        self.result: Any = None
        self.result_json: str | None = None  # the answer, encoded once
        self.error: dict[str, Any] | None = None  # {"code":..., "type":..., "message":...}
        self.submitted = submitted
        self.shown_state = JobState.QUEUED
        self.recorded = False  # its acceptance record is durable: its id exists for good
        self.finished: float | None = None
        self.key = key  # its idempotency key, if any
        self.duplicates = 0
        self.requeued = 0
        self.recovered = 0
        self.ran_on: Counter[str] = Counter()
        self.failures: dict[int, int] = {}  # index -> failed attempts
        self.lost: dict[int, int] = {}  # index -> times its worker vanished while running it
        self.inflight: dict[int, list[Any]] = {}  # index -> dispatches (scheduler's objects)
        self.retrying: set[int] = set()  # indices waiting out a retry backoff
        self.durations_sum = 0.0
        self.durations_n = 0
        self.first_sent: float | None = None  # when its first sub-task was sent (metrics)
        self._durable = Waiters()
        self._ended = Waiters()
        self._watchers: list[Callable[[Job], None]] = []
        # Called after each take while a streamed upload waits for room (server/streams.py).
        self.on_take: Callable[[], None] | None = None

    # -- queue ---------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Sub-tasks waiting for a worker (not counting those waiting out a retry backoff)."""
        if self.state in JobState.FINAL:
            return 0
        return (self.total - self.next_index) + len(self.retry)

    def has_pending(self) -> bool:
        """Whether the job has a sub-task to hand out (fresh or given back) and has not ended."""
        return self.state not in JobState.FINAL and (
            bool(self.retry) or self.next_index < self.total
        )

    def take(self) -> int:
        """The next sub-task to dispatch (callers check :meth:`has_pending` first)."""
        if self.retry:
            index = self.retry.popleft()
        else:
            index = self.next_index
            self.next_index += 1
        self.tally.queued -= 1
        if self.state == JobState.QUEUED:
            self.state = JobState.RUNNING
        if self.on_take is not None:
            self.on_take()
        return index

    def requeue(self, index: int, front: bool = True) -> bool:
        """Queue a sub-task again; False when that is pointless (ended, or already answered)."""
        if self.state in JobState.FINAL or self.results.has(index):
            return False
        self.requeued += 1
        self.tally.queued += 1
        if front:
            self.retry.appendleft(index)
        else:
            self.retry.append(index)
        return True

    def add_chunks(self, chunks: list[Any]) -> None:
        """A streamed input grew by these sub-task inputs (queued after the others)."""
        self.chunks.extend(chunks)
        self.results.grow(len(chunks))
        self.total += len(chunks)
        if self.state not in JobState.FINAL:
            self.tally.queued += len(chunks)

    def seal(self) -> None:
        """A streamed input is complete: the job can finish once every sub-task has a result."""
        self.sealed = True

    def has_result(self, index: int) -> bool:
        """Whether sub-task ``index``'s result is in (or the job ended): another is a duplicate."""
        return self.state in JobState.FINAL or self.results.has(index)

    def prefill(self, results: dict[int, Any]) -> None:
        """Recovery: install results a journal already holds (a merge task folds them again);
        queue only the missing ones."""
        before = self.queued
        for index, value in results.items():
            if 0 <= index < self.total and not self.results.has(index):
                self.results.put(index, value)
                self.chunks[index] = None
                self.done += 1
                self.shown_done += 1  # read back from the journal: durable
                self.recovered += 1
        self.next_index = self.total
        self.retry = deque(i for i in range(self.total) if not self.results.has(i))
        self.tally.queued += self.queued - before
        if self.done:
            self.state = JobState.RUNNING

    def dispatched(self, disp: Any) -> int:
        """A copy of sub-task ``disp.index`` was sent; returns its attempt number."""
        self.inflight.setdefault(disp.index, []).append(disp)
        self.running += 1
        return self.failures.get(disp.index, 0) + 1

    def released(self, disp: Any) -> None:
        """A copy sent by :meth:`dispatched` answered, failed or was cancelled."""
        copies = self.inflight.get(disp.index)
        if copies is not None:
            copies.remove(disp)
            if not copies:
                del self.inflight[disp.index]
        self.running -= 1

    def attempt_failed(self, index: int) -> int:
        """Count a failed attempt of sub-task ``index``; returns the attempts failed so far."""
        n = self.failures[index] = self.failures.get(index, 0) + 1
        return n

    def worker_lost(self, index: int) -> int:
        """Count a worker vanishing under sub-task ``index``; returns how often it did."""
        n = self.lost[index] = self.lost.get(index, 0) + 1
        return n

    def backing_off(self, index: int) -> None:
        """Sub-task ``index`` waits out a retry backoff (shown as ``retrying``)."""
        self.retrying.add(index)

    def retry_due(self, index: int) -> bool:
        """Its backoff is over: queue it again; False when that is pointless."""
        self.retrying.discard(index)
        return self.requeue(index)

    def restore_end(self, ended: Any) -> None:
        """Recovery: become the ended job a journal's ``JobEnded`` record describes; its end is
        in the journal, so it is settled at once."""
        self.total = ended.total
        self.state, self.finished, self.error = ended.state, ended.finished, ended.error
        self.result_json = ended.result_json
        self.chunks, self.results = [], results_for(0, None)
        self.next_index = self.total
        if ended.state == JobState.DONE:
            self.done = self.shown_done = self.total
        self.settle()

    # -- results -------------------------------------------------------------------------------

    def record(self, index: int, result: Any, worker: str, duration: float = 0.0) -> bool:
        """Store a sub-task's result; False (and counted) when it is a duplicate or too late."""
        if self.state in JobState.FINAL or self.results.has(index):
            self.duplicates += 1
            return False
        self.results.put(index, result)  # kept, or folded in and dropped (merge)
        self.chunks[index] = None  # its input is not needed again: memory goes as work is done
        self.done += 1
        self.ran_on[worker] += 1
        self.durations_sum += duration
        self.durations_n += 1
        self.failures.pop(index, None)
        return True

    def result_durable(self) -> None:
        """One recorded result is now durable (its journal record committed, or there is no
        journal): progress may count it. Progress never shows a result a crash could lose, so
        it never goes back after a restart."""
        self.shown_done += 1
        self._notify()

    def complete(self) -> bool:
        """Whether all results are in, the input sealed and the job not ended: it can combine.
        A merge that raised completes the job at once: its combine fails with that error."""
        if self.state in JobState.FINAL:
            return False
        return (self.sealed and self.done == self.total) or self.results.error is not None

    def ordered_results(self) -> list[Any]:
        """What the task's combine takes: every result in order, or the one merged value."""
        return self.results.ordered()

    def mean_duration(self) -> float | None:
        return self.durations_sum / self.durations_n if self.durations_n else None

    # -- ending --------------------------------------------------------------------------------

    def finish(
        self,
        state: str,
        now: float,
        result: Any = None,
        error: dict | None = None,
        encoded: str | None = None,
    ) -> None:
        """Move to a final state at once (nothing more is dispatched); waiters hear of it only
        when :meth:`settle` is called, once the end is durable. ``encoded``: the answer as
        encoded once, for every reply that carries it."""
        if self.state in JobState.FINAL:
            return
        self.result_json = encoded
        self.tally.queued -= self.queued
        self.shown_state = self.state  # what status() shows until the end is durable
        self.state = state
        self.result = result
        self.error = error
        self.finished = now
        # Inputs and partial results are no longer needed; keep only the answer.
        self.chunks = []
        self.results = results_for(0, None)
        self.retry.clear()
        self.retrying.clear()
        # Watchers stay until the end is durable: results recorded before the end become
        # durable with it (or just before it), and progress may still count them.
        self._notify()

    def settle(self) -> None:
        """The end is durable: waiters hear of it, and views show it."""
        self._ended.fire(self)
        self._watchers.clear()

    def settle_failed(self, error: BaseException) -> None:
        """The end could not be made durable: every waiter fails with ``error``, so no client
        is shown an end that a restart would not find."""
        self._ended.fail(error)
        self._watchers.clear()

    @property
    def is_final(self) -> bool:
        """Whether the job has ended (done, failed or cancelled), durable or not."""
        return self.state in JobState.FINAL

    @property
    def settled(self) -> bool:
        """Whether the job's end is durable and its waiters told."""
        return self._ended.fired

    def wait(self) -> Deferred[Job]:
        """A Deferred that fires with this job once its end is recorded (at once if it is)."""
        return self._ended.add()

    def mark_recorded(self) -> None:
        """Its acceptance record is durable: its id exists for good (views and lookups)."""
        self.recorded = True

    def mark_durable(self) -> None:
        """The job's acceptance (its input, as cut) is durable: its id may be shown."""
        self._durable.fire(self)

    def not_durable(self, error: BaseException) -> None:
        """The acceptance could not be made durable: whoever waits for the id gets ``error``."""
        self._durable.fail(error)

    def not_durable_failure(self, failure: Any) -> None:
        """:meth:`not_durable` as an errback (``failure`` is a Twisted ``Failure``)."""
        self._durable.fail(failure.value)

    @property
    def accepted(self) -> bool:
        """Whether the id was (or may be) shown as accepted: acceptance durable, not refused.
        A job never accepted (an abandoned upload, a refused acceptance) holds no key."""
        return self._durable.fired and self._durable.error is None

    def when_durable(self) -> Deferred[Job]:
        """Fires once the job's acceptance is durable: only then may a client see its id."""
        return self._durable.add()

    def watch(self, fn: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``fn(job)`` on each durable result and at the end, until the end is durable
        (never for an ended job)."""
        if self.is_final:
            return lambda: None
        self._watchers.append(fn)

        def unsubscribe() -> None:
            if fn in self._watchers:
                self._watchers.remove(fn)

        return unsubscribe

    def _notify(self) -> None:
        for fn in list(self._watchers):
            fn(self)

    # -- views ---------------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """The job's progress as a PROGRESS line carries it: sub-tasks done and in all."""
        return {"done": self.shown_done, "total": self.total}

    @property
    def visible_state(self) -> str:
        """The state a client may see: a final state only once it is durable (settled)."""
        ended = self._ended
        if self.state in JobState.FINAL and (not ended.fired or ended.error is not None):
            return self.shown_state
        return self.state

    def status(self) -> dict[str, Any]:
        """The job's STATUS object; a final state shows only once the end is settled."""
        final = self.is_final
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "state": self.visible_state,
            "total": self.total,
            "done": self.shown_done,
            "running": 0 if final else self.running,
            "queued": 0 if final else self.queued,
            "retrying": 0 if final else len(self.retrying),
            "submitted": round(self.submitted, 3),
            "ran_on": dict(self.ran_on),
            "requeued": self.requeued,
            "duplicates": self.duplicates,
            "recovered": self.recovered,
        }
        if self.key is not None:
            out["key"] = self.key
        if not self.sealed and not final:
            out["receiving"] = True
        if self.finished is not None and out["state"] in JobState.FINAL:
            out["finished"] = round(self.finished, 3)
            out["elapsed"] = round(self.finished - self.submitted, 6)
            if self.error is not None:
                out["error"] = self.error
        return out
