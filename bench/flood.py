"""Flood: one client pipelines requests without ever reading replies; another times PING.

    python bench/flood.py --runs 5            # prints each run, then the medians
    python bench/flood.py --scenario jobs     # only 1,000 JOBS over 5,000 held jobs

One connection writes ``--submits`` ``SUBMIT sleep 0`` lines, then ``--jobs`` ``JOBS`` lines, on a
non-blocking socket: as fast as the kernel takes them, waiting for room when its buffer is full,
for at most ``--seconds``, and it never reads a reply. Meanwhile a second connection sends
``PING`` and waits for ``OK PONG``, one after another, and the server's resident memory
(``VmRSS`` in ``/proc/<pid>/status``) is sampled every 20 ms. No worker is connected, so every
accepted job stays queued (the per-connection limit, ``--max-client-jobs``, refuses the rest
with ``ERR BUSY``). The ``jobs`` scenario first has the server hold ``--hold`` queued jobs
(submitted normally, replies read), then floods only the ``JOBS`` lines.

Reported per run: PING round trips p50/p99/max (ms) and count, the server's RSS before the flood,
its peak while flooding, and after the flooding connection closed (MB), and how much of the
flood the server took in (bytes). Each run gets a fresh server. Bounded: the flood stops after
``--seconds``; a PING waits at most ``--ping-timeout`` (a PING that waits that long counts as
that long, and pinging stops); the server is killed if its RSS grows past ``--rss-abort`` MB.

``flood_once`` is the scenario; tests/integration/test_flood.py asserts bounds on its figures.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUBMIT_LINE = b"SUBMIT sleep 0\n"
JOBS_LINE = b"JOBS\n"


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class FloodResult:
    pings: int = 0
    ping_p50_ms: float = 0.0
    ping_p99_ms: float = 0.0
    ping_max_ms: float = 0.0
    ping_timed_out: bool = False
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0
    flood_bytes: int = 0
    flood_total_bytes: int = 0
    flood_seconds: float = 0.0
    aborted: bool = False
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("latencies_ms")
        return out


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    while b"\n" not in buf:  # the HELLO greeting
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection before its greeting")
        buf += chunk
    return sock


def _pinger(
    sock: socket.socket, stop: threading.Event, out: list[float], timeout: float, res: FloodResult
) -> None:
    """PING round trips on ``sock`` (greeted already), one at a time, until ``stop``; a PING
    unanswered for ``timeout`` s counts as ``timeout`` and ends the pinging (the connection is
    out of step after it)."""
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            sock.sendall(b"PING\n")
            buf = b""
            try:
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("the server closed the PING connection")
                    buf += chunk
            except TimeoutError:
                out.append(timeout * 1000)
                res.ping_timed_out = True
                return
            out.append((time.perf_counter() - t0) * 1000)
            if buf != b"OK PONG\n":
                raise ConnectionError(f"unexpected reply to PING: {buf[:100]!r}")
    finally:
        sock.close()


def hold_jobs(port: int, n: int) -> None:
    """Have the server hold ``n`` queued jobs (no worker runs them): pipelined SUBMITs whose
    replies are all read, over connections of at most 2,000 jobs each (under the default
    --max-client-jobs), so a JOBS flood that follows has something to list."""
    for first in range(0, n, 2000):
        count = min(2000, n - first)
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            f = sock.makefile("rwb")
            f.readline()  # HELLO
            f.write(SUBMIT_LINE * count)
            f.flush()
            for _ in range(count):
                line = f.readline()
                if not line.startswith(b"OK j"):
                    raise RuntimeError(f"holding jobs: the server said {line[:200]!r}")


def flood_once(
    port: int,
    pid: int,
    submits: int = 20_000,
    jobs: int = 1_000,
    seconds: float = 5.0,
    settle: float = 1.0,
    ping_timeout: float = 10.0,
    rss_abort_mb: float = 1500.0,
    kill: object = None,
) -> FloodResult:
    """Run the flood against a server (``port``, process ``pid``) and measure it. ``kill`` is
    called (no arguments) if the server's RSS passes ``rss_abort_mb`` above where it started."""
    res = FloodResult()
    before = rss_kib(pid)
    res.rss_before_mb = before / 1024
    peak = [before]
    stop_ping, stop_rss = threading.Event(), threading.Event()
    latencies: list[float] = []
    ping_error: list[BaseException] = []

    ping_sock = _connect(port, ping_timeout)  # greeted before the flood begins

    def ping() -> None:
        try:
            _pinger(ping_sock, stop_ping, latencies, ping_timeout, res)
        except BaseException as e:  # reported by the caller
            ping_error.append(e)

    def sample() -> None:
        while not stop_rss.wait(0.02):
            now = rss_kib(pid)
            peak[0] = max(peak[0], now)
            if now - before > rss_abort_mb * 1024 and not res.aborted:
                res.aborted = True
                if callable(kill):
                    kill()

    sampler = threading.Thread(target=sample, name="flood-rss", daemon=True)
    pinger = threading.Thread(target=ping, name="flood-ping", daemon=True)
    sampler.start()
    flooder = _connect(port, 10)
    pinger.start()
    payload = memoryview(SUBMIT_LINE * submits + JOBS_LINE * jobs)
    res.flood_total_bytes = len(payload)
    flooder.setblocking(False)
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < len(payload) and not res.aborted:
            left = seconds - (time.monotonic() - t0)
            if left <= 0:
                break
            try:
                sent += flooder.send(payload[sent : sent + (1 << 16)])
            except BlockingIOError:
                select.select([], [flooder], [], min(left, 0.1))
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    break
                raise
        res.flood_bytes = sent
        # Keep the flood connection open (unread) for the rest of the window: its backlog is
        # the point. Then the settle time, still pinging, still unread.
        rest = seconds - (time.monotonic() - t0)
        if rest > 0 and not res.aborted:
            time.sleep(rest)
        res.flood_seconds = time.monotonic() - t0
        time.sleep(settle)
    finally:
        stop_ping.set()
        pinger.join(timeout=ping_timeout + 5)
        res.rss_peak_mb = peak[0] / 1024
        flooder.close()
    time.sleep(1.0)  # let the server see the close and drop what it held for that connection
    stop_rss.set()
    sampler.join(timeout=5)
    res.rss_after_mb = rss_kib(pid) / 1024
    res.latencies_ms = latencies
    res.pings = len(latencies)
    res.ping_p50_ms = percentile(latencies, 50)
    res.ping_p99_ms = percentile(latencies, 99)
    res.ping_max_ms = max(latencies, default=0.0)
    if ping_error:
        raise RuntimeError(f"the PING connection failed: {ping_error[0]!r}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs, each on a fresh server")
    p.add_argument("--submits", type=int, default=20_000, help="SUBMIT sleep 0 lines")
    p.add_argument("--jobs", type=int, default=1_000, help="JOBS lines after them")
    p.add_argument("--seconds", type=float, default=5.0, help="how long the flood lasts")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of pinging after it")
    p.add_argument("--ping-timeout", type=float, default=30.0, help="longest wait for a PONG")
    p.add_argument("--rss-abort", type=float, default=1500.0, help="MB of growth that kills")
    p.add_argument("--hold", type=int, default=5_000, help="jobs held for the JOBS scenario")
    p.add_argument(
        "--scenario",
        choices=["submits", "jobs", "both"],
        default="both",
        help="submits: --submits SUBMITs then --jobs JOBS on an empty server; jobs: only "
        "--jobs JOBS, over --hold held jobs",
    )
    p.add_argument("--json", action="store_true", help="print each run as a JSON line too")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clusterd.launch import LocalCluster

    scenarios = ["submits", "jobs"] if args.scenario == "both" else [args.scenario]
    for scenario in scenarios:
        submits, hold = (args.submits, 0) if scenario == "submits" else (0, args.hold)
        results: list[FloodResult] = []
        for run in range(1, args.runs + 1):
            with tempfile.TemporaryDirectory(prefix="clusterd-flood-") as tmp:
                cluster = LocalCluster(Path(tmp))
                try:
                    cluster.start_server()
                    assert cluster.server is not None and cluster.port is not None
                    server = cluster.server
                    if hold:
                        hold_jobs(cluster.port, hold)
                    res = flood_once(
                        cluster.port,
                        server.pid,
                        submits,
                        args.jobs,
                        args.seconds,
                        args.settle,
                        args.ping_timeout,
                        args.rss_abort,
                        kill=server.kill,
                    )
                finally:
                    cluster.kill_server()  # a stuck server would not stop on SIGTERM at once
                    cluster.stop()
            results.append(res)
            print(
                f"{scenario} run {run}: PING p50 {res.ping_p50_ms:.2f} ms, "
                f"p99 {res.ping_p99_ms:.2f} ms, max {res.ping_max_ms:.1f} ms over "
                f"{res.pings} pings{' (the last timed out)' if res.ping_timed_out else ''}; "
                f"server RSS {res.rss_before_mb:.0f} MB before, {res.rss_peak_mb:.0f} MB peak, "
                f"{res.rss_after_mb:.0f} MB after; flood {res.flood_bytes}/"
                f"{res.flood_total_bytes} bytes taken in {res.flood_seconds:.1f} s"
                f"{' ABORTED (RSS)' if res.aborted else ''}",
                flush=True,
            )
            if args.json:
                print(json.dumps({"scenario": scenario, **res.summary()}), flush=True)

        def med(attr: str, results: list[FloodResult] = results) -> float:
            return statistics.median(getattr(r, attr) for r in results)

        what = (
            f"{submits} SUBMIT + {args.jobs} JOBS"
            if scenario == "submits"
            else f"{args.jobs} JOBS over {hold} held jobs"
        )
        print(
            f"{scenario} ({what}), median of {len(results)} runs: PING p50 "
            f"{med('ping_p50_ms'):.2f} ms, p99 {med('ping_p99_ms'):.2f} ms, max "
            f"{med('ping_max_ms'):.1f} ms; server RSS {med('rss_before_mb'):.0f} MB before, "
            f"{med('rss_peak_mb'):.0f} MB peak, {med('rss_after_mb'):.0f} MB after",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
