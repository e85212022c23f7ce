"""The scheduler: jobs in, sub-tasks out to workers, results combined. No sockets, no reactor.

Time comes from an injected ``IReactorTime`` (a ``task.Clock`` in tests). A worker is a
:class:`WorkerHandle` whose ``runner`` sends one sub-task and returns a Deferred that fires with the
result, or fails with :class:`TaskFailed` (the task raised) or :class:`WorkerLost` (the sub-task
came back without an answer and must run again elsewhere). The protocol layer supplies runners;
this module decides who runs what.

Fairness: jobs with queued sub-tasks sit in a ring; each free slot takes one sub-task from the next
job in the ring that the worker can run, so a one-sub-task job submitted behind a 10,000-sub-task
job is dispatched at the next free slot, not after the big one drains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.jobs import Job, JobState
from clusterd.core.wire import ErrorCode, WireError, dumps
from clusterd.tasks.registry import Registry, TaskInputError

__all__ = ["Scheduler", "SubTask", "TaskFailed", "WorkerLost", "WorkerHandle"]

DEFAULT_CHUNKS_PER_SLOT = 4
DEFAULT_CHUNKS_NO_WORKERS = 16
MAX_DEFAULT_CHUNKS = 256


@dataclass(frozen=True)
class SubTask:
    job: str
    index: int
    task: str
    input: Any


class TaskFailed(Exception):
    """The task function raised on the worker: ``type`` and ``message`` are the exception's."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(type, message)
        self.type = type
        self.message = message


class WorkerLost(Exception):
    """A dispatched sub-task will get no answer from this worker; it runs again elsewhere."""


@dataclass(eq=False)
class WorkerHandle:
    name: str
    tasks: frozenset[str]
    slots: int
    runner: Callable[[SubTask], Deferred[Any]]
    close: Callable[[], None] = lambda: None
    address: str = ""
    connected: float = 0.0
    busy: int = 0
    done: int = 0
    failed: int = 0
    alive: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.slots - self.busy if self.alive else 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "tasks": sorted(self.tasks),
            "slots": self.slots,
            "busy": self.busy,
            "done": self.done,
            "failed": self.failed,
            "connected": round(self.connected, 3),
        }


