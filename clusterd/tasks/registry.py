"""Named tasks and where they come from.

A task is three pure functions over JSON values: ``split`` (server: input and a chunk count to a
list of chunk inputs), ``run`` (worker process: one chunk to one result) and ``combine`` (server:
the chunk results, in chunk order, to the job's answer). A task may also declare ``merge(a, b)``,
associative and commutative: the server then folds each result into one accumulator as it
arrives instead of holding them all, and calls ``combine([accumulator])`` once at the end. A
``run`` may be a generator: each part it yields is streamed as produced (merged, for a ``merge``
task; concatenated, as a streamed result's pieces are, otherwise). Tasks come only from code the operator
installed: the built-ins, the ``clusterd.tasks`` entry-point group, and modules named with
``--tasks`` (:mod:`clusterd.tasks.loading` gathers them). Nothing a peer sends can add a task or
choose a module to import.

Layering: this module imports nothing of clusterd; ``builtins`` imports it, and ``loading``
imports both, so every arrow in ``clusterd.tasks`` points one way (down to this module).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Task", "TaskInputError", "Registry"]


class TaskInputError(ValueError):
    """Raised by ``split`` for an input the task cannot take; the client gets ERR BAD_INPUT."""


@dataclass(frozen=True)
class Task:
    """A named task.

    ``input_kind`` is ``"json"`` or ``"text"``: for ``"text"`` tasks the ``clusterd`` command sends
    a ``--file`` as one JSON string instead of parsing it as JSON. ``split`` must be
    deterministic: after a restart the server splits the journaled input again and keeps the
    results it already has by chunk index.
    """

    name: str
    split: Callable[[Any, int], Sequence[Any]]
    run: Callable[[Any], Any]
    combine: Callable[[list[Any]], Any]
    doc: str = ""
    input_kind: str = "json"
    timeout: float | None = None  # seconds per sub-task; None: the server's default
    attempts: int | None = None  # tries per sub-task; None: the server's default
    # "list" or "text": the input may be streamed (docs/PROTOCOL.md, "Streamed values") as JSON
    # array pieces or JSON string pieces, cut into sub-tasks as it arrives; each cut sub-task
    # input still goes through ``split(chunk, 1)``, which validates it. None: not streamable.
    stream: str | None = None
    # Exception types that retrying cannot help (bad data, say): when ``run`` raises one, the
    # worker says so (ERROR ``"retry": false``) and the job fails at once, whatever its attempts.
    no_retry: tuple[type[BaseException], ...] = ()
    # True for ``@task`` functions with the default split/combine: the input is a list, each
    # element's result is at the same place in the answer, so ClusterExecutor.map may send
    # several inputs as one job (their concatenation) and cut the answer back.
    elementwise: bool = False
    # ``merge(a, b) -> value``, associative AND commutative (results arrive in any order): the
    # server folds results into one accumulator as they come (core/folding.py), and the answer
    # is ``combine([accumulator])``, so combine must accept one merged value for all results.
    # merge may update its first argument (the accumulator, never used again) in place and
    # return it; it must not change its second.
    merge: Callable[[Any, Any], Any] | None = None

    def run_whole(self, chunk: Any) -> Any:
        """``run(chunk)`` as one value, for code that runs a task in-process (the fakes of
        :mod:`clusterd.testing`): a generator run's parts merged (``merge``) or concatenated,
        as the server makes them."""
        return self.whole(self.run(chunk))

    def whole(self, out: Any) -> Any:
        """What ``run`` returned, as one value: a generator's parts merged or concatenated."""
        if not isinstance(out, types.GeneratorType):
            return out
        parts = list(out)
        if self.merge is not None:
            if not parts:
                raise ValueError(f"task {self.name!r} merges parts but its run yielded none")
            return functools.reduce(self.merge, parts)
        if parts and isinstance(parts[0], str):
            return "".join(parts)
        return [x for p in parts for x in p]

    def describe(self) -> dict[str, Any]:
        """The task's entry in the TASKS reply: name, doc, input kind, and how it may be
        streamed."""
        out = {"name": self.name, "doc": self.doc, "input": self.input_kind}
        if self.stream is not None:
            out["stream"] = self.stream
        if self.elementwise:
            out["elementwise"] = True
        if self.merge is not None:
            out["merge"] = True
        return out


class Registry:
    """Tasks by name. Adding a second task with a name already taken is an error, not a shadow."""

    def __init__(self, tasks: Iterable[Task] = ()) -> None:
        self._tasks: dict[str, Task] = {}
        for t in tasks:
            self.add(t)

    def add(self, task: Task) -> None:
        """Add ``task``; raises TypeError for a non-Task and ValueError for a name already taken."""
        if not isinstance(task, Task):
            raise TypeError(f"not a clusterd Task: {task!r}")
        if task.name in self._tasks:
            raise ValueError(f"two tasks are named {task.name!r}")
        self._tasks[task.name] = task

    def get(self, name: str) -> Task | None:
        """The task named ``name``, or None."""
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def names(self) -> list[str]:
        """The task names, sorted."""
        return sorted(self._tasks)
