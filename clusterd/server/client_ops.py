"""The client operations, independent of any transport: :class:`ClientOps`.

One ``ClientOps`` serves one client (a line-protocol connection today; an HTTP client later):
it checks the per-client limits, makes one scheduler call per operation and returns values or
Deferreds. It formats no line and reads no socket, so another front end can drive exactly the
same operations. Imports the scheduler's public API and ``core`` only.

Errors are raised as :class:`~clusterd.core.errors.WireError` (their codes are the protocol's:
BUSY, BAD_REQUEST, NO_SUCH_JOB...). A Deferred returned here fails with ``CancelledError`` if
the client went away (:meth:`close`), with a ``WireError`` for a streamed upload the scheduler
refused, or with a ``JournalError`` when the record could not be made durable.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jobs import Job
from clusterd.core.scheduler import Scheduler
from clusterd.core.uploads import Upload
from clusterd.core.wire import JobRequest
from clusterd.server.limits import JOBS_DEFAULT_LIMIT, JOBS_MAX_LIMIT, ConnectionSettings

__all__ = ["ClientOps", "Prepared"]

Prepared = tuple[list[Any] | None, str | None]  # (pieces, encoded cut) or (None, None)
_JOB_ID = re.compile(r"j[0-9]{1,18}")


class ClientOps:
    """The operations one client may ask for, with its per-client limits; no lines, no sockets."""

    def __init__(self, core: Scheduler, settings: ConnectionSettings) -> None:
        self.core = core
        self.settings = settings
        # This client's unfinished jobs -> the wait() that forgets each when it ends: a
        # count kept in O(1) per job instead of a set rebuilt on every submit.
        self.open_jobs: dict[Job, Deferred[Any]] = {}

    # -- submitting ----------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise BUSY if this client already has max_client_jobs unfinished jobs."""
        if len(self.open_jobs) >= self.settings.max_client_jobs:
            raise WireError(
                ErrorCode.BUSY,
                f"this connection has {len(self.open_jobs)} unfinished jobs, the most allowed; "
                "wait for some to end.",
            )

    def submit(
        self,
        req: JobRequest,
        pieces: list[Any] | None = None,
        encoded: str | None = None,
    ) -> Job:
        """Submit a parsed request (``pieces``/``encoded``: its cut, prepared off the reactor
        by :meth:`prepare`); the job counts against this client until it ends."""
        job = self.core.submit(
            req.task, req.input, req.chunks, req.options, req.input_json, pieces, encoded
        )
        self._track(job)
        return job

    def prepare(self, req: JobRequest, default_chunks: int | None) -> Prepared:
        """Split and encode a big request's input: pure, for a thread (core.offload)."""
        if req.by_ref:
            return None, None  # nothing to split: submit_ref cuts byte ranges
        pieces = self.core.prepare(req.task, req.input, req.chunks or default_chunks)
        durable = pieces is not None and self.core.journal.durable
        return pieces, self.core.encode_cut(pieces) if durable else None

    def open_stream(self, task: str, options: dict[str, Any]) -> tuple[Job, Upload | None]:
        """A job whose input arrives in pieces (``Upload.feed``/``end``/``abandon``)."""
        job, upload = self.core.open_stream(task, options)
        self._track(job)
        return job, upload

    def accepted(self, job: Job) -> Deferred[Job]:
        """Fires with the job once it is durably recorded (what SUBMIT answers with)."""
        d = job.when_durable()
        if not d.called:
            self.core.journal.hurry()  # the id waits for the commit: no lingering for company
        return d

    def _track(self, job: Job) -> None:
        """Count one of this client's jobs until it ends (for max_client_jobs): O(1) per job,
        and forgotten when the client goes."""
        if job.is_final or job in self.open_jobs:
            return
        d = job.wait()
        self.open_jobs[job] = d
        # Its end, or an end the journal could not record: either way it stops counting.
        d.addCallbacks(self._untrack, self._untrack_failed, errbackArgs=(job,))

    def _untrack(self, job: Job) -> None:
        self.open_jobs.pop(job, None)

    def _untrack_failed(self, failure: Failure, job: Job) -> None:
        self.open_jobs.pop(job, None)

    def close(self) -> None:
        """The client went away: stop counting its jobs (they run on)."""
        open_jobs, self.open_jobs = self.open_jobs, {}
        for d in open_jobs.values():
            d.cancel()

    # -- asking --------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job, or WireError NO_SUCH_JOB."""
        return self.core.get(job_id)

    def result(self, job: Job) -> Deferred[Job]:
        """Fires with the job once it has ended and its end is durable."""
        return job.wait()

    def status(self, job_id: str) -> dict[str, Any]:
        """The STATUS object of the job ``job_id``; raises WireError UNKNOWN_JOB if there is
        none."""
        return self.core.job_status(self.core.get(job_id))

    def cancel(self, job_id: str) -> Deferred[Job]:
        """Cancel; fires with the job once its end (cancelled, or the one it already had) is
        durable, so a restart never resumes a job its client was told is cancelled."""
        return self.core.cancel(job_id).wait()

    def jobs(self, limit: Any = JOBS_DEFAULT_LIMIT, before: Any = None) -> list[dict[str, Any]]:
        """One page of jobs, newest first: ``limit`` (1-JOBS_MAX_LIMIT) jobs older than the job
        id ``before``; each as id, task, state, done and total."""
        if type(limit) is not int or not 1 <= limit <= JOBS_MAX_LIMIT:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"JOBS option 'limit' must be an integer from 1 to {JOBS_MAX_LIMIT}.",
            )
        if before is not None and not (isinstance(before, str) and _JOB_ID.fullmatch(before)):
            raise WireError(
                ErrorCode.BAD_REQUEST, "JOBS option 'before' must be a job id, e.g. j42."
            )
        return [
            {k: s[k] for k in ("id", "task", "state", "done", "total")}
            for s in (j.status() for j in self.core.list_jobs(limit, before))
        ]

    def workers(self) -> list[dict[str, Any]]:
        """The connected workers' descriptions (WORKERS)."""
        return [w.describe() for w in self.core.workers()]

    def tasks(self) -> Any:
        """The tasks, with the workers and slots that can run each (TASKS)."""
        return self.core.tasks_view()

    def stats(self) -> Any:
        """The scheduler's counters (STATS)."""
        return self.core.stats()
