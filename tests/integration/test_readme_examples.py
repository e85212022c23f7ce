"""The README's Python examples run as written against a LocalCluster: its ``mytasks.py`` is the
task module of the server and worker, and every other Python block is a client script."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE_ADDRESS = "tcp:127.0.0.1:7420"


def python_blocks() -> list[str]:
    """Every ```python block of the README, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_has_the_examples_this_test_runs():
    """The README shows ClusterExecutor, @task, BlockingClient and the Deferred API in Python."""
    text = "\n".join(python_blocks())
    for name in ("ClusterExecutor", "@task", "BlockingClient", "connect(reactor", "AsyncCluster"):
        assert name in text


def test_readme_python_examples_run(tmp_path):
    """Each README Python client example exits 0 and prints what its comments say, against a
    cluster loading the README's mytasks.py with --tasks."""
    blocks = python_blocks()
    modules = [b for b in blocks if b.startswith("# mytasks.py")]
    scripts = [b for b in blocks if not b.startswith("# mytasks.py")]
    assert len(modules) == 1 and len(scripts) >= 6
    (tmp_path / "mytasks.py").write_text(modules[0])
    env = {"PYTHONPATH": str(tmp_path)}
    (tmp_path / "cluster").mkdir()
    with LocalCluster(tmp_path / "cluster", server_args=["--tasks", "mytasks"], env=env) as c:
        c.start_server()
        # The README's input by reference lies in the temporary directory.
        roots = ["--ref-root", tempfile.gettempdir()]
        c.start_worker("w1", slots=2, extra=["--tasks", "mytasks", *roots])
        c.wait_workers()
        out = []
        for script in scripts:
            assert EXAMPLE_ADDRESS in script
            run = subprocess.run(
                [sys.executable, "-c", script.replace(EXAMPLE_ADDRESS, c.address)],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            assert run.returncode == 0, run.stderr
            out.append(run.stdout)
    executor, blocking, deferred, asyncio_, by_ref, parts = out[:6]
    assert parts.strip() == "[('a', 3), ('b', 3), ('c', 2)]"
    assert executor.splitlines()[:3] == ["9592", "[1, 4, 9]", "[[1, 4], [9]]"]
    assert "ZeroDivisionError: division by zero" in executor
    assert "return 1 / x" in executor
    assert blocking.splitlines()[0] == "9592"
    assert deferred.strip() == "6"
    assert asyncio_.splitlines() == [
        "6",
        "[[1, 4], [9]]",
        "11",
        "ZeroDivisionError: division by zero",
    ]
    assert by_ref.strip() == "True"  # the input by reference
