"""Whether a job may come in, and what it becomes: limits, idempotency keys, the split.

:class:`Admission` refuses with :class:`~clusterd.core.errors.WireError` (the refusal type,
with an :class:`~clusterd.core.errors.ErrorCode`): an unknown task, a bad input, too many
sub-tasks, a full queue, a broken journal, a key reused for another task. It remembers which
job each idempotency key names; a key whose job ended without ever being accepted is free
again (the client saw an error, not an id, and PROTOCOL.md tells it to retry with that key).

Pure policy: no Deferreds, no clock. Imports :mod:`clusterd.core.errors`,
:mod:`clusterd.core.jobs` and :mod:`clusterd.tasks.registry` (the bottom layer).
"""

from __future__ import annotations

from typing import Any

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jobs import Job, JobOptions, Tally
from clusterd.core.refs import RefRange, cut_ranges, range_count, ref_format
from clusterd.tasks.registry import Registry, Task, TaskInputError

__all__ = ["Admission", "default_chunks"]

DEFAULT_CHUNKS_PER_SLOT = 4
DEFAULT_CHUNKS_NO_WORKERS = 16
MAX_DEFAULT_CHUNKS = 256


def default_chunks(slots: int) -> int:
    """The chunk count a job gets when it names none, given the slots that can run it."""
    if not slots:
        return DEFAULT_CHUNKS_NO_WORKERS
    return max(1, min(MAX_DEFAULT_CHUNKS, DEFAULT_CHUNKS_PER_SLOT * slots))


class Admission:
    """The admission rules of one scheduler (``config`` is read on every call)."""

    def __init__(self, registry: Registry, config: Any) -> None:
        self.registry = registry
        self.config = config
        self.keys: dict[str, Job] = {}

    @staticmethod
    def check_journal(failure: BaseException | None) -> None:
        """A broken journal takes no new work: nothing accepted now could be made durable."""
        if failure is not None:
            raise WireError(ErrorCode.JOURNAL_ERROR, str(failure))

    def keyed(self, key: str | None, task_name: str) -> Job | None:
        """The job a key names, if it was accepted (or its acceptance is still on its way). A
        job that ended without ever being accepted (an upload abandoned or cut short by a
        crash, an acceptance the journal refused) frees its key."""
        if key is None or key not in self.keys:
            return None
        existing = self.keys[key]
        if existing.is_final and not existing.accepted:
            del self.keys[key]
            return None
        if existing.task != task_name:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"key {key!r} already names job {existing.id} of task {existing.task}; "
                "use a new key for a different job.",
            )
        return existing

    def remember(self, job: Job) -> None:
        """Note the job an idempotency key names, so a retried request with that key finds it."""
        if job.key is not None:
            self.keys[job.key] = job

    def forget(self, job: Job) -> None:
        """Free the job's idempotency key, if it still names this job (the job expired, or ended
        without ever being accepted)."""
        if job.key is not None and self.keys.get(job.key) is job:
            del self.keys[job.key]

    def task(self, task_name: str) -> Task:
        """The task named ``task_name``; raises WireError UNKNOWN_TASK, listing the known tasks, if
        there is none."""
        task = self.registry.get(task_name)
        if task is None:
            raise WireError(
                ErrorCode.UNKNOWN_TASK,
                f"no task named {task_name!r}; known tasks: {', '.join(self.registry.names())}.",
            )
        return task

    def streamable(self, task_name: str) -> Task:
        """The task named ``task_name`` if it takes a streamed input; raises WireError
        (UNKNOWN_TASK, or BAD_REQUEST when it does not)."""
        task = self.task(task_name)
        if task.stream is None:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"task {task_name} does not take a streamed input; send it on the request line.",
            )
        return task

    def check_chunks(self, chunks: int | None) -> None:
        """Raise WireError TOO_MANY_SUBTASKS if a job asks for more chunks than the server
        allows."""
        if chunks is not None and chunks > self.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"{chunks} chunks asked; this server allows at most "
                f"{self.config.max_subtasks} per job.",
            )

    def ranges(self, task: Task, options: dict[str, Any], default: int) -> list[RefRange]:
        """The byte ranges an input by reference is cut into (``chunks``, or ``default``, more
        if a range would pass the size cap); raises WireError for a bad format or too many."""
        chunks = options.get("chunks") or default
        self.check_chunks(options.get("chunks"))
        fmt = ref_format(options, task.name, str(task.stream))
        count = range_count(options["size"], chunks)
        if count > self.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"the input's {options['size']} bytes make {count} sub-tasks; "
                f"at most {self.config.max_subtasks} allowed.",
            )
        return cut_ranges(options["ref"], options["size"], chunks, fmt)

    def check_queue(self, queued: int, adding: int) -> None:
        """Raise WireError BUSY if ``adding`` sub-tasks would take the queue past its limit."""
        if queued + adding > self.config.max_queued:
            raise WireError(
                ErrorCode.BUSY,
                f"the server holds {queued} queued sub-tasks and this job adds {adding}; "
                f"the limit is {self.config.max_queued}. Retry later.",
            )

    def split(self, task_name: str, value: Any, chunks: int) -> list[Any]:
        """The task's split, its errors as BAD_INPUT, its size checked. Pure (any thread)."""
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

    def prepare(self, task_name: str, value: Any, chunks: int | None) -> list[Any] | None:
        """:meth:`split`, or None when submit will refuse the job anyway (unknown task, too
        many chunks), so no time is spent splitting it."""
        if task_name not in self.registry:
            return None
        if chunks is None or chunks > self.config.max_subtasks:
            return None
        return self.split(task_name, value, chunks)

    def cut(self, job: Job, inputs: list[Any], queued: int) -> list[Any]:
        """The sub-task inputs a streamed ``job`` grows by: each cut input checked by the
        task's split, the job's and the queue's limits checked."""
        pieces: list[Any] = []
        for value in inputs:
            pieces.extend(self.split(job.task, value, 1))
        if job.total + len(pieces) > self.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"the input splits into more than {self.config.max_subtasks} sub-tasks, "
                "the most this server allows per job; give a larger 'size' or fewer 'chunks'.",
            )
        self.check_queue(queued, len(pieces))
        return pieces

    def new_job(
        self,
        job_id: str,
        task: Task,
        pieces: list[Any],
        options: dict[str, Any],
        now: float,
        tally: Tally,
        streamed: bool = False,
    ) -> Job:
        """The job, its options after defaults (a null option means "the default", as it does
        for chunks), its key remembered."""
        timeout = options.get("timeout") or task.timeout or self.config.default_timeout
        attempts = options.get("attempts") or task.attempts or self.config.default_attempts
        opts = JobOptions(timeout, attempts)
        key = options.get("key")
        job = Job(job_id, task.name, pieces, now, opts, tally, key, not streamed, task.merge)
        self.remember(job)
        return job


def _describe(e: BaseException) -> str:
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
