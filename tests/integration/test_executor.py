"""ClusterExecutor and @task against real twistd processes: map over a decorated function from
a user module, and a remote traceback when it raises."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import wait
from pathlib import Path

import pytest

from clusterd.client import ClusterExecutor, JobFailed, RemoteTraceback, RequestRefused
from clusterd.client.aio import AsyncCluster
from clusterd.launch import wait_for

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("clusterd"))


def test_map_over_a_task_function_in_order(cluster):
    """map over an @task function yields each input's result in input order, one job each
    or several inputs per job with chunksize, the same either way."""
    inputs = [[i, i + 1] for i in range(12)]
    want = [[i * i, (i + 1) ** 2] for i in range(12)]
    with ClusterExecutor(cluster.address) as ex:
        assert list(ex.map("square", inputs, timeout=60)) == want
        assert list(ex.map("square", inputs, timeout=60, chunksize=5)) == want
        # A task that is not elementwise ignores chunksize: one job per input.
        assert list(ex.map("sum", inputs, timeout=60, chunksize=4)) == [sum(v) for v in inputs]
        f = ex.submit("square", list(range(100)), chunks=4)
        assert f.result(timeout=60) == [x * x for x in range(100)]
        assert f.job.startswith("j")


def test_a_failing_task_raises_with_the_remote_traceback(cluster):
    """A task that raises fails its future with JobFailed naming the remote type and message,
    carrying the worker's traceback; a no_retry exception fails on the first attempt."""
    with ClusterExecutor(cluster.address) as ex:
        f = ex.submit("fragile", [1, -2, 3], attempts=5)
        with pytest.raises(JobFailed) as e:
            f.result(timeout=60)
    err = e.value
    assert "ValueError: negative input -2" in str(err)
    assert "in fragile" in err.traceback and "clusterd_test_tasks.py" in err.traceback
    assert isinstance(err.__cause__, RemoteTraceback)
    assert err.error["attempts"] == 1  # marked no_retry: not tried 5 times


def test_cli_failure_line_and_status_show_the_traceback(cluster):
    """The CLI's failure report and `clusterd status` both show the remote traceback."""
    run = subprocess.run(
        [CLI, "--server", cluster.address, "run", "fragile", "[-1]"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "ValueError: negative input -1" in run.stderr
    assert "remote traceback" in run.stderr and "in fragile" in run.stderr
    with ClusterExecutor(cluster.address) as ex:
        f = ex.submit("fragile", [-7])
        wait([f], timeout=60)
    status = subprocess.run(
        [CLI, "--server", cluster.address, "status", f.job],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "in fragile" in status.stdout and "traceback" in status.stdout


def test_shutdown_cancel_futures_cancels_jobs_not_done(cluster):
    """shutdown(cancel_futures=True) cancels the futures of jobs not done and CANCELs them."""
    ex = ClusterExecutor(cluster.address, max_workers=1)
    futures = [ex.submit("sleep", [5.0]) for _ in range(3)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert all(f.cancelled() for f in futures)
    with cluster.client() as c:
        states = lambda: all(c.status(f.job)["state"] == "cancelled" for f in futures)  # noqa: E731
        wait_for(states, 30, "the jobs to be cancelled")
    with pytest.raises(RuntimeError):
        ex.submit("sum", [1])


def test_a_refused_submit_is_the_futures_exception(cluster):
    """A SUBMIT the server refuses (unknown task) fails its future, as a call that raised."""
    with ClusterExecutor(cluster.address) as ex:
        f = ex.submit("no-such-task", [1])
        assert isinstance(f.exception(timeout=10), RequestRefused)
        assert f.exception().code == "UNKNOWN_TASK"


def test_async_cluster_runs_maps_and_raises_with_the_remote_traceback(cluster):
    """AsyncCluster awaits a job's answer, maps in input order, and a failed job raises
    JobFailed with the worker's traceback, all from an asyncio program."""

    async def main():
        async with AsyncCluster(cluster.address) as ac:
            one = await ac.run("sum", [1, 2, 3])
            many = await ac.map("square", [[1, 2], [3]])
            with pytest.raises(JobFailed) as e:
                await ac.run("fragile", [-4])
            return one, many, e.value

    one, many, err = asyncio.run(main())
    assert one == 6 and many == [[1, 4], [9]]
    assert "ValueError: negative input -4" in str(err) and "in fragile" in err.traceback


def test_cancelling_the_awaiting_asyncio_task_cancels_the_job(cluster):
    """Cancelling the asyncio task that awaits a job sends CANCEL: the job ends cancelled."""

    async def main():
        async with AsyncCluster(cluster.address) as ac:
            job = await ac.submit("sleep", [30.0])
            waiter = asyncio.ensure_future(_await(job))
            await asyncio.sleep(0)  # the waiter now awaits the job's future
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            return job.id

    job = asyncio.run(main())
    with cluster.client() as c:
        wait_for(lambda: c.status(job)["state"] == "cancelled", 30, "the job to be cancelled")


def test_async_cluster_must_be_connected_before_submit():
    """Submitting on an AsyncCluster that never connected is a clear RuntimeError."""
    with pytest.raises(RuntimeError, match="not connected"):
        asyncio.run(AsyncCluster("tcp:127.0.0.1:1").submit("sum", [1]))


async def _await(job):
    return await job
