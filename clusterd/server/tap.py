"""``twistd clusterd-server``: options and the service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

from clusterd import DEFAULT_PORT
from clusterd.config import LayeredOptions
from clusterd.core.framing import DEFAULT_MAX_LINE
from clusterd.options import load_secrets, load_tasks
from clusterd.options import positive_float as _positive_float
from clusterd.options import positive_int as _positive_int

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = f"tcp:{DEFAULT_PORT}:interface=127.0.0.1"
DEFAULT_JOURNAL = "clusterd-journal.sqlite"


class Options(LayeredOptions):
    """The ``twistd clusterd-server`` options; each may also come from ``$CLUSTERD_*`` or the
    ``--config`` TOML file (clusterd/config.py)."""

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
        [
            "journal",
            None,
            DEFAULT_JOURNAL,
            "SQLite file recording accepted jobs, sub-task results and answers, so a restart "
            "loses nothing. 'none' runs without one (nothing survives a restart).",
        ],
        [
            "journal-sync",
            None,
            "full",
            "full: each commit is fsynced, so it survives power loss; normal: it survives a "
            "crash of the server process but not of the machine, for lower latency.",
        ],
        [
            "heartbeat-interval",
            None,
            5.0,
            "Seconds between PINGs to a quiet worker.",
            _positive_float,
        ],
        [
            "heartbeat-timeout",
            None,
            15.0,
            "Seconds of silence after which a worker is declared lost and its sub-tasks requeued.",
            _positive_float,
        ],
        [
            "default-timeout",
            None,
            0.0,
            "Seconds a sub-task may run before it is retried elsewhere, for tasks and jobs "
            "that set none. 0: no limit.",
            float,
        ],
        [
            "stall-factor",
            None,
            20.0,
            "A sub-task with no timeout that runs this many times its task's mean run time "
            "(and at least --stall-min seconds) has stalled: it is retried, and a worker that "
            "answered nothing meanwhile is dropped.",
            _positive_float,
        ],
        [
            "stall-min",
            None,
            60.0,
            "Seconds a sub-task with no timeout may always run before it can count as stalled.",
            _positive_float,
        ],
        [
            "default-attempts",
            None,
            3,
            "Tries per sub-task (task raised, timed out, or its pool process died) before the job "
            "fails, for tasks and jobs that set none.",
            _positive_int,
        ],
        [
            "max-lost",
            None,
            5,
            "Times a sub-task's worker may vanish under it before the job fails (WORKER_LOST).",
            _positive_int,
        ],
        [
            "max-queued",
            None,
            1_000_000,
            "Sub-tasks queued over all jobs; a SUBMIT that would pass it gets ERR BUSY.",
            _positive_int,
        ],
        [
            "max-client-jobs",
            None,
            10_000,
            "Unfinished jobs one connection may have submitted; more gets ERR BUSY.",
            _positive_int,
        ],
        [
            "client-secret-file",
            None,
            None,
            "File holding the secret clients must prove (AUTH client). Also read from "
            "$CLUSTERD_CLIENT_SECRET. Without it, clients need no authentication.",
        ],
        [
            "worker-secret-file",
            None,
            None,
            "File holding the secret workers must prove (AUTH worker). Also read from "
            "$CLUSTERD_WORKER_SECRET. Without it, workers need no authentication.",
        ],
        [
            "auth-timeout",
            None,
            10.0,
            "Seconds a connection may take to authenticate before it is closed.",
            _positive_float,
        ],
        [
            "max-connections",
            None,
            1024,
            "Connections at once, all peers together; more get ERR TOO_MANY_CONNECTIONS.",
            _positive_int,
        ],
        [
            "max-connections-per-ip",
            None,
            64,
            "Connections at once from one address.",
            _positive_int,
        ],
        [
            "max-json-depth",
            None,
            64,
            "Deepest nesting of a request's JSON; deeper gets ERR JSON_TOO_DEEP.",
            _positive_int,
        ],
        [
            "max-result-bytes",
            None,
            64 * 1024 * 1024,
            "Largest encoded job result; larger fails the job with RESULT_TOO_LARGE.",
            _positive_int,
        ],
        [
            "max-input-bytes",
            None,
            1 << 30,
            "Largest streamed job input, in bytes of piece lines; more is INPUT_TOO_LARGE.",
            _positive_int,
        ],
        [
            "prefetch",
            None,
            256,
            "Most sub-tasks per slot a worker may hold queued when a job's sub-tasks are short "
            "(mean under 10 ms, no timeout), and never more than about 50 ms of them: one "
            "message round trip is not paid per tiny sub-task. 1 turns it off.",
            _positive_int,
        ],
        [
            "dispatch-per-turn",
            None,
            16,
            "Most sub-tasks dispatch sends before it lets every other connection have a reactor "
            "turn; the rest follow in the next turn. Lower keeps PING fast under many workers, "
            "higher sends bigger bursts.",
            _positive_int,
        ],
        [
            "http",
            None,
            None,
            "Endpoint for the HTTP API, /metrics and /healthz (docs/HTTP.md), e.g. "
            "tcp:7421:interface=127.0.0.1. Off unless given; binds loopback without interface=.",
        ],
        [
            "speculate-factor",
            None,
            3.0,
            "With --speculate: a running sub-task this many times its job's mean is a straggler.",
            _positive_float,
        ],
    ]
    optFlags = [
        [
            "insecure",
            None,
            "Allow listening on a non-loopback interface without both a client and a worker "
            "secret: anyone who can reach the port may submit jobs or attach a worker. Logged "
            "loudly at start. Without it, such a --listen is refused.",
        ],
        [
            "speculate",
            None,
            "Start backup copies of straggling sub-tasks on idle workers; the first result wins.",
        ],
    ]

    listOptions = ("listen", "tasks")

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:7420, tcp:7420:interface=0.0.0.0, unix:/run/c.sock,
        ssl:7421:privateKey=k.pem:certKey=c.pem. Repeatable. Default: tcp:7420 on 127.0.0.1.
        tcp:, ssl:, mtls: and tcp6: without interface= bind loopback; a non-loopback interface
        needs both secrets (or --insecure)."""
        self["listen"].append(description)

    def opt_tasks(self, module: str) -> None:
        """Python module (import name) defining a TASKS list of clusterd.tasks.Task. Repeatable.
        Workers must load the same module."""
        self["tasks"].append(module)

    def postOptions(self) -> None:
        """Default the listen address, load the secrets and tasks, and refuse an exposed open
        server; raises UsageError."""
        super().postOptions()
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self.secrets = load_secrets(
            self,
            [
                ("client", "client-secret-file", "CLUSTERD_CLIENT_SECRET"),
                ("worker", "worker-secret-file", "CLUSTERD_WORKER_SECRET"),
            ],
        )
        self._check_listen()
        self.registry = load_tasks(self["tasks"])

    def _check_listen(self) -> None:
        """Bind loopback unless an interface is named, and refuse to expose an open server:
        listening where other machines can connect, without both secrets, needs --insecure
        (issue 10 item 12: ``tcp:7420`` used to bind 0.0.0.0 with nothing required)."""
        from clusterd.endpoints import loopback_default

        try:
            addresses = [loopback_default(d) for d in self["listen"]]
        except ValueError as e:
            raise usage.UsageError(f"--listen: {e}") from None
        self["listen"] = [a.description for a in addresses]
        self.exposed = [a.where for a in addresses if a.exposed]
        missing = [r for r in ("client", "worker") if r not in self.secrets]
        if self.exposed and missing and not self["insecure"]:
            raise usage.UsageError(
                f"refusing to listen on {', '.join(self.exposed)} without a "
                f"{' and a '.join(missing)} secret: anyone who can reach it could "
                + (
                    "submit jobs and attach workers"
                    if len(missing) == 2
                    else ("submit jobs" if missing == ["client"] else "attach a worker")
                )
                + ". Give --client-secret-file and --worker-secret-file (or "
                "$CLUSTERD_CLIENT_SECRET and $CLUSTERD_WORKER_SECRET), listen on loopback or "
                "unix:, or pass --insecure to run open on purpose (see SECURITY.md)."
            )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The server's service tree: the scheduler's service and one listener per ``--listen``."""
    if reactor is None:
        from twisted.internet import reactor  # noqa: PLC0415 - only when twistd runs us

    from clusterd.endpoints import listening_service
    from clusterd.server.gcpolicy import GcPolicy
    from clusterd.server.protocol import ConnectionSettings, ServerFactory
    from clusterd.server.service import ServerService, build_core, journal_opener

    top = MultiService()
    core = build_core(options, reactor)
    opener, metrics = journal_opener(options, reactor), None
    if options["http"]:
        from clusterd.server.http.metrics import Metrics

        metrics = Metrics(core)
        opener = metrics.journal_opener(opener)
    ServerService(core, open_journal=opener).setServiceParent(top)
    GcPolicy(reactor).setServiceParent(top)  # short GC pauses with a big heap (gcpolicy.py)
    settings = ConnectionSettings(
        max_line=options["max-line"],
        max_client_jobs=options["max-client-jobs"],
        heartbeat_interval=options["heartbeat-interval"],
        heartbeat_timeout=options["heartbeat-timeout"],
        secrets=options.secrets,
        auth_timeout=options["auth-timeout"],
        max_json_depth=options["max-json-depth"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
    )
    _warn_open_roles(options)
    factory = ServerFactory(core, settings=settings, clock=reactor)
    for description in options["listen"]:
        listening_service(reactor, description, factory).setServiceParent(top)
    if metrics is not None:
        from clusterd.server.http import http_service
        from clusterd.server.http.site import build_site

        site = build_site(core, settings, metrics)
        http_service(reactor, _http_address(options), site).setServiceParent(top)
    return top


def _http_address(options: Options) -> str:
    """``--http`` with clusterd's loopback default; exposing the API without a client secret
    needs --insecure, as for --listen."""
    from clusterd.endpoints import loopback_default

    try:
        address = loopback_default(options["http"])
    except ValueError as e:
        raise usage.UsageError(f"--http: {e}") from None
    if address.exposed and "client" not in options.secrets and not options["insecure"]:
        raise usage.UsageError(
            f"refusing to serve the HTTP API on {address.where} without a client secret "
            "(--client-secret-file), or pass --insecure (see SECURITY.md)."
        )
    return address.description


def _warn_open_roles(options: Options) -> None:
    """Say loudly which roles anyone who can connect may take (no secret for them)."""
    log = Logger(namespace="clusterd.server")
    open_roles = [r for r in ("client", "worker") if r not in options.secrets]
    if open_roles and getattr(options, "exposed", None):
        log.critical(
            "INSECURE (--insecure): listening on {exposed} with no secret for {roles}: anyone "
            "who can reach it over the network may act as {roles} (see SECURITY.md)",
            exposed=", ".join(options.exposed),
            roles=" and ".join(open_roles),
        )
    elif open_roles:
        log.warn(
            "no secret for {roles}: anyone who can reach {listen} may act as {roles} "
            "(see SECURITY.md)",
            roles=" and ".join(open_roles),
            listen=", ".join(options["listen"]),
        )
