"""Inputs by reference on real twistd processes: the workers read a local file, or an http
URL served by twisted.web's static.File, by byte ranges; counts are exact (docs/PROTOCOL.md,
"Inputs by reference")."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterd.client.errors import JobFailed

pytestmark = pytest.mark.integration

SUPPORT = Path(__file__).parent / "support"
CLI = str(Path(sys.executable).with_name("clusterd"))
WORDS = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "η", "theta"]


def _text(n: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    seps = [" ", "\n", "  ", "\t"]
    return "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a text file and a JSON-lines file."""
    d = tmp_path_factory.mktemp("refdata")
    (d / "words.txt").write_text(_text(60_000), encoding="utf-8")
    (d / "nums.jsonl").write_text("".join(f"{i}\n" for i in range(5_000)))
    return d


@pytest.fixture(scope="module")
def web(data: Path) -> Iterator[str]:
    """The data directory served over http by a twisted.web static.File."""
    proc = subprocess.Popen(
        [sys.executable, str(SUPPORT / "range_server.py"), str(data)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until it listens (or dies: then "")
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, data: Path, web: str) -> Iterator[Any]:
    """Two one-slot workers that may read the data directory and the web server's URLs."""
    from conftest import make_cluster

    roots = ["--ref-root", str(data), "--ref-root", f"{web}/"]
    c = make_cluster(tmp_path_factory.mktemp("refcluster"), worker_args=roots)
    yield c
    c.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path, data: Path) -> Iterator[Any]:
    """A cluster of its own whose workers may read the data directory."""
    from conftest import make_cluster

    c = make_cluster(tmp_path, worker_args=["--ref-root", str(data)])
    yield c
    c.stop()


def test_wordcount_by_file_path_is_exact(cluster, data):
    """Wordcount of a file named by path, cut into ranges, equals a sequential count."""
    path = data / "words.txt"
    want = dict(Counter(path.read_text(encoding="utf-8").split()))
    with cluster.client(timeout=120) as c:
        for chunks in (1, 7, 50):
            assert c.run_ref("wordcount", str(path), path.stat().st_size, chunks) == want


def test_wordcount_and_json_lines_by_http_url(cluster, data, web):
    """Both formats read by http range requests (workers use treq) give exact answers."""
    text = (data / "words.txt").read_text(encoding="utf-8")
    size = (data / "words.txt").stat().st_size
    nums = (data / "nums.jsonl").stat().st_size
    with cluster.client(timeout=120) as c:
        assert c.run_ref("wordcount", f"{web}/words.txt", size, 13) == dict(Counter(text.split()))
        assert c.run_ref("sum", f"{web}/nums.jsonl", nums, 9) == sum(range(5_000))
        assert c.run_ref("sum", str(data / "nums.jsonl"), nums, 4, format="lines") == sum(
            range(5_000)
        )


def test_unreadable_references_fail_cleanly(cluster, data, web):
    """A missing file, a 404 and a wrong size fail the job with the reader's message."""
    size = (data / "words.txt").stat().st_size
    cases = [
        (str(data / "missing.txt"), size, "cannot open"),
        (f"{web}/missing.txt", size, "HTTP 404"),
        (str(data / "words.txt"), size + 1, "the job names"),
        (f"{web}/words.txt", size + 5, "the job names"),
    ]
    with cluster.client(timeout=120) as c:
        for ref, n, fragment in cases:
            with pytest.raises(JobFailed) as e:
                c.run_ref("wordcount", ref, n, 2, attempts=2)
            assert e.value.error["type"] == "RefError" and fragment in e.value.error["message"]


def test_failed_read_is_retried(cluster, data, web):
    """A range whose first fetch fails (HTTP 500) is retried, and the answer is exact."""
    path = data / "nums.jsonl"
    with cluster.client(timeout=120) as c:
        before = _retried(c.stats())
        job = c.submit_ref("sum", f"{web}/flaky/nums.jsonl", path.stat().st_size, 1, attempts=3)
        assert c.wait(job) == sum(range(5_000))
        assert _retried(c.stats()) == before + 1


