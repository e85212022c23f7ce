"""The jobs a scheduler holds, by id, with the index that pages them (the JOBS verb).

Ids are ``j<seq>`` and seq only grows, so a sorted index of sequence numbers, extended from the
new end of the (insertion-ordered) table and pruned of ids no longer held as they are met, pages
in O(limit + log n) amortised. Pure: no Deferreds, no clock.
"""

from __future__ import annotations

from bisect import bisect_left

from clusterd.core.jobs import Job

__all__ = ["JobTable", "job_seq"]


def job_seq(job_id: str) -> int | None:
    """The sequence number in a job id ``j<seq>``; None for anything else."""
    if job_id[:1] == "j" and job_id[1:].isdigit():
        return int(job_id[1:])
    return None


class JobTable:
    """The jobs a scheduler holds, by id, with a sorted index of sequence numbers to page them."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.seq_index: list[int] | None = None

    def expired(self, horizon: float) -> list[Job]:
        """Ended jobs, their end durable, that finished before ``horizon``: removed."""
        old = [
            j
            for j in self.jobs.values()
            if j.finished is not None and j.finished < horizon and j.settled
        ]
        for job in old:
            del self.jobs[job.id]
        return old

    def page(self, limit: int, before: str | None = None) -> list[Job]:
        """Up to ``limit`` held jobs whose id exists for good, newest first; with ``before``
        (a job id, held or not), only jobs submitted before it."""
        index = self._fresh_index()
        i = len(index) if before is None else bisect_left(index, job_seq(before) or 0)
        out: list[Job] = []
        while i > 0 and len(out) < limit:
            i -= 1
            job = self.jobs.get(f"j{index[i]}")
            if job is None:
                del index[i]  # expired or never kept: met once, then gone
            elif job.recorded:  # an id not yet durable does not exist for clients
                out.append(job)
        return out

    def _fresh_index(self) -> list[int]:
        index = self.seq_index
        if index is None or len(index) > 2 * len(self.jobs) + 1024:
            index = sorted(s for s in map(job_seq, self.jobs) if s is not None)
            self.seq_index = index
            return index
        top = index[-1] if index else 0
        fresh = []
        for job_id in reversed(self.jobs):  # newest first: stop at the first known one
            seq = job_seq(job_id)
            if seq is None:
                continue
            if seq <= top:
                break
            fresh.append(seq)
        index.extend(sorted(fresh))
        return index
