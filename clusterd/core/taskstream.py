"""The task stream: a bounded ring of the most recent sub-task runs (worker, job, start, end).

Why: the dashboard draws each worker's recent sub-tasks as bars on a time axis, and nothing
else keeps per-sub-task timing once a result is recorded. :meth:`TaskStream.note` is O(1) (a
``deque`` with ``maxlen``), so the execution path pays one append per answer and memory stays
bounded whatever the load.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["TaskStream", "DEFAULT_TASKSTREAM_SIZE"]

DEFAULT_TASKSTREAM_SIZE = 2000


class TaskStream:
    """The last ``size`` sub-task runs, oldest first."""

    def __init__(self, size: int = DEFAULT_TASKSTREAM_SIZE) -> None:
        self.runs: deque[tuple[str, str, int, float, float, bool]] = deque(maxlen=size)

    def note(self, worker: str, job: str, index: int, start: float, end: float, ok: bool) -> None:
        """One sub-task's run ended (answered, failed or was taken back): O(1)."""
        self.runs.append((worker, job, index, start, end, ok))

    def view(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The runs that ended after ``since`` (epoch seconds), oldest first, as JSON objects."""
        return [
            {"worker": w, "job": j, "index": i, "start": s, "end": e, "ok": ok}
            for w, j, i, s, e, ok in self.runs
            if e > since
        ]
