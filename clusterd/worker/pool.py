"""PoolService: ``--slots`` child processes that run task code off the reactor thread.

Why our own ``spawnProcess`` pool and not ``ProcessPoolExecutor``: a child that dies (segfault,
``os._exit``, OOM kill) fails only the sub-task it held and is respawned, where a broken executor
fails every pending future; and data crosses as JSON lines, never pickle. See TWISTED.md §9.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core import jsoncodec
from clusterd.core.framing import LineFramer
from clusterd.core.messages import error_fields
from clusterd.core.refs import RefRange

__all__ = ["PoolService", "ChildDied", "RunResult"]


class ChildDied(Exception):
    """The pool process running a sub-task exited before answering."""


class RunResult(NamedTuple):
    """What a pool run fires with: the task's return value and the seconds it ran; ``parts``:
    how many parts a generator run streamed to its ``on_part`` instead (value then None)."""

    value: Any
    seconds: float
    parts: int = 0


class _Child(ProcessProtocol):
    log = Logger()

    def __init__(self, pool: PoolService, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.framer = LineFramer(1 << 40)
        self.current: dict[int, Deferred[Any]] = {}  # the batch it is running, by ticket
        self.ended: Deferred[None] = Deferred()
        self.alive = True

    def send(self, batch: list[tuple[int, str, Any, Deferred[Any]]]) -> None:
        """Hand the child one run, or several as one message (one pipe round trip for a batch
        of tiny sub-tasks instead of one each)."""
        self.current = {ticket: d for ticket, _, _, d in batch}
        if isinstance(batch[0][2], bytes):  # a text chunk, alone: header, raw bytes, "\n"
            ticket, task, value, _ = batch[0]
            head = {"id": ticket, "task": task, "bytes": len(value)}
            if ticket in self.pool.part_sinks:
                head["parts"] = True
            self.transport.writeSequence([jsoncodec.dumpb(head) + b"\n", value, b"\n"])
            return
        msgs = [_message(ticket, task, value) for ticket, task, value, _ in batch]
        for m in msgs:
            if m["id"] in self.pool.part_sinks:
                m["parts"] = True  # a generator's parts come as produced, not as one result
        self.transport.write(
            jsoncodec.dumpb(msgs[0] if len(msgs) == 1 else msgs, allow_nan=True) + b"\n"
        )

    def outReceived(self, data: bytes) -> None:
        """Fire the Deferreds of the runs answered on these lines (a reply, or a batch of them)."""
        for line in self.framer.feed(data):
            if not isinstance(line, bytes) or not self.current:
                continue
            if line[:1] == b"+":  # a generator's part: "+<id> <json>", passed on as bytes
                self.pool._part(line)
                continue
            msg = jsoncodec.loads(line, allow_nan=True)
            replies = msg if isinstance(msg, list) else [msg]
            fired = [(self.current.pop(r.get("id"), None), r) for r in replies]
            if not self.current:
                self.pool._released(self)
            for d, r in fired:
                if d is None:
                    continue  # cancelled while in a batch: its answer is not wanted
                if r.get("ok"):
                    d.callback(RunResult(r.get("result"), r.get("t", 0.0), r.get("parts", 0)))
                else:
                    d.errback(_TaskError.from_reply(r))

    def kill(self) -> None:
        """Kill the child (it runs a cancelled sub-task); a child already gone is fine."""
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass

    def errReceived(self, data: bytes) -> None:
        """Log what the child's task code printed or raised to stderr."""
        text = data.decode("utf-8", "replace").rstrip()
        if text:
            self.log.info("pool child {slot}: {text}", slot=self.slot, text=text)

    def processEnded(self, reason: Failure) -> None:
        """The child died: fail its runs with ChildDied and let the pool respawn it."""
        self.alive = False
        current, self.current = self.current, {}
        self.pool._child_ended(self, reason)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"signal {sig}" if sig else f"exit code {code}"
        for d in current.values():
            d.errback(ChildDied(f"pool process died ({how}) while running the sub-task"))
        self.ended.callback(None)


def _message(ticket: int, task: str, value: Any) -> dict[str, Any]:
    """A child's request: the input, or for a file range the range it reads itself."""
    if type(value) is RefRange:
        return {"id": ticket, "task": task, "ref": value.wire()}
    return {"id": ticket, "task": task, "input": value}


class _TaskError(Exception):
    """The task raised in the child: its type, message, formatted traceback, and whether the
    task marked it worth retrying (``Task.no_retry``)."""

    def __init__(self, type: str, message: str, traceback: str = "", retry: bool = True) -> None:
        super().__init__(type, message)
        self.type = type
        self.message = message
        self.traceback = traceback
        self.retry = retry

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> _TaskError:
        """The error a child's ``{"ok": false, ...}`` reply describes."""
        return cls(*error_fields(r))


