"""Crash consistency: SIGKILL the server at random moments, restart it on the same journal, and
check that every job id a client was ever shown finishes with exactly the right answer.

The rounds aim the kills at the windows issue 10 names: a big one-line job being split on a
thread while a 64-slot worker registers or leaves (so the default chunk count moves under it), a
streamed upload, a big job's combine, and the moment real workers register again after a
restart. Timings come from a seeded RNG; the seed is in every failure message, and
``CLUSTERD_CRASH_SEED=<n>`` replays one. Bounded: 8 kills, waits with deadlines.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    Expected,
    Ledger,
    LineConn,
    SlotWorker,
    expected_wordcount,
    primes_below,
    wait_ready,
    words_text,
)

from clusterd.client.api import job_line
from clusterd.client.errors import ClusterError, JobCancelled, JobFailed, RequestRefused
from clusterd.core.wire import dumps
from clusterd.launch import LocalCluster, wait_for

pytestmark = pytest.mark.integration

SERVER_ARGS = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]
BIG_SUM_N = 1_500_000  # an 11 MB SUBMIT line: parsed and split on the server's thread
BIG_SORT_N = 1_000_000  # a 7 MB line, and a combine (k-way merge) long enough to kill inside


class Crash:
    """One crash run: the cluster, the ledger, the RNG, and the client moves the rounds make."""

    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.cluster = LocalCluster(tmp_path / "run", server_args=SERVER_ARGS)
        (tmp_path / "run").mkdir()
        self.fakes: list[SlotWorker] = []
        self.threads: list[threading.Thread] = []
        self.kills = 0
        self.streams: dict[str, tuple[Expected, str]] = {}  # key -> (expected, text)

    # -- processes ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self.cluster.port is not None
        return self.cluster.port

    def start(self) -> None:
        self.cluster.start_server()
        self.cluster.start_worker("w1", slots=2)
        self.cluster.wait_workers(["w1"])

    def restart(self, wait_worker: bool = True) -> None:
        self.cluster.start_server(self.port)
        wait_ready(self.cluster)
        if wait_worker:
            self.cluster.wait_workers(["w1"], timeout=30)

    def kill(self, why: str) -> None:
        self.cluster.kill_server(signal.SIGKILL)
        self.kills += 1
        self.ledger.note(f"KILL {self.kills}: {why}")
        for t in self.threads:
            t.join(timeout=30)  # their sockets are closed by the kernel: they end at once
        self.threads = []
        for f in self.fakes:
            f.close()
        self.fakes = []

    def fake(self, name: str, slots: int, delay: float) -> SlotWorker:
        f = SlotWorker(self.port, name, slots, delay)
        self.fakes.append(f)
        return f

    # -- client moves (each survives the server dying under it) -------------------------------

    def background(self, fn: Callable[[], None]) -> None:
        t = threading.Thread(target=self._guard, args=(fn,), daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (ClusterError, OSError) as e:
            self.ledger.note(f"connection lost ({type(e).__name__}): nothing shown")

    def submit(self, exp: Expected, value: Any, chunks: int | None = None, **opts: Any) -> None:
        """SUBMIT on a connection of its own; an ``OK jN`` is recorded as shown."""
        with self.cluster.client(timeout=60) as c:
            try:
                job = c.submit(exp.task, value, chunks, **opts)
            except RequestRefused as e:
                self.ledger.note(f"{exp.label} refused: {e.code}")
                return
            self.ledger.show(job, exp, "OK")

    def run(self, exp: Expected, value: Any, chunks: int | None = None) -> None:
        """RUN on a connection of its own; a RESULT is recorded, and must be right already."""
        with self.cluster.client(timeout=120) as c:
            try:
                reply = c.request(job_line("RUN", exp.task, value, chunks))
            except RequestRefused as e:
                self.ledger.note(f"{exp.label} refused: {e.code}")
                return
            except (JobFailed, JobCancelled) as e:
                self.ledger.problems.append(f"RUN {exp.label} ended {type(e).__name__}: {e}")
                return
            assert reply.job is not None
            self.ledger.result(reply.job, exp, reply.value)

    def stream(self, key: str, pieces_sent: threading.Event | None = None, after: int = 0) -> None:
        """A streamed ``SUBMIT wordcount @`` with ``key``, sent in 64 KiB pieces, 15 ms apart;
        ``pieces_sent`` is set once ``after`` pieces went out (the round kills then)."""
        exp, text = self.streams[key]

        def pieces() -> Iterator[str]:
            step = 64 << 10
            for n, start in enumerate(range(0, len(text), step)):
                yield text[start : start + step]
                if pieces_sent is not None and n + 1 == after:
                    pieces_sent.set()
                time.sleep(0.015)

        with self.cluster.client(timeout=60) as c:
            try:
                job = c.submit_stream("wordcount", pieces(), key=key)
            except RequestRefused as e:
                self.ledger.note(f"{exp.label} refused: {e.code}")
                return
            self.ledger.show(job, exp, "OK")

    def status(self, job: str) -> dict[str, Any] | None:
        try:
            with self.cluster.client(timeout=10) as c:
                return c.status(job)
        except (ClusterError, OSError):
            return None

    def big_submit(self, exp: Expected, value: Any, chunks: int | None) -> tuple[LineConn, str]:
        """Write a big one-line SUBMIT on a raw connection and return it (the reply unread), so
        the test acts in the few milliseconds after the newline."""
        conn = LineConn(self.port, timeout=60)
        opts = "" if chunks is None else " " + dumps({"chunks": chunks})
        conn.send(f"SUBMIT {exp.task} {dumps(value)}{opts}")
        return conn, exp.label

    def read_ok(self, conn: LineConn, exp: Expected) -> str | None:
        try:
            line = conn.readline()
        except (OSError, ConnectionError):
            self.ledger.note(f"{exp.label}: connection lost before its reply")
            return None
        if line.startswith("OK "):
            job = line.split()[1]
            self.ledger.show(job, exp, "OK")
            return job
        self.ledger.note(f"{exp.label}: {line[:100]}")
        return None

    def wait_progress(self, job: str, least: int, timeout: float = 30) -> dict[str, Any] | None:
        """Poll STATUS until ``least`` sub-tasks are done (None if the job ended first)."""

        def enough() -> Any:
            s = self.status(job)
            if s is None or s["state"] in ("done", "failed", "cancelled"):
                return {"ended": s}
            return s if s["done"] >= least else None

        out = wait_for(enough, timeout, f"{job} to finish {least} sub-tasks", interval=0.005)
        return None if "ended" in out else out


# -- the rounds ---------------------------------------------------------------------------------


def round_split_with_registration(x: Crash, n: int) -> None:
    """An 11 MB ``SUBMIT sum`` with no chunks; a 64-slot worker registers right after the
    newline (while the line is split on the server's thread); SIGKILL once some, not all,
    sub-tasks are answered (the 64-slot worker answers slowly, the real one at once)."""
    start = n * 7
    exp = Expected(f"big-sum-{n}", "sum", sum(range(start, start + BIG_SUM_N)))
    big = x.fake("big", 64, delay=1.5)
    conn, _ = x.big_submit(exp, list(range(start, start + BIG_SUM_N)), None)
    big.register()
    job = x.read_ok(conn, exp)
    conn.close()
    if job is not None:
        s = x.wait_progress(job, 1)
        x.ledger.note(f"{job}: {s and s['done']}/{s and s['total']} done at the kill")
        time.sleep(x.rng.uniform(0.0, 0.4))
    x.kill(f"{exp.label} split while a 64-slot worker registered")


def round_split_with_leaving(x: Crash, n: int) -> None:
    """A 64-slot worker is registered; an 11 MB ``SUBMIT sum`` with no chunks is written and
    the worker leaves right after the newline; SIGKILL part way through the job."""
    start = 1 + n * 11
    exp = Expected(f"big-sum-{n}", "sum", sum(range(start, start + BIG_SUM_N)))
    big = x.fake("big", 64, delay=30.0)  # holds what it is given: requeued when it leaves
    big.register()
    wait_for(big.registered.is_set, 10, "the 64-slot worker to register")
    conn, _ = x.big_submit(exp, list(range(start, start + BIG_SUM_N)), None)
    big.close()
    job = x.read_ok(conn, exp)
    conn.close()
    if job is not None:
        s = x.wait_progress(job, x.rng.randint(1, 6))
        x.ledger.note(f"{job}: {s and s['done']}/{s and s['total']} done at the kill")
    x.kill(f"{exp.label} split while a 64-slot worker left")


def round_stream(x: Crash, n: int, retry: str | None) -> None:
    """Retry an interrupted streamed upload with its key (it must give the right answer),
    then start another streamed upload and SIGKILL in the middle of it."""
    if retry is not None:
        x.stream(retry)
    key = f"stream-{x.seed}-{n}"
    text = words_text(x.rng, 350_000)  # about 2 MB: 31 pieces of 64 KiB
    x.streams[key] = (Expected(f"stream-{n}", "wordcount", expected_wordcount(text)), text)
    sent = threading.Event()
    x.background(lambda: x.stream(key, sent, after=x.rng.randint(3, 20)))
    sent.wait(timeout=30)
    time.sleep(x.rng.uniform(0.0, 0.01))
    x.kill(f"mid-upload of {key}")
    return None


def round_combine(x: Crash, n: int, chunks: int | None) -> None:
    """A 7 MB ``SUBMIT sort`` (offloaded split); SIGKILL once every sub-task is answered,
    while the server merges them on its thread."""
    values = [x.rng.randrange(10**9) for _ in range(BIG_SORT_N)]
    exp = Expected(f"big-sort-{n}", "sort", sorted(values))
    helper = x.fake(f"fast{n}", 8, delay=0.0)
    helper.register()
    conn, _ = x.big_submit(exp, values, chunks)
    job = x.read_ok(conn, exp)
    conn.close()
    if job is not None:
        s = x.status(job)
        total = s["total"] if s else 1
        s = x.wait_progress(job, total)
        x.ledger.note(f"{job}: {'ended before' if s is None else 'combining at'} the kill")
        time.sleep(x.rng.uniform(0.0, 0.1))
    x.kill(f"{exp.label} combine")


def round_reregister(x: Crash, n: int) -> None:
    """Restart, and before the real worker is back: jobs without chunks, a 64-slot worker
    registering, and SIGKILL within 0.4 s, while workers register again."""
    x.restart(wait_worker=False)
    small = list(range(n, 200_000 + n))
    exp = Expected(f"rereg-sum-{n}", "sum", sum(small))
    x.background(lambda: x.submit(exp, small))
    big = x.fake("big", 64, delay=0.05)
    big.register()
    durations = [0.01] * 40
    x.background(lambda: x.submit(Expected(f"rereg-sleep-{n}", "sleep", durations), durations))
    time.sleep(x.rng.uniform(0.05, 0.4))
    x.kill("while workers registered again")


def round_mixed(x: Crash, n: int) -> None:
    """Small jobs of every built-in task, with and without chunks, RUN and SUBMIT; SIGKILL at
    a random moment among them."""
    rng = x.rng
    a = rng.randrange(0, 50_000)
    primes = {"start": a, "stop": a + 60_000}
    nums = [rng.randrange(-1000, 1000) for _ in range(30_000)]
    text = words_text(rng, 40_000)
    durations = [0.02] * 20
    moves = [
        lambda: x.run(Expected(f"primes-{n}", "primes", primes_below(a, a + 60_000)), primes, 8),
        lambda: x.submit(Expected(f"sum-{n}", "sum", sum(nums)), nums),
        lambda: x.submit(Expected(f"sleep-{n}", "sleep", durations), durations, 10),
        lambda: x.run(Expected(f"sort-{n}", "sort", sorted(nums)), nums),
        lambda: x.submit(Expected(f"wc-{n}", "wordcount", expected_wordcount(text)), text, 4),
    ]
    for move in moves:
        x.background(move)
    time.sleep(rng.uniform(0.05, 0.8))
    x.kill("among small jobs")


def _run_mixed_and_run(x: Crash, n: int) -> None:
    """RUN of the mixed kind whose job shows via RESULT: the run helper wants its value set."""
    values = list(range(n, n + 5000))
    x.run(Expected(f"run-sum-{n}", "sum", sum(values)), values)


def test_every_shown_job_id_survives_random_sigkills_with_its_exact_answer(tmp_path):
    """Across 8 SIGKILLs of the server at random moments (split, upload, combine,
    re-registration) and restarts on the same journal, every job id a client was shown finishes
    with exactly its answer, and no id is ever shown for two different jobs."""
    seed = int(os.environ.get("CLUSTERD_CRASH_SEED", random.randrange(1 << 30)))
    x = Crash(tmp_path, seed)
    began = time.monotonic()
    try:
        x.start()
        round_split_with_registration(x, 1)
        x.restart()
        round_stream(x, 2, retry=None)
        x.restart()
        round_combine(x, 3, chunks=64)
        round_reregister(x, 4)
        x.restart()
        round_split_with_leaving(x, 5)
        x.restart()
        round_stream(x, 6, retry=f"stream-{seed}-2")
        round_reregister(x, 7)
        x.restart()
        _run_mixed_and_run(x, 8)
        round_mixed(x, 8)
        x.restart()
        # The end: every interrupted upload retried with its key, then every id shown waited.
        x.stream(f"stream-{seed}-6")
        helper = x.fake("final", 8, delay=0.0)
        helper.register()
        deadline = time.monotonic() + 60
        with x.cluster.client(timeout=60) as c:
            for job, exp in sorted(x.ledger.shown.items(), key=lambda kv: int(kv[0][1:])):
                if time.monotonic() > deadline:
                    x.ledger.problems.append(f"WAIT {job} ({exp.label}): not checked, 60 s spent")
                    continue
                try:
                    value = c.wait(job)
                except (RequestRefused, JobFailed, JobCancelled) as e:
                    x.ledger.problems.append(
                        f"WAIT {job} ({exp.label}, {exp.task}): {type(e).__name__} {e}"
                    )
                    continue
                if not exp.matches(value):
                    x.ledger.problems.append(
                        f"WAIT {job} ({exp.label}, {exp.task}): wrong answer "
                        f"{exp.describe(value)}, expected {exp.describe(exp.answer)}"
                    )
    finally:
        for f in x.fakes:
            f.close()
        x.cluster.stop()
    elapsed = time.monotonic() - began
    shown = ", ".join(f"{j}={e.label}" for j, e in sorted(x.ledger.shown.items()))
    assert not x.ledger.problems, (
        f"seed={seed} (replay: CLUSTERD_CRASH_SEED={seed}), {x.kills} kills, {elapsed:.0f}s; "
        f"{len(x.ledger.problems)} problems:\n  "
        + "\n  ".join(x.ledger.problems)
        + f"\nids shown: {shown}\nevents:\n  "
        + "\n  ".join(x.ledger.events[-60:])
    )
    assert x.kills == 8
    assert len(x.ledger.shown) >= 8, f"seed={seed}: too few ids shown to mean anything: {shown}"
