"""The ``clusterd`` command: submit jobs and inspect a server from a shell.

Exit codes: 0 success; 1 the job failed or was cancelled; 2 bad usage (a bad ``--server`` address
too); 3 the server could not be reached, did not answer within ``--timeout``, or the connection
broke; 4 the server refused the request (``ERR``); 130 (128 + SIGINT) ``run``, ``watch`` or ``wait`` was interrupted
with Ctrl-C (the job goes on unless ``--cancel-on-interrupt``); 141 (128 + SIGPIPE, like other Unix tools) the reader of stdout went away
(``clusterd jobs | head -1``), which is not reported.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

from clusterd.client.cli_input import (
    DEFAULT_SERVER,
    DEFAULT_TIMEOUT,
    ProgressBar,
    UploadBar,
    UsageError,
    build_parser,
    open_stream,
    read_input,
)
from clusterd.client.cli_ref import submit_ref
from clusterd.client.errors import (
    ClusterError,
    InputUnreadable,
    JobCancelled,
    JobFailed,
    RequestRefused,
    ServerTimeout,
)
from clusterd.client.pieces import PIECE_BYTES

__all__ = [
    "main",
    "build_parser",
    "UploadBar",
    "DEFAULT_SERVER",
    "DEFAULT_TIMEOUT",
    "EXIT_OK",
    "EXIT_JOB_FAILED",
    "EXIT_USAGE",
    "EXIT_CONNECTION",
    "EXIT_REFUSED",
]

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_CONNECTION, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for tools killed by it
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for tools stopped by Ctrl-C


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
        _check_endpoint(reactor, args.server)
    except UsageError as e:
        return _report(e)
    args.secret = secret  # for a second connection (CANCEL while WATCH holds the first)
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


def _check_endpoint(reactor: Any, address: str) -> None:
    """Raise UsageError (exit 2, one line) unless ``address`` is an endpoint string the clients
    read: Twisted's client forms, or a bare ``HOST:PORT``."""
    from twisted.internet.endpoints import _parse, clientFromString

    from clusterd.client.blocking import endpoint_string

    try:
        args, _ = _parse(endpoint_string(address))
        if args and str(args[0]).lower() == "tls":
            # Syntax only: a trust directory that cannot be read is a connection problem
            # (exit 3, naming it), reported when connecting, as before.
            if len(args) != 3 or not str(args[2]).isdigit():
                raise ValueError("tls: needs HOST:PORT")
        else:
            clientFromString(reactor, endpoint_string(address))
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(
            f"bad server address {address!r} ({e}); use HOST:PORT, tcp:HOST:PORT, unix:PATH "
            "or tls:HOST:PORT[:trustRoots=DIR]"
        ) from None


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
    if isinstance(e, JobFailed) and e.traceback:
        print(f"remote traceback (from the worker):\n{e.traceback.rstrip()}", file=sys.stderr)
    if isinstance(e, (JobFailed, JobCancelled)):
        return EXIT_JOB_FAILED
    if isinstance(e, (UsageError, InputUnreadable)):
        return EXIT_USAGE
    return EXIT_CONNECTION


