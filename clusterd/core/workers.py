"""The contract between the scheduler and a connected worker (:class:`IWorkerLink`), and the
registry of connected workers (:class:`WorkerRegistry` of :class:`WorkerHandle`).

The scheduler never sees a socket: a worker is a link that can take one sub-task at a time
(``send``) and be dropped (``close``). The line protocol's worker session implements it; so do
the fakes in the tests, and could an HTTP or in-process worker.

The registry keeps, as workers come and go, the counts every request needs (slots over all
workers, slots and workers per task), so no request walks the worker table. Imports nothing of
the scheduler: the scheduler imports this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from clusterd.core.refs import RefRange

__all__ = ["IWorkerLink", "SubTask", "TimedResult", "WorkerHandle", "WorkerRegistry", "Dispatch"]


@dataclass(frozen=True)
class SubTask:
    """One sub-task as a worker link is asked to run it (``attempt`` counts from 1)."""

    job: str
    index: int
    task: str
    input: Any
    attempt: int = 1
    ref: RefRange | None = None  # instead of ``input``: the byte range the worker reads


class TimedResult:
    """A result with the seconds its task function ran, as the worker measured it. Runners may
    fire with one instead of a bare value; the scheduler learns sub-task sizes from it without
    counting time spent queued on the worker."""

    __slots__ = ("value", "seconds")

    def __init__(self, value: Any, seconds: float) -> None:
        self.value = value
        self.seconds = seconds


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


@dataclass(eq=False)
class WorkerHandle:
    """A registered worker as the scheduler counts it: its link's ``runner`` (send) and
    ``close``, its slots, and what it holds (``busy``, ``dispatches``)."""

    name: str
    tasks: frozenset[str]
    slots: int
    runner: Callable[[SubTask], Deferred[Any]]
    close: Callable[[], None] = lambda: None
    address: str = ""
    connected: float = 0.0
    busy: int = 0
    done: int = 0
    failed: int = 0
    alive: bool = True
    draining: bool = False
    prefetch: int = 1  # sub-tasks per slot it may hold when they are short (queued on the worker)
    last_answer: float = 0.0  # when it last answered a sub-task (or registered)
    last_seen: float = 0.0  # when its connection last delivered a line (its last heartbeat)
    # Its unanswered sub-tasks, oldest dispatch first (a dict keeps insertion order and
    # removes in O(1)), so the stall check looks at one entry per worker.
    dispatches: dict[Any, None] = field(default_factory=dict)

    @property
    def free(self) -> int:
        """Slots free for new work: none while the worker is gone or draining."""
        return self.slots - self.busy if self.alive and not self.draining else 0

    @property
    def open(self) -> bool:
        """May take more work of some kind (short sub-tasks may be prefetched)."""
        return self.alive and not self.draining and self.busy < self.slots * self.prefetch

    def describe(self) -> dict[str, Any]:
        """The worker's entry in the WORKERS reply."""
        return {
            "name": self.name,
            "address": self.address,
            "tasks": sorted(self.tasks),
            "slots": self.slots,
            "busy": min(self.busy, self.slots),
            "prefetched": max(0, self.busy - self.slots),
            "done": self.done,
            "failed": self.failed,
            "draining": self.draining,
            "connected": round(self.connected, 3),
            "last_seen": round(self.last_seen, 3),
        }


class WorkerRegistry:
    """Connected workers by name, with the slot and worker counts per task kept as they come
    and go: O(1) for ``default_chunks``, ``wants_more``, ``waiting_for_worker`` and STATS."""

    def __init__(self) -> None:
        self.by_name: dict[str, WorkerHandle] = {}
        self.slots = 0  # over all connected workers
        self.task_slots: Counter[str] = Counter()  # task -> slots of workers that run it
        self.task_workers: Counter[str] = Counter()  # task -> workers that run it
        # Workers that may have free slots: each enters when it registers or a slot of it frees,
        # and leaves when a pass finds it full. A full dispatch pass reads this, not every
        # worker: O(workers freed since the last pass), not O(workers), per new job.
        self.idle: dict[WorkerHandle, None] = {}
        self._order: dict[WorkerHandle, int] = {}  # registration order, for ties in a pass
        self._registered = 0

    def __len__(self) -> int:
        return len(self.by_name)

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(self.by_name.values())

    def get(self, name: str) -> WorkerHandle | None:
        """The connected worker named ``name``, or None."""
        return self.by_name.get(name)

    def current(self, handle: WorkerHandle) -> bool:
        """Whether ``handle`` is still the registration under its name."""
        return self.by_name.get(handle.name) is handle

    def add(self, handle: WorkerHandle) -> None:
        """Count a new registration (the caller removed any old one of that name first)."""
        self.by_name[handle.name] = handle
        self.idle[handle] = None
        self._order[handle] = self._registered
        self._registered += 1
        self.slots += handle.slots
        for task in handle.tasks:
            self.task_slots[task] += handle.slots
            self.task_workers[task] += 1

    def freed(self, handle: WorkerHandle) -> None:
        """A slot of ``handle`` came free (a sub-task of it ended): a full pass looks at it."""
        self.idle[handle] = None

    def with_free_slots(self) -> list[WorkerHandle]:
        """The connected workers with a free slot, in the order they registered (as a scan of
        every worker would give them); the others leave the idle index (they enter it again
        when a slot of theirs frees)."""
        out = []
        for handle in list(self.idle):
            if handle.free > 0 and self.current(handle):
                out.append(handle)
            else:
                del self.idle[handle]
        out.sort(key=self._order.__getitem__)
        return out

    def remove(self, handle: WorkerHandle) -> None:
        """Stop counting ``handle`` (if it is still the registration under its name)."""
        self.idle.pop(handle, None)
        if not self.current(handle):
            return
        self._order.pop(handle, None)
        del self.by_name[handle.name]
        self.slots -= handle.slots
        for task in handle.tasks:
            self.task_slots[task] -= handle.slots
            self.task_workers[task] -= 1
            if not self.task_workers[task]:
                del self.task_workers[task], self.task_slots[task]


@dataclass(eq=False)
class Dispatch:
    """One copy of a sub-task sent to a worker: the scheduler's, holding the send's Deferred."""

    job: Any  # clusterd.core.jobs.Job
    index: int
    worker: WorkerHandle
    started: float
    d: Deferred[Any] | None = None
    stalled: str | None = None  # why check_stalls took it back: "worker" or "subtask"
