"""Fixtures that start real twistd servers and workers on loopback (via LocalCluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterd.launch import LocalCluster

SUPPORT = str(Path(__file__).parent / "support")
TEST_TASKS = ["--tasks", "clusterd_test_tasks"]


def make_cluster(
    tmp_path: Path, workers: int = 2, slots: int = 1, worker_args: list[str] | None = None
) -> LocalCluster:
    cluster = LocalCluster(
        tmp_path, server_args=["--tasks", "clusterd_test_tasks"], env={"PYTHONPATH": SUPPORT}
    )
    cluster.start_server()
    extra = ["--tasks", "clusterd_test_tasks", *(worker_args or [])]
    for i in range(1, workers + 1):
        cluster.start_worker(f"w{i}", slots=slots, extra=extra)
    cluster.wait_workers()
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One server and two one-slot workers, shared by a module's read-only tests."""
    c = make_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own, for tests that kill or restart processes."""
    c = make_cluster(tmp_path)
    yield c
    c.stop()
