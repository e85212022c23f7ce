"""ServerService: owns the scheduler's lifetime, its journal thread and periodic housekeeping."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from clusterd.core.scheduler import Scheduler
from clusterd.server.fastlog import speed_up_text_logs

__all__ = ["ServerService"]


class ServerService(Service):
    log = Logger()
    name = "core"

    def __init__(
        self, core: Scheduler, sweep_interval: float = 60.0, speculate_interval: float = 1.0
    ) -> None:
        self.core = core
        self._sweep = LoopingCall(self._expire)
        self._sweep.clock = core.clock
        self.sweep_interval = sweep_interval
        self._speculate = LoopingCall(core.speculate)
        self._speculate.clock = core.clock
        self.speculate_interval = speculate_interval
        # Sub-tasks that make no progress (a wedged worker) are taken back: see check_stalls.
        self._stalls = LoopingCall(core.check_stalls)
        self._stalls.clock = core.clock

    def _expire(self) -> None:
        n = self.core.expire()
        if n:
            self.log.info("forgot {n} finished jobs past retention", n=n)

    def startService(self) -> None:
        super().startService()
        # twistd has begun logging by now: its text log gets the faster formatter (same text).
        speed_up_text_logs()
        # The journal's writer starts only now, after recovery read it back (in makeService).
        self.core.journal.start()
        self.log.info(
            "clusterd server starting; tasks: {tasks}", tasks=", ".join(self.core.registry.names())
        )
        self._sweep.start(self.sweep_interval, now=False)
        if self.core.config.speculate:
            self._speculate.start(self.speculate_interval, now=False)
        self._stalls.start(1.0, now=False)

    def stopService(self) -> Deferred[Any]:
        """Listeners stop first (they were added after us); then the journal is flushed."""
        super().stopService()
        for loop in (self._sweep, self._speculate, self._stalls):
            if loop.running:
                loop.stop()

        def flushed(_: Any) -> None:
            self.log.info("journal flushed; server stopped")

        return self.core.stop().addCallback(flushed)