class PoolService(Service):
    """Runs task functions in ``slots`` child processes; ``run`` returns a Deferred."""

    log = Logger()
    name = "pool"

    def __init__(
        self, slots: int, task_modules: list[str], reactor: Any, stop_timeout: float = 10.0
    ) -> None:
        self.slots = slots
        self.task_modules = task_modules
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.children: list[_Child] = []
        self.idle: deque[_Child] = deque()
        self.waiting: deque[tuple[int, str, Any, Deferred[Any]]] = deque()
        self.ticket = 0
        self.batch_max = 64
        self.part_sinks: dict[int, Any] = {}  # ticket -> on_part, for runs that asked for parts

    TaskError = _TaskError
    streams_parts = True  # run() takes on_part: a generator run's parts, as produced

    def startService(self) -> None:
        """Spawn one child per slot."""
        super().startService()
        for slot in range(self.slots):
            self._spawn(slot)
        self.log.info("process pool started with {n} children", n=self.slots)

    def _spawn(self, slot: int) -> None:
        child = _Child(self, slot)
        argv = [sys.executable, "-m", "clusterd.worker.child"]
        for m in self.task_modules:
            argv += ["--tasks", m]
        # env=None: inherit our environment (leaving env out gives the child an empty one).
        self.reactor.spawnProcess(child, sys.executable, argv, env=None)
        self.children.append(child)
        self._released(child)

    def run(self, task: str, value: Any, on_part: Any = None) -> Deferred[Any]:
        """Run ``task`` on ``value`` in a child. Cancelling the Deferred drops a queued run, or
        kills the child running it (a new child takes its place): Python code cannot be
        interrupted any other way. ``on_part(bytes)``: called with each part (encoded JSON) a
        generator run yields, as the child produces it."""
        self.ticket += 1
        ticket = self.ticket
        if on_part is not None:
            self.part_sinks[ticket] = on_part

        def cancel(d: Deferred[Any]) -> None:
            """Drop the run if queued; else kill its child, or ignore its answer in a batch."""
            for item in self.waiting:
                if item[0] == ticket:
                    self.waiting.remove(item)
                    return
            for child in self.children:
                if ticket in child.current:
                    if len(child.current) == 1:
                        # Alone in its child: kill it, the only way to stop Python code.
                        child.current = {}
                        child.kill()
                    else:
                        # In a batch of short runs: let it finish and drop its answer.
                        del child.current[ticket]
                    return

        d: Deferred[Any] = Deferred(cancel)
        if on_part is not None:
            d.addBoth(_forget, self.part_sinks, ticket)
        if self.idle:
            self.idle.popleft().send([(ticket, task, value, d)])
        else:
            self.waiting.append((ticket, task, value, d))
        return d

    def _part(self, line: bytes) -> None:
        """A part line from a child: to its run's ``on_part`` (dropped if it asked for none)."""
        ticket, _, body = line[1:].partition(b" ")
        sink = self.part_sinks.get(int(ticket)) if ticket.isdigit() else None
        if sink is not None:
            sink(body)

    @property
    def busy(self) -> int:
        """Runs held: running in a child or queued for one."""
        return len(self.waiting) + sum(len(c.current) for c in self.children)

    def _released(self, child: _Child) -> None:
        if not child.alive:
            return
        if self.waiting:
            # Share what waits among the children, at most batch_max per message.
            n = max(1, min(self.batch_max, len(self.waiting) // self.slots))
            child.send(self._take(n))
        else:
            self.idle.append(child)

    def _take(self, n: int) -> list[tuple[int, str, Any, Deferred[Any]]]:
        """Up to ``n`` waiting runs for one message; a text chunk (bytes) goes alone, since
        its bytes follow their header raw instead of inside a JSON batch."""
        batch = [self.waiting.popleft()]
        while len(batch) < n and self.waiting and not isinstance(batch[0][2], bytes):
            if isinstance(self.waiting[0][2], bytes):
                break
            batch.append(self.waiting.popleft())
        return batch

    def _child_ended(self, child: _Child, reason: Failure) -> None:
        if child in self.idle:
            self.idle.remove(child)
        if child in self.children:
            self.children.remove(child)
        if self.running:
            self.log.warn(
                "pool child {slot} ended ({reason}); starting a new one",
                slot=child.slot,
                reason=reason.getErrorMessage(),
            )
            self._spawn(child.slot)

    def stopService(self) -> Deferred[Any]:
        """Close the children's stdin and kill those still running after ``stop_timeout``; fires
        once all have ended."""
        super().stopService()
        children = list(self.children)
        for c in children:
            c.transport.closeStdin()
        kill = self.reactor.callLater(self.stop_timeout, self._kill, children)

        def done(_: Any) -> None:
            """Cancel the kill timer and fail the runs still waiting with ChildDied."""
            if kill.active():
                kill.cancel()
            for _t, _task, _v, d in self.waiting:
                d.errback(ChildDied("worker is stopping"))
            self.waiting.clear()

        return DeferredList([c.ended for c in children]).addCallback(done)

    def _kill(self, children: list[_Child]) -> None:
        for c in children:
            if c.alive:
                c.kill()


def _forget(result: Any, sinks: dict[int, Any], ticket: int) -> Any:
    """The run settled (or was cancelled): its parts, if any more come, go nowhere."""
    sinks.pop(ticket, None)
    return result
