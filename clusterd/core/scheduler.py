"""The scheduler: jobs in, sub-tasks out to workers, results combined. No sockets, no reactor.

This is the coordinator and the core's public face (the server and the tests use only it): it
wires the parts (listed in :mod:`clusterd.core`) together and applies what they decide.

Time comes from an injected ``IReactorTime`` (a ``task.Clock`` in tests), and the dispatch
loop's yield from an injected ``next_turn`` (default: ``callLater(0)`` on that clock). A worker
is an :class:`~clusterd.core.workers.IWorkerLink` (``attach``) or ``add_worker``'s runner.

Delivery: a sub-task may run more than once (at-least-once execution), but its result is combined
exactly once; late and duplicate results are counted and dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from clusterd.core.admission import Admission
from clusterd.core.config import OFFLOAD_BYTES, OFFLOAD_SUBTASKS, SchedulerConfig
from clusterd.core.dispatch import Dispatcher
from clusterd.core.endings import Backoffs, Endings
from clusterd.core.errors import ErrorCode, TaskFailed, WireError, WorkerLost
from clusterd.core.execution import Execution
from clusterd.core.intake import Intake, encode_cut
from clusterd.core.jobs import Job, JobState, Tally
from clusterd.core.journal import Journal, NullJournal
from clusterd.core.recovery import FAILED, RESUME, restore
from clusterd.core.retry import RetryPolicy
from clusterd.core.ring import Prefetch, Ring, TaskTimes
from clusterd.core.table import JobTable
from clusterd.core.uploads import IUploadSink, Upload
from clusterd.core.workers import SubTask, TimedResult, WorkerHandle, WorkerRegistry
from clusterd.tasks.registry import Registry

__all__ = ["Scheduler", "SchedulerConfig", "SubTask", "TaskFailed", "WorkerLost", "WorkerHandle"]
__all__ += ["TimedResult", "OFFLOAD_SUBTASKS", "OFFLOAD_BYTES"]

Offload = Callable[..., Deferred[Any]]
NextTurn = Callable[[Callable[[], None]], Any]
COUNTERS = (
    "jobs_submitted jobs_done jobs_failed jobs_cancelled jobs_recovered subtasks_dispatched "
    "subtasks_completed subtasks_requeued subtasks_retried subtasks_timed_out "
    "subtasks_speculative results_duplicate results_late workers_registered workers_lost"
).split()


@implementer(IUploadSink)
class Scheduler:
    """The core's coordinator: jobs in, sub-tasks out to workers, results combined."""

    log = Logger()

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        journal: Journal | None = None,
        config: SchedulerConfig | None = None,
        offload: Offload | None = None,
        next_turn: NextTurn | None = None,
        **overrides: Any,
    ) -> None:
        self.registry = registry
        self.clock = clock
        # Long pure work (a big combine) off the thread: deferToThread, or None (inline, tests).
        self.offload = offload
        self.journal: Journal = journal if journal is not None else NullJournal()
        self.config = config or SchedulerConfig()
        for k, v in overrides.items():
            if not hasattr(self.config, k):
                raise TypeError(f"unknown scheduler setting {k!r}")
            setattr(self.config, k, v)
        self.started = clock.seconds()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._assemble(next_turn or (lambda f: clock.callLater(0, f)))

    def _assemble(self, next_turn: NextTurn) -> None:
        """Build the parts; each gets only the collaborators it calls."""
        self._tally = Tally()  # sub-tasks queued over all jobs
        self._table = JobTable()
        self._jobs = self._table.jobs
        self._workers = WorkerRegistry()
        self._times = TaskTimes()
        self._task_mean = self._times.means  # seconds, moving mean of recent sub-tasks
        self._admission = Admission(self.registry, self.config)
        self._ring = Ring()
        # How many sub-tasks a worker may hold while taking one of a job's (prefetch).
        self._limit = Prefetch(self.config, self._times).limit
        backoffs = Backoffs(self.clock)
        ends = self._endings = Endings(
            self.registry, self.clock, self.config, self.counters, backoffs, self
        )
        self.end_observers = ends.observers  # callables(job) at each job's end (metrics)
        policy = RetryPolicy(self.config, self._times)
        self._exec = Execution(
            self.clock, self.counters, policy, self._times, self._ring, ends, backoffs
        )
        self._dispatcher = Dispatcher(
            self._ring, self._workers, self._limit, self._exec.send, next_turn, self.config
        )
        self._pump = self._exec.pump = self._dispatcher.pump
        self._exec.freed = self._workers.freed
        self.task_stream = self._exec.stream  # recent sub-task runs (the dashboard's)
        parts = (self._admission, ends, self._ring, self._table, self._tally, self._workers)
        self._intake = Intake(self, *parts, self._pump)
        for part in (self, ends, self._exec, self._intake):  # one Logger.__get__ each, not per line
            part.log = part.log

    @property
    def _seq_index(self) -> list[int] | None:
        return self._table.seq_index

    # -- jobs ----------------------------------------------------------------------------------

    def submit(
        self,
        task_name: str,
        value: Any,
        chunks: int | None = None,
        options: dict[str, Any] | None = None,
        input_json: str | None = None,
        pieces: list[Any] | None = None,
        encoded: str | None = None,
    ) -> Job:
        """Split and enqueue a job (see :meth:`Intake.submit`); raises WireError."""
        return self._intake.submit(task_name, value, chunks, options, input_json, pieces, encoded)

    def open_stream(
        self, task_name: str, options: dict[str, Any] | None = None
    ) -> tuple[Job, Upload | None]:
        """Start a job whose input arrives in pieces (see :meth:`Intake.open_stream`)."""
        return self._intake.open_stream(task_name, options)

    def grow(self, job: Job, inputs: list[Any]) -> None:
        """Queue sub-task inputs cut from a streamed input (:class:`IUploadSink`)."""
        self._intake.grow(job, inputs)

    def seal(self, job: Job) -> None:
        """A streamed job's input is complete (:class:`IUploadSink`)."""
        self._intake.seal(job)

    def abandon(self, job: Job, code: str, message: str) -> None:
        """A streamed input went wrong; its key is free again (:class:`IUploadSink`)."""
        self._endings.abandon(job, code, message)

    def wants_more(self, job: Job) -> bool:
        """Whether a streamed job should take more input now (see :meth:`Intake.wants_more`)."""
        return self._intake.wants_more(job)

    def default_chunks(self, task_name: str) -> int:
        """The chunk count a job of this task gets when it names none (depends on workers)."""
        return self._intake.default_chunks(task_name)

    def prepare(self, task_name: str, value: Any, chunks: int | None) -> list[Any] | None:
        """The slow, pure part of :meth:`submit`: split a (big) input into ``chunks``. Safe on
        another thread: it reads only the registry and the limits. None when submit will
        refuse the job anyway (unknown task, too many chunks), so no time is spent splitting
        it. The caller passes the pieces to :meth:`submit`, which journals exactly them."""
        return self._admission.prepare(task_name, value, chunks)

    encode_cut = staticmethod(encode_cut)

    def get(self, job_id: str) -> Job:
        """A job by id, for any request naming one. A job whose acceptance is not durable yet
        does not exist for clients (its id may never be kept): it is UNKNOWN_JOB."""
        job = self._jobs.get(job_id)
        if job is None or not job.recorded:
            raise WireError(
                ErrorCode.UNKNOWN_JOB, f"no job {job_id!r} (never submitted, or expired)."
            )
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel the job unless it ended, and return it; WireError UNKNOWN_JOB if unknown."""
        job = self.get(job_id)
        if not job.is_final:
            self._endings.end(job, JobState.CANCELLED)
        return job

    def jobs(self) -> list[Job]:
        """Every job held whose id exists for good (its acceptance is durable)."""
        return [j for j in self._jobs.values() if j.recorded]

    def list_jobs(self, limit: int, before: str | None = None) -> list[Job]:
        """Up to ``limit`` jobs, newest first, older than job id ``before``: JOBS pages."""
        return self._table.page(limit, before)

    def queued_subtasks(self) -> int:
        """Sub-tasks queued over all jobs: a counter, never a walk of the jobs."""
        return self._tally.queued

    def waiting_for_worker(self, job: Job) -> bool:
        """True while the job has queued work that no connected worker can run."""
        return job.has_pending() and not self._workers.task_workers[job.task]

    def job_status(self, job: Job) -> dict[str, Any]:
        """The job's STATUS object, noting when no connected worker can run its task."""
        out = job.status()
        if self.waiting_for_worker(job):
            out["waiting_for_worker"] = True
            out["note"] = f"no connected worker can run task {job.task}; the job waits for one."
        return out

    def expire(self) -> int:
        """Forget ended jobs older than the retention time, here and in the journal."""
        old = self._table.expired(self.clock.seconds() - self.config.retention)
        for job in old:
            self._admission.forget(job)
        if old:
            self.journal.forget([j.id for j in old])
        return len(old)

    def recover(self, journal: Journal | None = None) -> int:
        """Load the journal: ended jobs come back with their answers, unfinished ones resume
        from their recorded results (only missing sub-tasks run again). Returns jobs resumed.
        ``journal``: the journal to use from now on, opened by the caller (the server opens
        it when its service starts, not when the service tree is built); only before any job
        was accepted. Raises JournalError if it cannot be read."""
        if journal is not None:
            if self._jobs:
                raise RuntimeError("a journal is given to recover() before any job is accepted")
            self.journal = journal
        recovered = self.journal.load()
        self._intake.next_id = max(self._intake.next_id, recovered.next_seq)
        horizon = self.clock.seconds() - self.config.retention
        expired, resumed = [], 0
        for rec in recovered.jobs:
            back = restore(rec, horizon, self.registry.get, self._admission.split, self._tally)
            if back is None:
                expired.append(rec.accepted.job)
                continue
            job = back.job
            self._jobs[job.id] = job
            if back.action != "ended":
                self._endings.active += 1
                resumed += 1
                self._resume(job, back.action, back.error)
            a = rec.accepted
            job.mark_recorded()
            # Acknowledged jobs only: a streamed input never completed was never given an id
            # as accepted, so it holds no key (the client retries under the same one).
            if not a.streamed or rec.sealed is not None:
                job.mark_durable()
            self._admission.remember(job)
        if expired:
            self.journal.forget(expired)
        self.counters["jobs_recovered"] = resumed
        if resumed:
            self.log.info("resumed {n} unfinished jobs from the journal", n=resumed)
        self._pump()
        return resumed

    def _resume(self, job: Job, action: str, error: dict[str, Any] | None) -> None:
        if action == FAILED:
            self._endings.end(job, JobState.FAILED, error=error)
            return
        assert action == RESUME
        self.log.info(
            "job {job_id} resumed: {done} of {total} sub-tasks already done",
            job_id=job.id,
            done=job.done,
            total=job.total,
        )
        if job.complete():
            self._endings.combine(job)
        else:
            self._ring.add(job)

    def stop(self) -> Deferred[None]:
        """Flush and close the journal (what is durable then is what a restart resumes)."""
        return self.journal.close()

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
        now = self.clock.seconds()
        handle = WorkerHandle(name, frozenset(tasks), slots, runner, close, address, now)
        handle.prefetch = self.config.prefetch
        handle.last_answer = handle.last_seen = handle.connected
        self._workers.add(handle)
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

    def attach(self, link: Any) -> WorkerHandle:
        """Register an :class:`~clusterd.core.workers.IWorkerLink` (see :meth:`add_worker`)."""
        return self.add_worker(
            link.name, link.tasks, link.slots, link.send, link.close, link.address
        )

    def drain_worker(self, handle: WorkerHandle) -> None:
        """The worker is stopping: send it nothing new; what it holds may still finish."""
        if not handle.draining:
            handle.draining = True
            self.log.info(
                "worker {worker} draining with {busy} sub-tasks in flight",
                worker=handle.name,
                busy=handle.busy,
            )

    def remove_worker(self, handle: WorkerHandle) -> None:
        """Forget a worker. Its in-flight sub-tasks come back through their Deferreds failing
        with WorkerLost, which the runner's owner fires when the connection goes."""
        if not handle.alive:
            return
        handle.alive = False
        self._workers.remove(handle)
        self.counters["workers_lost"] += 1
        self.log.info(
            "worker {worker} lost with {busy} sub-tasks in flight",
            worker=handle.name,
            busy=handle.busy,
        )

    def workers(self) -> list[WorkerHandle]:
        """The connected workers, for the WORKERS verb."""
        return list(self._workers)

    def late_result(self) -> None:
        """A worker answered a sub-task no longer expected (timed out, cancelled, or a copy)."""
        self.counters["results_late"] += 1

    def check_stalls(self) -> int:
        """Take back sub-tasks that make no progress; the server calls it every second (see
        :meth:`Execution.check_stalls`). Returns how many sub-tasks were taken back."""
        return self._exec.check_stalls(list(self._workers), self.remove_worker)

    def speculate(self) -> int:
        """Start backup copies of straggling sub-tasks on idle workers; first result wins.
        A sub-task straggles when its job has nothing queued, enough finished sub-tasks to
        trust their mean duration, and it has run ``speculate_factor`` times that mean."""
        if not self.config.speculate:
            return 0
        return self._exec.speculate(list(self._jobs.values()), self._workers)

    # -- views ---------------------------------------------------------------------------------

    def tasks_view(self) -> list[dict[str, Any]]:
        """Each task's description with the workers and slots that can run it (TASKS)."""
        out = []
        for task in self.registry:
            d = task.describe()
            d["workers"] = self._workers.task_workers[task.name]
            d["slots"] = self._workers.task_slots[task.name]
            out.append(d)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters, all kept as things change: O(1) in jobs and workers."""
        return {
            **self.counters,
            "jobs_active": self._endings.active,
            "jobs_held": len(self._jobs),
            "subtasks_queued": self._tally.queued,
            "subtasks_running": self._exec.busy,
            "workers": len(self._workers),
            "slots": self._workers.slots,
            "slots_busy": self._exec.busy,
            "journal": self.journal.durable,
            "journal_ok": self.journal.failure is None,
            "uptime": round(self.clock.seconds() - self.started, 3),
        }
