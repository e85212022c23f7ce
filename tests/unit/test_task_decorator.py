"""The ``@task`` decorator: a plain function becomes a task (defaults: a list input cut into
even slices, run element-wise, concatenated), and ``--tasks`` finds decorated functions."""

from __future__ import annotations

import sys

import pytest

from clusterd.tasks import Task, TaskInputError, load_registry, task
from clusterd.tasks.decorator import concat, list_split, task_of


def _run_job(t: Task, value, chunks: int):
    return t.combine([t.run(c) for c in t.split(value, chunks)])


def test_bare_decorator_makes_an_elementwise_list_task():
    """@task on f(x) makes a task named f: list in, f of each element out, in order."""

    @task
    def square(x):
        """Squares a number."""
        return x * x

    t = task_of(square)
    assert square(3) == 9  # the function itself is unchanged
    assert (t.name, t.doc, t.stream, t.elementwise) == ("square", "Squares a number.", "list", True)
    assert _run_job(t, list(range(10)), 3) == [x * x for x in range(10)]
    assert _run_job(t, [], 4) == []
    assert t.describe()["elementwise"] is True
    with pytest.raises(TaskInputError):
        t.split(5, 2)


def test_decorator_with_split_and_combine_runs_the_function_on_whole_chunks():
    """With split= or combine=, the function is the task's run: it gets the whole chunk."""

    @task(name="total", combine=sum, no_retry=ValueError, timeout=5.0)
    def chunk_sum(chunk):
        return sum(chunk)

    t = task_of(chunk_sum)
    assert (t.name, t.split, t.elementwise, t.stream) == ("total", list_split, False, None)
    assert (t.no_retry, t.timeout) == ((ValueError,), 5.0)
    assert _run_job(t, [1, 2, 3, 4], 3) == 10
    assert "elementwise" not in t.describe()

    @task(split=lambda v, n: [v] * n, stream="text")
    def echo(chunk):
        return [chunk]

    t = task_of(echo)
    assert (t.combine, t.stream) == (concat, "text")
    assert _run_job(t, "a", 2) == ["a", "a"]


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write a module on sys.path; forget it afterwards."""
    names = []

    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_load_registry_finds_decorated_functions_and_tasks_lists(module):
    """A --tasks module's @task functions are loaded with its TASKS list, each once, and a
    decorated function imported from elsewhere is not loaded twice."""
    name = module(
        "clusterd_deco_a",
        "from clusterd.tasks import Task, task\n"
        "@task\n"
        "def cube(x):\n    return x ** 3\n"
        "alias = cube\n"
        "TASKS = [Task('twice', lambda v, n: [v], lambda x: 2 * x, lambda rs: rs[0]), cube.clusterd_task]\n",
    )
    other = module(
        "clusterd_deco_b",
        "from clusterd_deco_a import cube\nfrom clusterd.tasks import task\n@task(name='neg')\ndef f(x):\n    return -x\n",
    )
    reg = load_registry([name, other], use_entry_points=False)
    assert {"cube", "twice", "neg", "sum"} <= set(reg.names())
    assert _run_job(reg.get("cube"), [1, 2], 2) == [1, 8]


def test_load_registry_rejects_a_module_with_neither(module):
    """A --tasks module with no TASKS list and no @task function is an error naming both."""
    name = module("clusterd_deco_none", "def f(x):\n    return x\n")
    with pytest.raises(ValueError, match="no TASKS list and no @task function"):
        load_registry([name], use_entry_points=False)
