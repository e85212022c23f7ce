"""The ``clusterd`` command: submit jobs and inspect a server from a shell.

Exit codes: 0 success; 1 the job failed or was cancelled; 2 bad usage; 3 the server could not be
reached, did not answer within ``--timeout``, or the connection broke; 4 the server refused the
request (``ERR``); 141 (128 + SIGPIPE, like other Unix tools) the reader of stdout went away
(``clusterd jobs | head -1``), which is not reported.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import sys
import time
from typing import Any

from clusterd import DEFAULT_PORT, __version__
from clusterd.client.errors import (
    ClusterError,
    InputUnreadable,
    JobCancelled,
    JobFailed,
    RequestRefused,
    ServerTimeout,
)
from clusterd.client.pieces import PIECE_BYTES, json_array_pieces, text_pieces

__all__ = ["main", "EXIT_OK", "EXIT_JOB_FAILED", "EXIT_USAGE", "EXIT_CONNECTION", "EXIT_REFUSED"]

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_CONNECTION, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for tools killed by it
DEFAULT_SERVER = f"tcp:127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 10.0  # seconds: clusterd.client.api.DEFAULT_TIMEOUT, without importing Twisted


def _timeout(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
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
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        c.add_argument("--chunks", "-n", type=int, help="number of sub-tasks to split into")
        c.add_argument("--timeout", type=float, help="seconds a sub-task may run before a retry")
        c.add_argument("--attempts", type=int, help="tries per sub-task before the job fails")
        c.add_argument("--key", help="idempotency key: resubmitting with it returns the same job")
        if name == "run":
            c.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
            c.add_argument("--pretty", action="store_true", help="indent the JSON result")
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
    for name, helptext in (
        ("workers", "list connected workers"),
        ("tasks", "list tasks and how many worker slots can run each"),
        ("stats", "show server counters"),
        ("ping", "check the server answers"),
    ):
        sub.add_parser(name, help=helptext)
    return p


class ProgressBar:
    """A one-line bar on a terminal, redrawn in place; nothing at all elsewhere."""

    def __init__(self, stream: Any, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.start = time.monotonic()
        self.drawn = False

    def update(self, job: str, progress: dict[str, Any]) -> None:
        if not self.enabled:
            return
        done, total = progress.get("done", 0), progress.get("total", 0) or 1
        width = 30
        filled = width * done // total
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.monotonic() - self.start
        self.stream.write(
            f"\r{job} [{bar}] {done}/{total} {100 * done // total:3d}% {elapsed:6.1f}s"
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class UploadBar(ProgressBar):
    """While a big input streams: how much of it has been sent (of its size, when known)."""

    def __init__(self, stream: Any, enabled: bool, total: int | None) -> None:
        super().__init__(stream, enabled)
        self.total = total
        self.sent = 0
        self.last = -1.0

    def count(self, pieces: Any) -> Any:
        for piece in pieces:
            yield piece
            self.sent += len(piece)
            now = time.monotonic()
            if self.enabled and now - self.last >= 0.2:
                self.last = now
                if self.total:
                    self.update("upload", {"done": min(self.sent, self.total), "total": self.total})
                else:
                    self.stream.write(f"\rupload {self.sent:,} sent {now - self.start:6.1f}s")
                    self.stream.flush()
                    self.drawn = True


def _read_input(args: argparse.Namespace, text_task: bool) -> Any:
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
    pass


class _Prefixed:
    """A byte stream whose first bytes were already read (to see whether it is small)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.rest.read(n)


STREAM_ABOVE = PIECE_BYTES  # inputs larger than this (and stdin) are streamed, when the task can


