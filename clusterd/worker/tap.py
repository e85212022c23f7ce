"""``twistd clusterd-worker``: options and the service tree."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

from clusterd import DEFAULT_PORT
from clusterd.config import LayeredOptions
from clusterd.core.framing import DEFAULT_MAX_LINE
from clusterd.options import load_secrets, load_tasks
from clusterd.options import positive_float as _positive_float
from clusterd.options import positive_int as _positive_int
from clusterd.worker.service import WorkerService

__all__ = ["Options", "makeService", "WorkerService"]


class Options(LayeredOptions):
    """The ``twistd clusterd-worker`` options; each may also come from ``$CLUSTERD_*`` or the
    ``--config`` TOML file (clusterd/config.py)."""

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

    listOptions = ("tasks", "ref-root")

    def opt_tasks(self, module: str) -> None:
        """Python module (import name) defining a TASKS list of clusterd.tasks.Task. Repeatable.
        The server must load the same module."""
        self["tasks"].append(module)

    def opt_ref_root(self, root: str) -> None:
        """A directory (or an http(s) URL prefix) under which inputs by reference may be read;
        repeatable. Without any, a job may name any file this worker can read, or any URL."""
        self["ref-root"].append(root)

    def postOptions(self) -> None:
        """Default the name to host-pid, refuse one with spaces, load the secret and tasks; raises
        UsageError."""
        super().postOptions()
        if not self["name"]:
            self["name"] = f"{socket.gethostname()}-{os.getpid()}"
        if any(c.isspace() for c in self["name"]):
            raise usage.UsageError("--name must not contain spaces")
        secrets = load_secrets(self, [("worker", "secret-file", "CLUSTERD_SECRET")])
        self.secret = secrets.get("worker")
        self.registry = load_tasks(self["tasks"])


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The worker's service tree: the process pool and a reconnecting connection to the server."""
    if reactor is None:
        from twisted.internet import reactor  # noqa: PLC0415 - only when twistd runs us

    from twisted.application.internet import ClientService, backoffPolicy

    from clusterd.tls import client_endpoint
    from clusterd.worker.pool import PoolService
    from clusterd.worker.protocol import WorkerFactory
    from clusterd.worker.refs import ref_root

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
        ref_roots=tuple(ref_root(r) for r in options["ref-root"]),
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
