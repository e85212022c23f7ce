"""A real twistd server configured from a TOML file, logging JSON (README, "Configuration")."""

from __future__ import annotations

import json

import pytest_twisted
from conftest import SUPPORT
from twistedproc import spawn_twistd

from clusterd.client import connect

START = 30.0  # seconds a process may take to print its readiness line


@pytest_twisted.ensureDeferred
async def test_a_server_from_a_toml_file_logs_one_json_object_per_line(tmp_path):
    """twistd clusterd-server --config: the file's listen, tasks and log-format take effect,
    every output line is a JSON object, a job's events carry job_id as a field, and a client
    connection writes no debug line at the default level."""
    from twisted.internet import reactor

    config = tmp_path / "server.toml"
    config.write_text(
        'listen = ["tcp:0:interface=127.0.0.1"]\n'
        'tasks = ["clusterd_test_tasks"]\n'
        'journal = "none"\n'
        'log-format = "json"\n'
    )
    env = {"PYTHONPATH": SUPPORT}
    server = spawn_twistd(
        reactor,
        "server",
        ["clusterd-server", "--config", str(config)],
        r"clusterd listening on [0-9.]+:(\d+)",
        str(tmp_path),
        env,
    )
    worker = client = None
    try:
        port = int((await server.wait_ready(reactor, START)).group(1))
        worker = spawn_twistd(
            reactor,
            "worker",
            ["clusterd-worker", "--connect", f"tcp:127.0.0.1:{port}", "--name", "w1"]
            + ["--tasks", "clusterd_test_tasks"],
            r"registered with server .* as w1",
            str(tmp_path),
            env,
        )
        await worker.wait_ready(reactor, START)
        client = await connect(reactor, f"tcp:127.0.0.1:{port}", timeout=10)
        assert await client.run("sum", list(range(100)), 4).addTimeout(30, reactor) == 4950
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            await worker.stop(reactor)
        await server.stop(reactor)
    events = [json.loads(line) for line in server.lines if line.strip()]
    assert events and all(isinstance(e, dict) for e in events)
    assert any(e.get("job_id") and "submitted" in e["text"] for e in events)
    assert not any("connection from" in e["text"] for e in events)
    assert {e["level"] for e in events} <= {"info", "warn", "error", "critical"}
    # The worker kept twistd's text lines (the default), so the formats are independent.
    assert not worker.lines[0].startswith("{")
