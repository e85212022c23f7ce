"""Fairness and prefetch: which job's sub-task a worker takes next, and how many it may hold.

Jobs with queued sub-tasks sit in a :class:`Ring`; each free slot takes one sub-task from the
next job in the ring that the worker can run, so a one-sub-task job submitted behind a
10,000-sub-task job is dispatched at the next free slot, not after the big one drains.

:class:`Prefetch` says how many sub-tasks a worker may hold while taking one of a job's: its
slots, or more when the job's sub-tasks are short, so one message round trip is not paid per
tiny sub-task. :class:`TaskTimes` keeps the moving mean run time per task it judges by.

Pure policy: no Deferreds, no clock. Imports only :mod:`clusterd.core.jobs` and
:mod:`clusterd.core.workers` (for types).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clusterd.core.jobs import Job
    from clusterd.core.workers import WorkerHandle

__all__ = ["Ring", "Prefetch", "TaskTimes"]


class TaskTimes:
    """A moving mean, per task, of how long its sub-tasks ran lately (seconds)."""

    def __init__(self) -> None:
        self.means: dict[str, float] = {}

    def note(self, task: str, duration: float) -> None:
        """Fold a sub-task's run time into its task's moving mean."""
        previous = self.means.get(task)
        self.means[task] = duration if previous is None else previous + 0.1 * (duration - previous)

    def mean(self, task: str) -> float | None:
        """The task's moving mean run time, or None before any sub-task of it has run."""
        return self.means.get(task)


class Prefetch:
    """How many sub-tasks a worker may hold: ``prefetch_below`` says which jobs are short,
    ``prefetch_window`` how many seconds of them a slot may hold queued."""

    def __init__(self, config: Any, times: TaskTimes) -> None:
        self.config = config  # read on every call: a test or operator may change a knob
        self.times = times

    def limit(self, worker: WorkerHandle, job: Job) -> int:
        """Its slots, or, for a job whose sub-tasks are short (and have no timeout, which runs
        from dispatch), slots x prefetch. A job with no answers yet is judged by its task's
        recent sub-tasks, so a stream of small jobs (one sub-task each) is prefetched too."""
        if job.options.timeout is not None:
            return worker.slots
        if job.durations_n:
            mean = job.durations_sum / job.durations_n
        else:
            mean = self.times.mean(job.task)
            if mean is None:
                return worker.slots
        if mean < self.config.prefetch_below:
            # About `window` seconds of work per slot, at most --prefetch sub-tasks: a 20 µs
            # sub-task gets a deep queue (batches amortise every message), a 5 ms one a shallow
            # one, so no worker sits on much more work than the others at a job's end.
            window = int(self.config.prefetch_window / max(mean, 1e-6))
            return worker.slots * max(2, min(worker.prefetch, window))
        return worker.slots


class Ring:
    """Jobs with queued sub-tasks, served round-robin."""

    def __init__(self) -> None:
        self._ring: deque[Job] = deque()
        self._in_ring: set[str] = set()
        self._last_served: Job | None = None

    def __bool__(self) -> bool:
        return bool(self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, job: Job) -> None:
        """Join the ring just ahead of the job served last, so a newcomer is served before
        that job gets another turn (round-robin), not after it. No-op without queued work."""
        if job.id not in self._in_ring and job.has_pending():
            self._in_ring.add(job.id)
            if self._ring and self._ring[-1] is self._last_served:
                self._ring.insert(len(self._ring) - 1, job)
            else:
                self._ring.append(job)

    def next_for(
        self, worker: WorkerHandle, limit: Callable[[WorkerHandle, Job], int]
    ) -> Job | None:
        """The next job in the ring whose sub-task ``worker`` can run and hold (its ``busy``
        under ``limit(worker, job)``); jobs found with nothing queued leave the ring."""
        for _ in range(len(self._ring)):
            job = self._ring.popleft()
            if not job.has_pending():
                self._in_ring.discard(job.id)
                continue
            self._ring.append(job)
            if job.task in worker.tasks and worker.busy < limit(worker, job):
                self._last_served = job
                return job
        return None
