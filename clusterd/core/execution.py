"""Sending sub-tasks and taking their answers: the Deferred of every send.

:class:`Execution` sends a sub-task to a worker (:meth:`send`), and when the send's Deferred
fires, records the result exactly once (journaling it, cancelling a speculative copy that lost)
or applies what :class:`~clusterd.core.retry.RetryPolicy` decides about the failure: requeue,
retry after a backoff (a :class:`~clusterd.core.endings.Backoffs` timer), or fail the job. It
also takes back stalled sub-tasks and starts backup copies of stragglers.

After each answer it asks the dispatcher for more (``pump``): the arrow goes execution ->
dispatch -> execution.send through callables, never through an import. Imports
:mod:`clusterd.core.retry`, :mod:`clusterd.core.endings`, :mod:`clusterd.core.workers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core import retry as r
from clusterd.core.endings import Backoffs, Endings
from clusterd.core.errors import ErrorCode
from clusterd.core.jobs import Job, JobState
from clusterd.core.journal import ResultRecorded
from clusterd.core.refs import RefRange
from clusterd.core.ring import Ring, TaskTimes
from clusterd.core.taskstream import TaskStream
from clusterd.core.wire import dumps
from clusterd.core.workers import Dispatch, SubTask, TimedResult, WorkerHandle

__all__ = ["Execution"]


class Execution:
    """Sends sub-tasks to workers and takes their answers: records each result once, or applies the
    retry policy to a failure."""

    log = Logger(namespace="clusterd.core.scheduler.Scheduler")

    def __init__(
        self,
        clock: IReactorTime,
        counters: dict[str, int],
        policy: r.RetryPolicy,
        times: TaskTimes,
        ring: Ring,
        endings: Endings,
        backoffs: Backoffs,
    ) -> None:
        self.clock = clock
        self.counters = counters
        self.policy = policy
        self.times = times
        self.ring = ring
        self.endings = endings
        self.backoffs = backoffs
        self.pump: Callable[..., None] = lambda only=None: None  # set by the scheduler
        self.freed: Callable[[WorkerHandle], None] = lambda worker: None  # likewise
        self.busy = 0  # sub-tasks dispatched and not answered, over all workers
        self.stream = TaskStream()  # recent sub-task runs, for the dashboard

    def send(self, worker: WorkerHandle, job: Job, index: int) -> None:
        """Send ``job``'s sub-task ``index`` to ``worker``; its answer comes to
        :meth:`_on_result` or :meth:`_on_error`. A sub-task that cannot even be sent (its input
        does not encode, or is larger than the worker accepts) fails its job at once."""
        disp = Dispatch(job, index, worker, self.clock.seconds())
        attempt = job.dispatched(disp)
        worker.busy += 1
        self.busy += 1
        worker.dispatches[disp] = None
        self.counters["subtasks_dispatched"] += 1
        if job.first_sent is None:
            job.first_sent = disp.started
        chunk = job.chunks[index]
        if type(chunk) is RefRange:  # an input by reference: the worker reads this range
            sub = SubTask(job.id, index, job.task, None, attempt, ref=chunk)
        else:
            sub = SubTask(job.id, index, job.task, chunk, attempt)
        try:
            d = worker.runner(sub)
        except Exception as e:
            disp.d = Deferred()
            self._release(disp)
            error = {
                "code": ErrorCode.BAD_INPUT,
                "type": type(e).__name__,
                "message": f"sub-task {index} cannot be sent to a worker: {e}",
                "index": index,
            }
            self.endings.end(job, JobState.FAILED, error=error)
            return
        disp.d = d
        if job.options.timeout:
            d.addTimeout(job.options.timeout, self.clock)
        d.addCallbacks(self._on_result, self._on_error, callbackArgs=(disp,), errbackArgs=(disp,))

    def _release(self, disp: Dispatch, ok: bool = False) -> float:
        """Free the dispatch's slot and note its run in the task stream; returns the time."""
        now = self.clock.seconds()
        self.stream.note(disp.worker.name, disp.job.id, disp.index, disp.started, now, ok)
        disp.job.released(disp)
        disp.worker.busy -= 1
        self.busy -= 1
        if disp.worker.busy < disp.worker.slots:
            self.freed(disp.worker)
        disp.worker.dispatches.pop(disp, None)
        return now

    def _on_result(self, result: Any, disp: Dispatch) -> None:
        now = self._release(disp, True)
        job, index, worker = disp.job, disp.index, disp.worker
        worker.last_answer = now
        if type(result) is TimedResult:
            result, duration = result.value, result.seconds
        else:
            duration = now - disp.started
        self.times.note(job.task, duration)
        if job.record(index, result, worker.name, duration):
            worker.done += 1
            self.counters["subtasks_completed"] += 1
            journal = self.endings.owner.journal
            if journal.durable:
                # No waiter: a result that cannot be written breaks the journal, and then the
                # job's end fails to be recorded, so nothing of it is ever shown.
                journal.note(ResultRecorded(job.id, index, dumps(result)), job.result_durable)
            else:
                job.result_durable()
            for other in list(job.inflight.get(index, ())):
                other.d.cancel()  # a speculative copy lost the race
            if job.complete():
                self.endings.combine(job)
        else:
            self.counters["results_duplicate"] += 1
        self.pump(worker)

    def _on_error(self, failure: Failure, disp: Dispatch) -> None:
        self._release(disp)
        job, index, worker = disp.job, disp.index, disp.worker
        if disp.stalled is not None:
            decision = self.policy.on_stall(job, index, worker.name, disp.stalled)
        else:
            decision = self.policy.on_failure(failure, job, index, worker.name)
            if decision.why == "timeout":
                self.log.warn(
                    "sub-task {job_id}:{index} timed out on {worker} after {t}s",
                    job_id=job.id,
                    index=index,
                    worker=worker.name,
                    t=job.options.timeout,
                )
            elif decision.why == "unexpected":
                self.log.failure(
                    "sub-task {job_id}:{index} on {worker} failed unexpectedly; requeueing",
                    failure=failure,
                    job_id=job.id,
                    index=index,
                    worker=worker.name,
                )
        self._apply(decision, job, index, worker)
        self.pump()

    def _apply(self, decision: r.Decision, job: Job, index: int, worker: WorkerHandle) -> None:
        """Carry out a :class:`~clusterd.core.retry.Decision` about a failed dispatch."""
        if decision.action == r.IGNORE:
            return
        if decision.why in ("timeout", "stalled"):
            self.counters["subtasks_timed_out"] += 1
        if decision.charge == r.ATTEMPT:
            worker.failed += 1
            n = job.attempt_failed(index)
        elif decision.charge == r.LOST:
            job.worker_lost(index)
        if decision.action == r.FAIL:
            self.endings.end(job, JobState.FAILED, error=decision.error)
        elif decision.action == r.REQUEUE:
            if job.requeue(index):
                self.counters["subtasks_requeued"] += 1
                self.ring.add(job)
        else:
            self.counters["subtasks_retried"] += 1
            self.log.info(
                "sub-task {job_id}:{index} failed attempt {n} ({code}); retrying in {delay}s",
                job_id=job.id,
                index=index,
                n=n,
                code=decision.error["code"],
                delay=decision.delay,
            )
            self.backoffs.start(job, index, decision.delay, self._retry_due)

    def _retry_due(self, job: Job, index: int) -> None:
        if job.retry_due(index):
            self.ring.add(job)
            self.pump()

    def check_stalls(
        self, workers: list[WorkerHandle], remove_worker: Callable[[WorkerHandle], None]
    ) -> int:
        """Take back sub-tasks that make no progress; the server calls it every second.

        A sub-task whose job and task set no timeout still gets a deadline once its task's
        run time is known (:meth:`~clusterd.core.retry.RetryPolicy.stall_limit`). A worker holding such a sub-task
        that has answered nothing for that long (it answers PING but never a DO, say) is
        wedged: it is dropped, and everything it held runs elsewhere. On a worker that does
        answer, just the stalled sub-task fails its attempt (retried, like a timeout). Looks
        at each worker's oldest sub-tasks only: O(workers). Returns how many were taken back.
        No deadline is under ``stall_min``, so a worker whose oldest sub-task is younger is
        skipped without the policy's call (10,000 busy workers: a few ms, not 20-30 ms)."""
        now, taken = self.clock.seconds(), 0
        young = now - self.policy.config.stall_min
        for worker in workers:
            held = worker.dispatches
            if not held or next(iter(held)).started > young:
                continue
            found = self.policy.stalled_on(worker, now)
            if found is None:
                continue
            reason, dispatches = found
            if reason == "worker":
                self.log.warn(
                    "worker {worker} answered nothing for {t:.0f}s while holding {n} sub-tasks; "
                    "dropping it, its sub-tasks run elsewhere",
                    worker=worker.name,
                    t=now - max(worker.last_answer, dispatches[0].started),
                    n=len(dispatches),
                )
                remove_worker(worker)  # the scheduler's: counted and logged
            taken += self.take_back(dispatches, reason)
            if reason == "worker":
                worker.close()
        return taken

    def take_back(self, dispatches: list[Dispatch], reason: str) -> int:
        """Cancel stalled dispatches (``reason``: "worker" or "subtask"); their Deferreds fail
        at once, and :meth:`_on_error` applies the stall decision. Returns how many."""
        for disp in dispatches:
            disp.stalled = reason
            disp.d.cancel()  # the runner's owner drops it (tells the worker, if any)
        return len(dispatches)

    def speculate(self, jobs: list[Job], workers: Any) -> int:
        """Start backup copies of straggling sub-tasks on idle workers; first result wins."""
        now, started = self.clock.seconds(), 0
        for job in jobs:
            for index, running_on in self.policy.straggling(job, now):
                worker = self.policy.spare_for(workers, job.task, running_on)
                if worker is None:
                    continue
                self.log.info(
                    "sub-task {job_id}:{index} straggles on {slow}; backup copy on {worker}",
                    job_id=job.id,
                    index=index,
                    slow=running_on.name,
                    worker=worker.name,
                )
                self.send(worker, job, index)  # a backup copy
                self.counters["subtasks_speculative"] += 1
                started += 1
        return started
