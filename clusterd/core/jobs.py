"""A job and its sub-tasks: the state machine, with no I/O.

A job is split once, at submit. Its sub-tasks are numbered 0..n-1; ``next_index`` hands out fresh
ones lazily and ``retry`` holds indices handed back (a worker was lost), so a queued sub-task costs
no object of its own. Each result is recorded exactly once: a duplicate or late result (the job
already has it, or the job has ended) is ignored and counted.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["Job", "JobState"]


class JobState:
    QUEUED = "queued"  # accepted, nothing dispatched yet
    RUNNING = "running"  # at least one sub-task dispatched
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = frozenset({DONE, FAILED, CANCELLED})


_MISSING = object()


class Job:
    def __init__(self, job_id: str, task: str, chunks: list[Any], submitted: float) -> None:
        self.id = job_id
        self.task = task
        self.chunks = chunks
        self.total = len(chunks)
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
        self.duplicates = 0
        self.requeued = 0
        self.ran_on: Counter[str] = Counter()
        self._waiters: list[Deferred[Job]] = []
        self._watchers: list[Callable[[Job], None]] = []

    # -- queue ---------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Sub-tasks waiting for a worker."""
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
        self.running += 1
        if self.state == JobState.QUEUED:
            self.state = JobState.RUNNING
        return index

    def give_back(self, index: int) -> None:
        """A dispatched sub-task came back without a result: queue it again, first in line."""
        self.running -= 1
        if self.state in JobState.FINAL or self.results[index] is not _MISSING:
            return
        self.requeued += 1
        self.retry.appendleft(index)

    # -- results -------------------------------------------------------------------------------

    def record(self, index: int, result: Any, worker: str) -> bool:
        """Store a sub-task's result; False (and counted) when it is a duplicate or too late."""
        self.running -= 1
        if self.state in JobState.FINAL or self.results[index] is not _MISSING:
            self.duplicates += 1
            return False
        self.results[index] = result
        self.done += 1
        self.ran_on[worker] += 1
        self._notify()
        return True

    def complete(self) -> bool:
        return self.done == self.total and self.state not in JobState.FINAL

    def ordered_results(self) -> list[Any]:
        return list(self.results)

    # -- ending --------------------------------------------------------------------------------

    def finish(self, state: str, now: float, result: Any = None, error: dict | None = None) -> None:
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
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)

    @property
    def is_final(self) -> bool:
        return self.state in JobState.FINAL

    def wait(self) -> Deferred[Job]:
        """A Deferred that fires with this job once it has ended (at once if it has)."""
        if self.is_final:
            d: Deferred[Job] = Deferred()
            d.callback(self)
            return d
        d = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        return d

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
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "running": max(self.running, 0) if not self.is_final else 0,
            "queued": self.queued if not self.is_final else 0,
            "submitted": round(self.submitted, 3),
            "ran_on": dict(self.ran_on),
            "requeued": self.requeued,
            "duplicates": self.duplicates,
        }
        if self.finished is not None:
            out["finished"] = round(self.finished, 3)
            out["elapsed"] = round(self.finished - self.submitted, 6)
        if self.error is not None:
            out["error"] = self.error
        return out
