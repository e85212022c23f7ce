"""The client verbs, once for both client libraries: how each call's request line is written
and how its reply is read.

:class:`ClientVerbs` defines every public call (``ping`` … ``stats``) on top of two transport
methods a client supplies: ``_send(line, decode, on_progress)`` and ``_send_lines(lines,
decode)``. :class:`clusterd.client.api.Client` returns Deferreds of the decoded value,
:class:`clusterd.client.blocking.BlockingClient` the value itself. A new verb is one method
here. May import :mod:`clusterd.core` and the client's errors and pieces, never a transport.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from clusterd.client.errors import ClusterError
from clusterd.client.pieces import stream_lines
from clusterd.core.auth import proof
from clusterd.core.wire import Reply, dumps, parse_json

__all__ = [
    "ClientVerbs",
    "Decode",
    "ProgressFn",
    "auth_line",
    "job_line",
    "jobs_line",
    "ref_line",
]

ProgressFn = Callable[[str, dict[str, Any]], None]
Decode = Callable[[Reply], Any]


# -- encoders --------------------------------------------------------------------------------


def job_line(verb: str, task: str, value: Any, chunks: int | None = None, **options: Any) -> str:
    """``RUN``/``SUBMIT`` request line: task, input, and the job options that are set
    (``chunks``, ``timeout``, ``attempts``, ``key``)."""
    line = f"{verb} {task} {dumps(value)}"
    opts = {k: v for k, v in {"chunks": chunks, **options}.items() if v is not None}
    if opts:
        line += " " + dumps(opts)
    return line


def ref_line(
    verb: str, task: str, ref: str, size: int, chunks: int | None = None, **options: Any
) -> str:
    """``RUN``/``SUBMIT <task> &``: an input named by reference (a file path the workers can
    read, or an http(s) URL), its ``size`` in bytes, and the job options that are set."""
    opts = {"ref": ref, "size": size, "chunks": chunks, **options}
    return f"{verb} {task} & " + dumps({k: v for k, v in opts.items() if v is not None})


def jobs_line(limit: int | None = None, before: str | None = None) -> str:
    """``JOBS``, with its paging options when any is given."""
    opts = {k: v for k, v in (("limit", limit), ("before", before)) if v is not None}
    return "JOBS " + dumps(opts) if opts else "JOBS"


def auth_line(info: dict[str, Any], secret: bytes | None) -> str | None:
    """The AUTH request a client must send after this greeting, or None if none is needed."""
    if "client" not in info.get("auth", ()):
        return None
    if secret is None:
        raise ClusterError(
            "the server requires a client secret: set $CLUSTERD_SECRET or use --secret-file"
        )
    return "AUTH client " + proof(secret, str(info.get("nonce")), "client")


# -- decoders (the reply has passed raise_for) ----------------------------------------------


def _text(reply: Reply) -> str:
    return reply.text


def _value(reply: Reply) -> Any:
    return reply.value


def _json(reply: Reply) -> Any:
    return parse_json(reply.text, "the reply")


def _state(reply: Reply) -> str:
    return reply.text.split(" ", 1)[-1]


class ClientVerbs:
    """Every client call, written once. Each returns what the client's transport returns for
    the decoded reply: a Deferred (``Client``) or the value (``BlockingClient``); a refused
    request fails with the matching :mod:`clusterd.client.errors` exception."""

    server_info: dict[str, Any]

    def _send(self, line: str, decode: Decode, on_progress: ProgressFn | None = None) -> Any:
        raise NotImplementedError

    def _send_lines(self, lines: Iterator[bytes], decode: Decode) -> Any:
        raise NotImplementedError

    def _max_line(self) -> int:
        """The server's line limit, from its greeting."""
        return int(self.server_info.get("max_line", 16 << 20))

    def ping(self) -> Any:
        """``PING``: the server's answer text (``PONG``)."""
        return self._send("PING", _text)

    def submit(self, task: str, value: Any, chunks: int | None = None, **options: Any) -> Any:
        """Submit a job; its id once the server has durably recorded it. Options:
        ``timeout`` (seconds per sub-task), ``attempts``, ``key`` (idempotent submit)."""
        return self._send(job_line("SUBMIT", task, value, chunks, **options), _text)

    def run(self, task: str, value: Any, chunks: int | None = None, **options: Any) -> Any:
        """Submit a job and get its result (JobFailed / JobCancelled on failure)."""
        return self._send(job_line("RUN", task, value, chunks, **options), _value)

    def submit_stream(
        self, task: str, pieces: Iterable[Any], chunks: int | None = None, **options: Any
    ) -> Any:
        """Submit a job whose input is streamed: ``pieces`` yields JSON arrays (or strings, for
        text tasks) whose concatenation is the input, read lazily as the connection drains.
        Option ``size``: the input's length (items or characters), so ``chunks`` sub-tasks come
        out equal. The job id once the whole input is durably recorded."""
        opts = {"chunks": chunks, **options}
        lines = stream_lines("SUBMIT", task, pieces, opts, dumps, self._max_line())
        return self._send_lines(lines, _text)

    def run_stream(
        self, task: str, pieces: Iterable[Any], chunks: int | None = None, **options: Any
    ) -> Any:
        """:meth:`submit_stream`, then the job's result."""
        opts = {"chunks": chunks, **options}
        lines = stream_lines("RUN", task, pieces, opts, dumps, self._max_line())
        return self._send_lines(lines, _value)

    def submit_ref(
        self, task: str, ref: str, size: int, chunks: int | None = None, **options: Any
    ) -> Any:
        """Submit a job whose input the workers read where it lives: ``ref`` is an absolute
        file path they can see, or an http(s) URL that answers range requests; ``size`` its
        length in bytes. Option ``format``: "text" or "lines" (JSON lines), by default the
        one the task reads. The job id once it is durably recorded."""
        return self._send(ref_line("SUBMIT", task, ref, size, chunks, **options), _text)

    def run_ref(
        self, task: str, ref: str, size: int, chunks: int | None = None, **options: Any
    ) -> Any:
        """:meth:`submit_ref`, then the job's result."""
        return self._send(ref_line("RUN", task, ref, size, chunks, **options), _value)

    def wait(self, job: str) -> Any:
        """The result of a job, once it has ended."""
        return self._send(f"WAIT {job}", _value)

    def watch(self, job: str, on_progress: ProgressFn) -> Any:
        """Call ``on_progress(job, {"done":..,"total":..})`` as the job advances; then its
        result."""
        return self._send(f"WATCH {job}", _value, on_progress)

    def status(self, job: str) -> Any:
        """A job's state and progress (a dict)."""
        return self._send(f"STATUS {job}", _json)

    def cancel(self, job: str) -> Any:
        """Cancel a job; its state afterwards (``cancelled``, or how it had ended)."""
        return self._send(f"CANCEL {job}", _state)

    def jobs(self, limit: int | None = None, before: str | None = None) -> Any:
        """One page of jobs, newest first (the server's default page is 100); pass the last
        id of a page as ``before`` for the next one."""
        return self._send(jobs_line(limit, before), _json)

    def workers(self) -> Any:
        """The connected workers (a list of dicts)."""
        return self._send("WORKERS", _json)

    def tasks(self) -> Any:
        """The tasks the server knows (a list of dicts)."""
        return self._send("TASKS", _json)

    def stats(self) -> Any:
        """The server's counters (a dict)."""
        return self._send("STATS", _json)
