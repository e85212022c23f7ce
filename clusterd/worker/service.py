"""The worker's service tree: drain on stop, then stop the connection and the pool."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger

__all__ = ["WorkerService"]


class WorkerService(MultiService):
    """The worker's service tree. On stop (SIGTERM) it first drains: takes no new sub-tasks and
    finishes those held; only then do the connection and the pool stop (MultiService would
    stop all children at once). What still runs after the timeout is handed back."""

    log = Logger(namespace="clusterd.worker.tap.WorkerService")  # as before the move

    def __init__(self, timeout: float, clock: Any) -> None:
        super().__init__()
        self.timeout = timeout
        self.clock = clock
        self.factory: Any = None

    def stopService(self) -> Deferred[None]:
        """Drain first (finish the sub-tasks held), then stop the connection and the pool."""
        d = self._drain()
        return d.addCallback(lambda _: super(WorkerService, self).stopService())

    def _drain(self) -> Deferred[None]:
        self.factory.stopping = True
        proto = self.factory.current
        if proto is None or not proto.registered:
            return succeed(None)
        held = len(proto.running)
        self.log.info(
            "stopping: finishing {n} sub-tasks held (at most {t}s)", n=held, t=self.timeout
        )
        d = proto.drain()
        d.addTimeout(self.timeout, self.clock)

        def gave_up(f: Any) -> None:
            """The drain timed out: log it; the server requeues what was still held."""
            f.trap(TimeoutError)
            self.log.warn(
                "drain timed out; handing {n} sub-tasks back to the server", n=len(proto.running)
            )

        return d.addErrback(gave_up)
