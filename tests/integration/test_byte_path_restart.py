"""The byte path survives a crash: a text input streamed as ``$<n>`` frames is journaled as
BLOBs, and a real server SIGKILLed mid-job resumes it from them with the exact answer."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from crashkit import LineConn, wait_ready

from clusterd.launch import LocalCluster
from clusterd.tasks.builtins import TASKS

pytestmark = pytest.mark.integration

WORDCOUNT = next(t for t in TASKS if t.name == "wordcount")


def _text() -> bytes:
    """Some 300 KB of text with multi-byte characters (so frame edges split some of them)."""
    words = ["naïve", "café", "straße", "δέλτα", "word", "end", "日本語", "x"]
    return " ".join(words[(i * 7) % len(words)] + str(i % 50) for i in range(30_000)).encode()


def test_streamed_frames_resume_exactly_after_sigkill(tmp_path: Path) -> None:
    """A job whose input came as $<n> frames is SUBMITted with no worker, the server is
    SIGKILLed and restarted on the same journal, and the job resumes from its BLOB chunks to the
    exact word count."""
    data = _text()
    cluster = LocalCluster(tmp_path)
    try:
        port = cluster.start_server()
        conn = LineConn(port)
        conn.send(f'SUBMIT wordcount @ {{"chunks":6,"size":{len(data)}}}')
        for i in range(0, len(data), 7001):  # frame edges fall inside characters
            part = data[i : i + 7001]
            conn.send(b"$%d\n" % len(part) + part)
        conn.send(".")
        reply = conn.readline()
        assert reply.startswith("OK j"), reply
        job = reply.split()[1]
        conn.close()
        cluster.kill_server(signal.SIGKILL)
        cluster.start_server(port)
        wait_ready(cluster)
        cluster.start_worker("w1", slots=2)
        cluster.wait_workers(["w1"])
        with cluster.client(timeout=60) as c:
            value = c.wait(job)
        expected = WORDCOUNT.combine([WORDCOUNT.run(data.decode())])
        assert value == expected
        assert expected == dict(Counter(w.lower() for w in data.decode().split()))
    finally:
        cluster.stop()
