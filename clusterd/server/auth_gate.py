"""The authentication gate of one connection: which roles it holds, AUTH, and its deadline.

With no secrets every role is open. With secrets, the greeting carries a nonce; until a role
is granted only AUTH, PING, HELP and QUIT are answered, lines are limited to
PRE_AUTH_MAX_LINE, and the connection is closed after ``auth_timeout``. A failed AUTH is
answered after a delay that grows with recent failures from that address (across
connections), and the connection reads and runs nothing meanwhile (SECURITY.md).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from clusterd.core.auth import ROLES, new_nonce, verify
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.replies import format_error
from clusterd.core.wire import WORKER_VERBS
from clusterd.server.limits import LOG_NAMESPACE, PRE_AUTH_MAX_LINE

__all__ = ["AuthGate"]

_OPEN_VERBS = ("AUTH", "PING", "HELP", "QUIT")


class AuthGate:
    """One connection's authentication: the roles it holds, the AUTH verb, and the deadline to
    authenticate by."""

    log = Logger(namespace=LOG_NAMESPACE)  # the namespace logs had before the split

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # a ServerProtocol (connection.py)
        self.settings = conn.settings
        self.roles: set[str] = set()
        self.nonce: str | None = None
        self.failures = 0
        self.timer: Any = None

    def start(self) -> dict[str, Any]:
        """At connect: grant the open roles, arm the deadline; returns the greeting's extras."""
        secrets = self.settings.secrets
        self.roles = {r for r in ROLES if r not in secrets}
        if not self.roles:
            self.conn.framer.limit = PRE_AUTH_MAX_LINE
        if not secrets:
            return {}
        self.nonce = new_nonce()
        # Slowloris: a peer that never authenticates does not keep its socket for ever.
        self.timer = self.conn.clock.callLater(self.settings.auth_timeout, self._expired)
        return {"auth": sorted(secrets), "nonce": self.nonce}

    def stop(self) -> None:
        """Disarm the authentication deadline (the connection is gone)."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if not self.roles:
            conn = self.conn
            self.log.warn("{peer} did not authenticate in time; closing", peer=conn.peer)
            conn.closing = True
            conn.write(
                format_error(
                    ErrorCode.AUTH_TIMEOUT,
                    f"no successful AUTH within {self.settings.auth_timeout:g}s; closing.",
                )
            )
            conn.close()

    def check(self, verb: str) -> None:
        """Until a role is granted only AUTH, PING, HELP and QUIT are answered."""
        if verb in _OPEN_VERBS:
            return
        role = "worker" if verb == "REGISTER" or verb in WORKER_VERBS else "client"
        if role not in self.roles:
            raise WireError(
                ErrorCode.NOAUTH,
                f"this connection is not authenticated as a {role}; "
                f"send AUTH {role} <proof> first (see SECURITY.md).",
            )

    def auth(self, rest: str) -> None:
        """The AUTH verb."""
        parts = rest.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise WireError(
                ErrorCode.BAD_REQUEST, "AUTH takes a role (client or worker) and a proof."
            )
        role, given = parts
        conn = self.conn
        secret = self.settings.secrets.get(role)
        if secret is None or role in self.roles:
            conn.replies.reply(f"OK AUTHENTICATED {role}")
            return
        factory = getattr(conn, "factory", None)
        if factory is not None and factory.auth_locked(conn.host):
            # This address has spent its guesses for now, across all its connections: the
            # proof is not even checked, so opening more connections buys no more guesses.
            self.log.warn(
                "AUTH from {peer} refused unchecked: too many recent failures from {host}",
                peer=conn.peer,
                host=conn.host,
            )
            conn.closing = True
            conn.replies.reply(
                format_error(
                    ErrorCode.AUTH_FAILED,
                    f"too many failed AUTHs from {conn.host} recently; try again later. Closing.",
                )
            )
            return
        if self.nonce is not None and verify(secret, self.nonce, role, given):
            self.roles.add(role)
            conn.framer.limit = conn.max_line
            # A worker authenticating is news; a client doing it is every CLI call (debug).
            (self.log.info if role == "worker" else self.log.debug)(
                "{peer} authenticated as {role}", peer=conn.peer, role=role
            )
            conn.replies.reply(f"OK AUTHENTICATED {role}")
            return
        self._failed(role, factory)

    def _failed(self, role: str, factory: Any) -> None:
        conn = self.conn
        self.failures += 1
        delay = factory.auth_failed(conn.host) if factory is not None else 0.0
        self.log.warn(
            "failed AUTH as {role} from {peer} ({n} on this connection); answering in {delay}s",
            role=role,
            peer=conn.peer,
            n=self.failures,
            delay=delay,
        )
        last = self.failures >= self.settings.max_auth_failures
        if last:
            conn.closing = True  # read nothing more: no further guesses on this connection
        reply = conn.replies.open()
        # Read and run nothing more until this answer goes out: a request pipelined behind a
        # failed AUTH waits for it like its reply does, and nothing piles up meanwhile.
        conn.stop_reading("auth")

        def answer() -> None:
            """After the delay: answer ERR AUTH_FAILED, then close the connection on the last
            failure allowed, else read on."""
            conn.stops.discard("auth")
            conn.replies.finish(
                reply,
                format_error(
                    ErrorCode.AUTH_FAILED,
                    "authentication failed" + ("; too many failures, closing." if last else "."),
                ),
            )
            if last:
                conn.close()
            else:
                conn.drain()

        # Failures are answered slowly (and later requests queue behind): guessing is costly.
        call = conn.clock.callLater(delay, answer)
        reply.cleanup = lambda: call.cancel() if call.active() else None
