"""The dispatch loop: fill free slots from the ring, a bounded number of sends per turn.

:class:`Dispatcher` serves what the scheduler asks for: a full pass over the workers with free
slots (a worker came, a job arrived, a sub-task was requeued), and refills owed to workers that
answered (O(1) each, no scan). After ``dispatch_per_turn`` sends since the last pause it stops
and resumes through the injected ``next_turn`` (the scheduler's default is a
``callLater(0)`` on its clock), so no reactor turn writes an unbounded burst and a PING on
another connection waits behind at most that much dispatch work.

It decides which worker takes which job's sub-task (through :class:`~clusterd.core.ring.Ring`
and the prefetch limit) and calls ``send(worker, job, index)``; the scheduler's ``send`` owns the
Deferred. Imports only :mod:`clusterd.core.ring` and :mod:`clusterd.core.workers` (types).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clusterd.core.jobs import Job
    from clusterd.core.ring import Ring
    from clusterd.core.workers import WorkerHandle, WorkerRegistry

__all__ = ["Dispatcher", "REFILL_STEP"]

REFILL_STEP = 2  # sub-tasks one answer may grant the worker that sent it


class Dispatcher:
    """The dispatch loop: fills free worker slots from the ring, yielding through ``next_turn``
    after ``dispatch_per_turn`` sends."""

    def __init__(
        self,
        ring: Ring,
        workers: WorkerRegistry,
        limit: Callable[[WorkerHandle, Job], int],
        send: Callable[[WorkerHandle, Job, int], None],
        next_turn: Callable[[Callable[[], None]], Any],
        config: Any,
    ) -> None:
        self.ring = ring
        self.workers = workers
        self.limit = limit
        self.send = send
        self.next_turn = next_turn
        self.config = config  # dispatch_per_turn, read at every send
        self._pumping = False
        self._full_pass_due = False  # a full pass over the workers is asked for
        self._owed: OrderedDict[WorkerHandle, int] = OrderedDict()  # refills owed, by answer
        self._sent_since_pause = 0
        self._pass: deque[list[Any]] | None = None  # [worker, grants left] of a paused pass
        self._resume_call: Any = None  # what next_turn returned; None while not paused

    def pump(self, only: WorkerHandle | None = None) -> None:
        """Ask for dispatch. With ``only``, just that worker changed (it answered a sub-task):
        it is owed a refill of up to REFILL_STEP sub-tasks. Without, a full pass fills every
        worker's free slots. A request made while dispatch runs (a runner that answers
        synchronously) or is paused is served by the running loop or by the continuation."""
        if only is not None:
            self._owed[only] = self._owed.get(only, 0) + REFILL_STEP
        else:
            self._full_pass_due = True
            self._pass = None  # things changed: the next pass starts from a fresh scan
        if self._resume_call is None:
            self._dispatch()

    def _dispatch(self) -> None:
        """Serve what was asked: a full pass first (idle slots), then the owed refills in the
        order the answers came, pausing when the per-turn budget of sends runs out."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._full_pass_due or self._owed:
                if not self.ring:
                    self._full_pass_due = False
                    self._pass = None
                    self._owed.clear()
                    return
                if self._full_pass_due:
                    self._full_pass_due = False
                    if not self._fill_free_slots():
                        self._full_pass_due = True
                        self._pause()
                        return
                    continue
                worker, owed = self._owed.popitem(last=False)
                left = self._refill(worker, owed)
                if left:
                    self._owed[worker] = left
                    self._owed.move_to_end(worker, last=False)  # first in the next turn
                    self._pause()
                    return
        finally:
            self._pumping = False

    def _budget_left(self) -> bool:
        cap = self.config.dispatch_per_turn
        return not cap or self._sent_since_pause < cap

    def _pause(self) -> None:
        if self._resume_call is None:
            self._resume_call = self.next_turn(self._continue)

    def _continue(self) -> None:
        self._resume_call = None
        self._sent_since_pause = 0
        self._dispatch()

    def _take(self, worker: WorkerHandle) -> bool:
        """Send ``worker`` one sub-task of the next job it can take; False if there is none."""
        job = self.ring.next_for(worker, self.limit)
        if job is None:
            return False
        self._sent_since_pause += 1
        self.send(worker, job, job.take())
        return True

    def _fill_free_slots(self) -> bool:
        """A full pass: workers with free slots, most free first, take one sub-task each per
        round until the slots free at the start of the pass are used or nothing they can run is
        left. Prefetch beyond the slots comes only from refills, so it grows with answers
        instead of in one burst. False if the budget ran out first; the pass then resumes where
        it stopped, without a rescan, unless another full pass was asked for meanwhile. Slots
        freed by answers meanwhile are not the pass's: those answers' refills cover them."""
        if self._pass is None:
            workers = self.workers.with_free_slots()
            workers.sort(key=lambda w: w.busy / w.slots)
            self._pass = deque([w, w.free] for w in workers)
        queue = self._pass
        while queue and self.ring:
            entry = queue[0]
            worker = entry[0]
            if worker.free <= 0 or not self.workers.current(worker):
                queue.popleft()
                continue
            if not self._budget_left():
                return False
            queue.popleft()
            if not self._take(worker):
                continue
            entry[1] -= 1
            if entry[1] > 0:
                queue.append(entry)  # its next sub-task comes in the next round
        self._pass = None
        return True

    def _refill(self, worker: WorkerHandle, owed: int) -> int:
        """Send ``worker`` up to ``owed`` sub-tasks within its limit. Returns how many are still
        owed because the budget ran out: 0 when done, or when no more fit or none is left."""
        while owed and worker.open and self.workers.current(worker):
            if not self._budget_left():
                return owed
            if not self._take(worker):
                return 0
            owed -= 1
        return 0
