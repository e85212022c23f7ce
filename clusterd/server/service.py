"""ServerService: owns the scheduler's lifetime and its periodic housekeeping."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from clusterd.core.scheduler import Scheduler

__all__ = ["ServerService"]


class ServerService(Service):
    log = Logger()
    name = "core"

    def __init__(self, core: Scheduler, sweep_interval: float = 60.0) -> None:
        self.core = core
        self.sweep_interval = sweep_interval
        self._sweep = LoopingCall(self._expire)
        self._sweep.clock = core.clock

    def _expire(self) -> None:
        n = self.core.expire()
        if n:
            self.log.info("forgot {n} finished jobs past retention", n=n)

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "clusterd server starting; tasks: {tasks}", tasks=", ".join(self.core.registry.names())
        )
        self._sweep.start(self.sweep_interval, now=False)

    def stopService(self) -> None:
        if self._sweep.running:
            self._sweep.stop()
        return super().stopService()
