"""ServerService: owns the scheduler's lifetime, its journal thread and periodic housekeeping."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from clusterd.core.scheduler import Scheduler
from clusterd.server.fastlog import speed_up_text_logs

__all__ = ["ServerService", "build_core", "open_journal"]


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


def open_journal(path: str, reactor: Any, sync: str = "full") -> Any:
    """The journal for ``--journal``: SQLite at ``path``, or none for ``none``."""
    from clusterd.core.journal import NullJournal

    log = Logger(namespace="clusterd.server")
    if path.lower() in ("none", "off", ""):
        log.warn("running WITHOUT a journal (--journal none): jobs do not survive a restart")
        return NullJournal()
    from clusterd.server.sqlite_journal import SqliteJournal

    journal = SqliteJournal(path, reactor, sync=sync)
    log.info("journal: {path}", path=os.path.abspath(path))
    return journal


def build_core(options: Any, reactor: Any) -> Scheduler:
    """The scheduler for the server's options: its journal opened and recovered. A journal that
    cannot be read, written or locked is one clear line and exit 1 (SystemExit): never start
    empty on a journal we cannot read, nor on one another server holds."""
    from functools import partial

    from twisted.internet.threads import deferToThreadPool

    from clusterd.core.journal import JournalError
    from clusterd.core.scheduler import SchedulerConfig

    config = SchedulerConfig(
        max_subtasks=options["max-subtasks"],
        max_queued=options["max-queued"],
        retention=options["retention"],
        default_timeout=options["default-timeout"] or None,
        default_attempts=options["default-attempts"],
        stall_factor=options["stall-factor"],
        stall_min=options["stall-min"],
        max_lost=options["max-lost"],
        speculate=bool(options["speculate"]),
        speculate_factor=options["speculate-factor"],
        max_result_bytes=options["max-result-bytes"],
        max_input_bytes=options["max-input-bytes"],
        prefetch=options["prefetch"],
        dispatch_per_turn=options["dispatch-per-turn"],
    )
    journal = None
    try:
        journal = open_journal(options["journal"], reactor, options["journal-sync"])
        # Combining big answers runs on the reactor's thread pool (offload).
        offload = partial(deferToThreadPool, reactor, reactor.getThreadPool())
        core = Scheduler(options.registry, reactor, journal, config, offload=offload)
        core.recover()
    except JournalError as e:
        if journal is not None:
            journal.close()  # lets go of its lock
        raise SystemExit(f"clusterd-server: {e}. Refusing to start.") from None
    return core
