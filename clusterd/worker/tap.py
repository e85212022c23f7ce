"""``twistd clusterd-worker``: options and the service tree."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python import usage

from clusterd import DEFAULT_PORT
from clusterd.core.framing import DEFAULT_MAX_LINE
from clusterd.options import positive_float as _positive_float
from clusterd.options import positive_int as _positive_int

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a clusterd worker: connect to a server, register, and run sub-tasks in a pool of "
        "child processes. Reconnects with backoff whenever the server goes away."
    )
    optParameters = [
        [
            "connect",
            "c",
            f"tcp:127.0.0.1:{DEFAULT_PORT}",
            "Server endpoint, e.g. tcp:host:7420, unix:/run/clusterd.sock, "
            "tls:host:7421:trustRoots=/etc/clusterd/ca.",
        ],
        [
            "slots",
            "s",
            os.cpu_count() or 1,
            "Sub-tasks run at once: one pool process each. Default: CPU count.",
            _positive_int,
        ],
        ["name", "n", None, "Worker name shown in WORKERS. Default: <hostname>-<pid>."],
        [
            "max-reconnect-delay",
            None,
            30.0,
            "Longest wait, in seconds, between attempts to reach the server.",
            _positive_float,
        ],
        [
            "max-line",
            None,
            DEFAULT_MAX_LINE,
            "Longest protocol line accepted, in bytes.",
            _positive_int,
        ],
        [
            "secret-file",
            None,
            None,
            "File holding the worker secret, when the server requires one. Also read from "
            "$CLUSTERD_SECRET. Never passed on the command line, where ps would show it.",
        ],
        [
            "heartbeat-interval",
            None,
            5.0,
            "Seconds between PINGs to a quiet server.",
            _positive_float,
        ],
        [
            "heartbeat-timeout",
            None,
            15.0,
            "Seconds of silence after which the server is presumed gone and we reconnect.",
            _positive_float,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On SIGTERM: seconds to finish the sub-tasks held before handing the rest back.",
            _positive_float,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tasks"] = []

    def opt_tasks(self, module: str) -> None:
        """Python module (import name) defining a TASKS list of clusterd.tasks.Task. Repeatable.
        The server must load the same module."""
        self["tasks"].append(module)

    def postOptions(self) -> None:
        if not self["name"]:
            self["name"] = f"{socket.gethostname()}-{os.getpid()}"
        if any(c.isspace() for c in self["name"]):
            raise usage.UsageError("--name must not contain spaces")
        from clusterd.core.auth import SecretError, load_secret

        try:
            self.secret = load_secret(self["secret-file"], "CLUSTERD_SECRET")
        except SecretError as e:
            raise usage.UsageError(str(e)) from e
        from clusterd.tasks import load_registry

        try:
            self.registry = load_registry(self["tasks"])
        except Exception as e:
            raise usage.UsageError(f"cannot load tasks: {e}") from e


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # noqa: PLC0415 - only when twistd runs us

    from twisted.application.internet import ClientService, backoffPolicy

    from clusterd.tls import client_endpoint
    from clusterd.worker.pool import PoolService
    from clusterd.worker.protocol import WorkerFactory

    top = WorkerService(options["drain-timeout"], reactor)
    pool = PoolService(options["slots"], options["tasks"], reactor)
    pool.setServiceParent(top)
    factory = WorkerFactory(
        pool,
        options["name"],
        options.registry.names(),
        options["slots"],
        options["max-line"],
        clock=reactor,
        heartbeat_interval=options["heartbeat-interval"],
        heartbeat_timeout=options["heartbeat-timeout"],
        secret=options.secret,
        max_delay=options["max-reconnect-delay"],
    )
    try:
        # Our parser: tls: trustRoots read every certificate (*.pem, *.crt, *.cer, bundles).
        endpoint = client_endpoint(reactor, options["connect"])
    except (ValueError, OSError) as e:
        raise SystemExit(f"clusterd-worker: --connect {options['connect']}: {e}") from None
    client = ClientService(
        endpoint,
        factory,
        retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=options["max-reconnect-delay"]),
    )
    client.setName("connection")
    client.setServiceParent(top)
    top.factory = factory
    return top


class WorkerService(MultiService):
    """The worker's service tree. On stop (SIGTERM) it first drains: takes no new sub-tasks and
    finishes those held; only then do the connection and the pool stop (MultiService would
    stop all children at once). What still runs after the timeout is handed back."""

    log = Logger()

    def __init__(self, timeout: float, clock: Any) -> None:
        super().__init__()
        self.timeout = timeout
        self.clock = clock
        self.factory: Any = None

    def stopService(self) -> Deferred[None]:
        d = self._drain()
        return d.addCallback(lambda _: super(WorkerService, self).stopService())

    def _drain(self) -> Deferred[None]:
        self.factory.stopping = True
        proto = self.factory.current
        if proto is None or not proto.registered:
            return succeed(None)
        held = len(proto.running)
        self.log.info(
            "stopping: finishing {n} sub-tasks held (at most {t}s)", n=held, t=self.timeout
        )
        d = proto.drain()
        d.addTimeout(self.timeout, self.clock)

        def gave_up(f: Any) -> None:
            f.trap(TimeoutError)
            self.log.warn(
                "drain timed out; handing {n} sub-tasks back to the server", n=len(proto.running)
            )

        return d.addErrback(gave_up)
