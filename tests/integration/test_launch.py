"""LocalCluster waits for readiness lines from each process's own output, never a stale log."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import SUPPORT, TEST_TASKS

from clusterd.launch import LocalCluster


def test_a_restarted_server_reports_the_port_it_listens_on_now(tmp_path: Path) -> None:
    """After a restart start_server returns the new process's port, not the one an earlier
    run logged in the same (appended) log file."""
    with LocalCluster(tmp_path, server_args=TEST_TASKS, env={"PYTHONPATH": SUPPORT}) as c:
        c.start_server()
        c.kill_server()
        port = c.start_server()
        listened = re.findall(r"clusterd listening on [0-9.]+:(\d+)", c.log_text("server"))
        assert len(listened) == 2
        assert port == int(listened[-1])
        with c.client(timeout=10) as client:
            assert client.ping() == "PONG"


def test_wait_workers_waits_for_registration_with_the_restarted_server(tmp_path: Path) -> None:
    """wait_workers after a server restart returns once the workers registered with the new
    server (their earlier registration does not count), and the server then lists them."""
    with LocalCluster(tmp_path, server_args=TEST_TASKS, env={"PYTHONPATH": SUPPORT}) as c:
        c.start_server()
        c.start_worker("w1", extra=TEST_TASKS)
        c.wait_workers()
        c.kill_server()
        c.start_server(port=c.port)
        c.wait_workers(timeout=30)
        assert c.watches["worker-w1"].count("registered") == 2
        with c.client(timeout=10) as client:
            assert {w["name"] for w in client.workers()} == {"w1"}


def test_wait_log_sees_only_the_current_process_lines(tmp_path: Path) -> None:
    """wait_log matches a line of the running process, and an earlier run's line does not
    satisfy it."""
    with LocalCluster(tmp_path, server_args=TEST_TASKS, env={"PYTHONPATH": SUPPORT}) as c:
        c.start_server()
        first = c.wait_log("server", r"clusterd listening on \S+", 10)
        c.kill_server()
        c.start_server()
        again = c.wait_log("server", r"clusterd listening on \S+", 10)
        assert again == f"clusterd listening on 127.0.0.1:{c.port}"
        assert first != again or c.port == int(first.rsplit(":", 1)[1])
