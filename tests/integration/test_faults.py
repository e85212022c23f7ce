"""Fault injection on real processes: SIGKILL, SIGTERM, hung and poison tasks, silent links.

Every test is bounded: waits poll with deadlines, kill loops have fixed counts.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import SUPPORT, TEST_TASKS
from proxy import FreezableProxy

from clusterd.client.errors import JobFailed
from clusterd.launch import LocalCluster, twistd_path, wait_for

pytestmark = pytest.mark.integration


def _runs(directory: Path) -> Counter[int]:
    path = directory / "runs.log"
    lines = path.read_text().split() if path.exists() else []
    return Counter(int(x) for x in lines)


@pytest.fixture
def fast_cluster(tmp_path: Path):
    """Two one-slot workers, quick heartbeats and reconnects, journal on (the default)."""
    c = LocalCluster(
        tmp_path / "run",
        server_args=[*TEST_TASKS, "--heartbeat-interval", "0.5", "--heartbeat-timeout", "2"],
        env={"PYTHONPATH": SUPPORT},
    )
    (tmp_path / "run").mkdir()
    c.start_server()
    for name in ("w1", "w2"):
        c.start_worker(name, extra=[*TEST_TASKS, "--heartbeat-interval", "0.5"])
    c.wait_workers()
    yield c
    c.stop()


def test_server_sigkill_mid_job_loses_nothing_and_recomputes_nothing(fast_cluster, tmp_path):
    """After SIGKILL of the server mid-job and a restart on the same journal, the accepted jobs
    finish with the right answers, and only sub-tasks the journal lacked run again."""
    c, n = fast_cluster, 150
    with c.client(timeout=60) as client:
        job = client.submit("record", {"n": n, "dir": str(tmp_path), "delay": 0.02}, n)
        queued = client.submit("sum", list(range(10)), 5)
        wait_for(lambda: client.status(job)["done"] >= 40, 60, "40 sub-tasks done")
        sum_left = 0 if client.status(queued)["state"] == "done" else 5
    port = c.port
    c.kill_server(signal.SIGKILL)
    before = sum(_runs(tmp_path).values())
    c.start_server(port)
    c.wait_workers(["w1", "w2"], timeout=60)
    with c.client(timeout=120) as client:
        assert client.wait(job) == sum(range(n))
        assert client.wait(queued) == 45
        status = client.status(job)
        dispatched = client.stats()["subtasks_dispatched"]
    assert status["recovered"] >= 30
    # The restarted server dispatched exactly what the journal did not hold...
    assert dispatched == n - status["recovered"] + sum_left
    runs = _runs(tmp_path)
    assert set(runs) == set(range(n))
    # ...and no sub-task the journal held ran again: each extra run is one that was in flight
    # (or answered but not yet committed) when the server died.
    rerun = sum(runs.values()) - n
    assert rerun <= before - status["recovered"] + 2


def test_server_sigterm_flushes_journal_and_resumes(fast_cluster, tmp_path):
    """SIGTERM stops the server cleanly; on restart the unfinished job resumes and completes."""
    c, n = fast_cluster, 60
    with c.client(timeout=60) as client:
        job = client.submit("record", {"n": n, "dir": str(tmp_path), "delay": 0.03}, n)
        wait_for(lambda: client.status(job)["done"] >= 10, 60, "10 sub-tasks done")
    port = c.port
    c.kill_server(signal.SIGTERM)
    assert "journal flushed" in c.log_text("server")
    c.start_server(port)
    c.wait_workers(["w1", "w2"], timeout=60)
    with c.client(timeout=60) as client:
        assert client.wait(job) == sum(range(n))
        assert client.status(job)["recovered"] >= 10


def test_hung_task_times_out_and_is_retried(fast_cluster, tmp_path):
    """A sub-task that hangs past its timeout is cancelled (its pool process killed) and
    retried; the job still succeeds and the worker keeps serving."""
    with fast_cluster.client(timeout=60) as client:
        job = client.submit("hang_once", str(tmp_path), None, timeout=1, attempts=3)
        assert client.wait(job) == "ok"
        stats = client.stats()
        assert stats["subtasks_timed_out"] == 1
        assert stats["subtasks_retried"] == 1
        assert client.run("sum", [1, 2, 3], 3) == 6


def test_dead_pool_process_is_reported_and_the_worker_keeps_serving(fast_cluster, tmp_path):
    """A pool process that dies mid-task (os._exit) is reported as ChildDied, replaced, and the
    sub-task retried; the worker stays registered and serving."""
    with fast_cluster.client(timeout=60) as client:
        assert client.run("die_once", str(tmp_path), None, attempts=2) == "survived"
        stats = client.stats()
        assert stats["subtasks_retried"] == 1
        assert stats["workers_lost"] == 0
        assert {w["name"] for w in client.workers()} == {"w1", "w2"}
        assert client.run("sum", list(range(10)), 10) == 45


def test_poison_task_fails_its_job_and_other_jobs_keep_running(fast_cluster):
    """A sub-task failing on every attempt fails its job with the last error; a job running
    beside it completes correctly."""
    with fast_cluster.client(timeout=60) as client:
        other = client.submit("sleep", [0.05] * 20, 20)
        poison = client.submit("fail", "x", 4, attempts=2)
        with pytest.raises(JobFailed) as e:
            client.wait(poison)
        assert e.value.code == "TASK_ERROR"
        assert e.value.error["type"] == "ValueError"
        assert e.value.error["attempts"] == 2
        assert client.wait(other) == [0.05] * 20


def test_sigterm_worker_finishes_what_it_holds_then_exits(fast_cluster):
    """SIGTERM on a worker: it takes nothing new, finishes its sub-task, then exits; nothing
    it held had to be requeued."""
    c = fast_cluster
    with c.client(timeout=60) as client:
        job = client.submit("sleep", [1.0] * 6, 6)
        wait_for(
            lambda: any(w["name"] == "w1" and w["busy"] for w in client.workers()),
            30,
            "w1 to hold a sub-task",
        )
        proc = c.workers.pop("w1")
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises the signal after a clean shutdown, so the status is -SIGTERM.
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert client.wait(job) == [1.0] * 6
        status = client.status(job)
    assert status["requeued"] == 0
    assert status["ran_on"]["w1"] >= 1
    assert "draining" in c.log_text("server")
    assert "stopping: finishing" in c.log_text("worker-w1")
    assert "Main loop terminated" in c.log_text("worker-w1")


def test_silent_link_worker_declared_lost_and_work_finishes_elsewhere(fast_cluster):
    """A worker behind a link that goes silent without closing is declared lost within the
    heartbeat timeout; its sub-tasks finish on another worker."""
    c = fast_cluster
    proxy = FreezableProxy(c.port)
    try:
        c.start_worker(
            "far",
            extra=[*TEST_TASKS, "--heartbeat-interval", "0.5", "--heartbeat-timeout", "30"],
            connect=f"tcp:127.0.0.1:{proxy.port}",
        )
        c.wait_workers(["far"])
        with c.client(timeout=60) as client:
            job = client.submit("sleep", [0.3] * 12, 12)
            wait_for(
                lambda: any(w["name"] == "far" and w["busy"] for w in client.workers()),
                30,
                "the far worker to hold a sub-task",
            )
            proxy.freeze()
            frozen_at = time.monotonic()
            wait_for(
                lambda: "far" not in {w["name"] for w in client.workers()},
                10,
                "the far worker to be declared lost",
            )
            lost_after = time.monotonic() - frozen_at
            assert client.wait(job) == [0.3] * 12
            status = client.status(job)
        assert status["requeued"] >= 1
        assert lost_after < 2 + 0.5 + 2  # timeout + one interval + scheduling slack
    finally:
        proxy.close()


@pytest.mark.slow
def test_5000_subtasks_survive_repeated_worker_sigkill(tmp_path):
    """A 5,000-sub-task job survives repeated SIGKILL of random workers (restarted each time)
    and still gives the exact answer."""
    c = LocalCluster(tmp_path, server_args=TEST_TASKS, env={"PYTHONPATH": SUPPORT})
    try:
        c.start_server()
        names = ["w1", "w2", "w3"]
        for name in names:
            c.start_worker(name, extra=TEST_TASKS)
        c.wait_workers()
        durations = [0.002] * 5000
        rng = random.Random(5)
        with c.client(timeout=300) as client:
            job = client.submit("sleep", durations, 5000)
            kills = 0
            for _ in range(8):
                if client.status(job)["state"] not in ("queued", "running"):
                    break
                victim = rng.choice(names)
                c.kill_worker(victim, signal.SIGKILL)
                kills += 1
                c.start_worker(victim, extra=TEST_TASKS)
                c.wait_workers([victim], timeout=60)
            assert client.wait(job) == durations
            status = client.status(job)
        assert kills >= 3
        assert status["requeued"] >= 1
        assert status["done"] == 5000
    finally:
        c.stop()


def test_corrupt_journal_refuses_to_start(tmp_path):
    """A journal file that is not a clusterd journal stops the server with a clear error."""
    bad = tmp_path / "clusterd-journal.sqlite"
    bad.write_bytes(b"not a database" * 500)
    proc = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "clusterd-server", "--listen", "tcp:0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Refusing to start" in proc.stderr
    assert bad.read_bytes() == b"not a database" * 500
