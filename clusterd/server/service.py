"""ServerService: owns the scheduler's lifetime, its journal thread and periodic housekeeping."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from clusterd.core.journal import JournalError
from clusterd.core.scheduler import Scheduler
from clusterd.server.fastlog import speed_up_text_logs

__all__ = ["ServerService", "build_core", "journal_opener", "open_journal"]


class ServerService(Service):
    """Owns the scheduler's lifetime: opens and recovers its journal, starts its writer and
    housekeeping loops."""

    log = Logger()
    name = "core"

    def __init__(
        self,
        core: Scheduler,
        sweep_interval: float = 60.0,
        speculate_interval: float = 1.0,
        open_journal: Callable[[], Any] | None = None,
    ) -> None:
        self.core = core
        # Opens the journal (file, lock, checks) when the service starts; None: the core's
        # journal is already open (tests, --journal none).
        self.open_journal = open_journal
        self._opened = False
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

    def privilegedStartService(self) -> None:
        """twistd calls this on every service before any ``startService``, and the listeners
        bind their ports here too, after us (they were added after this service): so the
        journal is opened and recovered before any port is bound, and a journal the server
        cannot use stops it before it ever listens."""
        super().privilegedStartService()
        if self.open_journal is not None and not self._opened:
            self._opened = True
            self._open_and_recover()

    def startService(self) -> None:
        """Open and recover the journal if not yet done, then start the writer and the sweep,
        speculation and stall loops."""
        if self.open_journal is not None and not self._opened:
            self._opened = True  # started without privilegedStartService (tests, embedding)
            self._open_and_recover()
        super().startService()
        # twistd has begun logging by now: its text log gets the faster formatter (same text).
        speed_up_text_logs()
        # The journal's writer starts only now, after recovery read it back.
        self.core.journal.start()
        self.log.info(
            "clusterd server starting; tasks: {tasks}", tasks=", ".join(self.core.registry.names())
        )
        self._sweep.start(self.sweep_interval, now=False)
        if self.core.config.speculate:
            self._speculate.start(self.speculate_interval, now=False)
        self._stalls.start(1.0, now=False)

    def _open_and_recover(self) -> None:
        """Open the journal and recover from it, before any listener starts (they are added
        after this service). A journal that cannot be read, written or locked is one clear
        line and exit 1 (SystemExit out of startService stops twistd before it listens):
        never start empty on a journal we cannot read, nor on one another server holds."""
        journal = None
        try:
            journal = self.open_journal()
            self.core.recover(journal)
        except JournalError as e:
            if journal is not None:
                journal.close()  # lets go of its lock
            # The process's own stderr (twistd has turned sys.stderr into a log file by now),
            # as when the journal was opened before twistd began logging.
            print(f"clusterd-server: {e}. Refusing to start.", file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None

    def stopService(self) -> Deferred[Any]:
        """Listeners stop first (they were added after us); then the journal is flushed."""
        super().stopService()
        for loop in (self._sweep, self._speculate, self._stalls):
            if loop.running:
                loop.stop()

        def flushed(_: Any) -> None:
            """Log that the journal is flushed and the server stopped."""
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
    """The scheduler for the server's options, with no journal yet: :class:`ServerService`
    opens the journal and recovers from it when it starts (see :func:`journal_opener`)."""
    from twisted.internet.threads import deferToThreadPool

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
    # Combining big answers runs on the reactor's thread pool (offload).
    offload = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    return Scheduler(options.registry, reactor, None, config, offload=offload)


def journal_opener(options: Any, reactor: Any) -> Callable[[], Any]:
    """What :class:`ServerService` calls at start to open ``--journal``."""
    return partial(open_journal, options["journal"], reactor, options["journal-sync"])
