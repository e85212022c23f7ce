"""Profile the clusterd server (and optionally a worker) with py-spy during one workload.

    python bench/profile_server.py --workload W1b [--journal none] [--worker] [--out DIR]

Starts the same cluster ``bench/run.py`` starts, warms up, then runs the workload once while
``py-spy record --format raw`` samples the server process (and worker ``w1``). It prints the
top functions by own samples and by cumulative samples (as a share of all samples of the
process, idle epoll included), and the server CPU per job from /proc. The raw collapsed stacks
stay in ``--out`` for a flame graph. py-spy is not a dependency: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchlib import FULL, cpu_seconds
from sys_clusterd import ClusterdSystem


def _py_spy() -> str:
    path = Path(sys.executable).with_name("py-spy")
    found = str(path) if path.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


# Frames every reactor callback runs under (twistd, the main loop, the log context): left out of
# the cumulative list, where they would fill the top with ~100% each.
_WRAPPERS = (
    "(twistd)",
    "(twistd.py)",
    "(app.py)",
    "(_twistd_unix.py)",
    "ReactorBase.run (base.py)",
    "ReactorBase.mainLoop (base.py)",
    "(log.py)",
    "(context.py)",
    "(posixbase.py)",
    "(threading.py)",
)


def top_costs(raw: Path, limit: int = 12) -> str:
    """The top frames of a collapsed-stack file: own samples and cumulative samples, each as a
    share of all the file's samples."""
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] for f in stack.split(";")]
        frames = [f.rstrip(")").rsplit(":", 1)[0] + ")" if "(" in f else f for f in frames]
        own[frames[-1]] += n
        for f in set(frames):
            if not f.endswith(_WRAPPERS):
                cum[f] += n
    out = [f"{total} samples"]
    for title, counter in (("own", own), ("cumulative", cum)):
        out.append(f"-- top by {title} samples --")
        for frame, n in counter.most_common(limit):
            out.append(f"{100 * n / max(total, 1):5.1f}%  {frame}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["W1b", "W3", "S1"], default="W1b")
    parser.add_argument("--workers", type=int, default=FULL.s1_workers, help="S1 fake workers")
    parser.add_argument("--journal", choices=["sqlite", "none"], default="sqlite")
    parser.add_argument("--worker", action="store_true", help="also profile worker w1")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", default=None, help="directory for the raw stacks")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="clusterd-prof-"))
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="clusterd-prof-run-"))
    system = ClusterdSystem("clusterd", args.journal != "none", root, FULL, print)
    spy = _py_spy()
    make = system.w1b if args.workload == "W1b" else system.w3
    jobs = FULL.w1b_jobs if args.workload == "W1b" else FULL.w3_runs
    if args.workload == "S1":
        return profile_s1(system, spy, args, out)
    with make() as (warm, once):
        warm()
        cluster = system.current
        assert cluster is not None and cluster.server is not None
        pid = cluster.server.pid
        targets = {"server": pid}
        if args.worker:
            targets["worker"] = cluster.workers["w1"].pid
        spies = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    str(args.rate),
                    "--nonblocking",
                    "--pid",
                    str(p),
                    "--output",
                    str(out / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, p in targets.items()
        ]
        cpu0 = cpu_seconds(pid)
        metrics = once()
        cpu = cpu_seconds(pid) - cpu0
        for s in spies:
            s.send_signal(2)
            s.wait(60)
    print(f"{args.workload} journal={args.journal}: {metrics}")
    print(f"server CPU per job: {cpu / jobs * 1e6:.0f} us")
    for name in targets:
        print(f"== {name} ({out / (name + '.txt')}) ==")
        print(top_costs(out / f"{name}.txt"))
    system.close()


def profile_s1(system: ClusterdSystem, spy: str, args: argparse.Namespace, out: Path) -> None:
    """S1 (registration and W1 with fake workers): the server is sampled from its start; a
    watcher thread attaches py-spy as soon as the cluster's server process exists."""
    system.sizes = dataclasses.replace(FULL, s1_workers=args.workers)
    spies: list[subprocess.Popen[bytes]] = []

    def attach() -> None:
        while not spies:
            cluster = system.current
            if cluster is not None and cluster.server is not None and cluster.port:
                spies.append(_record(spy, args.rate, cluster.server.pid, out / "server.txt"))
                return
            time.sleep(0.05)

    threading.Thread(target=attach, daemon=True).start()
    with system.s1() as (_warm, once):
        metrics = once()
    for s in spies:
        s.send_signal(2)
        s.wait(60)
    print(f"S1 with {args.workers} fake workers: {metrics}")
    print(top_costs(out / "server.txt"))


def _record(spy: str, rate: int, pid: int, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [spy, "record", "--format", "raw", "--rate", str(rate), "--nonblocking"]
        + ["--pid", str(pid), "--output", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    main()
