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

__all__ = [
    "LoggingEndpoint",
    "ListenAddress",
    "listening_service",
    "describe_address",
    "loopback_default",
    "no_delay",
]

# Prefixes whose endpoints bind an IP interface given by ``interface=``; Twisted's default for
# each (tcp, ssl: 0.0.0.0; tcp6: ::) is every interface, so clusterd supplies loopback instead.
_LOOPBACK_FOR = {"tcp": "127.0.0.1", "ssl": "127.0.0.1", "mtls": "127.0.0.1", "tcp6": "::1"}
_LOCAL_ONLY = ("unix",)  # endpoints no other machine can reach


class ListenAddress:
    """One ``--listen`` string after clusterd's defaults: ``description`` is what is bound
    (an IP endpoint without ``interface=`` gets loopback), ``exposed`` says whether peers on
    other machines may reach it (a non-loopback interface, or an endpoint type whose interface
    clusterd cannot see, such as ``systemd:``), and ``where`` names it for messages."""

    def __init__(self, description: str, exposed: bool, where: str) -> None:
        self.description = description
        self.exposed = exposed
        self.where = where

    def __repr__(self) -> str:
        return f"ListenAddress({self.description!r}, exposed={self.exposed})"


def _is_loopback(interface: str) -> bool:
    import ipaddress

    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name or "": Twisted binds whatever it resolves to, or everything


def loopback_default(description: str) -> ListenAddress:
    """Apply clusterd's listening default to an endpoint string: ``tcp:7420`` (and ``ssl:``,
    ``mtls:``, ``tcp6:``) without ``interface=`` binds loopback, not every interface as
    Twisted's own default would. Raises ValueError for a string Twisted cannot parse."""
    from twisted.internet.endpoints import _parse

    try:
        args, kwargs = _parse(description)
    except Exception as e:  # Twisted's tokenizer raises bare exceptions on bad escapes
        raise ValueError(f"cannot parse endpoint {description!r}: {e}") from None
    if not args:
        raise ValueError(f"cannot parse endpoint {description!r}")
    prefix = str(args[0]).lower()
    if prefix in _LOCAL_ONLY:
        return ListenAddress(description, False, description)
    if prefix not in _LOOPBACK_FOR:
        return ListenAddress(description, True, f"{description} (interface unknown to clusterd)")
    if "interface" not in kwargs:
        loopback = _LOOPBACK_FOR[prefix].replace(":", "\\:")
        description = f"{description}:interface={loopback}"
        return ListenAddress(description, False, description)
    interface = str(kwargs["interface"])
    exposed = not _is_loopback(interface)
    return ListenAddress(description, exposed, f"{description} (interface {interface or 'all'})")


def describe_address(addr: Any) -> str:
    """An address as ``host:port``, or its path (or repr) for a UNIX or other address."""
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(addr, "name", addr))


@implementer(IStreamServerEndpoint)
class LoggingEndpoint:
    """A server endpoint that logs the address it actually bound, so ``tcp:0`` can be found from the
    log."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, description: str) -> None:
        self.endpoint = endpoint
        self.description = description

    def listen(self, factory: Factory) -> Deferred:
        """Listen with ``factory``; the Deferred fires with the listening port once it is logged, or
        fails as the endpoint's listen does."""
        d = self.endpoint.listen(factory)

        def bound(port: Any) -> Any:
            """Log the bound address and pass the port on."""
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
