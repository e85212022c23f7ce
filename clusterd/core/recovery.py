"""Journal records back into jobs, after a restart.

:func:`restore` turns one :class:`~clusterd.core.journal.JobRecord` into a :class:`Restored`:
an ended job comes back with its answer (settled: its end is in the journal), an unfinished one
with the sub-task inputs as they were cut and the results already recorded (only the missing
sub-tasks run again), and one that cannot resume (its task is gone, its streamed input never
completed, its records are damaged) as a job to fail with the reason. Jobs ended before the
retention horizon are not restored at all (None): the caller forgets them.

Pure: no Deferreds, no clock. Imports :mod:`clusterd.core.errors`, :mod:`clusterd.core.jobs`
and the journal's record types.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jobs import Job, JobOptions, Tally
from clusterd.core.journal import JobRecord
from clusterd.core.refs import ranges_from_cut

__all__ = ["Restored", "restore", "journaled_inputs", "ENDED", "FAILED", "RESUME"]

ENDED, FAILED, RESUME = "ended", "failed", "resume"

Split = Callable[[str, Any, int], list[Any]]


@dataclass
class Restored:
    """A job rebuilt from the journal and what the scheduler must do with it: ENDED (hold
    it), FAILED (end it with ``error``) or RESUME (combine it if complete, else queue it)."""

    job: Job
    action: str
    error: dict[str, Any] | None = None


def restore(
    rec: JobRecord, horizon: float, installed: Callable[[str], Any], split: Split, tally: Tally
) -> Restored | None:
    """``rec`` as a job; None if it ended before ``horizon`` (expired). ``installed`` gives a
    task by name (or says whether it exists; falsy when it is gone); ``split`` splits an
    old-style (unstreamed) input again. A ``merge`` task's journaled results are folded again,
    one by one, into a fresh accumulator (each was journaled as a ResultRecorded)."""
    a = rec.accepted
    opts = JobOptions(a.options.get("timeout"), a.options.get("attempts") or 1)
    if rec.ended is not None:
        if rec.ended.finished < horizon:
            return None
        job = Job(a.job, a.task, [], a.submitted, opts, tally, a.key)
        job.restore_end(rec.ended)
        return Restored(job, ENDED)
    merge = None
    try:
        task = installed(a.task)
        merge = getattr(task, "merge", None)
        if not task:
            raise WireError(
                ErrorCode.TASK_MISSING,
                f"task {a.task!r} is no longer installed on this server",
            )
        if a.cut_json is not None:
            pieces = json.loads(a.cut_json)
            if not isinstance(pieces, list) or len(pieces) != a.chunks:
                raise WireError(ErrorCode.JOURNAL_ERROR, "the journaled cut is damaged")
            if "ref" in a.options:
                pieces = ranges_from_cut(a.options["ref"], pieces)
        elif a.streamed:
            pieces = journaled_inputs(rec)
        else:
            pieces = split(a.task, json.loads(a.input_json), a.chunks)
    except (WireError, ValueError) as e:
        job = Job(a.job, a.task, [], a.submitted, opts, tally, a.key)
        code = e.code if isinstance(e, WireError) else ErrorCode.BAD_INPUT
        message = e.message if isinstance(e, WireError) else str(e)
        return Restored(job, FAILED, {"code": code, "message": message})
    job = Job(a.job, a.task, pieces, a.submitted, opts, tally, a.key, merge=merge)
    job.ref = a.options.get("ref")
    job.prefill({i: json.loads(r) for i, r in rec.results.items()})
    return Restored(job, RESUME)


def _chunk(kept: str | bytes) -> Any:
    """One journaled sub-task input: a text chunk's bytes as they are (BLOB), else JSON text
    (every chunk of journals written before the byte path)."""
    if isinstance(kept, bytes | bytearray | memoryview):
        return bytes(kept)
    return json.loads(kept)


def journaled_inputs(rec: JobRecord) -> list[Any]:
    """A streamed job's sub-task inputs, as journaled: the input itself was never held."""
    if rec.sealed is None:
        raise WireError(
            ErrorCode.UPLOAD_INCOMPLETE,
            "the server stopped before this job's streamed input was complete; submit it again",
        )
    try:
        return [_chunk(rec.chunks[i]) for i in range(rec.sealed)]
    except KeyError as e:
        raise WireError(
            ErrorCode.JOURNAL_ERROR, f"the journal lacks sub-task input {e.args[0]}"
        ) from None
