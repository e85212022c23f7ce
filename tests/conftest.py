"""Shared pytest configuration for every clusterd test directory (unit, protocol, integration).

Test directories have no ``__init__.py`` and pytest runs in the default "prepend" import mode, so
this directory is put on ``sys.path`` explicitly: test modules import shared helpers with
``from helpers import result_of``.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import eventAsText, globalLogPublisher

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_collection_finish(session):
    """Move everything that exists after collection (modules, hypothesis, Twisted) out of the
    collector's view: the per-test ``gc.collect()`` below then scans only what tests create,
    which keeps it cheap enough to run after every test."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def no_logged_errors():
    """Fail the test when anything logs a failure or an error event (an unhandled Deferred error,
    ``log.failure``, legacy ``log.err``), including ones only logged at garbage collection."""
    seen: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not seen, eventAsText(seen[0])


@pytest.fixture
def clock():
    """A Clock; the test fails if it leaves a delayed call behind (a timer never cancelled).
    Test modules that need another clock define their own, which takes precedence."""
    c = Clock()
    yield c
    assert c.getDelayedCalls() == []


@pytest.fixture
def registry():
    """The built-in tasks."""
    from clusterd.tasks import Registry
    from clusterd.tasks.builtins import TASKS

    return Registry(TASKS)
