"""``AsyncCluster``: clusterd jobs as awaitables, for asyncio programs.

    import asyncio
    from clusterd.client.aio import AsyncCluster

    async def main():
        async with AsyncCluster("tcp:127.0.0.1:7420") as cluster:
            print(await cluster.run("sum", [1, 2, 3]))                # 6
            print(await cluster.map("sum", [[1, 2], [3, 4]]))         # [3, 7]
            job = await cluster.submit("sum", [5, 6])                 # journaled: job.id
            print(job.id, await job)                                  # j3 11

    asyncio.run(main())

Why it is built on :class:`~clusterd.client.executor.ClusterExecutor` rather than on a second
protocol implementation over asyncio streams: the executor already owns the connections, the
greeting, AUTH, TLS, the endpoint syntax and how a failure carries the remote traceback, and its
futures are real :class:`concurrent.futures.Future` objects, which
:func:`asyncio.wrap_future` turns into asyncio futures that never block the event loop. A job
runs on the cluster from the moment ``submit`` returns; awaiting it only waits for its answer.

Cancelling the asyncio task that awaits a job cancels the job on the server (``CANCEL``), the
same as ``Future.cancel()`` does for the executor. Errors are the same as everywhere:
:class:`~clusterd.client.errors.JobFailed` (with ``.traceback``),
:class:`~clusterd.client.errors.JobCancelled`, :class:`~clusterd.client.errors.RequestRefused`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterable
from typing import Any

from clusterd import DEFAULT_PORT
from clusterd.client.executor import ClusterExecutor

__all__ = ["AsyncCluster", "AsyncJob"]

_UNSET: Any = object()


class AsyncJob:
    """A submitted job: ``id`` is the server's job id; ``await job`` gives its answer (or
    raises the job's error); ``cancel()`` cancels it on the server if it has not ended."""

    __slots__ = ("id", "future")

    def __init__(self, job_id: str | None, future: asyncio.Future[Any]) -> None:
        self.id = job_id  # None when the SUBMIT was refused: awaiting raises why
        self.future = future

    def __await__(self) -> Generator[Any, None, Any]:
        return self.future.__await__()

    def cancel(self) -> bool:
        """Cancel the job (``CANCEL`` on the server); False if it already ended."""
        return self.future.cancel()


class AsyncCluster:
    """An asyncio front for a running cluster; use it as ``async with``. ``address``,
    ``secret``, ``max_workers`` and ``timeout`` are :class:`ClusterExecutor`'s."""

    def __init__(
        self,
        address: str = f"tcp:127.0.0.1:{DEFAULT_PORT}",
        max_workers: int = 8,
        secret: bytes | None = None,
        timeout: float | None = _UNSET,
    ) -> None:
        self._args: dict[str, Any] = {"max_workers": max_workers, "secret": secret}
        if timeout is not _UNSET:
            self._args["timeout"] = timeout
        self._address = address
        self._executor: ClusterExecutor | None = None

    async def __aenter__(self) -> AsyncCluster:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect (in a thread: connecting blocks); a bad address or secret raises here."""
        if self._executor is None:
            self._executor = await asyncio.to_thread(ClusterExecutor, self._address, **self._args)

    async def submit(self, task_name: str, value: Any, /, **options: Any) -> AsyncJob:
        """Submit a job; returns once the server has journaled it (the ``SUBMIT`` round trip
        runs in a thread, so a big input never blocks the event loop). Await the returned
        :class:`AsyncJob` for the answer. ``options`` are SUBMIT's (``chunks``, ``timeout``,
        ``attempts``, ``key``, ...)."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("AsyncCluster is not connected: use 'async with' or connect()")
        f = await asyncio.to_thread(executor.submit, task_name, value, **options)
        return AsyncJob(getattr(f, "job", None), asyncio.wrap_future(f))

    async def run(self, task_name: str, value: Any, /, **options: Any) -> Any:
        """Submit a job and await its answer."""
        return await (await self.submit(task_name, value, **options))

    async def map(self, task_name: str, inputs: Iterable[Any], /, **options: Any) -> list[Any]:
        """One job per input, all submitted at once; their answers in input order. The first
        failure raises, and the jobs still running are cancelled."""
        jobs = [await self.submit(task_name, value, **options) for value in inputs]
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise

    async def aclose(self, cancel_futures: bool = False) -> None:
        """Close the connections once the jobs awaited have answered (``cancel_futures``:
        cancel the jobs not yet done first)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=cancel_futures)
