"""Helpers shared by the test suites: ``from helpers import result_of, deterministic``.

The fakes live in :mod:`clusterd.testing` (users' tests use them too) and are re-exported here.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, settings
from twisted.internet.defer import Deferred
from twisted.logger import eventAsText, globalLogPublisher

from clusterd.testing import (
    FakePool,
    FakeServer,
    FakeWorker,
    LineConn,
    LineWorker,
    add_worker,
    result_of,
)

__all__ = [
    "ManualOffload",
    "restart",
    "result_of",
    "deterministic",
    "FakeWorker",
    "add_worker",
    "no_errors_logged",
    "LineConn",
    "LineWorker",
    "FakePool",
    "FakeServer",
    "QueueReactor",
]


# Hypothesis: the same examples on every run, no example database written into the repository,
# and no per-example deadline (a slow CI machine must not turn into a flaky failure).
deterministic = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def no_errors_logged() -> Iterator[list[dict]]:
    """The autouse ``no_logged_errors`` fixture for one block, e.g. one hypothesis example, so
    that a logged error fails (and is shrunk to) the example that caused it. Collects garbage at
    the end, so an unhandled Deferred error dropped inside the block is seen too."""
    seen: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        # Collected even when the block failed, so that its garbage cannot log an error into
        # whichever test happens to run the next collection.
        gc.collect()
        # What is still alive is not this block's garbage: freeze it (as conftest does after
        # collection), so that the next block's collection stays cheap.
        gc.freeze()
        globalLogPublisher.removeObserver(observer)
    assert not seen, eventAsText(seen[0])


class QueueReactor:
    """Stands in for the reactor of a journal's writer thread: callFromThread only queues; the
    test runs the calls on its own thread once the writer has finished, so nothing races."""

    def __init__(self) -> None:
        self.calls: list = []

    def callFromThread(self, f, *args) -> None:
        self.calls.append((f, args))

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class ManualOffload:
    """Records offloaded calls; ``run_all`` runs them (as the thread would) and fires their
    Deferreds (as callFromThread would), so a test sees the state in between."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred, object, tuple]] = []

    def __call__(self, fn, *args) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((d, fn, args))
        return d

    def run_all(self) -> int:
        n = 0
        while self.calls:
            d, fn, args = self.calls.pop(0)
            try:
                value = fn(*args)
            except Exception as e:
                d.errback(e)
            else:
                d.callback(value)
            n += 1
        return n


def restart(registry, journal, at: float = 100.0, **settings):
    """A fresh scheduler over the same journal, as after a crash and restart, recovered."""
    from twisted.internet.task import Clock

    from clusterd.core.scheduler import Scheduler

    clock = Clock()
    clock.advance(at)
    core = Scheduler(registry, clock, journal=journal, **settings)
    core.recover()
    return core
