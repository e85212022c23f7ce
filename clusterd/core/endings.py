"""How a job ends, and how its records are made durable.

:class:`Endings` combines a complete job's results (through ``offload`` for a big job, off the
reactor thread), ends jobs (done, failed, cancelled), and appends every record of a job to the
journal: when a record cannot be made durable the job fails and its waiters get the journal's
error, never an id or an end a restart would not find (see :mod:`clusterd.core.jobs`).

Owns the journal's and the offloaded combine's Deferreds; the retry timers it cancels at a
job's end belong to :class:`Backoffs`, which the execution side starts. Imports the journal's
records, :mod:`clusterd.core.jobs` and :mod:`clusterd.core.errors`; nothing that imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.config import OFFLOAD_BYTES, OFFLOAD_SUBTASKS
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jobs import Job, JobState
from clusterd.core.journal import JobAccepted, JobEnded
from clusterd.core.wire import dumps_big
from clusterd.tasks.registry import Registry

__all__ = ["Endings", "Backoffs", "combine_and_encode"]

_END_COUNTER = {
    JobState.DONE: "jobs_done",
    JobState.FAILED: "jobs_failed",
    JobState.CANCELLED: "jobs_cancelled",
}


def combine_and_encode(combine: Callable[[list[Any]], Any], results: list[Any]) -> tuple[Any, str]:
    """A task's combine and the encoding of its answer: the part of ending a job that can take
    long, and touches nothing shared, so it may run on another thread."""
    result = combine(results)
    return result, dumps_big(result)


class Backoffs:
    """The retry timers (on the scheduler's clock) of sub-tasks waiting out a backoff."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: dict[Job, dict[int, IDelayedCall]] = {}

    def start(self, job: Job, index: int, delay: float, due: Callable[[Job, int], None]) -> None:
        """Hold sub-task ``index`` of ``job`` back for ``delay`` seconds, then call ``due(job,
        index)`` to requeue it."""
        job.backing_off(index)
        self._calls.setdefault(job, {})[index] = self.clock.callLater(
            delay, self._due, job, index, due
        )

    def _due(self, job: Job, index: int, due: Callable[[Job, int], None]) -> None:
        calls = self._calls.get(job)
        if calls is not None:
            calls.pop(index, None)
            if not calls:
                del self._calls[job]
        due(job, index)

    def cancel(self, job: Job) -> None:
        """The job ended: its retries will never be due."""
        for call in self._calls.pop(job, {}).values():
            if call.active():
                call.cancel()


class Endings:
    """Ends jobs (done, failed, cancelled), combining results off the reactor when big, and makes
    each job's records durable."""

    log = Logger(namespace="clusterd.core.scheduler.Scheduler")

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        config: Any,
        counters: dict[str, int],
        backoffs: Backoffs,
        scheduler: Any,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.config = config
        self.counters = counters
        self.backoffs = backoffs
        self.owner = scheduler  # reads .journal and .offload (both may be replaced later)
        self.active = 0  # jobs not ended
        self.observers: list[Callable[[Job], None]] = []  # called at each job's end (metrics)

    # -- journal -------------------------------------------------------------------------------

    def append(
        self, record: Any, job: Job, lazy: bool = False, then: Callable[[], None] | None = None
    ) -> None:
        """Append one of ``job``'s records and call ``then`` once it is durable. If it cannot
        be made durable, the job fails and whoever waits for its id or its end gets the
        journal's error (never the id or the end)."""
        self.owner.journal.append(record, lazy=lazy).addCallbacks(
            _call, self._not_durable, callbackArgs=(then,), errbackArgs=(job,)
        )

    def record_acceptance(self, job: Job, lazy: bool, cut: str | None) -> None:
        """Journal a job's acceptance. ``cut``: its encoded sub-task inputs, when its input came
        whole (the job is then sealed, and its id may be shown, once this record commits);
        None for a streamed input, whose sub-task inputs follow in ChunksAdded records and
        whose JobSealed comes last. Either way the record says ``streamed``: recovery reads
        the cut, never splits an input again."""
        options: dict[str, Any] = {"timeout": job.options.timeout, "attempts": job.options.attempts}
        if job.ref is not None:
            options["ref"] = job.ref  # recovery rebuilds the ranges from it and the cut
        record = JobAccepted(
            job.id,
            int(job.id[1:]),
            job.task,
            "",
            job.total,
            options,
            job.key,
            job.submitted,
            streamed=True,
            cut_json=cut,
            sealed=None if cut is None else job.total,
        )
        self.append(record, job, lazy=lazy, then=partial(_recorded, job, cut is not None))

    def _not_durable(self, failure: Failure, job: Job) -> None:
        """A record of ``job`` could not be made durable (the journal logged why, once): the
        job must not run as if accepted, and nobody may be shown its id or its end."""
        error = failure.value
        self.log.debug("job {job_id}: journal write failed: {e}", job_id=job.id, e=error)
        if not job.is_final:
            message = failure.getErrorMessage()
            error_info = {"code": ErrorCode.JOURNAL_ERROR, "type": "JournalError"}
            error_info["message"] = message
            self.end(job, JobState.FAILED, error=error_info, durable=False)
        job.not_durable(error)
        job.settle_failed(error)

    def abandon(self, job: Job, code: str, message: str) -> None:
        """A streamed input went wrong: the job fails with ``code``; it was never accepted."""
        if not job.is_final:
            self.end(job, JobState.FAILED, error={"code": code, "message": message})
        job.not_durable(WireError(code, message))

    # -- combining -----------------------------------------------------------------------------

    def combine(self, job: Job) -> None:
        """Combine a job's results into its answer. A big job's combine (many sub-tasks, or a
        big input) runs through ``offload``, off the reactor thread, so PING and every other
        job stay responsive while, say, 64 sorted runs of a 200 MB input are merged."""
        task = self.registry.get(job.task)
        assert task is not None
        try:
            results = job.ordered_results()  # raises the error of a merge that failed
        except Exception:
            self._combine_failed(Failure(), job)
            return
        offload = self.owner.offload
        if offload is not None and (
            job.total >= OFFLOAD_SUBTASKS or job.input_size >= OFFLOAD_BYTES
        ):
            d = offload(combine_and_encode, task.combine, results)
            d.addCallbacks(
                self._combined, self._combine_failed, callbackArgs=(job,), errbackArgs=(job,)
            )
            return
        try:
            answer = combine_and_encode(task.combine, results)
        except Exception:
            self._combine_failed(Failure(), job)
            return
        self._combined(answer, job)

    def _combined(self, answer: tuple[Any, str], job: Job) -> None:
        if job.is_final:  # cancelled while its combine ran elsewhere
            return
        result, encoded = answer
        if len(encoded) > self.config.max_result_bytes:
            error = {
                "code": ErrorCode.RESULT_TOO_LARGE,
                "type": "ResultTooLarge",
                "message": f"the result encodes to {len(encoded)} characters; "
                f"the server allows {self.config.max_result_bytes}",
            }
            self.end(job, JobState.FAILED, error=error)
            return
        self.end(job, JobState.DONE, result=result, encoded=encoded)

    def _combine_failed(self, failure: Failure, job: Job) -> None:
        if job.is_final:
            return
        error = {
            "code": ErrorCode.COMBINE_ERROR,
            "type": failure.type.__name__,
            "message": failure.getErrorMessage(),
        }
        self.end(job, JobState.FAILED, error=error)

    # -- ending --------------------------------------------------------------------------------

    def end(
        self,
        job: Job,
        state: str,
        result: Any = None,
        error: dict | None = None,
        encoded: str | None = None,
        durable: bool = True,
    ) -> None:
        """End ``job`` now: its retries and running copies are dropped, and its end is
        journaled (``durable``; else the caller fails its waiters with the journal's error)."""
        if not job.is_final:
            self.active -= 1
        job.finish(state, self.clock.seconds(), result=result, error=error, encoded=encoded)
        self.backoffs.cancel(job)
        for copies in list(job.inflight.values()):
            for disp in list(copies):
                disp.d.cancel()  # tells the worker to drop it and frees the slot
        self.counters[_END_COUNTER[state]] += 1
        for observe in self.observers:
            observe(job)
        self.log.info(
            "job {job_id} {state} after {elapsed:.3f}s ({n} sub-tasks)",
            job_id=job.id,
            state=state,
            elapsed=job.finished - job.submitted,
            n=job.total,
        )
        if not durable:
            return
        record = JobEnded(job.id, state, encoded, error, job.total, job.finished)
        self.append(record, job, then=job.settle)


def _recorded(job: Job, sealed: bool) -> None:
    """A job's acceptance is durable: its id exists for good, and if its cut came with it,
    the id may be shown to its submitter."""
    job.mark_recorded()
    if sealed:
        job.mark_durable()


def _call(_: Any, fn: Callable[[], None] | None) -> None:
    if fn is not None:
        fn()
