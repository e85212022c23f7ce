"""A server and a worker as real processes on the session's reactor (pytest-twisted), each
awaited on its readiness line: the model for integration tests without sleeps or log polling."""

from __future__ import annotations

import pytest_twisted
from conftest import SUPPORT, TEST_TASKS
from twistedproc import spawn_twistd

from clusterd.client import connect

START = 30.0  # seconds a process may take to print its readiness line


@pytest_twisted.ensureDeferred
async def test_a_job_runs_on_processes_awaited_on_their_readiness_lines(tmp_path):
    """The server's "listening on" line gives its port, the worker's "registered" line says it
    can take work, and a RUN on that server then answers with the task's result."""
    from twisted.internet import reactor

    env = {"PYTHONPATH": SUPPORT}
    server = spawn_twistd(
        reactor,
        "server",
        ["clusterd-server", "--listen", "tcp:0:interface=127.0.0.1", *TEST_TASKS],
        r"clusterd listening on [0-9.]+:(\d+)",
        str(tmp_path),
        env,
    )
    worker = None
    client = None
    try:
        port = int((await server.wait_ready(reactor, START)).group(1))
        worker = spawn_twistd(
            reactor,
            "worker",
            ["clusterd-worker", "--connect", f"tcp:127.0.0.1:{port}", "--name", "w1", *TEST_TASKS],
            r"registered with server .* as w1",
            str(tmp_path),
            env,
        )
        await worker.wait_ready(reactor, START)
        client = await connect(reactor, f"tcp:127.0.0.1:{port}", timeout=10)
        assert await client.run("sum", list(range(100)), 4).addTimeout(30, reactor) == 4950
        workers = await client.workers().addTimeout(10, reactor)
        assert [w["name"] for w in workers] == ["w1"]
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            await worker.stop(reactor)
        await server.stop(reactor)
