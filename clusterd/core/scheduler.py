"""The scheduler: jobs in, sub-tasks out to workers, results combined. No sockets, no reactor.

Time comes from an injected ``IReactorTime`` (a ``task.Clock`` in tests). A worker is a
:class:`WorkerHandle` whose ``runner`` sends one sub-task and returns a Deferred that fires with the
result, or fails with :class:`TaskFailed` (the task raised, or its pool process died) or
:class:`WorkerLost` (no answer will come: the sub-task runs again elsewhere). Cancelling that
Deferred must tell the worker to drop the sub-task. The protocol layer supplies runners; this
module decides who runs what, when to retry, and when to give up.

Fairness: jobs with queued sub-tasks sit in a ring; each free slot takes one sub-task from the next
job in the ring that the worker can run, so a one-sub-task job submitted behind a 10,000-sub-task
job is dispatched at the next free slot, not after the big one drains.

Delivery: a sub-task may run more than once (at-least-once execution), but its result is combined
exactly once; late and duplicate results are counted and dropped.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.errors import ResultTooLarge, TaskFailed, WorkerLost
from clusterd.core.jobs import Job, JobOptions, JobState, Tally
from clusterd.core.journal import (
    ChunksAdded,
    JobAccepted,
    JobEnded,
    JobSealed,
    Journal,
    NullJournal,
    ResultRecorded,
)
from clusterd.core.streaming import Cutter, chunk_target
from clusterd.core.uploads import Upload
from clusterd.core.wire import ErrorCode, WireError, dumps, dumps_big
from clusterd.tasks.registry import Registry, Task, TaskInputError

__all__ = [
    "Scheduler",
    "SchedulerConfig",
    "SubTask",
    "TaskFailed",
    "WorkerLost",
    "WorkerHandle",
]

# A job this big has its combine offloaded (Scheduler.offload): its sub-task count, or its
# input's size in characters.
OFFLOAD_SUBTASKS = 32
OFFLOAD_BYTES = 1 << 20

Offload = Callable[..., Deferred[Any]]


def combine_and_encode(combine: Callable[[list[Any]], Any], results: list[Any]) -> tuple[Any, str]:
    """A task's combine and the encoding of its answer: the part of ending a job that can take
    long, and touches nothing shared, so it may run on another thread."""
    result = combine(results)
    return result, dumps_big(result)


DEFAULT_CHUNKS_PER_SLOT = 4
DEFAULT_CHUNKS_NO_WORKERS = 16
MAX_DEFAULT_CHUNKS = 256
REFILL_STEP = 2  # sub-tasks one answer may grant the worker that sent it


@dataclass(frozen=True)
class SubTask:
    job: str
    index: int
    task: str
    input: Any
    attempt: int = 1


class TimedResult:
    """A result with the seconds its task function ran, as the worker measured it. Runners may
    fire with one instead of a bare value; the scheduler learns sub-task sizes from it without
    counting time spent queued on the worker."""

    __slots__ = ("value", "seconds")

    def __init__(self, value: Any, seconds: float) -> None:
        self.value = value
        self.seconds = seconds


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
    draining: bool = False
    prefetch: int = 1  # sub-tasks per slot it may hold when they are short (queued on the worker)
    last_answer: float = 0.0  # when it last answered a sub-task (or registered)
    # Its unanswered sub-tasks, oldest dispatch first (a dict keeps insertion order and
    # removes in O(1)), so the stall check looks at one entry per worker.
    dispatches: dict[Any, None] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.slots - self.busy if self.alive and not self.draining else 0

    @property
    def open(self) -> bool:
        """May take more work of some kind (short sub-tasks may be prefetched)."""
        return self.alive and not self.draining and self.busy < self.slots * self.prefetch

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "tasks": sorted(self.tasks),
            "slots": self.slots,
            "busy": min(self.busy, self.slots),
            "prefetched": max(0, self.busy - self.slots),
            "done": self.done,
            "failed": self.failed,
            "draining": self.draining,
            "connected": round(self.connected, 3),
        }


@dataclass(eq=False)
class _Dispatch:
    job: Job
    index: int
    worker: WorkerHandle
    started: float
    speculative: bool
    d: Deferred[Any] | None = None
    stalled: str | None = None  # why check_stalls took it back: "worker" or "subtask"


@dataclass
class SchedulerConfig:
    """Every scheduling knob, with the defaults the server uses (see docs/RELIABILITY.md)."""

    max_subtasks: int = 100_000  # per job
    max_queued: int = 1_000_000  # sub-tasks queued over all jobs before SUBMIT gets ERR BUSY
    retention: float = 3600.0  # seconds an ended job stays retrievable
    default_timeout: float | None = None  # per sub-task, when neither task nor job sets one
    default_attempts: int = 3  # tries per sub-task before its job fails
    max_lost: int = 5  # times a sub-task's worker may vanish under it before its job fails
    retry_base: float = 0.5  # first retry backoff, doubled per failed attempt
    retry_cap: float = 30.0
    speculate: bool = False
    speculate_factor: float = (
        3.0  # a running sub-task this many times the job's mean is a straggler
    )
    speculate_min_done: int = 3  # finished sub-tasks needed before the mean is trusted
    speculate_min_seconds: float = 1.0  # never speculate on sub-tasks younger than this
    # A sub-task with no timeout stalls after stall_factor x its task's mean run time, and
    # never before stall_min seconds; a worker that answered nothing for that long is wedged.
    stall_factor: float = 20.0
    stall_min: float = 60.0
    max_result_bytes: int = 64 * 1024 * 1024  # a job's encoded answer
    max_input_bytes: int = 1 << 30  # a streamed input's piece lines, in total
    prefetch: int = 1  # short sub-tasks a worker may hold per slot (the server's default is 256)
    prefetch_below: float = 0.01  # a job whose sub-tasks run shorter than this (mean) is short
    prefetch_window: float = 0.05  # seconds of short sub-tasks a slot may hold queued
    dispatch_per_turn: int = 0  # DO lines sent before dispatch yields a reactor turn (0: no cap;
    # the server's default is 16)


class Scheduler:
    log = Logger()

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        journal: Journal | None = None,
        config: SchedulerConfig | None = None,
        offload: Offload | None = None,
        **overrides: Any,
    ) -> None:
        self.registry = registry
        self.clock = clock
        # Runs long pure work (a big job's combine) off the caller's thread; the server passes
        # deferToThread. None: run it inline, as the deterministic tests want.
        self.offload = offload
        self.journal: Journal = journal if journal is not None else NullJournal()
        self.config = config or SchedulerConfig()
        for k, v in overrides.items():
            if not hasattr(self.config, k):
                raise TypeError(f"unknown scheduler setting {k!r}")
            setattr(self.config, k, v)
        self.started = clock.seconds()
        self._jobs: dict[str, Job] = {}
        self._keys: dict[str, Job] = {}
        self._ring: deque[Job] = deque()
        self._in_ring: set[str] = set()
        self._last_served: Job | None = None
        self._task_mean: dict[str, float] = {}  # seconds, moving mean of recent sub-tasks
        self._workers: dict[str, WorkerHandle] = {}
        self._next_id = 1
        self._pumping = False
        self._full_pass_due = False  # a full pass over the workers is asked for
        self._owed: OrderedDict[WorkerHandle, int] = OrderedDict()  # refills owed, by answer
        self._sent_since_pause = 0
        self._pass: deque[list[Any]] | None = None  # [worker, grants left] of a paused pass
        self._resume_call: Any = None  # the callLater(0) that resumes a paused dispatch
        # Kept as things change, so that no request walks the job or worker table:
        self._tally = Tally()  # sub-tasks queued over all jobs
        self._active = 0  # jobs not ended
        self._busy = 0  # sub-tasks dispatched and not answered, over all workers
        self._slots = 0  # slots over all connected workers
        self._task_slots: Counter[str] = Counter()  # task -> slots of workers that run it
        self._task_workers: Counter[str] = Counter()  # task -> workers that run it
        self.counters = {
            "jobs_submitted": 0,
            "jobs_done": 0,
            "jobs_failed": 0,
            "jobs_cancelled": 0,
            "jobs_recovered": 0,
            "subtasks_dispatched": 0,
            "subtasks_completed": 0,
            "subtasks_requeued": 0,
            "subtasks_retried": 0,
            "subtasks_timed_out": 0,
            "subtasks_speculative": 0,
            "results_duplicate": 0,
            "results_late": 0,
            "workers_registered": 0,
            "workers_lost": 0,
        }

    # -- settings ------------------------------------------------------------------------------

    @property
    def max_subtasks(self) -> int:
        return self.config.max_subtasks

    @property
    def retention(self) -> float:
        return self.config.retention

    # -- jobs ----------------------------------------------------------------------------------

    def submit(
        self,
        task_name: str,
        value: Any,
        chunks: int | None = None,
        options: dict[str, Any] | None = None,
        input_json: str | None = None,
        pieces: list[Any] | None = None,
        encoded: tuple[str, ...] | None = None,
    ) -> Job:
        """Split and enqueue a job; raises WireError for an unknown task, a bad input, a full
        queue or a broken journal. With a ``key`` option, a job already accepted under that key
        is returned instead (idempotent submit). The job is dispatched at once; its id may be
        shown to the client once ``job.when_durable()`` fires. ``pieces``: the input already
        split by :meth:`prepare` (on another thread, for a big input), and ``encoded`` those
        pieces as :meth:`encode_cut` gives them (also done there).

        The journal records the sub-task inputs exactly as cut here, never the input to be
        split again: a restart resumes the very split its recorded results were computed for,
        whatever the workers connected since (the default chunk count depends on them)."""
        options = options or {}
        self._check_journal()
        existing = self._keyed(options.get("key"), task_name)
        if existing is not None:
            return existing
        task = self._task(task_name)
        if pieces is None:
            if chunks is None:
                chunks = self._default_chunks(task_name)
            self._check_chunks(chunks)
            pieces = self._split(task_name, value, chunks)
        self._check_queue(len(pieces))
        job = self._new_job(task, pieces, options)
        job.input_size = len(input_json) if input_json is not None else 0
        if not self.journal.durable:
            encoded = ()
        elif encoded is None or len(encoded) != len(pieces):
            encoded = self.encode_cut(pieces)
        # One record, the cut in it. Lazy: a RUN's client sees no id before the end, and a
        # SUBMIT's OK hurries the journal (ServerProtocol), so a short RUN's acceptance can
        # share its end's commit.
        self._record_acceptance(job, lazy=True, cut=encoded)
        if job.total == 0:
            self._combine(job)
        else:
            self._enring(job)
            self._pump()
        return job

    def _record_acceptance(self, job: Job, lazy: bool, cut: tuple[str, ...] | None) -> None:
        """Journal a job's acceptance. ``cut``: its encoded sub-task inputs, when its input came
        whole (the job is then sealed, and its id may be shown, once this record commits);
        None for a streamed input, whose sub-task inputs follow in ChunksAdded records and
        whose JobSealed comes last. Either way the record says ``streamed``: recovery reads
        the cut, never splits an input again."""
        record = JobAccepted(
            job.id,
            int(job.id[1:]),
            job.task,
            "",
            job.total,
            {"timeout": job.options.timeout, "attempts": job.options.attempts},
            job.key,
            job.submitted,
            streamed=True,
            inputs_json=cut or (),
            sealed=None if cut is None else job.total,
        )
        self._append(record, job, lazy=lazy, then=partial(_recorded, job, cut is not None))

    def _append(
        self,
        record: Any,
        job: Job,
        lazy: bool = False,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Append one of ``job``'s records and call ``then`` once it is durable. If it cannot
        be made durable, the job fails and whoever waits for its id or its end gets the
        journal's error (never the id or the end)."""
        self.journal.append(record, lazy=lazy).addCallbacks(
            _call, self._not_durable, callbackArgs=(then,), errbackArgs=(job,)
        )

    def _check_journal(self) -> None:
        """A broken journal takes no new work: nothing accepted now could be made durable."""
        failure = self.journal.failure
        if failure is not None:
            raise WireError(ErrorCode.JOURNAL_ERROR, str(failure))

    def _check_chunks(self, chunks: int | None) -> None:
        if chunks is not None and chunks > self.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"{chunks} chunks asked; this server allows at most "
                f"{self.config.max_subtasks} per job.",
            )

    def open_stream(
        self, task_name: str, options: dict[str, Any] | None = None
    ) -> tuple[Job, Upload | None]:
        """Start a job whose input will arrive in pieces (docs/PROTOCOL.md, "Streamed values").
        Returns the job and the :class:`Upload` to feed, or, when a ``key`` names a job already
        accepted, that job and None (the pieces are then read and dropped). Sub-tasks are
        dispatched as soon as they are cut, while the rest of the input is still arriving; the
        job's id may be shown once the input is complete and durable (``job.when_durable()``)."""
        options = options or {}
        self._check_journal()
        existing = self._keyed(options.get("key"), task_name)
        if existing is not None:
            return existing, None
        task = self._task(task_name)
        if task.stream is None:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"task {task_name} does not take a streamed input; send it on the request line.",
            )
        chunks = options.get("chunks")
        self._check_chunks(chunks)
        job = self._new_job(task, [], options, streamed=True)
        self._record_acceptance(job, lazy=False, cut=None)
        if chunks is None:
            chunks = self._default_chunks(task_name)
        target = chunk_target(task.stream, options.get("size"), chunks)
        return job, Upload(self, job, task, Cutter(task.stream, target))

    def grow(self, job: Job, inputs: list[Any]) -> None:
        """Add sub-task inputs cut from a streamed job's input: checked by the task's split,
        journaled, and queued at once. Raises WireError (the caller abandons the job)."""
        pieces: list[Any] = []
        for value in inputs:
            pieces.extend(self._split(job.task, value, 1))
        if job.total + len(pieces) > self.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"the input splits into more than {self.config.max_subtasks} sub-tasks, "
                "the most this server allows per job; give a larger 'size' or fewer 'chunks'.",
            )
        self._check_queue(len(pieces))
        start = job.total
        job.add_chunks(pieces)
        if self.journal.durable:
            self._append(ChunksAdded(job.id, start, tuple(dumps(p) for p in pieces)), job)
        self._enring(job)
        self._pump()

    def seal(self, job: Job) -> None:
        """A streamed job's input is complete: record that, then the job may finish."""
        job.seal()
        self.log.info(
            "job {job_id} input complete: {size} received, {n} sub-tasks",
            job_id=job.id,
            size=job.input_size,
            n=job.total,
        )
        self._append(JobSealed(job.id, job.total), job, then=job.mark_durable)
        if job.complete():
            self._combine(job)

    def abandon(self, job: Job, code: str, message: str) -> None:
        """A streamed input went wrong (a bad piece, a limit, the connection lost): the job
        fails with ``code``, so whoever looks it up learns why. It was never accepted, so its
        key is free for a retry."""
        if not job.is_final:
            self._end(job, JobState.FAILED, error={"code": code, "message": message})
        job.not_durable(WireError(code, message))

    def wants_more(self, job: Job) -> bool:
        """Whether a streamed job should take more input now. Enough queued sub-tasks to keep
        every worker that can run them busy twice over is enough: the rest may wait in the
        client, so the server holds what the job needs now, not the whole input."""
        if job.is_final:
            return True
        return job.queued < max(8, 2 * self._task_slots[job.task])

    def _keyed(self, key: str | None, task_name: str) -> Job | None:
        """The job a key names, if it was accepted (or its acceptance is still on its way). A
        job that ended without ever being accepted (an upload abandoned or cut short by a
        crash, an acceptance the journal refused) frees its key: the client saw an error, not
        an id, and PROTOCOL.md tells it to retry with the same key."""
        if key is None or key not in self._keys:
            return None
        existing = self._keys[key]
        if existing.is_final and not existing.accepted:
            del self._keys[key]
            return None
        if existing.task != task_name:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"key {key!r} already names job {existing.id} of task {existing.task}; "
                "use a new key for a different job.",
            )
        return existing

    def _task(self, task_name: str) -> Task:
        task = self.registry.get(task_name)
        if task is None:
            raise WireError(
                ErrorCode.UNKNOWN_TASK,
                f"no task named {task_name!r}; known tasks: {', '.join(self.registry.names())}.",
            )
        return task

    def _check_queue(self, adding: int) -> None:
        queued = self._tally.queued
        if queued + adding > self.config.max_queued:
            raise WireError(
                ErrorCode.BUSY,
                f"the server holds {queued} queued sub-tasks and this job adds {adding}; "
                f"the limit is {self.config.max_queued}. Retry later.",
            )

    def _new_job(
        self,
        task: Task,
        pieces: list[Any],
        options: dict[str, Any],
        streamed: bool = False,
    ) -> Job:
        # A null option means "the default", as it does for chunks.
        timeout = options.get("timeout") or task.timeout or self.config.default_timeout
        attempts = options.get("attempts") or task.attempts or self.config.default_attempts
        job = Job(
            f"j{self._next_id}",
            task.name,
            pieces,
            self.clock.seconds(),
            JobOptions(timeout, attempts),
            self._tally,
        )
        job.key = options.get("key")
        job.sealed = not streamed
        self._active += 1
        self._next_id += 1
        self._jobs[job.id] = job
        if job.key is not None:
            self._keys[job.key] = job
        self.counters["jobs_submitted"] += 1
        self.log.info(
            "job {job_id} submitted: task {task}, {n} sub-tasks",
            job_id=job.id,
            task=task.name,
            n="streamed" if streamed else job.total,
        )
        return job

    def _not_durable(self, failure: Failure, job: Job) -> None:
        """A record of ``job`` could not be made durable (the journal logged why, once): the
        job must not run as if accepted, and nobody may be shown its id or its end."""
        error = failure.value
        self.log.debug("job {job_id}: journal write failed: {e}", job_id=job.id, e=error)
        if not job.is_final:
            self._end(
                job,
                JobState.FAILED,
                error={
                    "code": ErrorCode.JOURNAL_ERROR,
                    "type": "JournalError",
                    "message": failure.getErrorMessage(),
                },
                durable=False,
            )
        job.not_durable(error)
        job.settle_failed(error)

    def prepare(self, task_name: str, value: Any, chunks: int | None) -> list[Any] | None:
        """The slow, pure part of :meth:`submit`: split a (big) input into ``chunks``. Safe on
        another thread: it reads only the registry and the limits. None when submit will
        refuse the job anyway (unknown task, too many chunks), so no time is spent splitting
        it. The caller passes the pieces to :meth:`submit`, which journals exactly them."""
        if task_name not in self.registry:
            return None
        if chunks is None or chunks > self.config.max_subtasks:
            return None
        return self._split(task_name, value, chunks)

    @staticmethod
    def encode_cut(pieces: list[Any]) -> tuple[str, ...]:
        """Sub-task inputs as the journal keeps them. Pure: safe on another thread."""
        return tuple(dumps(p) for p in pieces)

    def default_chunks(self, task_name: str) -> int:
        """The chunk count a job of this task gets when it names none (depends on workers)."""
        return self._default_chunks(task_name)

    def _split(self, task_name: str, value: Any, chunks: int) -> list[Any]:
        task = self.registry.get(task_name)
        assert task is not None
        try:
            pieces = list(task.split(value, chunks))
        except TaskInputError as e:
            raise WireError(ErrorCode.BAD_INPUT, f"{e}.") from None
        except Exception as e:  # a user task's split is foreign code: never let it crash us
            raise WireError(
                ErrorCode.BAD_INPUT, f"task {task_name} cannot split this input: {_describe(e)}."
            ) from None
        if len(pieces) > self.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"the input splits into {len(pieces)} sub-tasks; "
                f"at most {self.config.max_subtasks} allowed.",
            )
        return pieces

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
        job = self.get(job_id)
        if not job.is_final:
            self._end(job, JobState.CANCELLED)
        return job

    def jobs(self) -> list[Job]:
        """Every job held whose id exists for good (its acceptance is durable)."""
        return [j for j in self._jobs.values() if j.recorded]

    def queued_subtasks(self) -> int:
        """Sub-tasks queued over all jobs: a counter, never a walk of the jobs."""
        return self._tally.queued

    def waiting_for_worker(self, job: Job) -> bool:
        """True while the job has queued work that no connected worker can run."""
        return job.has_pending() and not self._task_workers[job.task]

    def job_status(self, job: Job) -> dict[str, Any]:
        out = job.status()
        if self.waiting_for_worker(job):
            out["waiting_for_worker"] = True
            out["note"] = f"no connected worker can run task {job.task}; the job waits for one."
        return out

    def expire(self) -> int:
        """Forget ended jobs older than the retention time, here and in the journal."""
        horizon = self.clock.seconds() - self.config.retention
        old = [
            j
            for j in self._jobs.values()
            if j.finished is not None and j.finished < horizon and j.settled
        ]
        for job in old:
            del self._jobs[job.id]
            if job.key is not None and self._keys.get(job.key) is job:
                del self._keys[job.key]
        if old:
            self.journal.forget([j.id for j in old])
        return len(old)

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> int:
        """Load the journal: ended jobs come back with their answers, unfinished ones resume
        from their recorded results (only missing sub-tasks run again). Returns jobs resumed."""
        recovered = self.journal.load()
        self._next_id = max(self._next_id, recovered.next_seq)
        horizon = self.clock.seconds() - self.config.retention
        expired, resumed = [], 0
        for rec in recovered.jobs:
            a = rec.accepted
            opts = JobOptions(a.options.get("timeout"), a.options.get("attempts") or 1)
            if rec.ended is not None:
                e = rec.ended
                if e.finished < horizon:
                    expired.append(a.job)
                    continue
                job = Job(a.job, a.task, [], a.submitted, opts, self._tally)
                job.total = e.total
                job.state, job.finished, job.error = e.state, e.finished, e.error
                job.result_json = e.result_json
                job.chunks, job.results = [], []
                job.next_index = job.total
                if e.state == JobState.DONE:
                    job.done = job.total
                job.settle()  # its end is in the journal
            else:
                self._active += 1
                job = self._resume(rec, opts)
                resumed += 1
            job.key = a.key
            job.recorded = True
            # Acknowledged jobs only: a streamed input never completed was never given an id
            # as accepted, so it holds no key (the client retries under the same one).
            if not a.streamed or rec.sealed is not None:
                job.mark_durable()
            self._jobs[job.id] = job
            if a.key is not None:
                self._keys[a.key] = job
        if expired:
            self.journal.forget(expired)
        self.counters["jobs_recovered"] = resumed
        if resumed:
            self.log.info("resumed {n} unfinished jobs from the journal", n=resumed)
        self._pump()
        return resumed

    def _resume(self, rec: Any, opts: JobOptions) -> Job:
        a = rec.accepted
        try:
            if a.task not in self.registry:
                raise WireError(
                    ErrorCode.TASK_MISSING,
                    f"task {a.task!r} is no longer installed on this server",
                )
            if a.streamed:
                pieces = self._journaled_inputs(rec)
            else:
                pieces = self._split(a.task, json.loads(a.input_json), a.chunks)
        except (WireError, ValueError) as e:
            job = Job(a.job, a.task, [], a.submitted, opts, self._tally)
            code = e.code if isinstance(e, WireError) else ErrorCode.BAD_INPUT
            message = e.message if isinstance(e, WireError) else str(e)
            self._jobs[job.id] = job
            self._end(job, JobState.FAILED, error={"code": code, "message": message})
            return job
        job = Job(a.job, a.task, pieces, a.submitted, opts, self._tally)
        job.prefill({i: json.loads(r) for i, r in rec.results.items()})
        self.log.info(
            "job {job_id} resumed: {done} of {total} sub-tasks already done",
            job_id=job.id,
            done=job.done,
            total=job.total,
        )
        if job.complete():
            self._combine(job)
        else:
            self._enring(job)
        return job

    @staticmethod
    def _journaled_inputs(rec: Any) -> list[Any]:
        """A streamed job's sub-task inputs, as journaled: the input itself was never held."""
        if rec.sealed is None:
            raise WireError(
                ErrorCode.UPLOAD_INCOMPLETE,
                "the server stopped before this job's streamed input was complete; submit it again",
            )
        try:
            return [json.loads(rec.chunks[i]) for i in range(rec.sealed)]
        except KeyError as e:
            raise WireError(
                ErrorCode.JOURNAL_ERROR, f"the journal lacks sub-task input {e.args[0]}"
            ) from None

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
        handle = WorkerHandle(
            name, frozenset(tasks), slots, runner, close, address, self.clock.seconds()
        )
        handle.prefetch = self.config.prefetch
        handle.last_answer = handle.connected
        self._workers[name] = handle
        self._slots += slots
        for task in handle.tasks:
            self._task_slots[task] += slots
            self._task_workers[task] += 1
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
        if self._workers.get(handle.name) is handle:
            del self._workers[handle.name]
            self._slots -= handle.slots
            for task in handle.tasks:
                self._task_slots[task] -= handle.slots
                self._task_workers[task] -= 1
                if not self._task_workers[task]:
                    del self._task_workers[task], self._task_slots[task]
        self.counters["workers_lost"] += 1
        self.log.info(
            "worker {worker} lost with {busy} sub-tasks in flight",
            worker=handle.name,
            busy=handle.busy,
        )

    def workers(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    def late_result(self) -> None:
        """A worker answered a sub-task no longer expected (timed out, cancelled, or a copy)."""
        self.counters["results_late"] += 1

    # -- dispatch ------------------------------------------------------------------------------

    def _default_chunks(self, task_name: str) -> int:
        slots = self._task_slots[task_name]
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

    def _limit(self, worker: WorkerHandle, job: Job) -> int:
        """How many sub-tasks ``worker`` may hold while taking one of ``job``'s: its slots, or,
        for a job whose sub-tasks are short (and have no timeout, which runs from dispatch),
        slots x prefetch, so that one message round trip is not paid per tiny sub-task. A job
        with no answers yet is judged by its task's recent sub-tasks, so a stream of small jobs
        (one sub-task each) is prefetched too."""
        if job.options.timeout is not None:
            return worker.slots
        if job.durations_n:
            mean = job.durations_sum / job.durations_n
        else:
            mean = self._task_mean.get(job.task)
            if mean is None:
                return worker.slots
        if mean < self.config.prefetch_below:
            # About prefetch_window seconds of work per slot, at most --prefetch sub-tasks: a
            # 20 µs sub-task gets a deep queue (batches amortise every message), a 5 ms one a
            # shallow one, so no worker sits on much more work than the others at a job's end.
            window = int(self.config.prefetch_window / max(mean, 1e-6))
            return worker.slots * max(2, min(worker.prefetch, window))
        return worker.slots

    def _next_job_for(self, worker: WorkerHandle) -> Job | None:
        for _ in range(len(self._ring)):
            job = self._ring.popleft()
            if not job.has_pending():
                self._in_ring.discard(job.id)
                continue
            self._ring.append(job)
            if job.task in worker.tasks and worker.busy < self._limit(worker, job):
                self._last_served = job
                return job
        return None

    def _pump(self, only: WorkerHandle | None = None) -> None:
        """Ask for dispatch. With ``only``, just that worker changed (it answered a sub-task):
        it is owed a refill of up to REFILL_STEP sub-tasks, which costs O(1), not a scan of
        every worker. Without, a full pass fills every worker's free slots. A request made
        while dispatch runs (a runner that answers synchronously) or is paused is served by
        the running loop or by the continuation."""
        if only is not None:
            self._owed[only] = self._owed.get(only, 0) + REFILL_STEP
        else:
            self._full_pass_due = True
            self._pass = None  # things changed: the next pass starts from a fresh scan
        if self._resume_call is None:
            self._dispatch()

    def _dispatch(self) -> None:
        """Serve what was asked: a full pass first (idle slots), then the owed refills in the
        order the answers came. After ``dispatch_per_turn`` DO lines since the last pause it
        stops and resumes in the next reactor turn (a callLater(0) on the injected clock), so
        no turn writes an unbounded burst, and a PING on another connection waits behind at
        most that much dispatch work."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._full_pass_due or self._owed:
                if not self._ring:
                    self._full_pass_due = False
                    self._pass = None
                    self._owed.clear()
                    return
                if self._full_pass_due:
                    self._full_pass_due = False
                    if not self._fill_free_slots():
                        self._full_pass_due = True
                        self._pause()
                        return
                    continue
                worker, owed = self._owed.popitem(last=False)
                left = self._refill(worker, owed)
                if left:
                    self._owed[worker] = left
                    self._owed.move_to_end(worker, last=False)  # first in the next turn
                    self._pause()
                    return
        finally:
            self._pumping = False

    def _budget_left(self) -> bool:
        cap = self.config.dispatch_per_turn
        return not cap or self._sent_since_pause < cap

    def _pause(self) -> None:
        if self._resume_call is None:
            self._resume_call = self.clock.callLater(0, self._continue_dispatch)

    def _continue_dispatch(self) -> None:
        self._resume_call = None
        self._sent_since_pause = 0
        self._dispatch()

    def _fill_free_slots(self) -> bool:
        """A full pass: workers with free slots, most free first, take one sub-task each per
        round until the slots free at the start of the pass are used or nothing they can run is
        left. Prefetch beyond the slots comes only from refills, so it grows with answers
        instead of in one burst. False if the budget ran out first; the pass then resumes where
        it stopped, without a rescan, unless another full pass was asked for meanwhile. Slots
        freed by answers meanwhile are not the pass's: those answers' refills cover them."""
        if self._pass is None:
            workers = [w for w in self._workers.values() if w.free > 0]
            workers.sort(key=lambda w: w.busy / w.slots)
            self._pass = deque([w, w.free] for w in workers)
        queue = self._pass
        while queue and self._ring:
            entry = queue[0]
            worker = entry[0]
            if worker.free <= 0 or self._workers.get(worker.name) is not worker:
                queue.popleft()
                continue
            if not self._budget_left():
                return False
            queue.popleft()
            job = self._next_job_for(worker)
            if job is None:
                continue
            self._sent_since_pause += 1
            self._send(worker, job, job.take())
            entry[1] -= 1
            if entry[1] > 0:
                queue.append(entry)  # its next sub-task comes in the next round
        self._pass = None
        return True

    def _refill(self, worker: WorkerHandle, owed: int) -> int:
        """Send ``worker`` up to ``owed`` sub-tasks within its limit. Returns how many are still
        owed because the budget ran out: 0 when done, or when no more fit or none is left."""
        while owed and worker.open and self._workers.get(worker.name) is worker:
            if not self._budget_left():
                return owed
            job = self._next_job_for(worker)
            if job is None:
                return 0
            self._sent_since_pause += 1
            self._send(worker, job, job.take())
            owed -= 1
        return 0

    def _send(self, worker: WorkerHandle, job: Job, index: int, speculative: bool = False) -> None:
        disp = _Dispatch(job, index, worker, self.clock.seconds(), speculative)
        job.inflight.setdefault(index, []).append(disp)
        job.running += 1
        worker.busy += 1
        self._busy += 1
        worker.dispatches[disp] = None
        self.counters["subtasks_dispatched"] += 1
        attempt = job.failures.get(index, 0) + 1
        sub = SubTask(job.id, index, job.task, job.chunks[index], attempt)
        try:
            d = worker.runner(sub)
        except Exception as e:
            # The sub-task cannot even be sent (its input does not encode, or is larger than
            # the worker accepts): retrying cannot help, so the job fails now.
            disp.d = Deferred()
            self._release(disp)
            self._end(
                job,
                JobState.FAILED,
                error={
                    "code": ErrorCode.BAD_INPUT,
                    "type": type(e).__name__,
                    "message": f"sub-task {index} cannot be sent to a worker: {e}",
                    "index": index,
                },
            )
            return
        disp.d = d
        if job.options.timeout:
            d.addTimeout(job.options.timeout, self.clock)
        d.addCallbacks(self._on_result, self._on_error, callbackArgs=(disp,), errbackArgs=(disp,))

    def _release(self, disp: _Dispatch) -> None:
        job, worker = disp.job, disp.worker
        copies = job.inflight.get(disp.index)
        if copies is not None:
            copies.remove(disp)
            if not copies:
                del job.inflight[disp.index]
        job.running -= 1
        worker.busy -= 1
        self._busy -= 1
        worker.dispatches.pop(disp, None)

    def _on_result(self, result: Any, disp: _Dispatch) -> None:
        self._release(disp)
        job, index, worker = disp.job, disp.index, disp.worker
        worker.last_answer = self.clock.seconds()
        if type(result) is TimedResult:
            result, duration = result.value, result.seconds
        else:
            duration = self.clock.seconds() - disp.started
        # A moving mean per task: how long this task's sub-tasks run lately.
        previous = self._task_mean.get(job.task)
        self._task_mean[job.task] = (
            duration if previous is None else previous + 0.1 * (duration - previous)
        )
        if job.record(index, result, worker.name, duration):
            worker.done += 1
            self.counters["subtasks_completed"] += 1
            if self.journal.durable:
                self._append(ResultRecorded(job.id, index, dumps(result)), job)
            for other in list(job.inflight.get(index, ())):
                other.d.cancel()  # a speculative copy lost the race
            if job.complete():
                self._combine(job)
        else:
            self.counters["results_duplicate"] += 1
        self._pump(worker)

    def _on_error(self, failure: Failure, disp: _Dispatch) -> None:
        self._release(disp)
        job, index, worker = disp.job, disp.index, disp.worker
        if disp.stalled is not None:
            self._stalled(disp)
            return
        if failure.check(CancelledError) or job.has_result(index) or job.inflight.get(index):
            # We cancelled it (job ended, or a copy won), or another copy still runs.
            self._pump()
            return
        if failure.check(TimeoutError):
            self.counters["subtasks_timed_out"] += 1
            self.log.warn(
                "sub-task {job_id}:{index} timed out on {worker} after {t}s",
                job_id=job.id,
                index=index,
                worker=worker.name,
                t=job.options.timeout,
            )
            self._attempt_failed(
                job,
                index,
                worker,
                {
                    "code": ErrorCode.TIMEOUT,
                    "type": "Timeout",
                    "message": f"sub-task ran longer than {job.options.timeout}s",
                },
            )
        elif failure.check(ResultTooLarge):
            err = failure.value  # retrying cannot make it fit
            self._end(
                job,
                JobState.FAILED,
                error={
                    "code": ErrorCode.RESULT_TOO_LARGE,
                    "type": err.type,
                    "message": err.message,
                    "index": index,
                    "worker": worker.name,
                },
            )
        elif failure.check(TaskFailed):
            err = failure.value
            code = err.code
            self._attempt_failed(
                job, index, worker, {"code": code, "type": err.type, "message": err.message}
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
            lost = job.lost[index] = job.lost.get(index, 0) + 1
            if lost > self.config.max_lost:
                self._end(
                    job,
                    JobState.FAILED,
                    error={
                        "code": ErrorCode.WORKER_LOST,
                        "type": "WorkerLost",
                        "message": f"sub-task {index} lost its worker {lost} times",
                        "index": index,
                        "worker": worker.name,
                    },
                )
            elif job.requeue(index):
                self.counters["subtasks_requeued"] += 1
                self._enring(job)
        self._pump()

    def _attempt_failed(
        self, job: Job, index: int, worker: WorkerHandle, error: dict[str, Any]
    ) -> None:
        worker.failed += 1
        n = job.failures[index] = job.failures.get(index, 0) + 1
        if n >= job.options.attempts:
            error.update(index=index, attempts=n, worker=worker.name)
            self._end(job, JobState.FAILED, error=error)
            return
        delay = min(self.config.retry_cap, self.config.retry_base * 2 ** (n - 1))
        self.counters["subtasks_retried"] += 1
        self.log.info(
            "sub-task {job_id}:{index} failed attempt {n} ({code}); retrying in {delay}s",
            job_id=job.id,
            index=index,
            n=n,
            code=error["code"],
            delay=delay,
        )
        job.delayed[index] = self.clock.callLater(delay, self._retry_due, job, index)

    def _retry_due(self, job: Job, index: int) -> None:
        job.delayed.pop(index, None)
        if job.requeue(index):
            self._enring(job)
            self._pump()

    # -- stalls --------------------------------------------------------------------------------

    def check_stalls(self) -> int:
        """Take back sub-tasks that make no progress; the server calls it every second.

        A sub-task whose job and task set no timeout still gets a deadline once its task's
        run time is known: ``stall_factor`` times the mean, at least ``stall_min`` seconds. A
        worker holding such a sub-task that has answered nothing for that long (it answers
        PING but never a DO, say) is wedged: it is dropped, and everything it held runs
        elsewhere. On a worker that does answer, just the stalled sub-task fails its attempt
        (retried, like a timeout). Until a task has a measured run time nothing stalls.
        Looks at each worker's oldest sub-task only: O(workers) per call. Returns how many
        sub-tasks were taken back."""
        now, taken = self.clock.seconds(), 0
        for worker in list(self._workers.values()):
            stalled = []
            for disp in worker.dispatches:
                limit = self._stall_limit(disp.job)
                if limit is None or now - disp.started < limit:
                    break
                stalled.append((disp, limit))
            if not stalled:
                continue
            first, limit = stalled[0]
            if now - max(worker.last_answer, first.started) >= limit:
                self.log.warn(
                    "worker {worker} answered nothing for {t:.0f}s while holding {n} sub-tasks; "
                    "dropping it, its sub-tasks run elsewhere",
                    worker=worker.name,
                    t=now - max(worker.last_answer, first.started),
                    n=len(worker.dispatches),
                )
                self.remove_worker(worker)
                stalled = [(d, limit) for d in worker.dispatches]
                reason = "worker"
            else:
                reason = "subtask"
            for disp, _ in stalled:
                disp.stalled = reason
                disp.d.cancel()  # the runner's owner drops it (tells the worker, if any)
                taken += 1
            if reason == "worker":
                worker.close()
        return taken

    def _stall_limit(self, job: Job) -> float | None:
        if job.options.timeout is not None:
            return None  # the job's own timeout takes it back
        mean = job.mean_duration()
        if mean is None:
            mean = self._task_mean.get(job.task)
        if mean is None:
            return None
        return max(self.config.stall_min, self.config.stall_factor * mean)

    def _stalled(self, disp: _Dispatch) -> None:
        job, index, worker = disp.job, disp.index, disp.worker
        if job.has_result(index) or job.inflight.get(index):
            self._pump()
            return
        if disp.stalled == "worker":
            if job.requeue(index):
                self.counters["subtasks_requeued"] += 1
                self._enring(job)
        else:
            self.counters["subtasks_timed_out"] += 1
            limit = self._stall_limit(job) or 0.0
            self._attempt_failed(
                job,
                index,
                worker,
                {
                    "code": ErrorCode.TIMEOUT,
                    "type": "Stalled",
                    "message": f"no answer after {limit:g}s ({self.config.stall_factor:g}x "
                    "the task's mean run time)",
                },
            )
        self._pump()

    # -- stragglers ----------------------------------------------------------------------------

    def speculate(self) -> int:
        """Start backup copies of straggling sub-tasks on idle workers; first result wins.
        A sub-task straggles when its job has nothing queued, enough finished sub-tasks to
        trust their mean duration, and it has run ``speculate_factor`` times that mean."""
        if not self.config.speculate:
            return 0
        now, started = self.clock.seconds(), 0
        cfg = self.config
        for job in list(self._jobs.values()):
            if job.is_final or job.queued or job.durations_n < cfg.speculate_min_done:
                continue
            threshold = max(cfg.speculate_min_seconds, cfg.speculate_factor * job.mean_duration())
            for index, copies in list(job.inflight.items()):
                if len(copies) != 1 or now - copies[0].started < threshold:
                    continue
                running_on = copies[0].worker
                spare = [
                    w
                    for w in self._workers.values()
                    if w.free > 0 and w is not running_on and job.task in w.tasks
                ]
                if not spare:
                    continue
                worker = max(spare, key=lambda w: w.free)
                self.log.info(
                    "sub-task {job_id}:{index} straggles on {slow}; backup copy on {worker}",
                    job_id=job.id,
                    index=index,
                    slow=running_on.name,
                    worker=worker.name,
                )
                self._send(worker, job, index, speculative=True)
                self.counters["subtasks_speculative"] += 1
                started += 1
        return started

    # -- endings -------------------------------------------------------------------------------

    def _combine(self, job: Job) -> None:
        """Combine a job's results into its answer. A big job's combine (many sub-tasks, or a
        big input) runs through ``offload``, off the reactor thread, so PING and every other
        job stay responsive while, say, 64 sorted runs of a 200 MB input are merged."""
        task = self.registry.get(job.task)
        assert task is not None
        results = job.ordered_results()
        if self.offload is not None and (
            job.total >= OFFLOAD_SUBTASKS or job.input_size >= OFFLOAD_BYTES
        ):
            d = self.offload(combine_and_encode, task.combine, results)
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
            self._end(
                job,
                JobState.FAILED,
                error={
                    "code": ErrorCode.RESULT_TOO_LARGE,
                    "type": "ResultTooLarge",
                    "message": f"the result encodes to {len(encoded)} characters; "
                    f"the server allows {self.config.max_result_bytes}",
                },
            )
            return
        self._end(job, JobState.DONE, result=result, encoded=encoded)

    def _combine_failed(self, failure: Failure, job: Job) -> None:
        if job.is_final:
            return
        self._end(
            job,
            JobState.FAILED,
            error={
                "code": ErrorCode.COMBINE_ERROR,
                "type": failure.type.__name__,
                "message": failure.getErrorMessage(),
            },
        )

    def _end(
        self,
        job: Job,
        state: str,
        result: Any = None,
        error: dict | None = None,
        encoded: str | None = None,
        durable: bool = True,
    ) -> None:
        job.result_json = encoded
        if not job.is_final:
            self._active -= 1
        job.finish(state, self.clock.seconds(), result=result, error=error)
        for call in job.delayed.values():
            if call.active():
                call.cancel()
        job.delayed.clear()
        for copies in list(job.inflight.values()):
            for disp in list(copies):
                disp.d.cancel()  # tells the worker to drop it and frees the slot
        key = {
            JobState.DONE: "jobs_done",
            JobState.FAILED: "jobs_failed",
            JobState.CANCELLED: "jobs_cancelled",
        }[state]
        self.counters[key] += 1
        self.log.info(
            "job {job_id} {state} after {elapsed:.3f}s ({n} sub-tasks)",
            job_id=job.id,
            state=state,
            elapsed=job.finished - job.submitted,
            n=job.total,
        )
        if not durable:
            return  # the caller fails the job's waiters with the journal's error
        record = JobEnded(job.id, state, encoded, error, job.total, job.finished)
        self._append(record, job, then=job.settle)

    # -- views ---------------------------------------------------------------------------------

    def tasks_view(self) -> list[dict[str, Any]]:
        out = []
        for task in self.registry:
            d = task.describe()
            d["workers"] = self._task_workers[task.name]
            d["slots"] = self._task_slots[task.name]
            out.append(d)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters, all kept as things change: O(1) in jobs and workers."""
        return {
            **self.counters,
            "jobs_active": self._active,
            "jobs_held": len(self._jobs),
            "subtasks_queued": self._tally.queued,
            "subtasks_running": self._busy,
            "workers": len(self._workers),
            "slots": self._slots,
            "slots_busy": self._busy,
            "journal": self.journal.durable,
            "journal_ok": self.journal.failure is None,
            "uptime": round(self.clock.seconds() - self.started, 3),
        }

    def list_jobs(self, limit: int, before: str | None = None) -> list[Job]:
        """Up to ``limit`` held jobs, newest first; with ``before`` (a job id, held or not),
        only jobs submitted before it: the JOBS verb's pages. Costs O(limit + log n),
        amortised: a sorted index of job sequence numbers (ids are ``j<seq>``, seq only grows)
        is extended from the new end of ``_jobs``, and ids no longer held are dropped from it
        as they are met (or all at once, when they outnumber the held ones)."""
        from bisect import bisect_left

        index: list[int] | None = getattr(self, "_seq_index", None)
        if index is None or len(index) > 2 * len(self._jobs) + 1024:
            index = sorted(s for s in map(_job_seq, self._jobs) if s is not None)
            self._seq_index = index
        else:
            top = index[-1] if index else 0
            fresh = []
            for job_id in reversed(self._jobs):  # newest first: stop at the first known one
                seq = _job_seq(job_id)
                if seq is None:
                    continue
                if seq <= top:
                    break
                fresh.append(seq)
            index.extend(sorted(fresh))
        i = len(index) if before is None else bisect_left(index, _job_seq(before) or 0)
        out: list[Job] = []
        while i > 0 and len(out) < limit:
            i -= 1
            job = self._jobs.get(f"j{index[i]}")
            if job is None:
                del index[i]  # expired or never kept: met once, then gone
            elif job.recorded:  # an id not yet durable does not exist for clients
                out.append(job)
        return out


def _recorded(job: Job, sealed: bool) -> None:
    """A job's acceptance is durable: its id exists for good, and if its cut came with it,
    the id may be shown to its submitter."""
    job.recorded = True
    if sealed:
        job.mark_durable()


def _call(_: Any, fn: Callable[[], None] | None) -> None:
    if fn is not None:
        fn()


def _describe(e: BaseException) -> str:
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _job_seq(job_id: str) -> int | None:
    """The sequence number in a job id ``j<seq>``; None for anything else."""
    if job_id[:1] == "j" and job_id[1:].isdigit():
        return int(job_id[1:])
    return None
