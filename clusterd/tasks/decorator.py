"""``@task``: a plain function in a user's module becomes a clusterd task.

    from clusterd.tasks import task

    @task
    def square(x):
        return x * x

makes a task named ``square`` whose input is a JSON array: the server cuts it into chunks
(even slices), each worker runs the function on every element of its chunk, and the server
concatenates the chunk results, so ``[1, 2, 3]`` gives ``[1, 4, 9]``. Such a task may be
streamed (``stream="list"``) and is *elementwise* (``ClusterExecutor.map`` may group inputs).

With ``split=`` or ``combine=`` the function is the task's ``run`` instead: it gets the whole
chunk, as in a hand-written :class:`Task`; a missing ``split`` cuts a list into even slices,
a missing ``combine`` concatenates lists. ``merge=`` (associative and commutative) lets the
server fold results as they arrive; with it, a missing ``combine`` returns the one merged value
(see :class:`~clusterd.tasks.registry.Task`). ``name=``, ``doc=``, ``stream=``, ``timeout=``,
``attempts=``, ``input_kind=`` and ``no_retry=`` are the :class:`Task` fields.

The decorated function is returned unchanged (call it locally, test it), with the task as
its ``clusterd_task`` attribute; loading a module with ``--tasks`` finds those (see
:mod:`clusterd.tasks.loading`). Nothing is pickled: each worker imports the module itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from clusterd.tasks.builtins import even_slices
from clusterd.tasks.registry import Task, TaskInputError

__all__ = ["task", "task_of", "list_split", "concat", "merged"]

F = TypeVar("F", bound=Callable[..., Any])
_UNSET: Any = object()


def list_split(value: Any, chunks: int) -> list[list[Any]]:
    """The default split: a JSON array cut into ``chunks`` even, contiguous slices."""
    if not isinstance(value, list):
        raise TaskInputError(f"this task takes a JSON array, not {type(value).__name__}")
    return [value[a:b] for a, b in even_slices(len(value), chunks)]


def concat(results: list[Any]) -> list[Any]:
    """The default combine: the chunk results (lists), concatenated in chunk order."""
    out: list[Any] = []
    for r in results:
        out.extend(r)
    return out


def merged(results: list[Any]) -> Any:
    """The default combine of a ``merge`` task: the one merged value (None for no results)."""
    return results[0] if results else None


def _elementwise(fn: Callable[[Any], Any]) -> Callable[[Sequence[Any]], list[Any]]:
    def run(chunk: Sequence[Any]) -> list[Any]:
        """Run the decorated function on every element of the chunk."""
        return [fn(x) for x in chunk]

    return run


def task(
    fn: F | None = None,
    *,
    name: str | None = None,
    split: Callable[[Any, int], Sequence[Any]] | None = None,
    combine: Callable[[list[Any]], Any] | None = None,
    merge: Callable[[Any, Any], Any] | None = None,
    stream: str | None = _UNSET,
    doc: str | None = None,
    no_retry: type[BaseException] | tuple[type[BaseException], ...] = (),
    **fields: Any,
) -> Any:
    """Make ``fn`` a task, as ``@task`` or ``@task(...)`` (see the module's docstring)."""

    def wrap(f: F) -> F:
        elementwise = split is None and combine is None and merge is None
        joined = combine or (merged if merge is not None else concat)
        retry_not = no_retry if isinstance(no_retry, tuple) else (no_retry,)
        t = Task(
            name or f.__name__,
            split or list_split,
            _elementwise(f) if elementwise else f,
            joined,
            doc=doc if doc is not None else (f.__doc__ or "").strip().split("\n")[0],
            stream=("list" if elementwise else None) if stream is _UNSET else stream,
            no_retry=retry_not,
            elementwise=elementwise,
            merge=merge,
            **fields,
        )
        f.clusterd_task = t  # type: ignore[attr-defined]
        return f

    return wrap if fn is None else wrap(fn)


def task_of(obj: Any) -> Task | None:
    """The task ``@task`` made of ``obj``, or None."""
    t = getattr(obj, "clusterd_task", None)
    return t if isinstance(t, Task) else None
