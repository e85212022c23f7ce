"""Shared pieces of the benchmark suite: sizes, inputs and answers, timing statistics, memory
readings, and the results file. Nothing here starts a process."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import string
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

WORKLOADS = ["W1", "W1b", "W2", "W3", "W4", "W4r", "B1", "M1", "S1", "Scale"]
SYSTEMS = ["clusterd", "clusterd-nojournal", "sequential", "multiprocessing", "ray", "dask"]
BASELINES = ["sequential", "multiprocessing", "ray", "dask"]
CLUSTERD_SYSTEMS = ["clusterd", "clusterd-nojournal"]

# Which systems run which workload. M1, S1 and Scale measure the clusterd server itself.
APPLIES = {
    "W1": SYSTEMS,
    "W1b": SYSTEMS,
    "W2": SYSTEMS,
    "W3": SYSTEMS,
    "W4": SYSTEMS,
    "W4r": ["clusterd"],  # W4 by reference: the workers read the file (no baseline has this)
    "B1": ["clusterd"],
    "M1": CLUSTERD_SYSTEMS,
    "S1": ["clusterd"],
    "Scale": ["clusterd"],
}

# Known answers for the prime-count sizes used (pi(x)); anything else is computed and checked
# against the sequential run.
PRIMES_BELOW = {3_000_000: 216_816, 30_000: 3_245}


class WrongAnswer(AssertionError):
    """A system returned a different answer from the expected one."""


def check(what: str, got: Any, want: Any) -> None:
    if got != want:
        shown = repr(got)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        raise WrongAnswer(f"{what}: wrong answer {shown}, expected {want!r}"[:600])


@dataclass(frozen=True)
class Sizes:
    w1_n: int = 20_000
    w1b_jobs: int = 20_000
    w1b_window: int = 100
    w2_stop: int = 3_000_000
    w2_chunks: int = 300
    w3_runs: int = 1_000
    w3_warmup: int = 20
    w4_bytes: int = 50_000_000
    w4_chunks: int = 100
    w4_vocab: int = 5_000
    b1_bytes: int = 200_000_000  # B1: the W4 text repeated to this size, streamed
    m1_n: int = 100_000
    m1_big_n: int = 2_000_000  # M1 again at the Scale workload's largest job
    s1_workers: int = 10_000
    s1_w1_n: int = 20_000
    scale_ns: tuple[int, ...] = (2_000, 20_000, 200_000, 2_000_000)
    # Seconds of measured work allowed per (system, workload) before further repeats are
    # dropped (the drop is reported). None: no limit.
    budget: float | None = 40.0
    # A workload whose warm-up predicts a single run longer than this many seconds is skipped
    # (reported); None: never skip.
    max_run: float | None = 150.0


FULL = Sizes()
SMOKE = Sizes(
    w1_n=200,
    w1b_jobs=200,
    w1b_window=20,
    w2_stop=30_000,
    w2_chunks=30,
    w3_runs=50,
    w3_warmup=5,
    w4_bytes=300_000,
    w4_chunks=10,
    w4_vocab=500,
    b1_bytes=1_200_000,  # over the CLI's 1 MiB streaming threshold
    m1_n=2_000,
    m1_big_n=4_000,
    s1_workers=20,
    s1_w1_n=200,
    scale_ns=(100, 1_000, 2_000, 4_000),
    budget=None,
    max_run=None,
)


# -- inputs ------------------------------------------------------------------------------------


def inc_answer(n: int) -> int:
    """The answer to ``inc {"n": n}``: the sum of i + 1 for i in range(n)."""
    return n * (n + 1) // 2


def prime_ranges(stop: int, chunks: int) -> list[tuple[int, int]]:
    """The same ranges the built-in ``primes`` task splits [0, stop) into."""
    from clusterd.tasks.builtins import even_slices

    return even_slices(stop, chunks)


def make_text(nbytes: int, vocab_size: int, seed: int = 20240401) -> str:
    """About ``nbytes`` of space-separated generated lowercase words (ASCII, so bytes == chars).

    The vocabulary is ``vocab_size`` distinct words of 2-10 letters drawn with a Zipf-like
    weighting, so some words are very common and many are rare, as in real text."""
    rng = random.Random(seed)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10)))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    cum = list(_accumulate(1.0 / (r + 1) for r in range(vocab_size)))
    parts: list[str] = []
    size = 0
    while size < nbytes:
        words = rng.choices(vocab, cum_weights=cum, k=200_000)
        piece = " ".join(words)
        parts.append(piece)
        size += len(piece) + 1
    text = " ".join(parts)
    cut = text.rfind(" ", 0, nbytes)
    return text[:cut] if cut > 0 else text


def _accumulate(xs: Iterable[float]) -> Iterable[float]:
    total = 0.0
    for x in xs:
        total += x
        yield total


def wordcount_answer(text: str) -> dict[str, int]:
    return dict(Counter(text.split()))


@dataclass
class TextInput:
    path: Path
    text: str
    answer: dict[str, int]
    mb: float  # megabytes (10**6 bytes)


# -- measurements ------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_metrics(samples_s: list[float], prefix: str = "") -> list[tuple[str, float, str]]:
    s = sorted(samples_s)
    return [(f"{prefix}p{q}_ms", percentile(s, q) * 1e3, "ms") for q in (50, 90, 99)]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (utime + stime from /proc/PID/stat), in seconds: the
    server's own cost of a workload, which the other sessions on a shared machine do not
    inflate the way they inflate wall time."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class OtherLoad:
    """CPU time used by processes outside this benchmark's own process tree (psutil), so that a
    run disturbed by something else on the machine can be told apart. None without psutil."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil = psutil

    def snapshot(self) -> tuple[float, dict[tuple[int, float], float]] | None:
        ps = self.psutil
        if ps is None:
            return None
        me = ps.Process()
        try:
            mine = {me.pid} | {c.pid for c in me.children(recursive=True)}
        except ps.Error:
            mine = {me.pid}
        cpu: dict[tuple[int, float], float] = {}
        for p in ps.process_iter(["create_time", "cpu_times"]):
            times = p.info.get("cpu_times")
            if p.pid in mine or times is None:
                continue
            cpu[(p.pid, p.info.get("create_time") or 0.0)] = times.user + times.system
        return time.monotonic(), cpu

    def percent(self, before, after) -> float | None:
        """Share of the machine's CPU capacity that other processes used between snapshots."""
        if before is None or after is None:
            return None
        wall = after[0] - before[0]
        if wall < 1.0:
            return None  # CPU times tick in 10 ms steps: too coarse for a shorter window
        used = sum(max(0.0, t - before[1].get(k, 0.0)) for k, t in after[1].items())
        return 100.0 * used / (wall * (os.cpu_count() or 1))


