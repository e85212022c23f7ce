"""Deferreds fired once, with a value or an error: a job's two gates (durable, ended)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

__all__ = ["Waiters"]


class Waiters:
    """Deferreds to fire once, with success or a failure; late subscribers are answered at once."""

    def __init__(self) -> None:
        self.fired = False
        self.value: Any = None
        self.error: BaseException | None = None
        # A dict (insertion-ordered): a waiter whose connection closed leaves in O(1).
        self._ds: dict[Deferred[Any], None] = {}

    def add(self) -> Deferred[Any]:
        """A Deferred that fires with the value or fails with the error once settled (at once if
        already settled); cancelling it drops it."""
        if self.fired:
            return fail(self.error) if self.error is not None else succeed(self.value)
        d: Deferred[Any] = Deferred(lambda d: self._ds.pop(d, None))
        self._ds[d] = None
        return d

    def fire(self, value: Any) -> None:
        """Settle with ``value``: every waiter's Deferred fires with it."""
        self._settle(value, None)

    def fail(self, error: BaseException) -> None:
        """Settle with ``error``: every waiter's Deferred fails with it."""
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if self.fired:
            return
        self.fired, self.value, self.error = True, value, error
        ds, self._ds = self._ds, {}
        for d in ds:
            if error is None:
                d.callback(value)
            else:
                d.errback(error)
