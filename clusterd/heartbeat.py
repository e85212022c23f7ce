"""Heartbeats for one connection: ping when quiet, declare the peer dead when silent too long.

A half-open TCP connection (a dead host, a pulled cable, a proxy that stopped forwarding) never
reports itself closed, so both server and worker send ``PING`` every ``interval`` seconds and
treat any received line as a sign of life; after ``timeout`` seconds of silence the peer is
declared lost and the connection aborted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall

__all__ = ["Heartbeat"]


class Heartbeat:
    """One connection's heartbeat: pings when quiet, and calls ``on_timeout`` after ``timeout``
    seconds of silence."""

    def __init__(
        self,
        clock: Any,
        interval: float,
        timeout: float,
        send_ping: Callable[[], None],
        on_timeout: Callable[[float], None],
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.send_ping = send_ping
        self.on_timeout = on_timeout
        self.last = clock.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        """Start pinging every ``interval`` seconds (none if ``interval`` is 0), counting silence
        from now."""
        self.last = self.clock.seconds()
        if self.interval > 0 and not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop pinging and watching for silence (the connection is gone)."""
        if self._loop.running:
            self._loop.stop()

    def touch(self) -> None:
        """A line arrived: the peer is alive, so silence counts from now."""
        self.last = self.clock.seconds()

    def _tick(self) -> None:
        silent = self.clock.seconds() - self.last
        if silent >= self.timeout:
            self.stop()
            self.on_timeout(silent)
        else:
            self.send_ping()
