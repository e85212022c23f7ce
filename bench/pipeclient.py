"""A small pipelining client on a raw socket, for many small jobs on one connection.

It keeps up to ``window`` requests outstanding and reads the replies in order (the server answers
in request order, docs/PROTOCOL.md "Pipelining and reply order"). The bundled BlockingClient sends
one request at a time, so it cannot show what one connection can carry.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator

from clusterd.core.auth import proof

__all__ = ["PipeClient", "PipeError"]


class PipeError(RuntimeError):
    """The server refused a request, a job did not succeed, or the connection broke."""


class PipeClient:
    def __init__(
        self, host: str, port: int, secret: bytes | None = None, timeout: float = 60.0
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb", buffering=1 << 16)
        greeting = self._readline()
        parts = greeting.split(" ", 3)
        if parts[:3] != ["HELLO", "clusterd", "1"]:
            raise PipeError(f"unexpected greeting {greeting[:100]!r}")
        info = json.loads(parts[3]) if len(parts) == 4 else {}
        if "client" in info.get("auth", ()):
            if secret is None:
                raise PipeError("the server wants a client secret")
            self.sock.sendall(f"AUTH client {proof(secret, info['nonce'], 'client')}\n".encode())
            reply = self._readline()
            if not reply.startswith("OK AUTHENTICATED"):
                raise PipeError(f"AUTH refused: {reply[:200]}")

    def _readline(self) -> str:
        line = self.rfile.readline()
        if not line:
            raise PipeError("the server closed the connection")
        return line.decode("utf-8").rstrip("\r\n")

    def pipeline(self, lines: Iterable[str], window: int) -> Iterator[str]:
        """Send ``lines`` with at most ``window`` outstanding; yield each final reply in order."""
        source = iter(lines)
        pending = 0
        exhausted = False
        while True:
            batch: list[str] = []
            while not exhausted and pending + len(batch) < window:
                try:
                    batch.append(next(source))
                except StopIteration:
                    exhausted = True
            if batch:
                self.sock.sendall(("\n".join(batch) + "\n").encode("utf-8"))
                pending += len(batch)
            if pending == 0:
                return
            reply = self._readline()
            if reply.startswith("PROGRESS "):
                continue
            pending -= 1
            yield reply

    @staticmethod
    def result(reply: str) -> object:
        """The value of a ``RESULT <job> <json>`` reply; PipeError for anything else."""
        kind, _, rest = reply.partition(" ")
        if kind != "RESULT":
            raise PipeError(f"job did not succeed: {reply[:300]}")
        _job, _, value = rest.partition(" ")
        return json.loads(value)

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()

    def __enter__(self) -> PipeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
