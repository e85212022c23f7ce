"""A job and its sub-tasks: the state machine, with no I/O.

A job is split once, at submit (and again, identically, when a journal is recovered), or, when
its input is streamed, grows sub-task by sub-task as the input arrives until it is *sealed*. Its
sub-tasks are numbered 0..n-1; ``next_index`` hands out fresh ones lazily and ``retry`` holds
indices handed back, so a queued sub-task costs no object of its own. Only dispatched sub-tasks
have state (:attr:`inflight`), and only failed ones a counter (:attr:`failures`, :attr:`lost`).

Each result is recorded exactly once: a duplicate or late result (the job already has it, or the
job has ended) is ignored and counted. A job's waiters are told of its end only once the end is
durable (``settle``), so an answer a client saw is never lost by a crash.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["Job", "JobState", "JobOptions"]


class JobState:
    QUEUED = "queued"  # accepted, nothing dispatched yet
    RUNNING = "running"  # at least one sub-task dispatched
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = frozenset({DONE, FAILED, CANCELLED})


_MISSING = object()


class JobOptions:
    """Per-job knobs, after defaults: sub-task timeout (None: none) and attempts per sub-task."""

    __slots__ = ("timeout", "attempts")

    def __init__(self, timeout: float | None, attempts: int) -> None:
        self.timeout = timeout
        self.attempts = attempts


class _Waiters:
    """Deferreds to fire once, with late subscribers answered at once."""

    def __init__(self) -> None:
        self.fired = False
        self.value: Any = None
        self._ds: list[Deferred[Any]] = []

    def add(self) -> Deferred[Any]:
        if self.fired:
            d: Deferred[Any] = Deferred()
            d.callback(self.value)
            return d
        d = Deferred(lambda d: self._ds.remove(d) if d in self._ds else None)
        self._ds.append(d)
        return d

    def fire(self, value: Any) -> None:
        if self.fired:
            return
        self.fired, self.value = True, value
        ds, self._ds = self._ds, []
        for d in ds:
            d.callback(value)


class Job:
    def __init__(
        self,
        job_id: str,
        task: str,
        chunks: list[Any],
        submitted: float,
        options: JobOptions | None = None,
    ) -> None:
        self.id = job_id
        self.task = task
        self.chunks = chunks
        self.total = len(chunks)
        self.sealed = True  # False while a streamed input is still arriving
        self.input_size = 0  # streamed jobs: items or characters received
        self.options = options or JobOptions(None, 1)
        self.results: list[Any] = [_MISSING] * self.total
        self.done = 0
        self.running = 0
        self.next_index = 0
        self.retry: deque[int] = deque()
        self.state = JobState.QUEUED
        self.result: Any = None
        self.result_json: str | None = None  # the answer, encoded once
        self.error: dict[str, Any] | None = None  # {"code":..., "type":..., "message":...}
        self.submitted = submitted
        self.finished: float | None = None
        self.key: str | None = None
        self.owner: object | None = None  # the connection that submitted it, for per-client limits
        self.duplicates = 0
        self.requeued = 0
        self.recovered = 0
        self.ran_on: Counter[str] = Counter()
        self.failures: dict[int, int] = {}  # index -> failed attempts
        self.lost: dict[int, int] = {}  # index -> times its worker vanished while running it
        self.inflight: dict[int, list[Any]] = {}  # index -> dispatches (scheduler's objects)
        self.delayed: dict[int, Any] = {}  # index -> IDelayedCall of a retry after backoff
        self.durations_sum = 0.0
        self.durations_n = 0
        self._durable = _Waiters()
        self._ended = _Waiters()
        self._watchers: list[Callable[[Job], None]] = []

    # -- queue ---------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Sub-tasks waiting for a worker (not counting those waiting out a retry backoff)."""
        if self.state in JobState.FINAL:
            return 0
        return (self.total - self.next_index) + len(self.retry)

    def has_pending(self) -> bool:
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
        if self.state == JobState.QUEUED:
            self.state = JobState.RUNNING
        return index

    def requeue(self, index: int, front: bool = True) -> bool:
        """Queue a sub-task again; False when that is pointless (ended, or already answered)."""
        if self.state in JobState.FINAL or self.results[index] is not _MISSING:
            return False
        self.requeued += 1
        if front:
            self.retry.appendleft(index)
        else:
            self.retry.append(index)
        return True

    def add_chunks(self, chunks: list[Any]) -> None:
        """A streamed input grew by these sub-task inputs (queued after the others)."""
        self.chunks.extend(chunks)
        self.results.extend([_MISSING] * len(chunks))
        self.total += len(chunks)

    def seal(self) -> None:
        """A streamed input is complete: the job can finish once every sub-task has a result."""
        self.sealed = True

    def has_result(self, index: int) -> bool:
        return self.state in JobState.FINAL or self.results[index] is not _MISSING

    def prefill(self, results: dict[int, Any]) -> None:
        """Recovery: install results a journal already holds; queue only the missing ones."""
        for index, value in results.items():
            if 0 <= index < self.total and self.results[index] is _MISSING:
                self.results[index] = value
                self.chunks[index] = None
                self.done += 1
                self.recovered += 1
        self.next_index = self.total
        self.retry = deque(i for i in range(self.total) if self.results[i] is _MISSING)
        if self.done:
            self.state = JobState.RUNNING

    # -- results -------------------------------------------------------------------------------

    def record(self, index: int, result: Any, worker: str, duration: float = 0.0) -> bool:
        """Store a sub-task's result; False (and counted) when it is a duplicate or too late."""
        if self.state in JobState.FINAL or self.results[index] is not _MISSING:
            self.duplicates += 1
            return False
        self.results[index] = result
        self.chunks[index] = None  # its input is not needed again: memory goes as work is done
        self.done += 1
        self.ran_on[worker] += 1
        self.durations_sum += duration
        self.durations_n += 1
        self.failures.pop(index, None)
        self._notify()
        return True

    def complete(self) -> bool:
        return self.sealed and self.done == self.total and self.state not in JobState.FINAL

    def ordered_results(self) -> list[Any]:
        return list(self.results)

    def mean_duration(self) -> float | None:
        return self.durations_sum / self.durations_n if self.durations_n else None

    # -- ending --------------------------------------------------------------------------------

    def finish(self, state: str, now: float, result: Any = None, error: dict | None = None) -> None:
        """Move to a final state at once (nothing more is dispatched); waiters hear of it only
        when :meth:`settle` is called, once the end is durable."""
        if self.state in JobState.FINAL:
            return
        self.state = state
        self.result = result
        self.error = error
        self.finished = now
        # Inputs and partial results are no longer needed; keep only the answer.
        self.chunks = []
        self.results = []
        self.retry.clear()
        self._notify()
        self._watchers.clear()

    def settle(self) -> None:
        self._ended.fire(self)

    @property
    def is_final(self) -> bool:
        return self.state in JobState.FINAL

    @property
    def settled(self) -> bool:
        return self._ended.fired

    def wait(self) -> Deferred[Job]:
        """A Deferred that fires with this job once its end is recorded (at once if it is)."""
        return self._ended.add()

    def mark_durable(self) -> None:
        self._durable.fire(self)

    def when_durable(self) -> Deferred[Job]:
        """Fires once the job's acceptance is durable: only then may a client see its id."""
        return self._durable.add()

    def watch(self, fn: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``fn(job)`` on every recorded result and at the end; returns an unsubscribe.
        An ended job has nothing more to report, so nothing is kept for it."""
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
        return {"done": self.done, "total": self.total}

    def status(self) -> dict[str, Any]:
        final = self.is_final
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "running": 0 if final else self.running,
            "queued": 0 if final else self.queued,
            "retrying": 0 if final else len(self.delayed),
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
        if self.finished is not None:
            out["finished"] = round(self.finished, 3)
            out["elapsed"] = round(self.finished - self.submitted, 6)
        if self.error is not None:
            out["error"] = self.error
        return out
