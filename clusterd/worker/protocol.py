"""The worker's side of the line protocol: register, take DO lines, answer DONE or ERROR.

``ClientService`` builds a new protocol per connection, so registration happens in every
connection: a worker that lost its server registers again as soon as it is back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from clusterd import PROTOCOL_VERSION
from clusterd.core.framing import DEFAULT_MAX_LINE, LineFramer, LineTooLong
from clusterd.core.wire import WireError, dumps, parse_greeting, parse_json_object
from clusterd.worker.pool import ChildDied, PoolService

__all__ = ["WorkerProtocol", "WorkerFactory"]


class WorkerProtocol(Protocol):
    log = Logger()

    def __init__(self, factory: WorkerFactory) -> None:
        self.factory = factory
        self.framer = LineFramer(factory.max_line)
        self.registered = False
        self.greeted = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        for event in self.framer.feed(data):
            if isinstance(event, LineTooLong):
                self.log.error("server sent a line over {limit} bytes; ignored", limit=event.limit)
                continue
            try:
                self._line(event.decode("utf-8"))
            except (WireError, UnicodeDecodeError) as e:
                self.log.error("bad line from server: {error}", error=str(e))

    def _line(self, text: str) -> None:
        verb, _, rest = text.partition(" ")
        if not self.greeted:
            version, _info = parse_greeting(text)
            if version != PROTOCOL_VERSION:
                self.log.error(
                    "server speaks protocol {v}, this worker {mine}; disconnecting",
                    v=version,
                    mine=PROTOCOL_VERSION,
                )
                self.transport.loseConnection()
                return
            self.greeted = True
            f = self.factory
            self._send(
                "REGISTER "
                + dumps(
                    {
                        "name": f.name,
                        "tasks": f.tasks,
                        "slots": f.slots,
                        "protocol": PROTOCOL_VERSION,
                    }
                )
            )
        elif verb == "DO":
            self._do(parse_json_object(rest, "DO"))
        elif verb == "OK" and rest.startswith("REGISTERED"):
            self.registered = True
            self.factory.registrations += 1
            self.log.info(
                "registered with server {peer} as {name} ({slots} slots)",
                peer=str(self.transport.getPeer()),
                name=self.factory.name,
                slots=self.factory.slots,
            )
        elif verb == "ERR":
            self.log.error("server refused: {text}", text=text)
            if not self.registered:
                self.transport.loseConnection()

    def _do(self, msg: dict[str, Any]) -> None:
        ticket = msg.get("id")
        d = self.factory.pool.run(str(msg.get("task")), msg.get("input"))

        def ok(result: Any) -> None:
            self._send("DONE " + dumps({"id": ticket, "job": msg.get("job"), "result": result}))

        def failed(f: Failure) -> None:
            if f.check(PoolService.TaskError):
                kind, message = f.value.type, f.value.message
            elif f.check(ChildDied):
                kind, message = "ChildDied", str(f.value)
            else:
                kind, message = type(f.value).__name__, str(f.value)
            self._send(
                "ERROR "
                + dumps({"id": ticket, "job": msg.get("job"), "type": kind, "message": message})
            )

        d.addCallbacks(ok, failed)

    def _send(self, line: str) -> None:
        if not self.lost and not self.transport.disconnecting:
            self.transport.write(line.encode("utf-8") + b"\n")

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost = True
        if self.registered:
            self.log.info("lost the server: {reason}", reason=reason.getErrorMessage())


class WorkerFactory(Factory):
    def __init__(
        self,
        pool: PoolService,
        name: str,
        tasks: list[str],
        slots: int,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        self.pool = pool
        self.name = name
        self.tasks = tasks
        self.slots = slots
        self.max_line = max_line
        self.registrations = 0

    def buildProtocol(self, addr: Any) -> WorkerProtocol:
        return WorkerProtocol(self)
