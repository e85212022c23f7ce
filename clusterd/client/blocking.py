"""A blocking client for scripts and notebooks: plain sockets, no reactor.

    with BlockingClient("tcp:127.0.0.1:7420") as c:
        print(c.run("primes", {"start": 0, "stop": 100000}))

It speaks the same protocol and raises the same exceptions as the Deferred API. It understands
``tcp:HOST:PORT``, ``HOST:PORT``, ``unix:PATH`` and the common form of Twisted's TLS client
string, ``tls:HOST:PORT[:trustRoots=DIR][:certificate=CERT:privateKey=KEY]`` (the host name is
checked against the server certificate; ``trustRoots`` is read as the worker reads it, see
:func:`clusterd.tls.load_certificates`).

Connecting, the TLS handshake, the greeting and AUTH are bounded by ``timeout`` (default
:data:`DEFAULT_TIMEOUT`), so a port that accepts and never speaks raises
:class:`~clusterd.client.errors.ServerTimeout` instead of hanging.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

from clusterd import DEFAULT_PORT, PROTOCOL_VERSION
from clusterd.client.errors import ClusterError, InputUnreadable, ServerTimeout, raise_for
from clusterd.client.verbs import ClientVerbs, Decode, auth_line
from clusterd.core.wire import Reply, ReplyReader, WireError, parse_greeting

__all__ = ["BlockingClient", "parse_address", "endpoint_string", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 10.0  # seconds to connect, handshake, be greeted and authenticate
_UNSET: Any = object()


_ENDPOINT_TYPES = {"tcp", "tls", "ssl", "unix", "tcp6", "systemd", "tor", "onion"}


def endpoint_string(address: str) -> str:
    """``address`` as a Twisted client endpoint string: a bare ``HOST:PORT`` (or ``HOST``)
    becomes ``tcp:HOST:PORT``; any other string is returned as it is. The CLI, this client and
    the Deferred client all read addresses through it, so they accept the same strings."""
    head, sep, tail = address.partition(":")
    if head.lower() in _ENDPOINT_TYPES or "=" in address or not head:
        return address
    if not sep:
        return f"tcp:{head}:{DEFAULT_PORT}"
    if tail.isdigit():
        return f"tcp:{address}"
    return address


def parse_address(address: str) -> tuple[int, Any]:
    """(address family, sockaddr) for ``tcp:``/``tls:HOST:PORT[:...]``, ``HOST:PORT`` or
    ``unix:PATH``."""
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[5:].split(":")[0]
    parts = [p for p in address.split(":") if "=" not in p]
    if parts[0] in ("tcp", "tls"):
        parts = parts[1:]
    if len(parts) == 1:
        parts.append(str(DEFAULT_PORT))
    try:
        return socket.AF_INET, (parts[0], int(parts[1]))
    except (IndexError, ValueError):
        raise ClusterError(f"cannot read server address {address!r}") from None


def tls_context(address: str) -> ssl.SSLContext | None:
    """An SSL context for a ``tls:`` address (None for any other): trust roots from
    ``trustRoots``, a directory or a bundle file whose every certificate is trusted (default:
    the system's), and a client certificate if given."""
    if not address.startswith("tls:"):
        return None
    from clusterd.tls import load_certificates

    args = dict(p.split("=", 1) for p in address.split(":") if "=" in p)
    ctx = ssl.create_default_context()
    roots = args.get("trustRoots")
    if roots:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            pem = b"".join(c.dumpPEM() for c in load_certificates(roots))
        except ValueError as e:
            raise ClusterError(str(e)) from None
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    if "certificate" in args:
        ctx.load_cert_chain(args["certificate"], args.get("privateKey"))
    return ctx


def _open_socket(address: str, timeout: float | None) -> socket.socket:
    """A connected socket (TLS-wrapped for ``tls:``), or ServerTimeout / ClusterError."""
    family, sockaddr = parse_address(address)
    ctx = tls_context(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError as e:
        sock.close()
        raise ServerTimeout(
            f"cannot connect to {address}: no connection within {timeout:g} s"
        ) from e
    except OSError as e:
        sock.close()
        raise ClusterError(f"cannot connect to {address}: {e}") from e
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock, server_hostname=sockaddr[0])
    except (OSError, ssl.SSLError) as e:
        sock.close()
        if isinstance(e, TimeoutError):
            raise ServerTimeout(
                f"TLS handshake with {address} timed out after {timeout:g} s"
            ) from e
        if isinstance(e, ssl.SSLCertVerificationError):
            why = f"certificate verify failed: {e.verify_message}"
        else:
            why = str(e)
        raise ClusterError(f"TLS handshake with {address} failed: {why}") from e


class BlockingClient(ClientVerbs):
    """One connection to a server, used from plain (blocking) code. Every call (see
    :class:`ClientVerbs`) returns its decoded reply.

    ``timeout`` bounds connecting, the TLS handshake, the greeting and AUTH (default
    :data:`DEFAULT_TIMEOUT` seconds; None waits forever); past it, :class:`ServerTimeout`.
    ``request_timeout`` bounds each later read, a reply such as ``RUN``'s being as slow as its
    job: by default it is ``timeout`` when that was given explicitly (as before), else None.
    """

    def __init__(
        self,
        address: str = f"tcp:127.0.0.1:{DEFAULT_PORT}",
        timeout: float | None = _UNSET,
        secret: bytes | None = None,
        request_timeout: float | None = _UNSET,
    ):
        if request_timeout is _UNSET:
            request_timeout = None if timeout is _UNSET else timeout
        if timeout is _UNSET:
            timeout = DEFAULT_TIMEOUT  # read now, so tests and callers may change the default
        self.sock = _open_socket(address, timeout)
        self.file = self.sock.makefile("rwb")
        self.replies = ReplyReader()
        try:
            version, self.server_info = parse_greeting(self._readline())
            if version != PROTOCOL_VERSION:
                raise ClusterError(
                    f"server speaks protocol {version}, this client {PROTOCOL_VERSION}"
                )
            line = auth_line(self.server_info, secret)
            if line is not None:
                self.request(line)
        except WireError as e:
            self.close()
            raise ClusterError(str(e)) from None
        except ServerTimeout as e:
            self.close()
            raise ServerTimeout(
                f"{address} accepted the connection but did not greet and authenticate us "
                f"within {timeout:g} s (is it a clusterd server?)"
            ) from e
        except ClusterError:
            self.close()
            raise
        self.sock.settimeout(request_timeout)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and its file; the client cannot be used afterwards."""
        try:
            self.file.close()
        finally:
            self.sock.close()

    def _readline(self) -> str:
        try:
            line = self.file.readline()
        except TimeoutError as e:
            raise ServerTimeout(
                f"no answer from the server within {self.sock.gettimeout():g} s"
            ) from e
        except OSError as e:
            raise ClusterError(f"connection to the server failed: {e}") from e
        if not line:
            raise ClusterError("the server closed the connection")
        return line.decode("utf-8").rstrip("\r\n")

    def request(self, line: str, on_progress: Callable[[str, dict], None] | None = None) -> Reply:
        """Send one request line and return its final reply (PROGRESS lines go to on_progress)."""
        return self.request_lines(iter([line.encode("utf-8") + b"\n"]), on_progress)

    def request_lines(
        self, lines: Iterator[bytes], on_progress: Callable[[str, dict], None] | None = None
    ) -> Reply:
        """Send one request made of several lines (a streamed input) and return its final
        reply. A refusal the server sends while the lines are still going out (a bad piece)
        is read once they have all been sent."""
        try:
            for line in lines:
                self.file.write(line)
            self.file.flush()
        except OSError as e:
            raise ClusterError(f"connection to the server failed: {e}") from e
        except ValueError as e:  # the input could not be read: abandon the half-sent job
            self.close()
            raise InputUnreadable(f"cannot read the input to stream: {e}") from e
        while True:
            try:
                reply = self.replies.feed(self._readline())
            except WireError as e:
                raise ClusterError(str(e)) from None
            if reply is None:
                continue
            if reply.final:
                return raise_for(reply)
            if on_progress is not None:
                on_progress(reply.job or "", reply.value)

    def _send(
        self, line: str, decode: Decode, on_progress: Callable[[str, dict], None] | None = None
    ) -> Any:
        return decode(self.request(line, on_progress))

    def _send_lines(self, lines: Iterator[bytes], decode: Decode) -> Any:
        return decode(self.request_lines(lines))
