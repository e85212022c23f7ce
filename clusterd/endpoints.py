"""Endpoint helpers shared by server and worker: listen from endpoint strings and log the
address actually bound, so ``--listen tcp:0`` (tests, the demo) can be found from the log."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["LoggingEndpoint", "listening_service", "describe_address", "no_delay"]


def describe_address(addr: Any) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(addr, "name", addr))


@implementer(IStreamServerEndpoint)
class LoggingEndpoint:
    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, description: str) -> None:
        self.endpoint = endpoint
        self.description = description

    def listen(self, factory: Factory) -> Deferred:
        d = self.endpoint.listen(factory)

        def bound(port: Any) -> Any:
            self.log.info(
                "clusterd listening on {address} ({description})",
                address=describe_address(port.getHost()),
                description=self.description,
            )
            return port

        return d.addCallback(bound)


def listening_service(
    reactor: Any, description: str, factory: Factory
) -> StreamServerEndpointService:
    """A service listening on an endpoint string; a port that cannot be bound stops twistd."""
    from twisted.internet.endpoints import serverFromString

    svc = StreamServerEndpointService(
        LoggingEndpoint(serverFromString(reactor, description), description), factory
    )
    svc._raiseSynchronously = True
    return svc


def no_delay(transport: Any) -> None:
    """Turn off Nagle's algorithm where the transport has it (TCP, and TLS over TCP): the
    protocol is request/response in small lines, and Nagle combined with delayed ACKs would hold
    each small reply for tens of milliseconds."""
    for candidate in (transport, getattr(transport, "transport", None)):
        setter = getattr(candidate, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:  # pragma: no cover - e.g. a socket already closing
                pass
            return
