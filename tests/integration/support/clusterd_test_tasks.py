"""Tasks the integration tests load with --tasks, as a user's own task module would be."""

import os

from clusterd.tasks import Task


def _split(value, chunks):
    return [value] * chunks


def _boom(chunk):
    raise ValueError(f"boom on {chunk!r}")


def _whoami(chunk):
    return os.getpid()


TASKS = [
    Task("fail", _split, _boom, lambda results: None, "always raises ValueError"),
    Task("pids", _split, _whoami, lambda results: sorted(set(results)), "pool process ids"),
]
