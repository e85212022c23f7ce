"""The server's service opens its journal when it starts, before any port is bound."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from clusterd.core.journal import JournalError, MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.server.service import ServerService
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS


def test_the_journal_is_opened_and_recovered_at_privileged_start_not_when_built():
    """Building the service opens nothing; privilegedStartService (which twistd runs before
    the listeners bind) opens the journal and recovers its jobs."""
    old = Scheduler(Registry(TASKS), Clock(), journal=MemoryJournal())
    job = old.submit("sum", [1, 2], chunks=1)
    opened: list[MemoryJournal] = []

    def opener() -> MemoryJournal:
        opened.append(old.journal)
        return old.journal

    core = Scheduler(Registry(TASKS), Clock())
    service = ServerService(core, open_journal=opener)
    assert opened == []
    service.privilegedStartService()
    assert opened == [old.journal] and core.get(job.id).total == 1
    service.startService()
    assert opened == [old.journal]  # opened once
    service.stopService()


def test_a_journal_that_cannot_be_opened_stops_the_start():
    """A journal error at start is one line on stderr and exit status 1, before any listener."""

    def opener() -> MemoryJournal:
        raise JournalError("journal /x is in use by another server (pid 7)")

    service = ServerService(Scheduler(Registry(TASKS), Clock()), open_journal=opener)
    with pytest.raises(SystemExit) as e:
        service.privilegedStartService()
    assert e.value.code == 1
