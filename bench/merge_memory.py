"""Server memory and CPU of a wordcount job with many sub-tasks whose results are big: the
figure for merge tasks (results folded into one accumulator as they arrive) against holding
every result until the combine.

    python bench/merge_memory.py [--mb 8] [--chunks 120] [--runs 3]

Each run starts a fresh server (so its peak RSS, VmHWM, is this job's) and two one-slot workers,
runs one wordcount over a text with a large vocabulary (so each sub-task's result is a big
dict), and prints the server's peak RSS and CPU seconds (utime+stime from /proc) for the run.
To compare with another checkout, run it with that checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import cpu_seconds

import clusterd
from clusterd.launch import LocalCluster


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def text_of(mb: float, vocabulary: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    words = [f"w{i:x}" for i in range(vocabulary)]
    out, size = [], 0
    while size < mb * 1e6:
        line = " ".join(rng.choices(words, k=16))
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


def one_run(text: str, chunks: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as d, LocalCluster(Path(d)) as c:
        c.start_server()
        for name in ("w1", "w2"):
            c.start_worker(name, slots=1)
        c.wait_workers()
        pid = c.server.pid
        base_rss, cpu0 = peak_rss_mb(pid), cpu_seconds(pid)
        with c.client(timeout=300) as client:
            merges = any(t.get("merge") for t in client.tasks() if t["name"] == "wordcount")
            start = time.perf_counter()
            answer = client.run("wordcount", text, chunks)
            took = time.perf_counter() - start
        print(f"  server's wordcount merges: {merges}; the run took {took:.2f} s")
        return peak_rss_mb(pid) - base_rss, cpu_seconds(pid) - cpu0, len(answer)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=8)
    p.add_argument("--chunks", type=int, default=120)
    p.add_argument("--vocabulary", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    text = text_of(a.mb, a.vocabulary)
    print(f"clusterd from {Path(clusterd.__file__).parent}")
    rss, cpu = [], []
    for _ in range(a.runs):
        r, t, n = one_run(text, a.chunks)
        rss.append(r)
        cpu.append(t)
        print(f"  peak server RSS growth {r:7.1f} MB   server CPU {t:6.2f} s   ({n} words)")
    print(
        f"median over {a.runs}: peak RSS growth {statistics.median(rss):.1f} MB, "
        f"server CPU {statistics.median(cpu):.2f} s "
        f"({len(text) / 1e6:.1f} MB, {a.chunks} sub-tasks)"
    )


if __name__ == "__main__":
    main()
