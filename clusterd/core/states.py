"""A job's states: in a module of their own, with no imports, so that code formatting replies
(``core/replies.py``, used by the blocking client) need not load ``jobs`` and Twisted."""

from __future__ import annotations

__all__ = ["JobState"]


class JobState:
    """The states a job goes through: queued, running, then one final state."""

    QUEUED = "queued"  # accepted, nothing dispatched yet
    RUNNING = "running"  # at least one sub-task dispatched
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = frozenset({DONE, FAILED, CANCELLED})
