"""The line protocol's server side, by its old import path.

The pieces live in their own modules now: ``connection`` (framing, backpressure, limits, the
auth gate's place, bounded closes), ``replies`` (reply order, paced streamed answers),
``client_session`` / ``client_ops`` (the client verbs), ``worker_session`` (the worker link),
``factory`` and ``limits``. This module re-exports the names other code and tests import.
"""

from __future__ import annotations

from clusterd.core.replies import final_lines, final_reply
from clusterd.server.connection import ServerProtocol
from clusterd.server.factory import ServerFactory
from clusterd.server.limits import (
    JOBS_DEFAULT_LIMIT,
    JOBS_MAX_LIMIT,
    MAX_PENDING_REPLIES,
    MAX_WORKER_SLOTS,
    OFFLOAD_LINE,
    PIECES_PER_TURN,
    PRE_AUTH_MAX_LINE,
    ConnectionSettings,
)

__all__ = [
    "ServerProtocol",
    "ServerFactory",
    "ConnectionSettings",
    "final_reply",
    "final_lines",
    "MAX_WORKER_SLOTS",
    "OFFLOAD_LINE",
    "PIECES_PER_TURN",
    "MAX_PENDING_REPLIES",
    "PRE_AUTH_MAX_LINE",
    "JOBS_DEFAULT_LIMIT",
    "JOBS_MAX_LIMIT",
]
