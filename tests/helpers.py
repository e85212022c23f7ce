"""Helpers shared by the test suites: ``from helpers import result_of, deterministic``."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["result_of", "deterministic"]


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred already has; raises its failure, or fails when it has none yet.

    It never waits: advance the Clock or pump the connection first.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has no result yet: advance the Clock or pump first"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


# Hypothesis: the same examples on every run, no example database written into the repository,
# and no per-example deadline (a slow CI machine must not turn into a flaky failure).
deterministic = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
