"""Per-connection limits and timers: :class:`ConnectionSettings` and the fixed limits.

Shared by the connection, its sessions and the factory; imports nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterd.core.framing import DEFAULT_MAX_LINE
from clusterd.core.jsontext import DEFAULT_MAX_JSON_DEPTH

__all__ = [
    "ConnectionSettings",
    "MAX_WORKER_SLOTS",
    "OFFLOAD_LINE",
    "PIECES_PER_TURN",
    "MAX_PENDING_REPLIES",
    "PRE_AUTH_MAX_LINE",
    "JOBS_DEFAULT_LIMIT",
    "JOBS_MAX_LIMIT",
]

MAX_WORKER_SLOTS = 4096
OFFLOAD_LINE = 1 << 20  # RUN/SUBMIT lines longer than this are parsed and split on a thread
PIECES_PER_TURN = 4  # pieces of a streamed answer written per reactor turn
# Requests read but not yet answered, per connection: past this many pending replies the server
# reads nothing more from that connection until replies drain (docs/PROTOCOL.md, "Pipelining").
MAX_PENDING_REPLIES = 1000
# Before a role is granted (secrets set), a line may be at most this long: AUTH, PING, HELP and
# QUIT are short, and an unauthenticated peer must not make the server hold megabytes.
PRE_AUTH_MAX_LINE = 4096
JOBS_DEFAULT_LIMIT = 100  # JOBS without a limit: the newest 100 jobs
JOBS_MAX_LIMIT = 1000


@dataclass
class ConnectionSettings:
    """Per-connection limits and timers (server options of the same names)."""

    max_line: int = DEFAULT_MAX_LINE
    max_client_jobs: int = 10_000  # unfinished jobs one connection may have submitted
    heartbeat_interval: float = 5.0  # worker connections: PING after this much quiet
    heartbeat_timeout: float = 15.0  # worker connections: declared lost after this much silence
    secrets: dict[str, bytes] = field(default_factory=dict)  # role -> secret; absent role: open
    auth_timeout: float = 10.0  # seconds to authenticate before the connection is closed
    max_auth_failures: int = 3  # failed AUTHs before the connection is closed
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    # A close the server decides (auth timeout, refusal, QUIT, ...) waits this long for the peer
    # (TLS close_notify, a full write buffer) before the socket is aborted.
    close_grace: float = 5.0
    # Failed AUTHs from one address within auth_failure_window seconds after which further AUTHs
    # from it are refused unchecked until the window has passed (across connections).
    max_address_auth_failures: int = 10
    auth_failure_window: float = 60.0


# Connection and session logs keep the namespace they had when one class did it all.
LOG_NAMESPACE = "clusterd.server.protocol.ServerProtocol"
