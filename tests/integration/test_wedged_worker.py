"""A worker that takes sub-tasks and never answers them cannot stall a job (issue 10, item 11)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration


class WedgedWorker:
    """A raw-socket worker: registers with many slots, answers PING, never answers a DO."""

    def __init__(self, port: int, slots: int = 64) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        info = {"name": "wedged", "tasks": ["sum"], "slots": slots, "protocol": 1}
        self.file.write(b"REGISTER " + json.dumps(info).encode() + b"\n")
        self.file.flush()
        assert self.file.readline().startswith(b"OK REGISTERED")
        self.dos = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            for line in self.file:
                if line.startswith(b"DO "):
                    self.dos += 1
                elif line.strip() == b"PING":
                    self.file.write(b"OK PONG\n")
                    self.file.flush()
        except OSError:
            pass
        finally:
            self.closed.set()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, server_args=["--stall-min", "2", "--stall-factor", "2"])
    c.start_server()
    yield c
    c.stop()


def test_a_wedged_worker_is_dropped_and_the_job_finishes_elsewhere(cluster: LocalCluster):
    """A 64-slot worker that answers PING but never a DO takes most of a job's sub-tasks; once
    the task's measured run time says they are overdue, the server drops it and a real worker
    finishes the job with the exact answer."""
    wedged = WedgedWorker(cluster.port)
    try:
        cluster.start_worker("w1", slots=1)
        cluster.wait_workers(["w1"])
        with cluster.client(timeout=60) as c:
            value = list(range(1, 1601))
            assert c.run("sum", value, chunks=16) == sum(value)
        assert wedged.dos >= 8  # it did take sub-tasks, and the job still finished
        assert wedged.closed.wait(10), "the server kept the wedged worker's connection"
        assert "answered nothing for" in cluster.log_text("server")
    finally:
        wedged.close()
