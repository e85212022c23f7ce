"""Real twistd server and workers on loopback, driven through the line protocol."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from clusterd.client.errors import JobFailed, RequestRefused
from clusterd.launch import twistd_path, wait_for
from clusterd.tasks.builtins import count_primes

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("clusterd"))


def test_plugins_listed_in_twistd_help(tmp_path):
    """After install, twistd lists both plugins and shows each plugin's options."""
    out = subprocess.run(
        [twistd_path(), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "clusterd-server" in out and "clusterd-worker" in out
    server = subprocess.run(
        [twistd_path(), "clusterd-server", "--help"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    for option in ("--listen", "--tasks", "--max-line", "--max-subtasks", "--retention"):
        assert option in server
    worker = subprocess.run(
        [twistd_path(), "clusterd-worker", "--help"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    for option in ("--connect", "--slots", "--name", "--tasks", "--max-reconnect-delay"):
        assert option in worker


def test_busy_port_stops_the_server(cluster, tmp_path):
    """A server told to listen on a port already in use exits non-zero instead of idling."""
    proc = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "clusterd-server", "--listen",
         f"tcp:{cluster.port}:interface=127.0.0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Address already in use" in proc.stdout + proc.stderr


def test_every_builtin_task_matches_sequential(cluster):
    """Each built-in task run on the cluster equals the plain sequential computation."""
    rng = random.Random(7)
    numbers = [rng.randint(-1000, 1000) for _ in range(5000)]
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "Delta", "it's"]) for _ in range(3000))
    with cluster.client(timeout=120) as c:
        assert c.run("sum", numbers, 16) == sum(numbers)
        assert c.run("sort", numbers, 16) == sorted(numbers)
        assert c.run("primes", {"start": 0, "stop": 60000}, 24) == count_primes(0, 60000)
        words = Counter(w.lower() for w in text.split())
        assert c.run("wordcount", text, 12) == dict(words)
        assert c.run("sleep", [0.01, 0.0, 0.02], 3) == [0.01, 0.0, 0.02]


def test_subtasks_spread_over_several_workers(cluster):
    """A many-chunk job runs on more than one worker process."""
    with cluster.client(timeout=120) as c:
        job = c.submit("sleep", [0.02] * 40, 40)
        assert c.wait(job) == [0.02] * 40
        status = c.status(job)
    assert set(status["ran_on"]) == {"w1", "w2"}
    assert sum(status["ran_on"].values()) == 40


def test_user_task_module_and_task_errors(cluster):
    """A --tasks module loads on server and workers; a raising task fails the job with its
    exception type and message, and the workers keep serving."""
    with cluster.client(timeout=60) as c:
        pids = c.run("pids", None, 8)
        assert len(pids) >= 2
        with pytest.raises(JobFailed) as e:
            c.run("fail", "x", 2)
        assert e.value.code == "TASK_ERROR"
        assert e.value.error["type"] == "ValueError"
        assert "boom on 'x'" in e.value.error["message"]
        assert c.run("sum", [1, 2, 3], 2) == 6
        assert {w["name"] for w in c.workers()} == {"w1", "w2"}


def test_raw_socket_pipelining_and_errors(cluster):
    """Pipelined requests on a raw socket get replies in order, errors included."""
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=60) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"HELLO clusterd 1 ")
        f.write(b"RUN sleep [0.2]\r\nPING\nBOGUS\nRUN sum [1,2,3]\nWAIT nope\nQUIT\n")
        f.flush()
        lines = [f.readline() for _ in range(6)]
        assert lines[0].startswith(b"RESULT j") and lines[0].endswith(b" [0.2]\n")
        assert lines[1] == b"OK PONG\n"
        assert lines[2].startswith(b"ERR UNKNOWN_VERB ")
        assert lines[3].startswith(b"RESULT j") and lines[3].endswith(b" 6\n")
        assert lines[4].startswith(b"ERR UNKNOWN_JOB ")
        assert lines[5] == b"OK BYE\n"
        assert f.readline() == b""


def test_cli_run_file_progress_and_exit_codes(cluster, tmp_path):
    """The clusterd command runs a job from a file, and its exit codes tell success (0), job
    failure (1), refusal (4) and connection failure (3) apart."""
    text = tmp_path / "big.txt"
    text.write_text("the cat and the hat\n" * 200)
    env = {"CLUSTERD_SERVER": cluster.address, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    ok = cli("run", "wordcount", "--file", str(text), "--chunks", "8")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == '{"the":400,"and":200,"cat":200,"hat":200}'
    assert cli("run", "fail", '"x"').returncode == 1
    refused = cli("run", "sum", '[1,"a"]')
    assert refused.returncode == 4 and "BAD_INPUT" in refused.stderr
    assert cli("--server", "tcp:127.0.0.1:1", "ping").returncode == 3
    job = cli("submit", "sum", "[1,2]").stdout.strip()
    assert cli("wait", job).stdout.strip() == "3"
    assert '"state": "done"' in cli("status", job).stdout
    second = cli("submit", "sum", "[3]").stdout.strip()
    newest = json.loads(cli("jobs", "--json", "--limit", "1").stdout)
    assert [j["id"] for j in newest] == [second]  # newest first, one page of one
    older = json.loads(cli("jobs", "--json", "--limit", "1", "--before", second).stdout)
    assert [j["id"] for j in older] == [job]


def test_unknown_task_and_waiting_for_worker(cluster):
    """An unknown task is refused at once with UNKNOWN_TASK."""
    with cluster.client(timeout=30) as c:
        with pytest.raises(RequestRefused) as e:
            c.submit("nosuch", 1)
    assert e.value.code == "UNKNOWN_TASK"


def test_sigkill_worker_mid_job_still_right_and_restart_reregisters(fresh_cluster):
    """SIGKILL of a worker mid-job requeues its sub-tasks and the job still completes with
    the right answer; the worker restarted later registers again."""
    c = fresh_cluster
    durations = [0.05] * 60
    with c.client(timeout=120) as client:
        job = client.submit("sleep", durations, 60)
        wait_for(lambda: client.status(job)["ran_on"].get("w1", 0) >= 3, 60, "w1 to make progress")
        c.kill_worker("w1", signal.SIGKILL)
        assert client.wait(job) == durations
        status = client.status(job)
        assert status["requeued"] >= 1
        assert status["ran_on"]["w2"] > 0
        wait_for(lambda: {w["name"] for w in client.workers()} == {"w2"}, 30, "w1 to be dropped")
        c.start_worker("w1", extra=["--tasks", "clusterd_test_tasks"])
        c.wait_workers(["w1", "w2"])
        assert client.run("sum", list(range(100)), 10) == 4950


def test_workers_reregister_after_server_restart(fresh_cluster):
    """Workers reconnect with backoff and register again when the server comes back."""
    c = fresh_cluster
    port = c.port
    c.kill_server(signal.SIGKILL)
    c.start_server(port)
    c.wait_workers(["w1", "w2"], timeout=60)
    with c.client(timeout=60) as client:
        assert client.run("sum", [1, 2, 3, 4], 4) == 10
