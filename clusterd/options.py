"""Value checkers for twistd option parsers (server and worker share them)."""

from __future__ import annotations

__all__ = ["positive_int", "positive_float"]


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be a positive integer")
    return n


def positive_float(value: str) -> float:
    n = float(value)
    if not n > 0:
        raise ValueError("must be positive")
    return n