async def _job_command(client: Any, args: argparse.Namespace, reactor: Any) -> int:
    """``run``/``submit``: send the input (streamed when big), then print the id or watch."""
    cmd = args.command
    info: dict[str, Any] = {}
    if cmd == "run":  # from here on: Ctrl-C is noticed once the job has an id (below)
        from clusterd.client.top import Interrupt

        interrupt = Interrupt(reactor)
    if args.input is None and not args.input_ref:  # the server checks a ref job's task
        tasks = {t["name"]: t for t in await client.tasks()}
        if args.task not in tasks:
            raise RequestRefused("UNKNOWN_TASK", f"no task named {args.task!r}")
        info = tasks[args.task]
    if args.chunks is not None and args.chunks < 1:
        raise UsageError("--chunks must be a positive integer")
    if getattr(args, "format", None) is not None and not args.input_ref:
        raise UsageError("--format is for an input named by --input-ref")
    options = {"timeout": args.timeout, "attempts": args.attempts, "key": args.key}
    # Pieces well within the server's line limit, even if escaping grows them 8-fold.
    max_line = int(client.server_info.get("max_line", 16 << 20))
    pieces_bytes = max(1024, min(PIECE_BYTES, max_line // 8))
    stream = None if args.input_ref else open_stream(args, info, pieces_bytes)
    if args.input_ref:
        job = await submit_ref(client, args, options)
    elif stream is not None:
        pieces, size = stream
        show = cmd == "run" and sys.stderr.isatty() and not args.no_progress
        source = getattr(args, "upload_source", None)
        upload = UploadBar(sys.stderr, show, getattr(args, "upload_bytes", None), source)
        try:
            job = await client.submit_stream(
                args.task, upload.count(pieces), args.chunks, size=size, **options
            )
        finally:
            upload.close()
    else:
        value = read_input(args, info.get("input") == "text")
        job = await client.submit(args.task, value, args.chunks, **options)
    if cmd == "submit":
        print(job)
        return EXIT_OK
    bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.no_progress)
    try:
        which, result = await _first_of(client.watch(job, bar.update), interrupt.wait())
    finally:
        bar.close()
    if which == 1:
        return await _interrupted(job, args, reactor)
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    _print_json(result, pretty=args.pretty)
    return EXIT_OK


def _first_of(watching: Any, interrupted: Any) -> Any:
    """Fires with (0, the WATCH outcome) or (1, None) on Ctrl-C, whichever comes first.
    (Twisted's ``race`` would wait for the interrupt when the job fails.) A late outcome is
    consumed quietly."""
    from twisted.internet.defer import Deferred

    first: Deferred[tuple[int, Any]] = Deferred()

    def settle(result: Any, which: int) -> None:
        if not first.called:
            first.callback((which, result))

    watching.addBoth(settle, 0)
    interrupted.addCallback(settle, 1)
    return first


async def _interrupted(job: str, args: argparse.Namespace, reactor: Any) -> int:
    """Ctrl-C during ``run``: the job goes on unless ``--cancel-on-interrupt``; say which, and
    how to reattach or cancel. The CANCEL goes on a second connection: the first still waits for
    the WATCH reply, and replies come in request order."""
    if not args.cancel_on_interrupt:
        print(
            f"clusterd: interrupted; job {job} goes on on the server. Reattach: clusterd wait "
            f"{job}   cancel: clusterd cancel {job}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    from clusterd.client.api import connect

    other = await connect(reactor, args.server, args.secret, timeout=args.connect_timeout)
    try:
        state = await other.cancel(job)
    finally:
        other.close()
    print(f"clusterd: interrupted; job {job} {state}", file=sys.stderr)
    return EXIT_INTERRUPTED


async def _follow(client: Any, args: argparse.Namespace, reactor: Any) -> int:
    """``watch``/``wait``: print the job's answer; Ctrl-C leaves the job running, says so and
    exits 130, as ``run`` does (without this, the reactor's own handler would stop with
    nothing said and exit 0, which a script reads as success)."""
    from clusterd.client.top import Interrupt

    interrupt = Interrupt(reactor)
    bar = ProgressBar(sys.stderr, args.command == "watch" and sys.stderr.isatty())
    if args.command == "watch":
        following = client.watch(args.job, bar.update)
    else:
        following = client.wait(args.job)
    try:
        which, result = await _first_of(following, interrupt.wait())
    finally:
        bar.close()
    if which == 1:
        print(
            f"clusterd: interrupted; job {args.job} goes on on the server. "
            f"Cancel: clusterd cancel {args.job}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    _print_json(result, pretty=False)
    return EXIT_OK


async def _command(client: Any, args: argparse.Namespace, reactor: Any = None) -> int:
    cmd = args.command
    if cmd in ("run", "submit"):
        return await _job_command(client, args, reactor)
    if cmd in ("watch", "wait"):
        return await _follow(client, args, reactor)
    if cmd == "status":
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
    elif cmd == "top":
        from clusterd.client.top import run_top

        return await run_top(client, args, reactor)
    else:
        if cmd == "jobs":
            value = await client.jobs(args.limit, args.before)
        else:
            value = await getattr(client, cmd)()
        _print_table(cmd, value, args.json)
    return EXIT_OK


def _print_table(cmd: str, value: Any, as_json: bool) -> None:
    """A JOBS/WORKERS/TASKS/STATS reply: the server's JSON with ``--json`` (as before), else a
    table: boxed and coloured on a terminal, plain columns elsewhere."""
    if as_json:
        _print_json(value)
        return
    from clusterd.client.views import TABLES, render

    terminal = sys.stdout.isatty()
    sys.stdout.write(render(TABLES[cmd](value, terminal), terminal))


def main(argv: list[str] | None = None) -> None:
    """The ``clusterd`` command's entry point: parse ``argv``, run the command on a reactor, exit
    with its code."""
    args = build_parser().parse_args(argv)
    from twisted.internet import defer, task

    def run(reactor: Any) -> defer.Deferred:
        """Run the command on ``reactor``; the Deferred fires with the exit code."""
        return defer.Deferred.fromCoroutine(_main(reactor, args)).addCallback(_exit_code)

    task.react(run)


def _exit_code(code: int) -> None:
    if code:
        raise SystemExit(code)