def _retried(stats: dict) -> int:
    counters = stats.get("counters", stats)
    return counters["subtasks_retried"]


def test_cli_input_ref_path_and_url(cluster, data, web):
    """clusterd run --input-ref takes a path (made absolute, stat for its size) or a URL (HEAD);
    an unreadable path or a --format without --input-ref is a usage error."""
    env = {"CLUSTERD_SERVER": cluster.address, "PATH": "/usr/bin:/bin"}
    want = dict(Counter((data / "words.txt").read_text(encoding="utf-8").split()))
    for ref in ("words.txt", f"{web}/words.txt"):
        out = subprocess.run(
            [CLI, "run", "wordcount", "--input-ref", ref, "-n", "6", "--no-progress"],
            capture_output=True,
            text=True,
            env=env,
            cwd=data,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == want
    bad = subprocess.run(
        [CLI, "run", "wordcount", "--input-ref", "nothing-here"],
        capture_output=True,
        text=True,
        env=env,
        cwd=data,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert bad.returncode == 2 and "cannot read nothing-here" in bad.stderr
    stray = subprocess.run(
        [CLI, "run", "wordcount", '"a b"', "--format", "text"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert stray.returncode == 2 and "--format is for an input named by --input-ref" in stray.stderr


def test_reference_job_resumes_after_server_sigkill(fresh_cluster, data):
    """A '&' job accepted before a SIGKILL resumes the same ranges after a restart."""
    c = fresh_cluster
    path = data / "words.txt"
    want = dict(Counter(path.read_text(encoding="utf-8").split()))
    for name in ("w1", "w2"):
        c.kill_worker(name)
    with c.client(timeout=60) as client:
        job = client.submit_ref("wordcount", str(path), path.stat().st_size, 11)
    c.kill_server(signal.SIGKILL)
    c.start_server(c.port)
    with c.client(timeout=60) as client:
        assert client.status(job)["total"] == 11
    for name in ("w1", "w2"):
        c.start_worker(name, extra=["--tasks", "clusterd_test_tasks", "--ref-root", str(data)])
    c.wait_workers(["w1", "w2"], timeout=60)
    with c.client(timeout=120) as client:
        assert client.wait(job) == want


def test_worker_ref_root_refuses_other_files(tmp_path, data):
    """A worker started with --ref-root reads references under it and fails the others."""
    from clusterd.launch import LocalCluster

    (tmp_path / "c").mkdir()
    other = tmp_path / "other.txt"
    other.write_text("secret words\n")
    with LocalCluster(tmp_path / "c") as c:
        c.start_server()
        c.start_worker("w1", extra=["--ref-root", str(data)])
        c.wait_workers()
        with c.client(timeout=60) as client:
            path = data / "nums.jsonl"
            assert client.run_ref("sum", str(path), path.stat().st_size, 2) == sum(range(5_000))
            with pytest.raises(JobFailed) as e:
                client.run_ref("wordcount", str(other), other.stat().st_size, 1, attempts=1)
    assert "not under a --ref-root" in e.value.error["message"]


def test_a_worker_without_ref_root_reads_no_reference(tmp_path):
    """A worker started without --ref-root refuses every input by reference, saying how to
    allow them: by default a client cannot make workers read their own files."""
    from clusterd.launch import LocalCluster

    (tmp_path / "plain").mkdir()
    words = tmp_path / "words.txt"
    words.write_text("a b c\n")
    with LocalCluster(tmp_path / "plain") as c:
        c.start_server()
        c.start_worker("w1")
        c.wait_workers()
        with c.client(timeout=60) as client:
            with pytest.raises(JobFailed) as e:
                client.run_ref("wordcount", str(words), words.stat().st_size, 1, attempts=1)
    assert "reads no inputs by reference" in e.value.error["message"]
    assert "--ref-root" in e.value.error["message"]
