"""Real processes on the test session's reactor (pytest-twisted): a ProcessProtocol that fires a
Deferred on the process's readiness line, the model for integration tests written as
``@pytest_twisted.ensureDeferred async def test_...`` (TWISTED.md §5, "Real processes").

Every wait is bounded (``addTimeout`` on the reactor); :meth:`ReadyProcess.stop` sends SIGTERM,
waits for the end with a timeout, then SIGKILL: the one reactor of the session is never left
with a process or a timer of ours.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from clusterd.launch import twistd_path

__all__ = ["ReadyProcess", "spawn_twistd"]


class ReadyProcess(ProcessProtocol):
    """Collects a process's output lines; ``ready`` fires with the first match of ``pattern``
    (a ``re.Match``) and fails if the process ends before printing it; :meth:`when_ended`
    gives a Deferred of the exit reason (a new one per call, so a timeout on one cancels no
    other)."""

    def __init__(self, name: str, pattern: str) -> None:
        self.name = name
        self.pattern = re.compile(pattern)
        self.lines: list[str] = []
        self._buf = b""
        self.ready: Deferred[re.Match[str]] = Deferred()
        self.exit: Failure | None = None
        self._end_waiters: list[Deferred[Failure]] = []

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        *whole, self._buf = self._buf.split(b"\n")
        for raw in whole:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            m = self.pattern.search(line)
            if m is not None and not self.ready.called:
                self.ready.callback(m)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(f"{self.name} ended before it was ready:\n" + self.text()[-2000:])
            )
        self.exit = reason
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(reason)

    def when_ended(self) -> Deferred[Failure]:
        if self.exit is not None:
            return succeed(self.exit)
        d: Deferred[Failure] = Deferred()
        self._end_waiters.append(d)
        return d

    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait_ready(self, reactor: Any, timeout: float) -> re.Match[str]:
        return await self.ready.addTimeout(timeout, reactor)

    async def stop(self, reactor: Any, timeout: float = 15.0) -> None:
        """SIGTERM, wait for the end (bounded), then SIGKILL and wait again."""
        for sig in ("TERM", "KILL"):
            if self.exit is not None:
                return
            try:
                self.transport.signalProcess(sig)
            except ProcessExitedAlready:
                pass
            try:
                await self.when_ended().addTimeout(timeout, reactor)
                return
            except Exception:
                if sig == "KILL":
                    raise


def spawn_twistd(
    reactor: Any, name: str, args: list[str], pattern: str, cwd: str, env: dict[str, str]
) -> ReadyProcess:
    """Start ``twistd -n --pidfile= ARGS`` with a :class:`ReadyProcess` on ``pattern``."""
    proto = ReadyProcess(name, pattern)
    argv = [twistd_path(), "-n", "--pidfile=", *args]
    reactor.spawnProcess(proto, argv[0], argv, env={**os.environ, **env}, path=cwd)
    return proto
