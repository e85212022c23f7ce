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


def _lines_split(value, chunks):
    """{"lines": [...], "delay": s}: one sub-task per group of lines."""
    lines, delay = value["lines"], value.get("delay", 0)
    step = max(1, -(-len(lines) // chunks))
    return [{"lines": lines[i : i + step], "delay": delay} for i in range(0, len(lines), step)]


def _count_lines(chunk):
    """A generator run: the word counts of each line, one part per line, as it is counted."""
    for line in chunk["lines"]:
        time.sleep(chunk["delay"])
        counts = {}
        for word in line.split():
            counts[word] = counts.get(word, 0) + 1
        yield counts


def _add_counts(a, b):
    for word, n in b.items():
        a[word] = a.get(word, 0) + n
    return a


def _expand_parts(n):
    """A generator run of a task without merge: n numbered strings, in parts of 1,000."""
    for start in range(0, n, 1000):
        yield [f"item-{i:08d}" for i in range(start, min(n, start + 1000))]


TASKS = [
    Task(
        "wc_lines",
        _lines_split,
        _count_lines,
        lambda r: dict(sorted(r[0].items())),
        "word counts of lines, streamed in parts and merged",
        merge=_add_counts,
    ),
    Task("expand_parts", lambda v, c: [v], _expand_parts, lambda r: r[0], "expand, in parts"),
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
