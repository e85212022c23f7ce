"""The clusterd benchmark suite: one command.

    python bench/run.py [--workloads W1,W2,...] [--systems clusterd,ray,...] [--repeat N]
                        [--smoke] [--out PATH]

It starts real twistd servers and workers on loopback (clusterd.launch.LocalCluster), runs each
workload on each system several times, checks every answer, prints a table of median (min-max)
with ratios against the baselines measured in the same run and the targets, and appends one JSON
line per measurement to bench/results/results.jsonl. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# Task code must import in every process the suite starts: clusterd workers get it through
# LocalCluster(env=...), Ray and Dask workers inherit it from here.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p
)
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from benchlib import (  # noqa: E402
    APPLIES,
    BASELINES,
    FULL,
    SMOKE,
    SYSTEMS,
    WORKLOADS,
    OtherLoad,
    Results,
    Sizes,
    TextInput,
    make_text,
    wordcount_answer,
)

# (metric, label, better): better is "high", "low", or None for information only.
METRICS: dict[str, list[tuple[str, str, str | None]]] = {
    "W1": [
        ("subtasks_per_s", "sub-tasks/s", "high"),
        ("submit_to_result_s", "submit->result s", "low"),
    ],
    "W1b": [
        ("jobs_per_s", "jobs/s", "high"),
        ("elapsed_s", "elapsed s", "low"),
        ("server_cpu_us_per_job", "server CPU us/job", "low"),
    ],
    "W2": [("speedup", "speedup x", "high"), ("elapsed_s", "elapsed s", "low")],
    "W3": [
        ("p50_ms", "p50 ms", "low"),
        ("p90_ms", "p90 ms", "low"),
        ("p99_ms", "p99 ms", "low"),
        ("server_cpu_us_per_job", "server CPU us/job", "low"),
    ],
    "W4": [
        ("mb_per_s", "MB/s", "high"),
        ("elapsed_s", "elapsed s", "low"),
        ("server_cpu_ms_per_mb", "server CPU ms/MB", "low"),
    ],
    "W4r": [
        ("mb_per_s", "MB/s", "high"),
        ("x_sequential", "x sequential W4", "high"),
        ("elapsed_s", "elapsed s", "low"),
    ],
    "B1": [
        ("mb_per_s", "MB/s", "high"),
        ("server_cpu_ms_per_mb", "server CPU ms/MB", "low"),
        ("ping_p50_ms", "PING p50 ms", "low"),
        ("ping_p99_ms", "PING p99 ms", "low"),
        ("ping_max_ms", "PING max ms", "low"),
        ("rss_peak_mb", "server peak RSS growth MB", "low"),
        ("input_mb", "input MB", None),
    ],
    "M1": [
        ("bytes_per_queued_subtask", "B/queued sub-task", "low"),
        ("bytes_per_queued_subtask_big", "B/queued sub-task, big job", "low"),
        ("rss_before_mib", "RSS before MiB", None),
        ("rss_after_mib", "RSS after MiB", None),
    ],
    "S1": [
        ("register_s", "register all s", "low"),
        ("register_server_cpu_us", "server CPU us/registration", "low"),
        ("subtasks_per_s", "W1 sub-tasks/s", "high"),
        ("w1_server_cpu_us", "W1 server CPU us/sub-task", "low"),
        ("kib_per_worker", "KiB/worker", "low"),
        ("ping_p50_ms", "PING p50 ms", "low"),
        ("ping_p99_ms", "PING p99 ms", "low"),
    ],
    "Scale": [],  # filled in from the sizes
}

TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("W1", "subtasks_per_s"): (">=", 30_000),
    ("W1b", "jobs_per_s"): (">=", 5_000),
    ("W2", "speedup"): (">=", 1.90),
    ("W3", "p50_ms"): ("<=", 0.5),
    ("W3", "p99_ms"): ("<=", 2.0),
    ("W4", "mb_per_s"): (">=", 55),
    ("W4r", "x_sequential"): (">=", 1.7),
    ("M1", "bytes_per_queued_subtask"): ("<=", 300),
    ("M1", "bytes_per_queued_subtask_big"): ("<=", 300),
    ("B1", "ping_p99_ms"): ("<=", 10),
    ("S1", "register_s"): ("<=", 10),  # at 10,000 workers (issue 13)
    ("S1", "ping_p99_ms"): ("<=", 20),
    ("S1", "kib_per_worker"): ("<=", 20),
    ("Scale", "ratio"): ("<=", 1.3),
}

BUSY_PCT = 10.0  # runs during which other processes used more CPU than this are flagged

PHASE_ORDER = ["sequential", "multiprocessing", "clusterd", "clusterd-nojournal", "ray", "dask"]


def _pick(value: str | None, known: list[str], what: str) -> list[str]:
    if not value:
        return list(known)
    by_lower = {k.lower(): k for k in known}
    out = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() not in by_lower:
            raise SystemExit(f"unknown {what} {item!r}; known: {', '.join(known)}")
        out.append(by_lower[item.lower()])
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 10_000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes: Sizes = SMOKE if args.smoke else FULL
        self.repeat = 1 if args.smoke else args.repeat
        self.workloads = _pick(args.workloads, WORKLOADS, "workload")
        self.systems = _pick(args.systems, SYSTEMS, "system")
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.t_start = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="clusterd-bench-"))
        run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        self.results = Results(Path(args.out), run_id, bool(args.smoke))
        self._text: TextInput | None = None
        self.load = OtherLoad()
        self.skipped: list[str] = []
        self.max_run = self.sizes.max_run if args.max_run is None else args.max_run
        self.budget = self.sizes.budget if args.budget is None else args.budget
        self.disturbed: list[str] = []
        METRICS["Scale"] = [
            (f"us_per_subtask_n{n}", f"us/sub-task n={n:,}", "low") for n in self.sizes.scale_ns
        ]
        lo, hi = min(self.sizes.scale_ns), max(self.sizes.scale_ns)
        METRICS["Scale"].append(("ratio", f"ratio n={hi:,} vs {lo:,}", "low"))

    # -- helpers -------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print(f"  note: {text}", flush=True)

    def clock(self) -> str:
        s = time.monotonic() - self.t_start
        return f"[{int(s // 60):2d}:{s % 60:04.1f}]"

    def text(self) -> TextInput:
        if self._text is None:
            t0 = time.perf_counter()
            text = make_text(self.sizes.w4_bytes, self.sizes.w4_vocab)
            path = self.root / "w4-text.txt"
            path.write_text(text)
            self._text = TextInput(path, text, wordcount_answer(text), len(text) / 1e6)
            print(
                f"  W4 input: {len(text) / 1e6:.1f} MB, {len(self._text.answer)} distinct "
                f"words, generated in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        return self._text

    def seq_w2_time(self) -> float | None:
        return self.results.median("W2", "sequential", "elapsed_s")

    def measure(
        self,
        workload: str,
        system: str,
        make: Callable[[], AbstractContextManager],
        label: str = "",
    ) -> bool:
        """Warm up once, then run up to --repeat times within the time budget."""
        name = f"{workload} {system}{' ' + label if label else ''}"
        print(f"{self.clock()} {name}", flush=True)
        budget = self.budget
        try:
            with make() as (warm, once):
                predicted = warm()
                cap = self.max_run
                if cap and predicted and predicted > cap:
                    self.skipped.append(f"{workload} {system}")
                    self.note(
                        f"{name}: SKIPPED, because at its warm-up rate one run would take about "
                        f"{predicted:.0f}s (more than {cap:.0f}s); measure it alone with "
                        f"--workloads {workload} --systems {system} --max-run 0"
                    )
                    return True
                spent = 0.0
                for r in range(1, self.repeat + 1):
                    snap = self.load.snapshot()
                    t0 = time.perf_counter()
                    metrics = once()
                    took = time.perf_counter() - t0
                    others = self.load.percent(snap, self.load.snapshot())
                    spent += took
                    for metric, value, unit in metrics:
                        self.results.add(workload, system, metric, value, unit, r, others)
                    shown = ", ".join(f"{m}={fmt(v)}" for m, v, _ in metrics[:3])
                    busy = (
                        f"; others used {others:.0f}% of the CPUs" if others and others >= 1 else ""
                    )
                    print(f"{self.clock()}   run {r}: {shown} ({took:.1f}s{busy})", flush=True)
                    if others is not None and others > BUSY_PCT:
                        self.disturbed.append(f"{name} run {r}: {others:.0f}%")
                    if budget and r < self.repeat and spent + took > budget:
                        self.note(
                            f"{name}: {r} of {self.repeat} repeats, to keep the run short "
                            f"(one run took {took:.0f}s; budget {budget:.0f}s per workload "
                            "and system)"
                        )
                        break
            return True
        except Exception as e:  # noqa: BLE001 - reported loudly, the run goes on
            traceback.print_exc()
            msg = f"{name}: {type(e).__name__}: {e}"
            print(f"!!! FAILED {msg}", file=sys.stderr, flush=True)
            print(f"!!! FAILED {msg}", flush=True)
            self.failures.append(msg)
            return False

    # -- phases --------------------------------------------------------------------------------

    def run(self) -> int:
        from sys_baselines import available

        s = self.sizes
        print(
            f"clusterd bench: {os.cpu_count()} CPUs, commit {self.results.commit}, "
            f"{'SMOKE sizes' if self.args.smoke else 'full sizes'}, repeat {self.repeat}, "
            f"results to {self.results.out}"
        )
        load = os.getloadavg()
        print(f"  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if self.load.psutil is None:
            self.note("psutil is not installed: CPU use by other processes is not tracked")
        elif load[0] > 0.5:
            self.note(
                f"the machine was not idle at the start (1-minute load average {load[0]:.2f}); "
                "the 'others%' column shows how much CPU other processes took during each row"
            )
        print(
            f"  sizes: W1 {s.w1_n:,} sub-tasks; W1b {s.w1b_jobs:,} jobs (<= {s.w1b_window} in "
            f"flight); W2 primes < {s.w2_stop:,} in {s.w2_chunks} ranges; W3 {s.w3_runs:,} RUNs "
            f"after {s.w3_warmup} warm-ups; W4 {s.w4_bytes / 1e6:g} MB in {s.w4_chunks} chunks; "
            f"M1 {s.m1_n:,} and {s.m1_big_n:,} queued; S1 {s.s1_workers:,} fake workers, W1 of {s.s1_w1_n:,}; "
            f"Scale {', '.join(f'{n:,}' for n in s.scale_ns)}",
            flush=True,
        )
        systems = []
        for name in self.systems:
            ok, why = available(name)
            if ok:
                systems.append(name)
            else:
                self.note(why)
        phases: list[tuple[str, list[str]]] = []
        if "W2" in self.workloads and "sequential" not in systems:
            if any(x in APPLIES["W2"] for x in systems):
                phases.append(("sequential", ["W2"]))
                self.note("sequential W2 measured as the baseline for the W2 speedup")
        for name in PHASE_ORDER:
            if name in systems:
                wl = [w for w in self.workloads if name in APPLIES[w]]
                if wl:
                    phases.append((name, wl))
        try:
            for name, wl in phases:
                if name in BASELINES:
                    self.run_baseline(name, wl)
                else:
                    self.run_clusterd(name, wl)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        self.print_table(systems)
        return 1 if self.failures else 0

    def run_baseline(self, name: str, workloads: list[str]) -> None:
        from sys_baselines import BASELINE_CLASSES

        system = BASELINE_CLASSES[name](self.sizes)
        print(f"{self.clock()} starting {name}", flush=True)
        try:
            system.start()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            self.failures.append(f"{name}: could not start: {type(e).__name__}: {e}")
            print(f"!!! FAILED {name} could not start: {e}", flush=True)
            return
        try:
            for w in workloads:
                if w == "W2":
                    base = (lambda: None) if name == "sequential" else self.seq_w2_time
                    self.measure(w, name, lambda base=base: system.w2(base))
                    if name == "sequential":
                        self.add_sequential_speedup()
                elif w == "W4":
                    self.measure(w, name, lambda: system.w4(self.text))
                else:
                    self.measure(w, name, getattr(system, w.lower()))
        finally:
            print(f"{self.clock()} stopping {name}", flush=True)
            system.stop()

    def add_sequential_speedup(self) -> None:
        med = self.seq_w2_time()
        if med is None:
            return
        for rec in list(self.results.records):
            if (rec.workload, rec.system, rec.metric) == ("W2", "sequential", "elapsed_s"):
                self.results.add("W2", "sequential", "speedup", med / rec.value, "x", rec.run)

    def add_ref_ratio(self, name: str) -> None:
        """W4 by reference against sequential W4 of the same run: each run's MB/s over the
        sequential median."""
        seq = self.results.median("W4", "sequential", "mb_per_s")
        if seq is None:
            self.note("W4r: no sequential W4 in this run, so no 'x sequential W4' ratio")
            return
        for rec in list(self.results.records):
            if (rec.workload, rec.system, rec.metric) == ("W4r", name, "mb_per_s"):
                self.results.add("W4r", name, "x_sequential", rec.value / seq, "x", rec.run)

    def run_clusterd(self, name: str, workloads: list[str]) -> None:
        from sys_clusterd import ClusterdSystem

        system = ClusterdSystem(
            name,
            name == "clusterd",
            self.root / name,
            self.sizes,
            note=self.note,
            share=bool(self.args.smoke),
        )
        if self.args.smoke:
            self.note(f"smoke: {name} W1, W1b, W2, W3 and Scale share one cluster")
        try:
            for w in workloads:
                if w == "W2":
                    self.measure(w, name, lambda: system.w2(self.seq_w2_time))
                elif w in ("W4", "W4r", "B1"):
                    self.measure(w, name, lambda w=w: getattr(system, w.lower())(self.text))
                    if w == "W4r":
                        self.add_ref_ratio(name)
                elif w == "Scale":
                    self.run_scale(system)
                else:
                    self.measure(w, name, getattr(system, w.lower()))
        finally:
            system.close()

    def run_scale(self, system) -> None:
        name = system.name
        top = max(self.sizes.scale_ns)
        print(f"{self.clock()} Scale {name}: one server for all sizes (up to {top:,})", flush=True)
        try:
            with system.scale_cluster() as cluster:
                for n in self.sizes.scale_ns:
                    self.measure("Scale", name, lambda n=n: system.scale(n, cluster), f"n={n:,}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            self.failures.append(f"Scale {name}: {type(e).__name__}: {e}")
            return
        lo, hi = min(self.sizes.scale_ns), max(self.sizes.scale_ns)
        a = self.results.median("Scale", name, f"us_per_subtask_n{lo}")
        b = self.results.median("Scale", name, f"us_per_subtask_n{hi}")
        if a and b:
            self.results.add("Scale", name, "ratio", b / a, "x", 1)

    # -- the table -----------------------------------------------------------------------------

    def print_table(self, systems: list[str]) -> None:
        headers = [
            "workload",
            "metric",
            "system",
            "median",
            "(min-max)",
            "runs",
            "clusterd vs this",
            "target",
            "result",
            "others%",
        ]
        rows: list[list[str]] = []
        order = [x for x in SYSTEMS if x in systems or x == "sequential"]
        for w in self.workloads:
            for metric, label, better in METRICS[w]:
                ref = self.results.median(w, "clusterd", metric)
                for system in order:
                    vals = self.results.values(w, system, metric)
                    failed = any(
                        f.startswith((f"{w} {system}:", f"{w} {system} ")) for f in self.failures
                    )
                    if not vals:
                        first = metric == METRICS[w][0][0]
                        if failed and system in APPLIES[w] and first:
                            rows.append([w, label, system, "FAILED", "", "0", "", "", "FAIL", ""])
                        elif f"{w} {system}" in self.skipped and first:
                            rows.append([w, label, system, "skipped", "", "0", "", "", "", ""])
                        continue
                    med = statistics.median(vals)
                    spread = f"({fmt(min(vals))}-{fmt(max(vals))})" if len(vals) > 1 else ""
                    ratio = ""
                    if better and system != "clusterd" and ref is not None and med > 0:
                        r = ref / med if better == "high" else med / ref
                        if r > 0:
                            ratio = f"{r:.3g}x better" if r >= 1 else f"{1 / r:.3g}x worse"
                    target, verdict = "", ""
                    t = TARGETS.get((w, metric))
                    if t is not None and system.startswith("clusterd"):
                        op, goal = t
                        target = f"{op} {fmt(goal)}"
                        ok = med >= goal if op == ">=" else med <= goal
                        verdict = "PASS" if ok else "MISS"
                    busy = self.results.others(w, system, metric)
                    rows.append(
                        [
                            w,
                            label,
                            system,
                            fmt(med),
                            spread,
                            str(len(vals)),
                            ratio,
                            target,
                            verdict,
                            f"{max(busy):.0f}" if busy else "",
                        ]
                    )
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)
        ]
        right = {3, 4, 5, 9}

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                for i, c in enumerate(cells)
            ).rstrip()

        print()
        print("Results: median (min-max) over the runs; 'clusterd vs this' compares the clusterd")
        print("row (journal on, auth on, 2 workers x 1 slot) with each other system, same run;")
        print("'others%' is the most CPU that processes outside the benchmark took during a run.")
        print(line(headers))
        print(line(["-" * w for w in widths]))
        last = None
        for r in rows:
            if last is not None and r[0] != last:
                print()
            last = r[0]
            print(line(r))
        print()
        if self.notes:
            print("Notes:")
            for n in self.notes:
                print(f"  - {n}")
        if self.disturbed:
            print(
                f"Runs during which other processes used more than {BUSY_PCT:.0f}% of the CPUs "
                "(their numbers are pessimistic):"
            )
            print("  " + "; ".join(self.disturbed))
        if self.failures:
            print("FAILURES:")
            for f in self.failures:
                print(f"  - {f}")
        total = time.monotonic() - self.t_start
        print(
            f"Total wall time {total / 60:.1f} min; {len(self.results.records)} measurements "
            f"appended to {self.results.out}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n")[0].rstrip(":")
    )
    p.add_argument("--workloads", help=f"comma list (default all: {','.join(WORKLOADS)})")
    p.add_argument(
        "--systems",
        help=f"comma list (default all available: {','.join(SYSTEMS)})",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per workload (default 3)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes and one run: a quick check it all works"
    )
    p.add_argument(
        "--out",
        default=str(BENCH_DIR / "results" / "results.jsonl"),
        help="JSON-lines file to append to (default bench/results/results.jsonl)",
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds of measured work per workload and system before further repeats are "
        "dropped (default 40 for the full sizes; 0: always --repeat runs)",
    )
    p.add_argument(
        "--max-run",
        type=float,
        help="skip a workload whose warm-up predicts a run longer than this many seconds "
        "(default 150 for the full sizes; 0: never skip)",
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
