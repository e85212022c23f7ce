"""The server's HTTP front end (``--http``): a JSON API over the same client operations as the
line protocol, server-sent events for a job's progress, Prometheus metrics and a health probe.

``site.py`` builds the tree; ``api.py`` routes ``/api/v1``; ``sse.py`` streams events;
``metrics.py`` is the Prometheus collector; ``openapi.py`` the OpenAPI 3 document.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["http_service"]


@implementer(IStreamServerEndpoint)
class _LoggedHttpEndpoint:
    """Logs ``clusterd http listening on HOST:PORT`` once bound (tests read ``tcp:0``'s port)."""

    log = Logger(namespace="clusterd.server.http")

    def __init__(self, endpoint: IStreamServerEndpoint, description: str) -> None:
        self.endpoint = endpoint
        self.description = description

    def listen(self, factory: Any) -> Deferred:
        """Listen, log the bound address, pass the port on."""
        from clusterd.endpoints import describe_address

        def bound(port: Any) -> Any:
            self.log.info(
                "clusterd http listening on {address} ({description})",
                address=describe_address(port.getHost()),
                description=self.description,
            )
            return port

        return self.endpoint.listen(factory).addCallback(bound)


def http_service(reactor: Any, description: str, site: Any) -> StreamServerEndpointService:
    """A service serving ``site`` on an endpoint string; a port that cannot be bound stops
    twistd, as for ``--listen``."""
    from twisted.internet.endpoints import serverFromString

    endpoint = _LoggedHttpEndpoint(serverFromString(reactor, description), description)
    svc = StreamServerEndpointService(endpoint, site)
    svc._raiseSynchronously = True
    return svc
