"""Fake workers: open N connections to a clusterd server that speak the worker protocol.

    python bench/fakeworkers.py --connect 127.0.0.1:7420 --count 1000 --secret-file w.secret

Each connection reads the ``HELLO`` greeting, sends ``AUTH worker <proof>`` (when the server asks
for a worker secret) and ``REGISTER`` with a unique name, ``"tasks": ["inc"]`` and one slot. It
answers ``PING`` with ``OK PONG`` and every ``DO {json}`` at once with
``DONE {"id": <id>, "result": <input + 1>}``, which is the answer of the bench task ``inc``. So
the server does all its usual work per sub-task while the "workers" cost next to nothing.

It is a load tool with bounds: connects and handshakes are limited to ``--concurrency`` at a time
(the listen backlog is small), every handshake step has a timeout, nothing reconnects, and it
exits after ``--max-seconds`` at the latest. It prints ``REGISTERED <n> <seconds>`` once all are
registered, and ``STATS {json}`` when it ends (SIGTERM, SIGINT or the time limit). The exit
status is 1 if any connection failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from clusterd.core.auth import proof


@dataclass
class State:
    connected: int = 0
    registered: int = 0
    done: int = 0
    pings: int = 0
    errors: int = 0
    closed: int = 0


def _json_line(verb: str, obj: object) -> bytes:
    return f"{verb} {json.dumps(obj, separators=(',', ':'))}\n".encode()


async def _handshake(
    i: int, args: argparse.Namespace, secret: bytes | None, state: State
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(args.host, args.port, limit=1 << 24)
    state.connected += 1
    hello = await reader.readline()
    parts = hello.decode("utf-8").rstrip("\r\n").split(" ", 3)
    if parts[:3] != ["HELLO", "clusterd", "1"]:
        raise ConnectionError(f"unexpected greeting {hello[:100]!r}")
    info = json.loads(parts[3]) if len(parts) == 4 else {}
    out = b""
    if "worker" in info.get("auth", ()):
        if secret is None:
            raise ConnectionError("the server wants a worker secret; give --secret-file")
        out += f"AUTH worker {proof(secret, info['nonce'], 'worker')}\n".encode()
    register = {"name": f"{args.prefix}{i}", "tasks": args.tasks, "slots": 1, "protocol": 1}
    writer.write(out + _json_line("REGISTER", register))
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection before REGISTERED")
        if line.startswith(b"OK REGISTERED"):
            state.registered += 1
            return reader, writer
        if line.startswith(b"ERR"):
            raise ConnectionError(line.decode("utf-8", "replace").strip())
        if line.startswith(b"PING"):
            writer.write(b"OK PONG\n")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: State) -> None:
    while True:
        line = await reader.readline()
        if not line:
            state.closed += 1
            return
        if line.startswith(b"DO "):
            msg = json.loads(line[3:])
            writer.write(_json_line("DONE", {"id": msg["id"], "result": msg["input"] + 1}))
            state.done += 1
        elif line.startswith(b"PING"):
            writer.write(b"OK PONG\n")
            state.pings += 1
        elif line.startswith(b"ERR"):
            state.errors += 1
            print(f"fakeworkers: server said {line[:200]!r}", file=sys.stderr, flush=True)
        # CANCEL and OK lines need nothing from a worker that answers at once.


async def _worker(
    i: int,
    args: argparse.Namespace,
    secret: bytes | None,
    state: State,
    gate: asyncio.Semaphore,
) -> None:
    writer = None
    try:
        async with gate:
            reader, writer = await asyncio.wait_for(
                _handshake(i, args, secret, state), args.handshake_timeout
            )
        await _serve(reader, writer, state)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a load tool reports and carries on
        state.errors += 1
        print(f"fakeworkers: worker {args.prefix}{i}: {e!r}", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()


async def _main(args: argparse.Namespace) -> int:
    secret = None
    if args.secret_file:
        with open(args.secret_file, "rb") as fh:
            secret = fh.read().strip()
    state = State()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gate = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(_worker(i, args, secret, state, gate))
        for i in range(args.first, args.first + args.count)
    ]
    announced = False
    deadline = t0 + args.max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        if not announced and state.registered >= args.count:
            announced = True
            print(f"REGISTERED {state.registered} {time.monotonic() - t0:.3f}", flush=True)
        if all(t.done() for t in tasks):
            break
        try:
            await asyncio.wait_for(stop.wait(), 0.02 if not announced else 0.5)
        except TimeoutError:
            pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print("STATS " + json.dumps(asdict(state)), flush=True)
    return 1 if state.errors else 0


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _fan_out(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``--procs`` copies of this tool, each with its share of the connections."""
    share, extra = divmod(args.count, args.procs)
    procs, first = [], args.first
    base = [a for a in argv]
    for k in range(args.procs):
        n = share + (1 if k < extra else 0)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, *base, "--procs", "1", "--first", str(first)]
                + ["--count", str(n)]
            )
        )
        first += n

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for p in procs:
        try:
            status |= p.wait(timeout=args.max_seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            status |= 1
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connect", required=True, help="server address HOST:PORT (loopback)")
    p.add_argument("--count", type=int, default=1000, help="connections to open")
    p.add_argument("--first", type=int, default=1, help="number of the first worker name")
    p.add_argument("--prefix", default="fake", help="worker name prefix")
    p.add_argument("--tasks", default="inc", help="comma-separated task names to register")
    p.add_argument("--secret-file", help="file holding the worker secret")
    p.add_argument("--concurrency", type=int, default=32, help="handshakes at once")
    p.add_argument("--handshake-timeout", type=float, default=30.0)
    p.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long")
    p.add_argument("--procs", type=int, default=1, help="processes to spread connections over")
    args = p.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    args.host, args.port = host.removeprefix("tcp:") or "127.0.0.1", int(port)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.procs > 1:
        stripped = _strip(argv, ("--procs", "--first", "--count"))
        return _fan_out(args, stripped)
    _raise_nofile(args.count + 256)
    return asyncio.run(_main(args))


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the given ``--name value`` / ``--name=value`` options."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
