"""Where a job keeps its sub-task results: all of them, or one accumulator.

A job whose task has no ``merge`` keeps every result by index (:class:`Kept`): its combine needs
them all, in sub-task order. A job whose task declares ``merge(a, b)`` (associative and
commutative, so results may be folded in any order) keeps one accumulator and a done flag per
sub-task (:class:`Folded`, a ``bytearray``: one byte per sub-task, not a result list): each
result is folded in when it is recorded and then dropped, so the server holds one merged value
however many sub-tasks the job has. The flag makes a duplicate or late result a no-op: nothing
is ever folded twice. The job's answer is then ``combine([accumulator])``.

A merge that raises does not escape into the caller (an answer arriving from a worker): the
fold keeps the error, the job counts as complete, and its combine raises it again, so the job
fails with ``COMBINE_ERROR`` as for a combine that raises.

Pure: no I/O, no clock. Imported by :mod:`clusterd.core.jobs` only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Kept", "Folded", "Merge", "results_for"]

Merge = Callable[[Any, Any], Any]

_MISSING = object()


class Kept:
    """Every result, by sub-task index, for a combine that needs them all in order."""

    __slots__ = ("values",)

    error: BaseException | None = None  # a kept result is never merged, so never fails

    def __init__(self, n: int) -> None:
        self.values: list[Any] = [_MISSING] * n

    def __getitem__(self, index: int) -> Any:
        return self.values[index]

    def __len__(self) -> int:
        return len(self.values)

    def has(self, index: int) -> bool:
        """Whether sub-task ``index``'s result is in."""
        return self.values[index] is not _MISSING

    def put(self, index: int, value: Any) -> None:
        """Keep sub-task ``index``'s result (callers check :meth:`has` first)."""
        self.values[index] = value

    def grow(self, n: int) -> None:
        """A streamed input grew by ``n`` sub-tasks."""
        self.values.extend([_MISSING] * n)

    def ordered(self) -> list[Any]:
        """The results in sub-task order: what ``combine`` takes."""
        return list(self.values)


class Folded:
    """One accumulator and a done flag per sub-task, for a task that declares ``merge``."""

    __slots__ = ("merge", "done", "acc", "error")

    def __init__(self, n: int, merge: Merge) -> None:
        self.merge = merge
        self.done = bytearray(n)
        self.acc: Any = _MISSING
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.done)

    def has(self, index: int) -> bool:
        """Whether sub-task ``index``'s result was folded in already."""
        return self.done[index] != 0

    def put(self, index: int, value: Any) -> None:
        """Fold sub-task ``index``'s result into the accumulator (callers check :meth:`has`
        first); the result itself is not kept. A merge that raises is kept as the fold's
        error (see the module docstring)."""
        self.done[index] = 1
        if self.error is not None:
            return
        if self.acc is _MISSING:
            self.acc = value
            return
        try:
            self.acc = self.merge(self.acc, value)
        except Exception as e:
            self.error = e
            self.acc = _MISSING

    def grow(self, n: int) -> None:
        """A streamed input grew by ``n`` sub-tasks."""
        self.done.extend(bytes(n))

    def ordered(self) -> list[Any]:
        """What ``combine`` takes: the one merged value ([] before any result). Raises the
        merge's error if one failed."""
        if self.error is not None:
            raise self.error
        return [] if self.acc is _MISSING else [self.acc]


def results_for(n: int, merge: Merge | None) -> Kept | Folded:
    """The results holder for a job of ``n`` sub-tasks whose task has ``merge`` (or None)."""
    return Kept(n) if merge is None else Folded(n, merge)
