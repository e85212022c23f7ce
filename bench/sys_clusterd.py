"""clusterd as a user runs it: real ``twistd`` server and workers on loopback (LocalCluster),
the journal on (or ``--journal none`` for clusterd-nojournal), client and worker secrets from
files, two workers with one slot each."""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    PRIMES_BELOW,
    Sizes,
    TextInput,
    check,
    cpu_seconds,
    inc_answer,
    latency_metrics,
    percentile,
    rss_bytes,
)
from pipeclient import PipeClient

from clusterd.launch import LocalCluster, wait_for

Metrics = list[tuple[str, float, str]]

BENCH_TASKS = ["--tasks", "clusterd_bench_tasks"]
DEFAULT_MAX_SUBTASKS = 100_000  # the server's --max-subtasks default
REQUEST_TIMEOUT = 900.0  # seconds any one reply may take (bounds every wait on a socket)


def clusterd_cli() -> str:
    """The installed ``clusterd`` command beside this interpreter."""
    path = Path(sys.executable).with_name("clusterd")
    if not path.exists():
        raise RuntimeError(f"no clusterd command at {path}; install the package first")
    return str(path)


class ClusterdSystem:
    """One way of running clusterd; each workload gets a fresh cluster."""

    def __init__(
        self,
        name: str,
        journal: bool,
        root: Path,
        sizes: Sizes,
        note: Callable,
        share: bool = False,
    ):
        self.name = name
        # share: W1, W1b, W2, W3 and Scale use one cluster (the smoke run, to save start-ups);
        # otherwise each workload starts its own, so none sees what an earlier one left behind.
        self.share = share
        self._shared: Any = None
        self.journal = journal
        self.root = root
        self.sizes = sizes
        self.note = note
        self._n = 0
        self.current: LocalCluster | None = None
        secret_dir = root / "secrets"
        secret_dir.mkdir(parents=True, exist_ok=True)
        self.client_secret_file = secret_dir / "client.secret"
        self.worker_secret_file = secret_dir / "worker.secret"
        for path in (self.client_secret_file, self.worker_secret_file):
            if not path.exists():
                path.write_text(secrets.token_hex(32) + "\n")
                os.chmod(path, 0o600)
        self.client_secret = self.client_secret_file.read_bytes().strip()

    # -- clusters ------------------------------------------------------------------------------

    @contextmanager
    def cluster(
        self,
        label: str,
        workers: int = 2,
        server_extra: list[str] | None = None,
        worker_extra: list[str] | None = None,
        listen: str | None = None,
    ) -> Iterator[LocalCluster]:
        self._n += 1
        workdir = self.root / f"{self.name}-{self._n:02d}-{label}"
        workdir.mkdir(parents=True)
        server_args = [
            *BENCH_TASKS,
            "--client-secret-file",
            str(self.client_secret_file),
            "--worker-secret-file",
            str(self.worker_secret_file),
            *([] if self.journal else ["--journal", "none"]),
            *(server_extra or []),
        ]
        pythonpath = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
        cluster = LocalCluster(
            workdir,
            server_args=server_args,
            env={"PYTHONPATH": pythonpath},
            client_secret=self.client_secret,
            start_timeout=60,
        )
        self.current = cluster  # the newest cluster, for tools that attach to its processes
        try:
            cluster.start_server(listen=listen)
            for i in range(1, workers + 1):
                cluster.start_worker(
                    f"w{i}",
                    slots=1,
                    extra=[
                        *BENCH_TASKS,
                        "--secret-file",
                        str(self.worker_secret_file),
                        *(worker_extra or []),
                    ],
                )
            if workers:
                cluster.wait_workers(timeout=60)
            yield cluster
        except BaseException:
            log = cluster.log_text("server")[-3000:]
            if log:
                print(f"--- {self.name} server log tail ({workdir}) ---\n{log}", file=sys.stderr)
            raise
        finally:
            cluster.stop()

    @contextmanager
    def standard(self, label: str) -> Iterator[LocalCluster]:
        """The usual cluster (server and two one-slot workers), shared when ``share`` is set."""
        if not self.share:
            with self.cluster(label) as cluster:
                yield cluster
            return
        if self._shared is None:
            manager = self.cluster("shared")
            self._shared = (manager, manager.__enter__())
        yield self._shared[1]

    def close(self) -> None:
        if self._shared is not None:
            manager, self._shared = self._shared[0], None
            manager.__exit__(None, None, None)

    def _client(self, cluster: LocalCluster):
        return cluster.client(timeout=REQUEST_TIMEOUT)

    # -- workloads: each is a context manager yielding (warm_up, run_once) -----------------------

    @contextmanager
    def w1(self) -> Iterator[tuple[Callable, Callable]]:
        n = self.sizes.w1_n
        with self.standard("w1") as cluster, self._client(cluster) as c:

            def warm() -> float:
                """Returns the time one run would take at the warm-up's rate."""
                k = min(200, n)
                t0 = time.perf_counter()
                check("W1 warm-up", c.run("inc", {"n": k}, chunks=k), inc_answer(k))
                return (time.perf_counter() - t0) * n / k

            def once() -> Metrics:
                t0 = time.perf_counter()
                total = c.run("inc", {"n": n}, chunks=n)
                dt = time.perf_counter() - t0
                check(f"W1 inc n={n}", total, inc_answer(n))
                return [("subtasks_per_s", n / dt, "sub-tasks/s"), ("submit_to_result_s", dt, "s")]

            yield warm, once

    @contextmanager
    def w1b(self) -> Iterator[tuple[Callable, Callable]]:
        jobs, window = self.sizes.w1b_jobs, self.sizes.w1b_window
        with self.standard("w1b") as cluster:
            pc = PipeClient("127.0.0.1", cluster.port, self.client_secret, REQUEST_TIMEOUT)
            try:

                def run_jobs(count: int) -> float:
                    lines = (f"RUN plus1 {k}" for k in range(count))
                    t0 = time.perf_counter()
                    got = 0
                    for k, reply in enumerate(pc.pipeline(lines, window)):
                        check(f"W1b job {k}", pc.result(reply), k + 1)
                        got += 1
                    dt = time.perf_counter() - t0
                    check("W1b replies", got, count)
                    return dt

                def warm() -> float:
                    k = min(200, jobs)
                    return run_jobs(k) * jobs / k

                def once() -> Metrics:
                    cpu0 = cpu_seconds(cluster.server.pid)
                    dt = run_jobs(jobs)
                    cpu = cpu_seconds(cluster.server.pid) - cpu0
                    return [
                        ("jobs_per_s", jobs / dt, "jobs/s"),
                        ("elapsed_s", dt, "s"),
                        ("server_cpu_us_per_job", cpu / jobs * 1e6, "us"),
                    ]

                yield warm, once
            finally:
                pc.close()

    @contextmanager
    def w2(self, seq_time: Callable[[], float | None]) -> Iterator[tuple[Callable, Callable]]:
        stop, chunks = self.sizes.w2_stop, self.sizes.w2_chunks
        with self.standard("w2") as cluster, self._client(cluster) as c:

            def warm() -> None:
                check("W2 warm-up", c.run("primes", {"start": 0, "stop": 1000}, chunks=2), 168)

            def once() -> Metrics:
                t0 = time.perf_counter()
                count = c.run("primes", {"start": 0, "stop": stop}, chunks=chunks)
                dt = time.perf_counter() - t0
                check(f"W2 primes below {stop}", count, PRIMES_BELOW[stop])
                out = [("elapsed_s", dt, "s")]
                base = seq_time()
                if base is not None:
                    out.insert(0, ("speedup", base / dt, "x"))
                return out

            yield warm, once

    @contextmanager
    def w3(self) -> Iterator[tuple[Callable, Callable]]:
        runs, warmups = self.sizes.w3_runs, self.sizes.w3_warmup
        line = 'RUN inc {"n":1}'
        with self.standard("w3") as cluster, self._client(cluster) as c:

            def one() -> float:
                t0 = time.perf_counter()
                value = c.request(line).value
                dt = time.perf_counter() - t0
                check("W3 RUN inc n=1", value, 1)
                return dt

            def warm() -> None:
                for _ in range(warmups):
                    one()

            def once() -> Metrics:
                cpu0 = cpu_seconds(cluster.server.pid)
                samples = [one() for _ in range(runs)]
                cpu = cpu_seconds(cluster.server.pid) - cpu0
                return [
                    *latency_metrics(samples),
                    ("server_cpu_us_per_job", cpu / runs * 1e6, "us"),
                ]

            yield warm, once

    def _wordcount_cli(
        self, cluster: LocalCluster, chunks: int | None, source: str = "--file"
    ) -> Callable:
        """``clusterd run wordcount --file PATH`` as a user types it: a file over 1 MiB is
        streamed in pieces (docs/PROTOCOL.md, "Streamed values"). ``source="--input-ref"``:
        the workers read the file themselves ("Inputs by reference")."""
        cmd = [
            clusterd_cli(),
            "--server",
            cluster.address,
            "--secret-file",
            str(self.client_secret_file),
            "run",
            "wordcount",
            "--no-progress",
            *(["--chunks", str(chunks)] if chunks else []),
            source,
        ]

        def run_file(path: Path) -> tuple[Any, float]:
            t0 = time.perf_counter()
            out = subprocess.run([*cmd, str(path)], capture_output=True, timeout=REQUEST_TIMEOUT)
            dt = time.perf_counter() - t0
            if out.returncode != 0:
                raise RuntimeError(
                    f"clusterd run wordcount exited {out.returncode}: "
                    f"{out.stderr.decode(errors='replace')[-1000:]}"
                )
            return json.loads(out.stdout), dt

        return run_file

    @contextmanager
    def w4(self, text: Callable[[], TextInput]) -> Iterator[tuple[Callable, Callable]]:
        with self.cluster("w4") as cluster:
            data = text()
            run_file = self._wordcount_cli(cluster, self.sizes.w4_chunks)

            def warm() -> None:
                small = cluster.workdir / "warm.txt"
                small.write_text("a b a c\n")
                check("W4 warm-up", run_file(small)[0], {"a": 2, "b": 1, "c": 1})

            def once() -> Metrics:
                cpu0 = cpu_seconds(cluster.server.pid)
                counts, dt = run_file(data.path)
                cpu = cpu_seconds(cluster.server.pid) - cpu0
                check("W4 word counts", counts, data.answer)
                return [
                    ("mb_per_s", data.mb / dt, "MB/s"),
                    ("elapsed_s", dt, "s"),
                    ("server_cpu_ms_per_mb", cpu * 1e3 / data.mb, "ms"),
                ]

            yield warm, once

    @contextmanager
    def w4r(self, text: Callable[[], TextInput]) -> Iterator[tuple[Callable, Callable]]:
        """W4 by reference: ``clusterd run wordcount --input-ref PATH`` on the W4 file (written
        once, in the run's temp dir); the server cuts byte ranges, never reading the file, and
        the workers' pool children read them."""
        data = text()
        small = self.root / "w4r-warm.txt"
        small.write_text("a b a c\n")
        # The workers may read these two files and nothing else (a worker reads no input by
        # reference outside its --ref-root; a file is a root of its own).
        roots = ["--ref-root", str(data.path), "--ref-root", str(small)]
        with self.cluster("w4r", worker_extra=roots) as cluster:
            # As a user types it: no --chunks, so the server's default cut (ranges of at most
            # 2 MiB: 24 for 50 MB), and 24 small results to combine instead of W4's 100.
            run_file = self._wordcount_cli(cluster, None, "--input-ref")

            def warm() -> None:
                check("W4r warm-up", run_file(small)[0], {"a": 2, "b": 1, "c": 1})

            def once() -> Metrics:
                counts, dt = run_file(data.path)
                check("W4r word counts", counts, data.answer)
                return [("mb_per_s", data.mb / dt, "MB/s"), ("elapsed_s", dt, "s")]

            yield warm, once

    @contextmanager
    def b1(self, text: Callable[[], TextInput]) -> Iterator[tuple[Callable, Callable]]:
        """B1: a big input (200 MB: the W4 text repeated) streamed by ``clusterd run
        wordcount --file``, with PING timed from another connection the whole time and the
        server's peak memory read at the end."""
        with self.cluster("b1") as cluster:
            data = text()
            repeats = max(1, -(-self.sizes.b1_bytes // data.path.stat().st_size))
            path = cluster.workdir / "b1-text.txt"
            with open(path, "wb") as out, open(data.path, "rb") as one:
                block = one.read()
                for _ in range(repeats):
                    out.write(block + b"\n")  # so no word runs into the next copy
            answer = {w: n * repeats for w, n in data.answer.items()}
            mb = path.stat().st_size / 1e6
            run_file = self._wordcount_cli(cluster, None)
            pid = cluster.server.pid
            base = rss_bytes(pid)

            def warm() -> None:
                small = cluster.workdir / "warm.txt"
                small.write_text("a b a c\n")
                check("B1 warm-up", run_file(small)[0], {"a": 2, "b": 1, "c": 1})

            def once() -> Metrics:
                cpu0 = cpu_seconds(pid)
                with PingSampler(self._client(cluster)) as pings:
                    counts, dt = run_file(path)
                cpu = cpu_seconds(pid) - cpu0
                check("B1 word counts", counts, answer)
                return [
                    ("mb_per_s", mb / dt, "MB/s"),
                    ("server_cpu_ms_per_mb", cpu * 1e3 / mb, "ms"),
                    *pings.metrics(),
                    ("rss_peak_mb", (peak_rss_bytes(pid) - base) / 1e6, "MB"),
                    ("input_mb", mb, "MB"),
                ]

            yield warm, once

    @contextmanager
    def m1(self) -> Iterator[tuple[Callable, Callable]]:
        def warm() -> None:
            pass

        def once() -> Metrics:
            small = self._m1_once(self.sizes.m1_n)
            big = self._m1_once(self.sizes.m1_big_n)
            return [
                ("bytes_per_queued_subtask", small[0], "B"),
                ("bytes_per_queued_subtask_big", big[0], "B"),
                ("rss_before_mib", small[1] / 2**20, "MiB"),
                ("rss_after_mib", small[2] / 2**20, "MiB"),
                ("rss_after_big_mib", big[2] / 2**20, "MiB"),
            ]

        yield warm, once

    def _m1_once(self, n: int) -> tuple[float, int, int]:
        """RSS growth per queued sub-task of one job of ``n`` (no workers, so all stay queued):
        (bytes per sub-task, RSS before, RSS after)."""
        # A fresh server each time: RSS does not shrink, so a second job would reuse memory.
        room = ["--max-subtasks", str(n), "--max-queued", str(max(n + 10, 1_000_000))]
        extra = room if n > DEFAULT_MAX_SUBTASKS else []
        with (
            self.cluster("m1", workers=0, server_extra=extra) as cluster,
            self._client(cluster) as c,
        ):
            pid = cluster.server.pid
            c.submit("inc", {"n": 10}, chunks=10)  # warm the submit path; stays queued
            time.sleep(0.5)
            before = rss_bytes(pid)
            job = c.submit("inc", {"n": n}, chunks=n)
            wait_for(lambda: c.status(job).get("queued") == n, 300, f"{n} sub-tasks to be queued")
            time.sleep(0.5)
            after = rss_bytes(pid)
        return (after - before) / n, before, after

    @contextmanager
    def s1(self) -> Iterator[tuple[Callable, Callable]]:
        count, n = self.sizes.s1_workers, self.sizes.s1_w1_n
        room = str(max(4096, count + 256))  # the fake workers, the clients, and some spare
        limits = ["--max-connections", room, "--max-connections-per-ip", room]
        nofile = raise_nofile(count + 1024)  # inherited by the server and fakeworkers.py
        self.note(
            f"S1 {self.name}: server started with {' '.join(limits)} (defaults 1024 and 64), "
            f"open-file limit {nofile}; {count:,} fake workers from bench/fakeworkers.py in "
            f"{fake_procs(count)} asyncio process(es)"
        )

        def warm() -> None:
            pass

        def once() -> Metrics:
            # A listen backlog that holds every handshake in flight (Twisted's default is 50;
            # a connect beyond it waits for a SYN retransmission, a second or more).
            listen = f"tcp:{{port}}:interface=127.0.0.1:backlog={S1_BACKLOG}"
            with self.cluster("s1", workers=0, server_extra=limits, listen=listen) as cluster:
                return self._s1_once(cluster, count, n)

        yield warm, once

    def _s1_once(self, cluster: LocalCluster, count: int, n: int) -> Metrics:
        pid = cluster.server.pid
        with self._client(cluster) as c:
            check("S1 warm-up ping", c.ping(), "PONG")
            c.stats()
            time.sleep(0.5)
            before = rss_bytes(pid)
            log = open(cluster.workdir / "fakeworkers.log", "wb")
            cpu0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            fake = subprocess.Popen(
                [
                    sys.executable,
                    str(BENCH_DIR / "fakeworkers.py"),
                    "--connect",
                    f"127.0.0.1:{cluster.port}",
                    "--count",
                    str(count),
                    "--secret-file",
                    str(self.worker_secret_file),
                    "--max-seconds",
                    "600",
                    "--procs",
                    str(fake_procs(count)),
                    "--concurrency",
                    str(S1_BACKLOG // 2 // fake_procs(count)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            try:

                def all_registered() -> bool:
                    if fake.poll() is not None:
                        raise RuntimeError(
                            "fakeworkers exited early:\n"
                            + (cluster.workdir / "fakeworkers.log").read_text()[-2000:]
                        )
                    return c.stats()["workers"] >= count  # O(1), unlike WORKERS

                wait_for(all_registered, 300, f"{count} fake workers to register", 0.05)
                register_s = time.perf_counter() - t0
                register_cpu = cpu_seconds(pid) - cpu0
                time.sleep(1.0)
                after = rss_bytes(pid)
                with PingSampler(self._client(cluster)) as sampler:
                    t1, cpu1 = time.perf_counter(), cpu_seconds(pid)
                    total = c.run("inc", {"n": n}, chunks=n)
                    dt, w1_cpu = time.perf_counter() - t1, cpu_seconds(pid) - cpu1
                pings = sampler.samples
                check(f"S1 W1 inc n={n}", total, inc_answer(n))
                lost = c.stats().get("workers_lost", 0)
                if lost:
                    raise RuntimeError(f"S1: {lost} fake workers were lost during the run")
            finally:
                fake.terminate()
                try:
                    fake.wait(30)
                except subprocess.TimeoutExpired:
                    fake.kill()
                    fake.wait()
        pings.sort()
        return [
            ("register_s", register_s, "s"),
            ("register_server_cpu_us", register_cpu / count * 1e6, "us"),
            ("subtasks_per_s", n / dt, "sub-tasks/s"),
            ("w1_server_cpu_us", w1_cpu / n * 1e6, "us"),
            ("kib_per_worker", (after - before) / count / 1024, "KiB"),
            ("ping_p50_ms", percentile(pings, 50) * 1e3, "ms"),
            ("ping_p99_ms", percentile(pings, 99) * 1e3, "ms"),
            ("pings", len(pings), "count"),
        ]

    @contextmanager
    def scale(self, n: int, cluster: LocalCluster) -> Iterator[tuple[Callable, Callable]]:
        with self._client(cluster) as c:

            def warm() -> None:
                check("Scale warm-up", c.run("inc", {"n": 100}, chunks=100), inc_answer(100))

            def once() -> Metrics:
                t0 = time.perf_counter()
                total = c.run("inc", {"n": n}, chunks=n)
                dt = time.perf_counter() - t0
                check(f"Scale inc n={n}", total, inc_answer(n))
                return [(f"us_per_subtask_n{n}", dt / n * 1e6, "us")]

            yield warm, once

    def scale_cluster(self) -> AbstractContextManager[LocalCluster]:
        top = max(self.sizes.scale_ns)
        if top <= DEFAULT_MAX_SUBTASKS:
            return self.standard("scale")
        # The largest job needs room per job and in the queue over all jobs (default 1,000,000).
        room = ["--max-subtasks", str(top), "--max-queued", str(max(top + 1000, 1_000_000))]
        return self.cluster("scale", server_extra=room)


class PingSampler:
    """PINGs a server every 5 ms from its own connection and thread while a workload runs."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.samples: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PingSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()
        if self.errors:
            raise self.errors[0]

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                check("PING", self.client.ping(), "PONG")
                self.samples.append(time.perf_counter() - t)
                self.stop.wait(0.005)
        except BaseException as e:  # noqa: BLE001 - re-raised by __exit__
            self.errors.append(e)

    def metrics(self) -> Metrics:
        pings = sorted(self.samples) or [float("nan")]
        return [
            ("ping_p50_ms", percentile(pings, 50) * 1e3, "ms"),
            ("ping_p99_ms", percentile(pings, 99) * 1e3, "ms"),
            ("ping_max_ms", pings[-1] * 1e3, "ms"),
            ("pings", len(self.samples), "count"),
        ]


S1_BACKLOG = 512  # the S1 server's listen backlog; fakeworkers.py keeps half that in flight


def fake_procs(count: int) -> int:
    """How many fakeworkers.py processes share ``count`` connections: one per 5,000, so the
    load tool itself keeps up with the server (it answers every DO at once)."""
    return max(1, -(-count // 5000))


def raise_nofile(want: int) -> int:
    """Raise this process's open-file limit (soft, up to the hard limit) to ``want``, for the
    bench only: the server and the fake workers started from here inherit it. Returns the
    limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
