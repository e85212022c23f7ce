"""The listening side: :class:`ServerFactory` builds a connection per peer and keeps the limits
that span connections (how many, per address; failed AUTHs per address)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from clusterd.core.framing import DEFAULT_MAX_LINE
from clusterd.core.scheduler import Scheduler
from clusterd.server.connection import ServerProtocol
from clusterd.server.limits import ConnectionSettings

__all__ = ["ServerFactory"]


class ServerFactory(Factory):
    """Builds a :class:`ServerProtocol` per peer and keeps the limits that span connections."""

    log = Logger(namespace="clusterd.server.protocol.ServerFactory")

    def __init__(
        self,
        core: Scheduler,
        max_line: int = DEFAULT_MAX_LINE,
        settings: ConnectionSettings | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.core = core
        self.settings = settings or ConnectionSettings(max_line=max_line)
        self.max_line = self.settings.max_line
        self.clock = clock or core.clock
        self.connections = 0
        self.per_host: Counter[str] = Counter()
        self.failures: dict[str, tuple[int, float]] = {}  # host -> (recent failures, last time)

    def admit(self, proto: ServerProtocol) -> str | None:
        """Count a new connection, or say why it is refused."""
        s = self.settings
        if self.connections >= s.max_connections:
            return f"the server has {self.connections} connections, its limit; try later."
        if self.per_host[proto.host] >= s.max_connections_per_ip:
            return f"{proto.host} already has {s.max_connections_per_ip} connections, the limit."
        self.connections += 1
        self.per_host[proto.host] += 1
        return None

    def release(self, proto: ServerProtocol) -> None:
        """Stop counting a closed connection against the totals and its host."""
        self.connections -= 1
        self.per_host[proto.host] -= 1
        if self.per_host[proto.host] <= 0:
            del self.per_host[proto.host]

    def _recent_failures(self, host: str, now: float) -> int:
        count, last = self.failures.get(host, (0, now))
        return 0 if now - last > self.settings.auth_failure_window else count

    def auth_locked(self, host: str) -> bool:
        """Whether ``host`` has used up its failed-AUTH budget (max_address_auth_failures
        within auth_failure_window seconds of the last one), across all its connections: its
        further AUTHs are refused without being checked until the window has passed."""
        count = self._recent_failures(host, self.clock.seconds())
        return count >= self.settings.max_address_auth_failures

    def auth_failed(self, host: str) -> float:
        """Record a failed AUTH from ``host``; returns how long to wait before answering. The
        delay grows with recent failures from that address, across connections."""
        now = self.clock.seconds()
        count = self._recent_failures(host, now) + 1
        self.failures.pop(host, None)  # re-inserted last: the dict stays in last-failure order
        self.failures[host] = (count, now)
        if len(self.failures) > 10_000:  # bounded memory under a spray of addresses:
            del self.failures[next(iter(self.failures))]  # forget the stalest address only
        return min(5.0, 0.25 * 2 ** min(count - 1, 5))

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        """A new connection, sharing this factory's scheduler, settings and clock."""
        p = ServerProtocol(self.core, settings=self.settings, clock=self.clock)
        p.factory = self
        return p
