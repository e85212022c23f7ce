"""The Deferred-based client library.

    client = await connect(reactor, "tcp:127.0.0.1:7420")
    total = await client.run("sum", [1, 2, 3])

Requests are pipelined on one connection: each method writes its line at once and returns a
Deferred that fires when its reply arrives (the server answers in request order). Errors arrive
as :mod:`clusterd.client.errors` exceptions. The calls themselves are
:class:`clusterd.client.verbs.ClientVerbs`, shared with the blocking client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from clusterd.client.errors import ClusterError, ServerTimeout, raise_for
from clusterd.client.protocol import ClientProtocol
from clusterd.client.verbs import ClientVerbs, Decode, ProgressFn, auth_line, job_line, jobs_line

__all__ = [
    "ClientProtocol",
    "Client",
    "connect",
    "job_line",
    "jobs_line",
    "auth_line",
    "DEFAULT_TIMEOUT",
]

# Seconds to connect, finish a TLS handshake, read the greeting and authenticate. A server
# answers all of that in milliseconds (a failed AUTH is delayed at most 5 s); without a bound a
# port that accepts and never speaks would hang a client forever.
DEFAULT_TIMEOUT = 10.0


class Client(ClientVerbs):
    """High-level calls on one connection. Every call (see :class:`ClientVerbs`) returns a
    Deferred of its decoded reply."""

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol

    @property
    def server_info(self) -> dict[str, Any]:  # type: ignore[override]
        """The server's HELLO information (version, line limit...), or {} before it arrived."""
        return self.protocol.server_info or {}

    def _send(
        self, line: str, decode: Decode, on_progress: ProgressFn | None = None
    ) -> Deferred[Any]:
        return self.protocol.request(line, on_progress).addCallback(raise_for).addCallback(decode)

    def _send_lines(self, lines: Iterator[bytes], decode: Decode) -> Deferred[Any]:
        return self.protocol.request_lines(lines).addCallback(raise_for).addCallback(decode)

    def close(self) -> None:
        """Close the connection; requests still pending fail with ClusterError."""
        self.protocol.transport.loseConnection()


def connect(
    reactor: Any,
    endpoint: str,
    secret: bytes | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Deferred[Client]:
    """Connect to a server by endpoint string (``tcp:host:port``, a bare ``host:port``,
    ``unix:path``, ``tls:...``);
    fires with a :class:`Client` once the server's greeting has arrived and, if the server
    requires it, the client secret has been proven. All of that must happen within
    ``timeout`` seconds (None: wait forever), or it fails with :class:`ServerTimeout` and the
    connection is closed. A TLS handshake that fails says why (``certificate verify
    failed``)."""
    state = _Connecting(endpoint)
    d = Deferred.fromCoroutine(_connect(reactor, endpoint, secret, state))
    if timeout is not None:

        def timed_out(result: Any, _timeout: float) -> Any:
            """On timeout: abort the connection and turn the cancellation into ServerTimeout naming
            the stage reached."""
            if state.proto is not None and state.proto.transport is not None:
                state.proto.transport.abortConnection()
            if isinstance(result, Failure) and result.check(
                CancelledError, ConnectingCancelledError
            ):
                raise ServerTimeout(f"timed out after {timeout:g} s {state.stage}")
            return result

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    return d


class _Connecting:
    """How far a connect got: what a timeout message names, and the connection it closes."""

    def __init__(self, endpoint: str) -> None:
        self.stage = f"connecting to {endpoint}"
        self.proto: ClientProtocol | None = None


async def _connect(reactor: Any, endpoint: str, secret: bytes | None, state: _Connecting) -> Client:
    from clusterd.client.blocking import endpoint_string
    from clusterd.tls import client_endpoint

    try:
        ep = client_endpoint(reactor, endpoint_string(endpoint))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ClusterError(str(e)) from None
    proto = await ep.connect(Factory.forProtocol(ClientProtocol))
    state.proto = proto
    state.stage = "waiting for the server's greeting (is it a clusterd server?)"
    info = await proto.greeted
    line = auth_line(info, secret)
    if line is not None:
        state.stage = "waiting for the answer to AUTH"
        try:
            raise_for(await proto.request(line))
        except ClusterError:
            proto.transport.loseConnection()
            raise
    return Client(proto)
