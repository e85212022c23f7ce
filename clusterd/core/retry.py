"""What to do when a sub-task fails, stalls or straggles: decisions, not actions.

:class:`RetryPolicy` turns a failed dispatch into a :class:`Decision`: ignore it (we cancelled
it, or another copy runs or won), requeue it (its worker vanished: not an attempt), retry it
after a backoff (an attempt failed: the task raised, timed out, or stalled), or fail the job
(attempts or ``max_lost`` ran out, or retrying cannot help). It also chooses which sub-tasks
stall (:meth:`RetryPolicy.stalled_on`) and which straggle (:meth:`RetryPolicy.stragglers`).

Failures are told apart by type (:mod:`clusterd.core.errors`), never by a wire string. The
scheduler applies a decision: it owns the counters, the timers and the Deferreds. Imports only
:mod:`clusterd.core.errors` and :mod:`clusterd.core.ring` (and job/worker types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.python.failure import Failure

from clusterd.core.errors import ErrorCode, NotRetryable, ResultTooLarge, TaskFailed, WorkerLost

if TYPE_CHECKING:
    from clusterd.core.jobs import Job
    from clusterd.core.ring import TaskTimes
    from clusterd.core.workers import WorkerHandle

__all__ = ["Decision", "RetryPolicy", "IGNORE", "REQUEUE", "RETRY", "FAIL"]

IGNORE, REQUEUE, RETRY, FAIL = "ignore", "requeue", "retry", "fail"
# What a failure is charged to: nothing, an attempt, or a lost worker.
ATTEMPT, LOST = "attempt", "lost"


@dataclass(frozen=True)
class Decision:
    """``action``: IGNORE, REQUEUE, RETRY (after ``delay`` s) or FAIL (the job, with
    ``error``). ``charge``: ATTEMPT (counts against the job's attempts and the worker's
    failures) or LOST (against ``max_lost``). ``why`` names the cause for logs and counters:
    "cancelled", "timeout", "stalled", "task", "too_large", "lost", "unexpected"."""

    action: str
    why: str
    error: dict[str, Any] | None = None
    delay: float = 0.0
    charge: str | None = None


class RetryPolicy:
    """Attempts, ``max_lost``, the backoff, stall deadlines and straggler choice, from the
    scheduler's config (read on every call) and the tasks' recent run times."""

    def __init__(self, config: Any, times: TaskTimes) -> None:
        self.config = config
        self.times = times

    def backoff(self, failed: int) -> float:
        """Seconds before retry number ``failed``: doubled per failed attempt, capped."""
        return min(self.config.retry_cap, self.config.retry_base * 2 ** (failed - 1))

    def on_failure(self, failure: Failure, job: Job, index: int, worker: str) -> Decision:
        """The decision for one failed dispatch of ``job``'s sub-task ``index`` on ``worker``
        (the dispatch already released)."""
        if failure.check(CancelledError) or job.has_result(index) or job.inflight.get(index):
            return Decision(IGNORE, "cancelled")
        if failure.check(TimeoutError):
            message = f"sub-task ran longer than {job.options.timeout}s"
            error = {"code": ErrorCode.TIMEOUT, "type": "Timeout", "message": message}
            return self._attempt(job, index, worker, error, "timeout")
        if failure.check(ResultTooLarge):
            err = failure.value  # retrying cannot make it fit
            error = {"code": err.code, "type": err.type, "message": err.message}
            error.update(index=index, worker=worker)
            return Decision(FAIL, "too_large", error)
        if failure.check(TaskFailed):
            err = failure.value
            error = {"code": err.code, "type": err.type, "message": err.message}
            if err.traceback:
                error["traceback"] = err.traceback
            if failure.check(NotRetryable):  # the task said retrying cannot help
                n = job.failures.get(index, 0) + 1
                error.update(index=index, attempts=n, worker=worker)
                return Decision(FAIL, "task", error, charge=ATTEMPT)
            return self._attempt(job, index, worker, error, "task")
        why = "lost" if failure.check(WorkerLost) else "unexpected"
        lost = job.lost.get(index, 0) + 1
        if lost > self.config.max_lost:
            error = {
                "code": ErrorCode.WORKER_LOST,
                "type": "WorkerLost",
                "message": f"sub-task {index} lost its worker {lost} times",
                "index": index,
                "worker": worker,
            }
            return Decision(FAIL, why, error, charge=LOST)
        return Decision(REQUEUE, why, charge=LOST)

    def on_stall(self, job: Job, index: int, worker: str, reason: str) -> Decision:
        """The decision for a dispatch :meth:`stalled_on` took back (``reason``: "worker",
        the worker was wedged and dropped; "subtask", just this sub-task overran)."""
        if job.has_result(index) or job.inflight.get(index):
            return Decision(IGNORE, "cancelled")
        if reason == "worker":
            return Decision(REQUEUE, "lost")
        limit = self.stall_limit(job) or 0.0
        message = (
            f"no answer after {limit:g}s ({self.config.stall_factor:g}x the task's mean run time)"
        )
        error = {"code": ErrorCode.TIMEOUT, "type": "Stalled", "message": message}
        return self._attempt(job, index, worker, error, "stalled")

    def _attempt(
        self, job: Job, index: int, worker: str, error: dict[str, Any], why: str
    ) -> Decision:
        n = job.failures.get(index, 0) + 1
        if n >= job.options.attempts:
            error.update(index=index, attempts=n, worker=worker)
            return Decision(FAIL, why, error, charge=ATTEMPT)
        return Decision(RETRY, why, error, self.backoff(n), ATTEMPT)

    # -- stalls --------------------------------------------------------------------------------

    def stall_limit(self, job: Job) -> float | None:
        """Seconds after which a sub-task of ``job`` with no timeout of its own stalls:
        ``stall_factor`` x its mean run time, at least ``stall_min``; None while unknown."""
        if job.options.timeout is not None:
            return None  # the job's own timeout takes it back
        mean = job.mean_duration()
        if mean is None:
            mean = self.times.mean(job.task)
        if mean is None:
            return None
        return max(self.config.stall_min, self.config.stall_factor * mean)

    def stalled_on(self, worker: WorkerHandle, now: float) -> tuple[str, list[Any]] | None:
        """What to take back from ``worker``: None, or ("subtask", its oldest dispatches past
        their deadline), or ("worker", all it holds) when it answered nothing for the oldest
        one's deadline: it is wedged. Looks at its oldest dispatches only."""
        stalled: list[Any] = []
        limit = None
        for disp in worker.dispatches:
            disp_limit = self.stall_limit(disp.job)
            if disp_limit is None or now - disp.started < disp_limit:
                break
            stalled.append(disp)
            limit = disp_limit if limit is None else limit
        if not stalled or limit is None:
            return None
        if now - max(worker.last_answer, stalled[0].started) >= limit:
            return "worker", list(worker.dispatches)
        return "subtask", stalled

    # -- stragglers ----------------------------------------------------------------------------

    def straggling(self, job: Job, now: float) -> list[tuple[int, WorkerHandle]]:
        """``job``'s sub-tasks that straggle (index, worker running it): the job has nothing
        queued, enough finished sub-tasks to trust their mean, and the sub-task's only copy
        has run ``speculate_factor`` times that mean."""
        cfg = self.config
        if job.is_final or job.queued or job.durations_n < cfg.speculate_min_done:
            return []
        threshold = max(cfg.speculate_min_seconds, cfg.speculate_factor * job.mean_duration())
        out = []
        for index, copies in list(job.inflight.items()):
            if len(copies) == 1 and now - copies[0].started >= threshold:
                out.append((index, copies[0].worker))
        return out

    @staticmethod
    def spare_for(workers: Any, task: str, running_on: WorkerHandle) -> WorkerHandle | None:
        """The worker with the most free slots, other than ``running_on``, that runs ``task``."""
        spare = [w for w in workers if w.free > 0 and w is not running_on and task in w.tasks]
        return max(spare, key=lambda w: w.free) if spare else None
