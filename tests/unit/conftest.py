"""Fixtures shared by the unit tests: a Clock that must be left with no pending call, and the
built-in tasks' registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


@pytest.fixture
def clock() -> Iterator[Clock]:
    """A Clock; the test fails if it leaves a delayed call behind (a timer never cancelled)."""
    c = Clock()
    yield c
    assert c.getDelayedCalls() == []


@pytest.fixture
def registry() -> Registry:
    """The built-in tasks."""
    return Registry(TASKS)