def _open_stream(
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
    if kind == "text":
        return text_pieces(fh, piece_bytes), nbytes
    pieces = json_array_pieces(fh, piece_bytes)
    try:
        first = next(pieces, [])
    except ValueError as e:
        raise UsageError(f"{args.file} is not a JSON array: {e}") from None
    # Each piece is about piece_bytes of input: the first tells how many items the file holds.
    size = None if nbytes is None else max(len(first), len(first) * nbytes // piece_bytes)
    return itertools.chain([first], pieces), size


def _print_json(value: Any, pretty: bool = True) -> None:
    if pretty:
        print(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        print(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


async def _main(reactor: Any, args: argparse.Namespace) -> int:
    from clusterd.client.api import connect
    from clusterd.core.auth import SecretError, load_secret

    try:
        secret = load_secret(args.secret_file, "CLUSTERD_SECRET")
    except SecretError as e:
        print(f"clusterd: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = await connect(reactor, args.server, secret, timeout=args.connect_timeout)
    except RequestRefused as e:
        return _report(e)
    except Exception as e:
        print(f"clusterd: cannot connect to {args.server}: {e}", file=sys.stderr)
        return EXIT_CONNECTION
    try:
        code = await _command(client, args, reactor)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except (ClusterError, UsageError) as e:
        return _report(e)
    except BrokenPipeError:
        return _stdout_gone()
    except OSError as e:
        if e.errno == errno.EPIPE:
            return _stdout_gone()
        raise
    finally:
        if not client.protocol.closed:
            client.close()


def _stdout_gone() -> int:
    """The reader of our output went away (``| head -1``): stop quietly, as Unix tools do.
    stdout is pointed at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def _report(e: Exception) -> int:
    """Print why the command failed; return the exit code that tells the kind of failure."""
    if isinstance(e, RequestRefused):
        print(f"clusterd: server refused: {e.code} {e.message}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"clusterd: {e}", file=sys.stderr)
    if isinstance(e, (JobFailed, JobCancelled)):
        return EXIT_JOB_FAILED
    if isinstance(e, (UsageError, InputUnreadable)):
        return EXIT_USAGE
    return EXIT_CONNECTION


async def _command(client: Any, args: argparse.Namespace, reactor: Any = None) -> int:
    cmd = args.command
    if cmd in ("run", "submit"):
        info: dict[str, Any] = {}
        if args.input is None:
            tasks = {t["name"]: t for t in await client.tasks()}
            if args.task not in tasks:
                raise RequestRefused("UNKNOWN_TASK", f"no task named {args.task!r}")
            info = tasks[args.task]
        if args.chunks is not None and args.chunks < 1:
            raise UsageError("--chunks must be a positive integer")
        options = {"timeout": args.timeout, "attempts": args.attempts, "key": args.key}
        # Pieces well within the server's line limit, even if escaping grows them 8-fold.
        max_line = int(client.server_info.get("max_line", 16 << 20))
        stream = _open_stream(args, info, max(1024, min(PIECE_BYTES, max_line // 8)))
        if stream is not None:
            pieces, size = stream
            show = cmd == "run" and sys.stderr.isatty() and not args.no_progress
            upload = UploadBar(sys.stderr, show, size if info.get("stream") == "text" else None)
            try:
                job = await client.submit_stream(
                    args.task, upload.count(pieces), args.chunks, size=size, **options
                )
            finally:
                upload.close()
        else:
            value = _read_input(args, info.get("input") == "text")
            job = await client.submit(args.task, value, args.chunks, **options)
        if cmd == "submit":
            print(job)
            return EXIT_OK
        bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.no_progress)
        try:
            result = await client.watch(job, bar.update)
        finally:
            bar.close()
        _print_json(result, pretty=args.pretty)
        return EXIT_OK
    if cmd == "watch":
        bar = ProgressBar(sys.stderr, sys.stderr.isatty())
        try:
            result = await client.watch(args.job, bar.update)
        finally:
            bar.close()
        _print_json(result, pretty=False)
        return EXIT_OK
    if cmd == "wait":
        _print_json(await client.wait(args.job), pretty=False)
    elif cmd == "status":
        _print_json(await client.status(args.job))
    elif cmd == "cancel":
        print(f"{args.job} {await client.cancel(args.job)}")
    elif cmd == "ping":
        # ping checks the server is alive: its answer is bounded by --timeout like the greeting.
        from twisted.internet.defer import TimeoutError as DeferTimeout

        answer = client.ping()
        if reactor is not None:
            answer.addTimeout(args.connect_timeout, reactor)
        try:
            print(await answer)
        except DeferTimeout:
            raise ServerTimeout(
                f"no answer to PING from {args.server} within {args.connect_timeout:g} s"
            ) from None
    elif cmd == "jobs":
        _print_json(await client.jobs(args.limit, args.before))
    else:
        _print_json(await getattr(client, cmd)())
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from twisted.internet import defer, task

    def run(reactor: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(_main(reactor, args)).addCallback(_exit_code)

    task.react(run)


def _exit_code(code: int) -> None:
    if code:
        raise SystemExit(code)
