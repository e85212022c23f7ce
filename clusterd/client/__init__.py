"""The clusterd client libraries, importable from here.

    from clusterd.client import BlockingClient            # plain sockets, no reactor
    from clusterd.client import ClusterExecutor           # concurrent.futures, no reactor
    from clusterd.client import connect                   # Deferred-based, on a reactor
    from clusterd.client import AsyncCluster              # asyncio awaitables

Both speak the same calls (:class:`ClientVerbs`) and raise the same errors. The Deferred API
(``Client``, ``ClientProtocol``, ``connect``) is imported on first use, so a script that only
uses :class:`BlockingClient` does not load Twisted.
"""

from __future__ import annotations

from typing import Any

from clusterd.client.blocking import BlockingClient, parse_address
from clusterd.client.errors import (
    ClusterError,
    InputUnreadable,
    JobCancelled,
    JobFailed,
    RemoteTraceback,
    RequestRefused,
    ServerTimeout,
)
from clusterd.client.executor import ClusterExecutor
from clusterd.client.pieces import byte_pieces, json_array_pieces, text_pieces
from clusterd.client.verbs import ClientVerbs, job_line, jobs_line

__all__ = [
    "AsyncCluster",
    "AsyncJob",
    "BlockingClient",
    "Client",
    "ClientProtocol",
    "ClientVerbs",
    "ClusterError",
    "ClusterExecutor",
    "DEFAULT_TIMEOUT",
    "InputUnreadable",
    "JobCancelled",
    "JobFailed",
    "RemoteTraceback",
    "RequestRefused",
    "ServerTimeout",
    "connect",
    "job_line",
    "jobs_line",
    "json_array_pieces",
    "parse_address",
    "text_pieces",
    "byte_pieces",
]

_LAZY = {"Client", "ClientProtocol", "connect", "DEFAULT_TIMEOUT"}
_LAZY_AIO = {"AsyncCluster", "AsyncJob"}  # asyncio costs ~40 ms to import: only when asked


def __getattr__(name: str) -> Any:
    """The Twisted-based names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        from clusterd.client import api

        return getattr(api, name)
    if name in _LAZY_AIO:
        from clusterd.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'clusterd.client' has no attribute {name!r}")
