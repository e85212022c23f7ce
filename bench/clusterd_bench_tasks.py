"""Tasks used only by the benchmark suite (``--tasks clusterd_bench_tasks``).

Load this module on the server and on every worker, with ``bench/`` on ``PYTHONPATH``:

- ``inc``: input ``{"n": N}`` splits into N chunks, chunk i is the integer i; each sub-task returns
  i + 1; the job's answer is the sum, N(N+1)/2. It is as small as a sub-task can be, so it
  measures the cluster's own per-sub-task cost.
- ``plus1``: input an integer k, one sub-task that returns k + 1; the job's answer is k + 1.
  Used for many one-sub-task jobs, where every answer is different and can be checked.
"""

from __future__ import annotations

from typing import Any

from clusterd.tasks import Task, TaskInputError

__all__ = ["TASKS", "inc_split", "inc_run", "inc_combine", "plus1_split"]


def inc_split(value: Any, chunks: int) -> list[int]:
    if not isinstance(value, dict) or set(value) != {"n"}:
        raise TaskInputError('inc takes {"n": N}')
    n = value["n"]
    if type(n) is not int or n < 1:
        raise TaskInputError("inc: n must be a positive integer")
    return list(range(n))


def inc_run(i: int) -> int:
    return i + 1


def inc_combine(results: list[int]) -> int:
    return sum(results)


def plus1_split(value: Any, chunks: int) -> list[int]:
    if type(value) is not int:
        raise TaskInputError("plus1 takes an integer")
    return [value]


def _first(results: list[int]) -> int:
    return results[0]


TASKS = [
    Task(
        "inc",
        inc_split,
        inc_run,
        inc_combine,
        'benchmark: {"n": N} -> N sub-tasks, sub-task i returns i+1; the answer is their sum',
    ),
    Task(
        "plus1",
        plus1_split,
        inc_run,
        _first,
        "benchmark: an integer k -> one sub-task returning k+1",
    ),
]
