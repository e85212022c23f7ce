"""The ``clusterd`` command's argument parser and input side: reading a job's input (whole, or
as pieces to stream) and the progress bars drawn on stderr.

No Twisted and no connection: :mod:`clusterd.client.cli` drives these.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

from clusterd import DEFAULT_PORT, __version__
from clusterd.client.pieces import PIECE_BYTES, byte_pieces, json_array_pieces

__all__ = [
    "build_parser",
    "open_stream",
    "read_input",
    "ProgressBar",
    "UploadBar",
    "UsageError",
    "DEFAULT_SERVER",
    "DEFAULT_TIMEOUT",
]

REF_HELP = (
    "the workers read the input where it lives: a file they can see, or an http(s) URL that "
    "answers range requests (text, or JSON lines for list tasks)"
)
DEFAULT_SERVER = f"tcp:127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 10.0  # seconds: clusterd.client.api.DEFAULT_TIMEOUT, without importing Twisted


def _timeout(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The ``clusterd`` command's argument parser: global options and one sub-command per verb."""
    p = argparse.ArgumentParser(
        prog="clusterd",
        description="Talk to a clusterd server.",
        epilog="Exit codes: 0 ok, 1 job failed or cancelled, 2 usage, 3 connection or timeout, "
        "4 refused, 141 stdout closed early.",
    )
    p.add_argument(
        "--server",
        "-s",
        default=os.environ.get("CLUSTERD_SERVER", DEFAULT_SERVER),
        help=f"server endpoint (default $CLUSTERD_SERVER or {DEFAULT_SERVER}); "
        "tcp:HOST:PORT, unix:PATH, tls:HOST:PORT:trustRoots=DIR",
    )
    p.add_argument(
        "--secret-file",
        help="file holding the client secret, if the server requires one (or set $CLUSTERD_SECRET)",
    )
    p.add_argument(
        "--timeout",
        "--connect-timeout",
        dest="connect_timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up (exit 3) if the server has not accepted, greeted and authenticated us "
        f"within SECONDS, or has not answered ping (default {DEFAULT_TIMEOUT:g}); goes before "
        "COMMAND (after run/submit, --timeout is the sub-task timeout)",
    )
    p.add_argument("--version", action="version", version=f"clusterd {__version__}")
    _add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def _add_commands(sub: Any) -> None:
    """One sub-parser per command; run and submit share their job options."""

    for name, helptext in (
        ("run", "submit a job and print its result (progress bar on a terminal)"),
        ("submit", "submit a job and print its id"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("task", help="task name (see: clusterd tasks)")
        c.add_argument("input", nargs="?", help="job input as JSON")
        c.add_argument(
            "--file",
            "-f",
            help="read the input from a file ('-' for stdin): JSON, or plain text for text tasks",
        )
        c.add_argument("--input-ref", metavar="PATH|URL", help=REF_HELP)
        c.add_argument("--format", choices=("text", "lines"), help="how --input-ref is read")
        c.add_argument("--chunks", "-n", type=int, help="number of sub-tasks to split into")
        c.add_argument("--timeout", type=float, help="seconds a sub-task may run before a retry")
        c.add_argument("--attempts", type=int, help="tries per sub-task before the job fails")
        c.add_argument("--key", help="idempotency key: resubmitting with it returns the same job")
        if name == "run":
            c.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
            c.add_argument("--pretty", action="store_true", help="indent the JSON result")
            c.add_argument(
                "--cancel-on-interrupt",
                action="store_true",
                help="on Ctrl-C cancel the job (default: leave it running and say how to "
                "reattach or cancel it)",
            )
    for name, helptext in (
        ("status", "show a job's state and progress"),
        ("wait", "wait for a job and print its result"),
        ("watch", "show a job's progress until it ends, then its result"),
        ("cancel", "cancel a job"),
    ):
        sub.add_parser(name, help=helptext).add_argument("job", help="job id, e.g. j1")
    jobs = sub.add_parser("jobs", help="list jobs the server holds, newest first")
    jobs.add_argument("--limit", type=int, default=None, help="how many (server default 100)")
    jobs.add_argument("--before", default=None, help="only jobs older than this id (next page)")
    tables = [jobs]
    for name, helptext in (
        ("workers", "list connected workers"),
        ("tasks", "list tasks and how many worker slots can run each"),
        ("stats", "show server counters"),
    ):
        tables.append(sub.add_parser(name, help=helptext))
    for c in tables:
        c.add_argument("--json", action="store_true", help="print the server's JSON, for scripts")
    sub.add_parser("ping", help="check the server answers")
    top = sub.add_parser("top", help="live view of workers, jobs and counters until Ctrl-C")
    top.add_argument("--iterations", type=_count, default=None, metavar="N",
                     help="stop after N refreshes (default: run until Ctrl-C)")  # fmt: skip
    top.add_argument("--interval", type=_timeout, default=1.0, metavar="SECONDS",
                     help="seconds between refreshes (default 1)")  # fmt: skip


def _count(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return n


def _progress(stream: Any, console: Any, *columns: Any) -> Any:
    """A rich Progress drawing on ``stream`` (or ``console``), redrawn only when told: no
    refresh thread runs beside the reactor."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(
        *columns, console=console or Console(file=stream), auto_refresh=False, transient=False
    )


class ProgressBar:
    """A job's progress on a terminal (sub-tasks done of total, elapsed, ETA), drawn with
    rich's Progress; nothing at all when disabled (stderr is not a terminal, --no-progress)."""

    def __init__(self, stream: Any, enabled: bool, console: Any = None) -> None:
        self.bar: Any = None
        self.task: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = _progress(
                stream, console, TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("sub-tasks"), TaskProgressColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )  # fmt: skip

    def update(self, job: str, progress: dict[str, Any]) -> None:
        """Redraw the bar for ``job`` from a PROGRESS object (done, total)."""
        if self.bar is None:
            return
        done, total = progress.get("done", 0), progress.get("total", 0) or 1
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(job, total=total)
        self.bar.update(self.task, completed=done, total=total)
        self.bar.refresh()

    def close(self) -> None:
        """Stop drawing, leaving the last state of the bar on its own line."""
        if self.bar is not None and self.task is not None:
            self.bar.stop()


class UploadBar:
    """While a big input streams: bytes of the file sent (MB), the rate (MB/s) and, when the
    size is known, the time left. ``source`` counts the bytes read from the file (see
    :func:`open_stream`); without one, the length of each text piece is counted."""

    def __init__(
        self,
        stream: Any,
        enabled: bool,
        total: int | None,
        source: Any = None,
        console: Any = None,
    ) -> None:
        self.source, self.sent, self.last = source, 0, -1.0
        self.bar: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = _progress(
                stream, console, TextColumn("upload"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("upload", total=total)

    def count(self, pieces: Any) -> Any:
        """Pass ``pieces`` through, counting what was sent and redrawing the bar at most five
        times a second."""
        for piece in pieces:
            yield piece
            if self.source is not None:
                self.sent = self.source.count
            elif isinstance(piece, str | bytes):
                self.sent += len(piece)
            now = time.monotonic()
            if self.bar is not None and now - self.last >= 0.2:
                self.last = now
                self.bar.update(self.task, completed=self.sent)
                self.bar.refresh()

    def close(self) -> None:
        """Draw the final count and stop drawing."""
        if self.bar is not None:
            self.bar.update(self.task, completed=self.sent)
            self.bar.stop()


def read_input(args: argparse.Namespace, text_task: bool) -> Any:
    """The job's input from the argument, ``--file`` or stdin: text for a text task, else parsed
    JSON; raises UsageError."""
    if args.input is not None and args.file is not None:
        raise UsageError("give the input either as an argument or with --file, not both")
    if args.input is not None:
        try:
            return json.loads(args.input)
        except ValueError as e:
            raise UsageError(f"the input is not valid JSON: {e}") from None
    if args.file is None:
        if sys.stdin.isatty():
            raise UsageError("no input: give it as JSON, with --file PATH, or on stdin")
        args.file = "-"
    if args.file == "-":
        data = getattr(args, "stdin_data", None)
        if data is None:
            data = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise UsageError(f"cannot read {args.file}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{args.file} is not UTF-8 text") from None
    if text_task:
        return text
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"{args.file} is not valid JSON: {e}") from None


class UsageError(Exception):
    """Bad usage of the command (exit code 2): the message says what to give instead."""

    pass


class _Prefixed:
    """A byte stream whose first bytes were already read (to see whether it is small)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes: the already-read head first, then the rest of the stream."""
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.rest.read(n)


class _Counted:
    """A byte stream that counts the bytes read from it: what the upload bar shows."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.count = raw, 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the underlying stream, counted."""
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        """Close the underlying stream."""
        self.raw.close()


STREAM_ABOVE = PIECE_BYTES  # inputs larger than this (and stdin) are streamed, when the task can


def open_stream(
    args: argparse.Namespace, info: dict[str, Any], piece_bytes: int
) -> tuple[Any, int | None] | None:
    """Pieces of a ``--file``/stdin input to stream, and its size (items or characters), when
    the task takes a streamed input and the input is big or of unknown size; else None. The
    file is read as the pieces are sent, never whole."""
    kind = info.get("stream")
    if kind is None or args.input is not None:
        return None
    if args.file is None:
        if sys.stdin.isatty():
            raise UsageError("no input: give it as JSON, with --file PATH, or on stdin")
        args.file = "-"
    if args.file == "-":
        head = sys.stdin.buffer.read(STREAM_ABOVE + 1)
        if len(head) <= STREAM_ABOVE:
            args.stdin_data = head  # small: sent on the request line, as before
            return None
        fh, nbytes = _Prefixed(head, sys.stdin.buffer), None
    else:
        try:
            nbytes = os.path.getsize(args.file)
            if nbytes <= STREAM_ABOVE:
                return None
            fh = open(args.file, "rb")  # noqa: SIM115 - closed when its pieces run out
        except OSError as e:
            raise UsageError(f"cannot read {args.file}: {e.strerror}") from None
    fh = args.upload_source = _Counted(fh)
    args.upload_bytes = nbytes
    if kind == "text":  # the file's bytes as $<n> frames, never decoded here
        return byte_pieces(fh, piece_bytes), nbytes
    pieces = json_array_pieces(fh, piece_bytes)
    try:
        first = next(pieces, [])
    except ValueError as e:
        raise UsageError(f"{args.file} is not a JSON array: {e}") from None
    # Each piece is about piece_bytes of input: the first tells how many items the file holds.
    size = None if nbytes is None else max(len(first), len(first) * nbytes // piece_bytes)
    return itertools.chain([first], pieces), size