class Scheduler:
    log = Logger()

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        max_subtasks: int = 100_000,
        retention: float = 3600.0,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.max_subtasks = max_subtasks
        self.retention = retention
        self.started = clock.seconds()
        self._jobs: dict[str, Job] = {}
        self._ring: deque[Job] = deque()
        self._in_ring: set[str] = set()
        self._last_served: Job | None = None
        self._workers: dict[str, WorkerHandle] = {}
        self._next_id = 1
        self._pumping = False
        self._again = False
        self.counters = {
            "jobs_submitted": 0,
            "jobs_done": 0,
            "jobs_failed": 0,
            "jobs_cancelled": 0,
            "subtasks_dispatched": 0,
            "subtasks_completed": 0,
            "subtasks_requeued": 0,
            "results_duplicate": 0,
            "workers_registered": 0,
            "workers_lost": 0,
        }

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, task_name: str, value: Any, chunks: int | None = None) -> Job:
        """Split and enqueue a job; raises WireError for an unknown task or a bad input."""
        task = self.registry.get(task_name)
        if task is None:
            raise WireError(
                ErrorCode.UNKNOWN_TASK,
                f"no task named {task_name!r}; known tasks: {', '.join(self.registry.names())}.",
            )
        if chunks is None:
            chunks = self._default_chunks(task_name)
        if chunks > self.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"{chunks} chunks asked; this server allows at most {self.max_subtasks} per job.",
            )
        try:
            pieces = list(task.split(value, chunks))
        except TaskInputError as e:
            raise WireError(ErrorCode.BAD_INPUT, f"{e}.") from None
        except Exception as e:  # a user task's split is foreign code: never let it crash us
            raise WireError(
                ErrorCode.BAD_INPUT, f"task {task_name} cannot split this input: {_describe(e)}."
            ) from None
        if len(pieces) > self.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"the input splits into {len(pieces)} sub-tasks; at most {self.max_subtasks} allowed.",
            )
        job = Job(f"j{self._next_id}", task_name, pieces, self.clock.seconds())
        self._next_id += 1
        self._jobs[job.id] = job
        self.counters["jobs_submitted"] += 1
        self.log.info(
            "job {job_id} submitted: task {task}, {n} sub-tasks",
            job_id=job.id,
            task=task_name,
            n=job.total,
        )
        if job.total == 0:
            self._combine(job)
        else:
            self._enring(job)
            self._pump()
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise WireError(
                ErrorCode.UNKNOWN_JOB, f"no job {job_id!r} (never submitted, or expired)."
            )
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.is_final:
            job.finish(JobState.CANCELLED, self.clock.seconds())
            self.counters["jobs_cancelled"] += 1
            self.log.info("job {job_id} cancelled", job_id=job.id)
        return job

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def waiting_for_worker(self, job: Job) -> bool:
        """True while the job has queued work that no connected worker can run."""
        return job.has_pending() and not any(
            job.task in w.tasks for w in self._workers.values() if w.alive
        )

    def job_status(self, job: Job) -> dict[str, Any]:
        out = job.status()
        if self.waiting_for_worker(job):
            out["waiting_for_worker"] = True
            out["note"] = f"no connected worker can run task {job.task}; the job waits for one."
        return out

    def expire(self) -> int:
        """Forget ended jobs older than the retention time; returns how many."""
        horizon = self.clock.seconds() - self.retention
        old = [j.id for j in self._jobs.values() if j.finished is not None and j.finished < horizon]
        for job_id in old:
            del self._jobs[job_id]
        return len(old)

    # -- workers -------------------------------------------------------------------------------

    def add_worker(
        self,
        name: str,
        tasks: Iterable[str],
        slots: int,
        runner: Callable[[SubTask], Deferred[Any]],
        close: Callable[[], None] = lambda: None,
        address: str = "",
    ) -> WorkerHandle:
        """Register a worker. A worker re-registering under a name still connected replaces the
        old registration (its half-open connection is closed and its sub-tasks requeued), so a
        reconnecting worker is never counted twice."""
        old = self._workers.get(name)
        if old is not None:
            self.log.info("worker {worker} re-registered; dropping its old connection", worker=name)
            self.remove_worker(old)
            old.close()
        handle = WorkerHandle(
            name, frozenset(tasks), slots, runner, close, address, self.clock.seconds()
        )
        self._workers[name] = handle
        self.counters["workers_registered"] += 1
        self.log.info(
            "worker {worker} registered from {address}: {slots} slots, tasks {tasks}",
            worker=name,
            address=address,
            slots=slots,
            tasks=sorted(handle.tasks),
        )
        self._pump()
        return handle

    def remove_worker(self, handle: WorkerHandle) -> None:
        """Forget a worker. Its in-flight sub-tasks come back through their Deferreds failing
        with WorkerLost, which the runner's owner fires when the connection goes."""
        if not handle.alive:
            return
        handle.alive = False
        if self._workers.get(handle.name) is handle:
            del self._workers[handle.name]
        self.counters["workers_lost"] += 1
        self.log.info(
            "worker {worker} lost with {busy} sub-tasks in flight",
            worker=handle.name,
            busy=handle.busy,
        )

    def workers(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    # -- dispatch ------------------------------------------------------------------------------

    def _default_chunks(self, task_name: str) -> int:
        slots = sum(w.slots for w in self._workers.values() if task_name in w.tasks)
        if not slots:
            return DEFAULT_CHUNKS_NO_WORKERS
        return max(1, min(MAX_DEFAULT_CHUNKS, DEFAULT_CHUNKS_PER_SLOT * slots))

    def _enring(self, job: Job) -> None:
        """Join the ring just ahead of the job served last, so a newcomer is served before
        that job gets another turn (round-robin), not after it."""
        if job.id not in self._in_ring and job.has_pending():
            self._in_ring.add(job.id)
            if self._ring and self._ring[-1] is self._last_served:
                self._ring.insert(len(self._ring) - 1, job)
            else:
                self._ring.append(job)

    def _next_job_for(self, worker: WorkerHandle) -> Job | None:
        for _ in range(len(self._ring)):
            job = self._ring.popleft()
            if not job.has_pending():
                self._in_ring.discard(job.id)
                continue
            self._ring.append(job)
            if job.task in worker.tasks:
                self._last_served = job
                return job
        return None

    def _pump(self) -> None:
        """Dispatch while some worker has a free slot and some job has work it can run.
        Re-entrant calls (a runner that answers synchronously) just ask for another pass."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._dispatch()
        finally:
            self._pumping = False

    def _dispatch(self) -> None:
        while self._ring:
            free = [w for w in self._workers.values() if w.free > 0]
            if not free:
                return
            # Most free slots first, one sub-task each per round: spreads a job over workers.
            free.sort(key=lambda w: -w.free)
            sent = False
            for worker in free:
                job = self._next_job_for(worker)
                if job is None:
                    continue
                self._send(worker, job, job.take())
                sent = True
            if not sent:
                return

    def _send(self, worker: WorkerHandle, job: Job, index: int) -> None:
        worker.busy += 1
        self.counters["subtasks_dispatched"] += 1
        sub = SubTask(job.id, index, job.task, job.chunks[index])
        try:
            d = worker.runner(sub)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(
            self._on_result,
            self._on_error,
            callbackArgs=(job, index, worker),
            errbackArgs=(job, index, worker),
        )

    def _on_result(self, result: Any, job: Job, index: int, worker: WorkerHandle) -> None:
        worker.busy -= 1
        worker.done += 1
        if job.record(index, result, worker.name):
            self.counters["subtasks_completed"] += 1
            if job.complete():
                self._combine(job)
        else:
            self.counters["results_duplicate"] += 1
        self._pump()

    def _on_error(self, failure: Failure, job: Job, index: int, worker: WorkerHandle) -> None:
        worker.busy -= 1
        if failure.check(TaskFailed):
            worker.failed += 1
            job.running -= 1
            if not job.is_final:
                err = failure.value
                self._end(
                    job,
                    JobState.FAILED,
                    error={
                        "code": ErrorCode.TASK_ERROR,
                        "type": err.type,
                        "message": err.message,
                        "index": index,
                        "worker": worker.name,
                    },
                )
        else:
            if not failure.check(WorkerLost):
                self.log.failure(
                    "sub-task {job_id}:{index} on {worker} failed unexpectedly; requeueing",
                    failure=failure,
                    job_id=job.id,
                    index=index,
                    worker=worker.name,
                )
            if not job.is_final:
                self.counters["subtasks_requeued"] += 1
            job.give_back(index)
            self._enring(job)
        self._pump()

    def _combine(self, job: Job) -> None:
        task = self.registry.get(job.task)
        assert task is not None
        try:
            result = task.combine(job.ordered_results())
            encoded = dumps(result)
        except Exception as e:
            self._end(
                job,
                JobState.FAILED,
                error={
                    "code": ErrorCode.COMBINE_ERROR,
                    "type": type(e).__name__,
                    "message": str(e),
                },
            )
            return
        self._end(job, JobState.DONE, result=result, encoded=encoded)

    def _end(
        self,
        job: Job,
        state: str,
        result: Any = None,
        error: dict | None = None,
        encoded: str | None = None,
    ) -> None:
        job.result_json = encoded
        job.finish(state, self.clock.seconds(), result=result, error=error)
        self.counters["jobs_done" if state == JobState.DONE else "jobs_failed"] += 1
        self.log.info(
            "job {job_id} {state} after {elapsed:.3f}s ({n} sub-tasks)",
            job_id=job.id,
            state=state,
            elapsed=job.finished - job.submitted,
            n=job.total,
        )

    # -- views ---------------------------------------------------------------------------------

    def tasks_view(self) -> list[dict[str, Any]]:
        out = []
        for task in self.registry:
            able = [w for w in self._workers.values() if task.name in w.tasks]
            d = task.describe()
            d["workers"] = len(able)
            d["slots"] = sum(w.slots for w in able)
            out.append(d)
        return out

    def stats(self) -> dict[str, Any]:
        live = [j for j in self._jobs.values() if not j.is_final]
        return {
            **self.counters,
            "jobs_active": len(live),
            "jobs_held": len(self._jobs),
            "subtasks_queued": sum(j.queued for j in live),
            "subtasks_running": sum(w.busy for w in self._workers.values()),
            "workers": len(self._workers),
            "slots": sum(w.slots for w in self._workers.values()),
            "slots_busy": sum(w.busy for w in self._workers.values()),
            "uptime": round(self.clock.seconds() - self.started, 3),
        }


def _describe(e: BaseException) -> str:
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
