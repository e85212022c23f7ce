"""The worker's registration with a server: the greeting, AUTH and REGISTER, the answer to
REGISTER, the backoff after a refusal, and saying why connections end before registering.

Functions of a :class:`~clusterd.worker.protocol.WorkerProtocol` (``proto``), kept apart from
the sub-task traffic.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd import PROTOCOL_VERSION
from clusterd.core.auth import proof
from clusterd.core.wire import WireError, dumps, parse_greeting, parse_json
from clusterd.endpoints import describe_address

__all__ = ["greeted", "registered", "refused", "log_unregistered_loss"]

log = Logger(namespace="clusterd.worker.protocol.WorkerProtocol")  # as before the split


def greeted(proto: Any, text: str) -> None:
    """The server's HELLO: check its protocol, then AUTH (if it asks) and REGISTER."""
    version, info = parse_greeting(text)
    if version != PROTOCOL_VERSION:
        log.error(
            "server speaks protocol {v}, this worker {mine}; disconnecting",
            v=version,
            mine=PROTOCOL_VERSION,
        )
        proto.transport.loseConnection()
        return
    proto.greeted = True
    if isinstance(info.get("max_line"), int):
        proto.server_max_line = info["max_line"]
    f = proto.factory
    auth = info.get("auth")
    if isinstance(auth, list) and "worker" in auth:
        if f.secret is None:
            log.error("the server requires a worker secret; give --secret-file or $CLUSTERD_SECRET")
        else:
            proto.send_line("AUTH worker " + proof(f.secret, str(info.get("nonce")), "worker"))
    registration = {
        "name": f.name,
        "tasks": f.tasks,
        "slots": f.slots,
        "protocol": PROTOCOL_VERSION,
        "max_line": f.max_line,
        "batch": True,
        "parts": True,
        "bytes": True,  # takes a text chunk as a binary DO (docs/PROTOCOL.md)
    }
    proto.send_line("REGISTER " + dumps(registration))


def registered(proto: Any, rest: str) -> None:
    """``OK REGISTERED {...}``: whether the server takes batches; the backoff starts over."""
    proto.registered = True
    try:
        info = parse_json(rest[len("REGISTERED") :], "OK REGISTERED")
    except WireError:
        info = None
    proto.batch = isinstance(info, dict) and info.get("batch") is True
    proto.parts_ok = isinstance(info, dict) and info.get("parts") is True
    f = proto.factory
    f.registrations += 1
    f.rejections = 0
    f.last_loss, f.losses = None, 0
    log.info(
        "registered with server {peer} as {name} ({slots} slots)",
        peer=str(proto.transport.getPeer()),
        name=f.name,
        slots=f.slots,
    )
    if f.stopping:
        proto.drain()


def refused(proto: Any, text: str) -> None:
    """An ``ERR`` from the server. Before registering, ClientService resets its backoff on
    every TCP connect, so a server that accepts then refuses would be hammered: back off here
    before closing."""
    log.error("server refused: {text}", text=text)
    if not proto.registered and not proto.closing:
        proto.closing = True
        f = proto.factory
        f.rejections += 1
        delay = min(f.max_delay, 0.5 * 2 ** min(f.rejections, 10))
        proto.backoff = f.clock.callLater(delay, proto.transport.loseConnection)


def log_unregistered_loss(proto: Any, reason: Failure | None) -> None:
    """Say why a connection ended before registering: a TLS handshake that failed (the
    server's certificate could not be verified, or the server refused ours) used to leave
    the worker retrying forever in silence. Repeats of one cause are logged at the 1st,
    2nd, 4th, 8th... time, so a worker that keeps failing does not flood its log."""
    from clusterd.tls import tls_failure_reason

    try:
        peer = describe_address(proto.transport.getPeer())
    except Exception:  # pragma: no cover - a transport without a peer
        peer = "the server"
    tls = tls_failure_reason(reason)
    text = tls if tls is not None else (reason.getErrorMessage() if reason else "closed")
    factory = proto.factory
    if text != factory.last_loss:
        factory.last_loss, factory.losses = text, 0
    factory.losses += 1
    if factory.losses & (factory.losses - 1):
        return  # not a power of two
    if tls is not None:
        log.error(
            "TLS handshake with {peer} failed: {reason} (attempt {n}); check trustRoots, "
            "the server's certificate and the name it is valid for, and our certificate",
            peer=peer,
            reason=tls,
            n=factory.losses,
        )
    else:
        log.warn(
            "connection to {peer} ended before registering: {reason} (attempt {n})",
            peer=peer,
            reason=text,
            n=factory.losses,
        )
