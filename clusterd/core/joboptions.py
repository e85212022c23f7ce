"""A job's knobs and the counts all jobs of one scheduler share: small value objects that
:mod:`clusterd.core.jobs` re-exports (moved out of it to keep it short). Imports nothing."""

from __future__ import annotations

__all__ = ["JobOptions", "Tally"]


class JobOptions:
    """Per-job knobs, after defaults: sub-task timeout (None: none) and attempts per sub-task."""

    __slots__ = ("timeout", "attempts")

    def __init__(self, timeout: float | None, attempts: int) -> None:
        self.timeout = timeout
        self.attempts = attempts


class Tally:
    """Counts shared by every job of one scheduler, kept as jobs change so that admission
    checks and STATS never walk the job table: sub-tasks queued over all jobs."""

    __slots__ = ("queued",)

    def __init__(self) -> None:
        self.queued = 0
