"""``twistd clusterd-server``: options and the service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

from clusterd import DEFAULT_PORT
from clusterd.core.framing import DEFAULT_MAX_LINE

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = f"tcp:{DEFAULT_PORT}:interface=127.0.0.1"


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be a positive integer")
    return n


def _positive_float(value: str) -> float:
    n = float(value)
    if not n > 0:
        raise ValueError("must be positive")
    return n


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a clusterd server. Workers (twistd clusterd-worker) and clients (clusterd, or nc) "
        "connect to the same port and speak the line protocol in docs/PROTOCOL.md."
    )
    optParameters = [
        [
            "max-line",
            None,
            DEFAULT_MAX_LINE,
            "Longest protocol line accepted, in bytes; longer lines get ERR LINE_TOO_LONG.",
            _positive_int,
        ],
        [
            "max-subtasks",
            None,
            100_000,
            "Most sub-tasks one job may split into; more gets ERR TOO_MANY_SUBTASKS.",
            _positive_int,
        ],
        [
            "retention",
            None,
            3600.0,
            "Seconds a finished job's result stays retrievable with WAIT and STATUS.",
            _positive_float,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["tasks"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:7420, tcp:7420:interface=0.0.0.0, unix:/run/c.sock,
        ssl:7421:privateKey=k.pem:certKey=c.pem. Repeatable. Default: tcp:7420 on 127.0.0.1."""
        self["listen"].append(description)

    def opt_tasks(self, module: str) -> None:
        """Python module (import name) defining a TASKS list of clusterd.tasks.Task. Repeatable.
        Workers must load the same module."""
        self["tasks"].append(module)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from clusterd.tasks import load_registry

        try:
            self.registry = load_registry(self["tasks"])
        except Exception as e:
            raise usage.UsageError(f"cannot load tasks: {e}") from e


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # noqa: PLC0415 - only when twistd runs us

    from clusterd.core.scheduler import Scheduler
    from clusterd.endpoints import listening_service
    from clusterd.server.protocol import ServerFactory
    from clusterd.server.service import ServerService

    top = MultiService()
    core = Scheduler(
        options.registry,
        reactor,
        max_subtasks=options["max-subtasks"],
        retention=options["retention"],
    )
    ServerService(core).setServiceParent(top)
    factory = ServerFactory(core, options["max-line"])
    for description in options["listen"]:
        listening_service(reactor, description, factory).setServiceParent(top)
    return top