@dataclass
class Record:
    workload: str
    system: str
    metric: str
    value: float
    unit: str
    run: int | str
    others_cpu_pct: float | None = None


@dataclass
class Results:
    """Every measurement, kept in memory for the table and appended to a JSON-lines file."""

    out: Path
    run_id: str
    smoke: bool
    commit: str | None = field(default_factory=git_commit)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        workload: str,
        system: str,
        metric: str,
        value: float,
        unit: str,
        run: int | str,
        others_cpu_pct: float | None = None,
    ) -> None:
        rec = Record(workload, system, metric, float(value), unit, run, others_cpu_pct)
        self.records.append(rec)
        line = {
            "workload": workload,
            "system": system,
            "metric": metric,
            "value": rec.value,
            "unit": unit,
            "run": run,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "commit": self.commit,
            "cpus": self.cpus,
            "run_id": self.run_id,
            "smoke": self.smoke,
            "others_cpu_pct": None if others_cpu_pct is None else round(others_cpu_pct, 1),
            "load1": round(os.getloadavg()[0], 2),
        }
        with open(self.out, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def values(self, workload: str, system: str, metric: str) -> list[float]:
        return [
            r.value
            for r in self.records
            if (r.workload, r.system, r.metric) == (workload, system, metric)
            and isinstance(r.run, int)
        ]

    def others(self, workload: str, system: str, metric: str) -> list[float]:
        return [
            r.others_cpu_pct
            for r in self.records
            if (r.workload, r.system, r.metric) == (workload, system, metric)
            and r.others_cpu_pct is not None
        ]

    def median(self, workload: str, system: str, metric: str) -> float | None:
        vals = self.values(workload, system, metric)
        return statistics.median(vals) if vals else None
