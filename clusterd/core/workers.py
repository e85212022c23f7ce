"""The contract between the scheduler and a connected worker: :class:`IWorkerLink`.

The scheduler never sees a socket: a worker is a link that can take one sub-task at a time
(``send``) and be dropped (``close``). The line protocol's worker session implements it; so do
the fakes in the tests, and could an HTTP or in-process worker.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IWorkerLink"]


class IWorkerLink(Interface):
    """One connected worker, as the scheduler drives it."""

    name = Attribute(
        "str: unique among connected workers; a link registering under a name "
        "still connected replaces the old one (which is closed)."
    )
    tasks = Attribute("frozenset[str]: the task names it can run.")
    slots = Attribute("int >= 1: sub-tasks it runs at once.")
    address = Attribute("str: where it connects from, for views and logs.")

    def send(sub):  # noqa: N805 - zope interface methods take no self
        """Send one :class:`~clusterd.core.scheduler.SubTask`; return a Deferred that

        - fires with the result, or with a ``TimedResult`` (value and the seconds the task
          function ran, as the worker measured it);
        - fails with :class:`~clusterd.core.errors.TaskFailed` (or a kind of it: ``ChildDied``,
          ``ResultTooLarge``, ``BadResult``) when the attempt failed on the worker;
        - fails with :class:`~clusterd.core.errors.WorkerLost` when no answer will come (the
          connection went): the sub-task runs again elsewhere, and it is not an attempt.

        Cancelling the Deferred (timeout, job ended, a speculative copy won) must tell the
        worker to drop the sub-task; the Deferred then fails with ``CancelledError``.
        Raises at once (sending nothing) if the sub-task cannot be sent at all (its input does
        not encode, or is longer than the worker accepts)."""

    def close():  # noqa: N805
        """Drop the connection at once (abort): it was replaced, or found wedged. Its pending
        Deferreds then fail with ``WorkerLost``."""
