"""Jobs coming in: a whole input (``submit``) or a streamed one (``open_stream``, then
``grow``/``seal``/``abandon`` as an :class:`~clusterd.core.uploads.Upload` cuts it).

:class:`Intake` asks :class:`~clusterd.core.admission.Admission` whether a job may come in and
what it splits into, numbers it, journals its acceptance and its cut (through
:class:`~clusterd.core.endings.Endings`), and queues it in the ring. The scheduler delegates its
public ``submit``, ``open_stream``, ``grow``, ``seal``, ``abandon`` and ``wants_more`` here.
Imports only the parts below it (admission, endings, jobs, ring, workers, uploads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from clusterd.core.admission import Admission, default_chunks
from clusterd.core.endings import Endings
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jobs import Job, Tally
from clusterd.core.journal import ChunksAdded, JobSealed
from clusterd.core.refs import encode_ranges
from clusterd.core.ring import Ring
from clusterd.core.streaming import ByteCutter, Cutter, chunk_target
from clusterd.core.table import JobTable
from clusterd.core.uploads import Upload
from clusterd.core.wire import dumps
from clusterd.core.workers import WorkerRegistry

__all__ = ["Intake", "encode_cut"]


def encode_cut(pieces: list[Any]) -> str:
    """Sub-task inputs as the journal keeps them: one JSON array, encoded in one call. Pure:
    safe on another thread."""
    return dumps(pieces)


class Intake:
    """Takes jobs in, whole or streamed: asks admission, numbers the job, journals its acceptance
    and queues it in the ring."""

    log = Logger(namespace="clusterd.core.scheduler.Scheduler")

    def __init__(
        self,
        owner: Any,
        admission: Admission,
        endings: Endings,
        ring: Ring,
        table: JobTable,
        tally: Tally,
        workers: WorkerRegistry,
        pump: Callable[[], None],
    ) -> None:
        self.owner = owner  # reads .journal, .clock, .counters
        self.sink = owner  # the IUploadSink an Upload drives (the scheduler's public grow/seal)
        self._admission = admission
        self._endings = endings
        self._ring = ring
        self._jobs = table.jobs
        self._tally = tally
        self._workers = workers
        self._pump = pump  # asks the dispatcher for a full pass
        self.next_id = 1

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
        if "ref" in options:  # "&": an input by reference (the wire parser checked its options)
            return self.submit_ref(task_name, options)
        adm = self._admission
        adm.check_journal(self.owner.journal.failure)
        existing = adm.keyed(options.get("key"), task_name)
        if existing is not None:
            return existing
        task = adm.task(task_name)
        if pieces is None:
            if chunks is None:
                chunks = self.default_chunks(task_name)
            adm.check_chunks(chunks)
            pieces = adm.split(task_name, value, chunks)
        adm.check_queue(self._tally.queued, len(pieces))
        job = self._new_job(task, pieces, options)
        job.input_size = len(input_json) if input_json is not None else 0
        if not self.owner.journal.durable:
            encoded = ""
        elif encoded is None:
            encoded = encode_cut(pieces)
        # One record, the cut in it. Lazy: a RUN's client sees no id before the end, and a
        # SUBMIT's OK hurries the journal (ServerProtocol), so a short RUN's acceptance can
        # share its end's commit.
        return self._accept(job, encoded)

    def _accept(self, job: Job, encoded: str) -> Job:
        """Journal a whole job's acceptance with its cut (``encoded``), and queue it."""
        self._endings.record_acceptance(job, lazy=True, cut=encoded)
        if job.total == 0:
            self._endings.combine(job)
        else:
            self._ring.add(job)
            self._pump()
        return job

    def submit_ref(self, task_name: str, options: dict[str, Any]) -> Job:
        """Enqueue a job whose input is named by reference (the ``ref``, ``size`` and
        ``format`` options, checked by the wire parser): cut into byte ranges the workers read,
        journaled as ``[[start,end],...]`` with the reference in the job's options, so a
        restart resumes the very same ranges. The server never reads the input itself."""
        adm = self._admission
        adm.check_journal(self.owner.journal.failure)
        existing = adm.keyed(options.get("key"), task_name)
        if existing is not None:
            return existing
        task = adm.streamable(task_name)
        ranges = adm.ranges(task, options, self.default_chunks(task_name))
        adm.check_queue(self._tally.queued, len(ranges))
        job = self._new_job(task, ranges, options)
        fmt = ranges[0].format if ranges else "text"
        job.ref = {"url": options["ref"], "size": options["size"], "format": fmt}
        job.input_size = options["size"]
        return self._accept(job, encode_ranges(ranges) if self.owner.journal.durable else "")

    def open_stream(
        self, task_name: str, options: dict[str, Any] | None = None
    ) -> tuple[Job, Upload | None]:
        """Start a job whose input will arrive in pieces (docs/PROTOCOL.md, "Streamed values").
        Returns the job and the :class:`Upload` to feed, or, when a ``key`` names a job already
        accepted, that job and None (the pieces are then read and dropped). Sub-tasks are
        dispatched as soon as they are cut, while the rest of the input is still arriving; the
        job's id may be shown once the input is complete and durable (``job.when_durable()``)."""
        options = options or {}
        adm = self._admission
        adm.check_journal(self.owner.journal.failure)
        existing = adm.keyed(options.get("key"), task_name)
        if existing is not None:
            return existing, None
        task = adm.streamable(task_name)
        chunks = options.get("chunks")
        adm.check_chunks(chunks)
        job = self._new_job(task, [], options, streamed=True)
        self._endings.record_acceptance(job, lazy=False, cut=None)
        if chunks is None:
            chunks = self.default_chunks(task_name)
        target = chunk_target(task.stream, options.get("size"), chunks)
        cutter = ByteCutter(target) if task.stream == "text" else Cutter(task.stream, target)
        return job, Upload(self.sink, job, task, cutter)

    def grow(self, job: Job, inputs: list[Any]) -> None:
        """Add sub-task inputs cut from a streamed job's input: checked by the task's split,
        journaled, and queued at once. Raises WireError (the caller abandons the job).
        A text stream's inputs are UTF-8 ``bytes`` (checked as they were cut): they skip the
        task's split and JSON, and the journal keeps them as they are (BLOBs)."""
        if inputs and isinstance(inputs[0], bytes):
            pieces = self._cut_bytes(job, inputs)
        else:
            pieces = self._admission.cut(job, inputs, self._tally.queued)
        start = job.total
        job.add_chunks(pieces)
        if self.owner.journal.durable:
            kept = tuple(p if isinstance(p, bytes) else dumps(p) for p in pieces)
            record = ChunksAdded(job.id, start, kept)
            self._endings.append(record, job)
        self._ring.add(job)
        self._pump()

    def _cut_bytes(self, job: Job, inputs: list[bytes]) -> list[bytes]:
        """The limits :meth:`Admission.cut` checks, for text chunks already cut and checked."""
        adm = self._admission
        if job.total + len(inputs) > adm.config.max_subtasks:
            raise WireError(
                ErrorCode.TOO_MANY_SUBTASKS,
                f"the input splits into more than {adm.config.max_subtasks} sub-tasks, "
                "the most this server allows per job; give a larger 'size' or fewer 'chunks'.",
            )
        adm.check_queue(self._tally.queued, len(inputs))
        return inputs

    def seal(self, job: Job) -> None:
        """A streamed job's input is complete: record that, then the job may finish."""
        job.seal()
        self.log.info(
            "job {job_id} input complete: {size} received, {n} sub-tasks",
            job_id=job.id,
            size=job.input_size,
            n=job.total,
        )
        self._endings.append(JobSealed(job.id, job.total), job, then=job.mark_durable)
        if job.complete():
            self._endings.combine(job)

    def abandon(self, job: Job, code: str, message: str) -> None:
        """A streamed input went wrong (a bad piece, a limit, the connection lost): the job
        fails with ``code``, so whoever looks it up learns why. It was never accepted, so its
        key is free for a retry."""
        self._endings.abandon(job, code, message)

    def wants_more(self, job: Job) -> bool:
        """Whether a streamed job should take more input now. Enough queued sub-tasks to keep
        every worker that can run them busy twice over is enough: the rest may wait in the
        client, so the server holds what the job needs now, not the whole input."""
        if job.is_final:
            return True
        return job.queued < max(8, 2 * self._workers.task_slots[job.task])

    def _new_job(
        self, task: Any, pieces: list[Any], options: dict[str, Any], streamed: bool = False
    ) -> Job:
        now = self.owner.clock.seconds()
        job_id = f"j{self.next_id}"
        job = self._admission.new_job(job_id, task, pieces, options, now, self._tally, streamed)
        self._endings.active += 1
        self.next_id += 1
        self._jobs[job.id] = job
        self.owner.counters["jobs_submitted"] += 1
        self.log.info(
            "job {job_id} submitted: task {task}, {n} sub-tasks",
            job_id=job.id,
            task=task.name,
            n="streamed" if streamed else job.total,
        )
        return job

    def default_chunks(self, task_name: str) -> int:
        """The chunk count a job of this task gets when it names none (depends on workers)."""
        return default_chunks(self._workers.task_slots[task_name])
