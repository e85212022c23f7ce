"""Big inputs and answers through real twistd processes: a 200 MB text streamed by the clusterd
command with the answer checked exactly and the server's memory bounded, a JSON array streamed
from stdin, and an answer longer than a line streamed back to the blocking client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from clusterd.launch import LocalCluster

SUPPORT = str(Path(__file__).parent / "support")
TEST_TASKS = ["--tasks", "clusterd_test_tasks"]

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("clusterd"))

MB = 1_000_000


def server_peak_rss_mb(cluster: LocalCluster) -> float:
    """The server process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{cluster.server.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
def big_cluster(tmp_path: Path):
    cluster = LocalCluster(tmp_path)
    cluster.start_server()
    for name in ("w1", "w2"):
        cluster.start_worker(name)
    cluster.wait_workers()
    yield cluster
    cluster.stop()


def test_200mb_text_streams_through_the_cli_with_bounded_server_memory(big_cluster, tmp_path):
    """`clusterd run wordcount --file` on a 200 MB file: the input goes in pieces (each far
    below the 16 MiB line limit), counts are exact, and the server never holds the whole input
    (its peak RSS stays well under the input's size)."""
    block_words = [f"w{i % 997}" for i in range(20_000)] + ["Don't", "it's", "end."]
    block = " ".join(block_words) + "\n"
    repeats = 200 * MB // len(block) + 1
    path = tmp_path / "big.txt"  # beside the cluster's logs
    with open(path, "w") as fh:
        for _ in range(repeats):
            fh.write(block)
    assert path.stat().st_size >= 200 * MB
    one = Counter(w.lower().strip(".") for w in block_words)
    expected = {w: n * repeats for w, n in one.items()}
    run = subprocess.run(
        [CLI, "-s", big_cluster.address, "run", "wordcount", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == expected
    assert "input complete: " in big_cluster.log_text("server")
    assert server_peak_rss_mb(big_cluster) < 150, "the server held the whole input"


def test_json_array_from_stdin_streams_and_big_answer_streams_back(tmp_path):
    """A JSON array on stdin is streamed in pieces; `sort`'s answer, longer than the server's
    1 MiB line limit, comes back as a streamed RESULT that the clients join; and a single
    sub-task's result longer than a line comes from the worker in pieces too."""
    cluster = LocalCluster(
        tmp_path,
        server_args=["--max-line", str(1 << 20), *TEST_TASKS],
        env={"PYTHONPATH": SUPPORT},
    )
    try:
        cluster.start_server()
        cluster.start_worker("w1", extra=["--max-line", str(1 << 20), *TEST_TASKS])
        cluster.wait_workers()
        values = [(i * 7919) % 400_003 for i in range(400_000)]
        data = json.dumps(values).encode()
        assert len(data) > 2 * (1 << 20)
        run = subprocess.run(
            [CLI, "-s", cluster.address, "run", "sort", "--chunks", "16"],
            input=data,
            capture_output=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == sorted(values)
        with cluster.client() as c:
            assert c.run_stream("sort", [values[:200_000], values[200_000:]], 8) == sorted(values)
            assert c.run_stream("sum", iter([[1, 2], [3]])) == 6
            # One sub-task's result is itself longer than a 1 MiB line (the input is a number):
            # the worker streams its DONE, and the server streams the answer on.
            assert c.run("expand", 100_000) == [f"item-{i:08d}" for i in range(100_000)]
    finally:
        cluster.stop()
