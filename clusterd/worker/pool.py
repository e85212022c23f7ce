"""PoolService: ``--slots`` child processes that run task code off the reactor thread.

Why our own ``spawnProcess`` pool and not ``ProcessPoolExecutor``: a child that dies (segfault,
``os._exit``, OOM kill) fails only the sub-task it held and is respawned, where a broken executor
fails every pending future; and data crosses as JSON lines, never pickle. See TWISTED.md §9.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd.core.framing import LineFramer

__all__ = ["PoolService", "ChildDied"]


class ChildDied(Exception):
    """The pool process running a sub-task exited before answering."""


class _Child(ProcessProtocol):
    log = Logger()

    def __init__(self, pool: PoolService, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.framer = LineFramer(1 << 40)
        self.current: tuple[int, Deferred[Any]] | None = None
        self.ended: Deferred[None] = Deferred()
        self.alive = True

    def send(self, ticket: int, task: str, value: Any, d: Deferred[Any]) -> None:
        self.current = (ticket, d)
        data = json.dumps({"id": ticket, "task": task, "input": value}, separators=(",", ":"))
        self.transport.write(data.encode("utf-8") + b"\n")

    def outReceived(self, data: bytes) -> None:
        for line in self.framer.feed(data):
            if not isinstance(line, bytes) or self.current is None:
                continue
            ticket, d = self.current
            msg = json.loads(line)
            if msg.get("id") != ticket:
                continue
            self.current = None
            self.pool._released(self)
            if msg.get("ok"):
                d.callback(msg.get("result"))
            else:
                d.errback(_TaskError(msg.get("type", "Error"), msg.get("message", "")))

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass

    def errReceived(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").rstrip()
        if text:
            self.log.info("pool child {slot}: {text}", slot=self.slot, text=text)

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        current, self.current = self.current, None
        self.pool._child_ended(self, reason)
        if current is not None:
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            how = f"signal {sig}" if sig else f"exit code {code}"
            current[1].errback(ChildDied(f"pool process died ({how}) while running the sub-task"))
        self.ended.callback(None)


class _TaskError(Exception):
    def __init__(self, type: str, message: str) -> None:
        super().__init__(type, message)
        self.type = type
        self.message = message


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

    TaskError = _TaskError

    def startService(self) -> None:
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

    def run(self, task: str, value: Any) -> Deferred[Any]:
        """Run ``task`` on ``value`` in a child. Cancelling the Deferred drops a queued run, or
        kills the child running it (a new child takes its place): Python code cannot be
        interrupted any other way."""
        self.ticket += 1
        ticket = self.ticket

        def cancel(d: Deferred[Any]) -> None:
            for item in self.waiting:
                if item[0] == ticket:
                    self.waiting.remove(item)
                    return
            for child in self.children:
                if child.current is not None and child.current[0] == ticket:
                    child.current = None
                    child.kill()
                    return

        d: Deferred[Any] = Deferred(cancel)
        if self.idle:
            self.idle.popleft().send(ticket, task, value, d)
        else:
            self.waiting.append((ticket, task, value, d))
        return d

    @property
    def busy(self) -> int:
        """Runs held: running in a child or queued for one."""
        return len(self.waiting) + sum(1 for c in self.children if c.current is not None)

    def _released(self, child: _Child) -> None:
        if not child.alive:
            return
        if self.waiting:
            child.send(*self.waiting.popleft())
        else:
            self.idle.append(child)

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
        super().stopService()
        children = list(self.children)
        for c in children:
            c.transport.closeStdin()
        kill = self.reactor.callLater(self.stop_timeout, self._kill, children)

        def done(_: Any) -> None:
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
