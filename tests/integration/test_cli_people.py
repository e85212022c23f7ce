"""The CLI for people against a real cluster: tables, ``top``, Ctrl-C during ``run``, a bare
HOST:PORT address."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clusterd.launch import wait_for

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("clusterd"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def _jobs(address: str) -> list[dict]:
    return json.loads(_cli("--server", address, "jobs", "--json").stdout)


def test_tables_off_a_terminal_and_bare_host_port(cluster):
    """`workers`, `tasks` and `stats` print plain tables off a terminal, reached by HOST:PORT;
    `--json` keeps the server's JSON."""
    bare = f"127.0.0.1:{cluster.port}"
    workers = _cli("--server", bare, "workers")
    assert workers.returncode == 0, workers.stderr
    assert workers.stdout.split()[:3] == ["NAME", "ADDRESS", "BUSY"] and "ready" in workers.stdout
    assert "\x1b" not in workers.stdout
    tasks = _cli("--server", bare, "tasks")
    assert any(line.split()[:1] == ["primes"] for line in tasks.stdout.splitlines())
    assert "uptime" in _cli("--server", bare, "stats").stdout
    assert isinstance(json.loads(_cli("--server", bare, "stats", "--json").stdout), dict)


def test_top_iterations_one(cluster):
    """`clusterd top --iterations 1` draws workers, jobs and counters once and exits 0."""
    done = _cli("--server", cluster.address, "top", "--iterations", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("up ") and "Workers" in done.stdout and "NAME" in done.stdout


def _interrupted_run(address: str, *extra: str) -> tuple[str, subprocess.CompletedProcess]:
    """Start `clusterd run sleep` on a long job, wait until the server holds it, send SIGINT."""
    before = {j["id"] for j in _jobs(address)}
    proc = subprocess.Popen(
        [CLI, "--server", address, "run", "sleep", "[60]", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        new = wait_for(
            lambda: [j for j in _jobs(address) if j["id"] not in before], 30, "the sleep job"
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return new[0]["id"], subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_during_run_leaves_the_job_and_says_how_to_reattach(cluster):
    """Ctrl-C during `run` exits 130, says the job goes on and names wait/cancel commands."""
    job, done = _interrupted_run(cluster.address)
    assert done.returncode == 130, done.stderr
    assert f"job {job} goes on" in done.stderr
    assert f"clusterd wait {job}" in done.stderr and f"clusterd cancel {job}" in done.stderr
    status = json.loads(_cli("--server", cluster.address, "status", job).stdout)
    assert status["state"] in ("queued", "running")
    assert _cli("--server", cluster.address, "cancel", job).returncode == 0


def test_ctrl_c_with_cancel_on_interrupt_cancels_the_job(cluster):
    """With --cancel-on-interrupt, Ctrl-C cancels the job and still exits 130."""
    job, done = _interrupted_run(cluster.address, "--cancel-on-interrupt")
    assert done.returncode == 130, done.stderr
    assert f"job {job} cancelled" in done.stderr
    status = json.loads(_cli("--server", cluster.address, "status", job).stdout)
    assert status["state"] == "cancelled"
