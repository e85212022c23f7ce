"""``clusterd top``: workers, jobs and counters on one screen, redrawn every second with rich's
Live display until Ctrl-C (exit 0) or ``--iterations`` refreshes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["run_top", "Interrupt"]


class Interrupt:
    """Ctrl-C (SIGINT) as Deferreds: replaces the reactor's own handler, which would stop the
    reactor with nothing said and exit 0. The signal handler only schedules; the Deferreds
    fire on the reactor."""

    def __init__(self, reactor: Any) -> None:
        import signal

        self.reactor = reactor
        self.fired = False
        self.waiting: list[Any] = []
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.fire)

    def fire(self) -> None:
        """Mark the interrupt and fire every Deferred waiting for it."""
        if self.fired:
            return
        self.fired = True
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def wait(self) -> Any:
        """A new Deferred that fires on Ctrl-C (at once if it already came); cancelling it (as
        ``race`` does with the losers) is harmless."""
        from twisted.internet.defer import Deferred

        d: Deferred[None] = Deferred()
        if self.fired:
            d.callback(None)
        else:
            self.waiting = [w for w in self.waiting if not w.called]
            self.waiting.append(d)
        return d


async def run_top(client: Any, args: argparse.Namespace, reactor: Any) -> int:
    """Fetch WORKERS, JOBS (one screen's worth) and STATS, draw them, wait ``--interval``;
    until Ctrl-C or ``--iterations``. Off a terminal each refresh is printed as plain text."""
    from rich.console import Console
    from rich.live import Live
    from twisted.internet.defer import race
    from twisted.internet.task import deferLater

    from clusterd.client.views import render, top_view

    terminal = sys.stdout.isatty()
    interrupt = Interrupt(reactor)
    live = Live(console=Console(), auto_refresh=False, screen=False) if terminal else None
    if live is not None:
        live.start()
    count = 0
    try:
        while args.iterations is None or count < args.iterations:
            workers, jobs, stats = (
                await client.workers(),
                await client.jobs(20),
                await client.stats(),
            )
            view = top_view(workers, jobs, stats, terminal)
            if live is not None:
                live.update(view, refresh=True)
            else:
                sys.stdout.write(render(view, False))
                sys.stdout.flush()
            count += 1
            if args.iterations is not None and count >= args.iterations:
                break
            which, _ = await race(
                [deferLater(reactor, args.interval, lambda: None), interrupt.wait()]
            )
            if which == 1:
                break
    finally:
        if live is not None:
            live.stop()
    return 0
