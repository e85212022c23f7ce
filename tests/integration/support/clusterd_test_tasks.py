"""Tasks the integration tests load with --tasks, as a user's own task module would be."""

import os
import time

from clusterd.tasks import Task, task


def _split(value, chunks):
    return [value] * chunks


def _boom(chunk):
    raise ValueError(f"boom on {chunk!r}")


def _whoami(chunk):
    return os.getpid()


def _record_split(value, chunks):
    return [{"i": i, "dir": value["dir"], "delay": value["delay"]} for i in range(value["n"])]


def _record(chunk):
    """Sleep, then append this sub-task's index to runs.log: the test counts executions."""
    time.sleep(chunk["delay"])
    fd = os.open(os.path.join(chunk["dir"], "runs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{chunk['i']}\n".encode())
    finally:
        os.close(fd)
    return chunk["i"]


def _hang_once(chunk):
    """Hang on the first execution (a marker file says it happened), succeed afterwards."""
    marker = os.path.join(chunk, "hung")
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(600)
    return "ok"


def _die_once(chunk):
    """Kill the pool process on the first execution, as a segfault or OOM kill would."""
    marker = os.path.join(chunk, "died")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return "survived"


def _expand(n):
    """A result far bigger than its input: n numbered strings."""
    return [f"item-{i:08d}" for i in range(n)]


TASKS = [
    Task("fail", _split, _boom, lambda results: None, "always raises ValueError"),
    Task("pids", _split, _whoami, lambda results: sorted(set(results)), "pool process ids"),
    Task("record", _record_split, _record, sum, "count executions in a directory"),
    Task("hang_once", lambda v, c: [v], _hang_once, lambda r: r[0], "hangs the first time"),
    Task("die_once", lambda v, c: [v], _die_once, lambda r: r[0], "kills its process once"),
    Task("expand", lambda v, c: [v], _expand, lambda r: r[0], "n numbered strings"),
]


@task
def square(x):
    """x * x for each element: an @task function with the default split and combine."""
    return x * x


@task(no_retry=(ValueError,))
def fragile(x):
    """Raises ValueError on a negative element; marked not worth retrying."""
    if x < 0:
        raise ValueError(f"negative input {x}")
    return x
