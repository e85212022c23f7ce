"""``ClusterExecutor``: a :class:`concurrent.futures.Executor` over a running cluster, for code
that knows nothing of Twisted.

    from clusterd.client import ClusterExecutor

    with ClusterExecutor("tcp:127.0.0.1:7420") as ex:
        f = ex.submit("sum", [1, 2, 3])                 # a clusterd job; f is a real Future
        print(f.result())                               # 6
        print(list(ex.map("sum", [[1, 2], [3, 4]])))    # [3, 7], in input order

How it works, and why: ``submit`` sends ``SUBMIT`` at once on one shared connection (a short
request, answered as soon as the job is journaled), so every job runs on the cluster as soon
as it is submitted, however few threads wait here. Each job's result is then fetched with
``WAIT`` by one of at most ``max_workers`` waiter threads, each with its own
:class:`BlockingClient` connection: a ``WAIT`` blocks its connection until the job ends, and a
pool of blocking connections needs no reactor and no hand-written reply demultiplexing (one
pipelined connection would serve replies in request order anyway, so a slow job would hold
back every later one). Results come back in whatever order jobs end.

A failed job's future raises :class:`JobFailed`, whose message names the remote exception's
type and message, with the worker's traceback as ``.traceback`` (and as the exception's
``__cause__``, so an uncaught one prints it). ``Future.cancel()`` works until the job ends and
sends ``CANCEL``; ``shutdown(cancel_futures=True)`` does that for every job not done.

``map(task, inputs, chunksize=n)``: one job per input, unless the task is *elementwise* (the
server's TASKS reply says so; ``@task`` functions with the default split and combine are) and
``n > 1``: then up to ``n`` consecutive list inputs go as one job (their concatenation) and
its answer is cut back into one result per input. For any other task ``chunksize`` changes
nothing, as with :class:`~concurrent.futures.ThreadPoolExecutor`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any

from clusterd import DEFAULT_PORT
from clusterd.client.blocking import BlockingClient
from clusterd.client.errors import ClusterError, JobCancelled, JobFailed

__all__ = ["ClusterExecutor"]

_UNSET: Any = object()


class ClusterExecutor(Executor):
    """Run clusterd jobs as futures. ``address`` is the same endpoint string as
    :class:`BlockingClient`'s; ``secret`` the client secret; ``timeout`` bounds connecting
    (not a job's run time: use ``Future.result(timeout)`` or ``map(timeout=)``). Connects
    at once, so a bad address or secret raises here."""

    def __init__(
        self,
        address: str = f"tcp:127.0.0.1:{DEFAULT_PORT}",
        max_workers: int = 8,
        secret: bytes | None = None,
        timeout: float | None = _UNSET,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._address = address
        self._secret = secret
        self._timeout = timeout
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._submitter: BlockingClient | None = self._connect()
        self._queue: queue.SimpleQueue[tuple[str, Future[Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending: dict[str, Future[Any]] = {}
        self._elementwise: set[str] | None = None
        self._shutdown = False

    def _connect(self) -> BlockingClient:
        if self._timeout is _UNSET:
            return BlockingClient(self._address, secret=self._secret)
        return BlockingClient(
            self._address, timeout=self._timeout, secret=self._secret, request_timeout=None
        )

    def submit(self, task_name: str, value: Any, /, **options: Any) -> Future[Any]:  # type: ignore[override]
        """Submit a job of ``task_name`` on ``value``; a Future of its result. ``options``
        are the job options (``chunks``, ``timeout``, ``attempts``, ``key``). A refused
        submit (unknown task, bad input) is the future's exception, as a call that raised."""
        f: Future[Any] = Future()
        with self._lock:
            if self._shutdown or self._submitter is None:
                raise RuntimeError("cannot schedule new futures after shutdown")
            try:
                job = self._submitter.submit(task_name, value, **options)
            except ClusterError as e:
                f.set_exception(e)
                return f
            f.job = job  # type: ignore[attr-defined]
            self._pending[job] = f
            if len(self._threads) < self._max_workers and len(self._threads) < len(self._pending):
                t = threading.Thread(target=self._wait_loop, name="clusterd-waiter", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put((job, f))
        f.add_done_callback(self._on_done)
        return f

    def _on_done(self, f: Future[Any]) -> None:
        """Forget a settled future; a cancelled one sends CANCEL for its job."""
        job = getattr(f, "job", None)
        with self._lock:
            self._pending.pop(job, None)
            if f.cancelled() and self._submitter is not None:
                try:
                    self._submitter.cancel(job)
                except ClusterError:
                    pass  # the job ended or the server is gone: nothing left to cancel

    def _wait_loop(self) -> None:
        """A waiter thread: WAIT for each queued job on its own connection."""
        client: BlockingClient | None = None
        try:
            while (item := self._queue.get()) is not None:
                job, f = item
                if f.done():
                    continue
                try:
                    client = client or self._connect()
                    _settle(f, result=client.wait(job))
                except JobFailed as e:
                    _settle(f, error=e)
                except JobCancelled as e:
                    _settle(f, error=e)
                except ClusterError as e:  # the connection broke: a new one for the next job
                    _settle(f, error=e)
                    if client is not None:
                        client.close()
                    client = None
        finally:
            if client is not None:
                client.close()

    def map(  # type: ignore[override]
        self,
        task_name: str,
        iterable: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Submit a job per input at once; yield their results in input order (each within
        ``timeout`` seconds of this call, else TimeoutError). ``chunksize``: see the module
        docstring."""
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        if chunksize == 1 or not self._is_elementwise(task_name):
            return super().map(task_name, iterable, timeout=timeout)
        units = list(_group(iterable, chunksize))
        results = super().map(task_name, [u[0] for u in units], timeout=timeout)
        return _ungroup(results, [u[1] for u in units])

    def _is_elementwise(self, task_name: str) -> bool:
        with self._lock:
            if self._elementwise is None:
                if self._submitter is None:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                tasks = self._submitter.tasks()
                self._elementwise = {t["name"] for t in tasks if t.get("elementwise")}
            return task_name in self._elementwise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; ``cancel_futures`` cancels (CANCEL) every job not done; ``wait``
        blocks until every job's future is settled. Connections close once all are."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending.values())
            threads = list(self._threads)
        if cancel_futures:
            for f in pending:
                f.cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            self._finish(threads)
        else:
            threading.Thread(target=self._finish, args=(threads,), daemon=True).start()

    def _finish(self, threads: list[threading.Thread]) -> None:
        for t in threads:
            t.join()
        with self._lock:
            submitter, self._submitter = self._submitter, None
        if submitter is not None:
            submitter.close()


def _settle(f: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile."""
    try:
        if error is None:
            f.set_result(result)
        else:
            f.set_exception(error)
    except InvalidStateError:
        pass  # cancelled by the caller while we waited: its CANCEL has gone out


def _group(iterable: Iterable[Any], size: int) -> Iterator[tuple[Any, list[int] | None]]:
    """``(job input, lengths)``: up to ``size`` list inputs concatenated with their lengths,
    or a lone non-list input with None."""
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        lists: list[Any] = []
        for value in batch:
            if isinstance(value, list):
                lists.append(value)
                continue
            if lists:
                yield [x for v in lists for x in v], [len(v) for v in lists]
                lists = []
            yield value, None
        if lists:
            yield [x for v in lists for x in v], [len(v) for v in lists]


def _ungroup(results: Iterator[Any], lengths: list[list[int] | None]) -> Iterator[Any]:
    """Each grouped job's answer cut back into one result per input."""
    for result, sizes in zip(results, lengths, strict=True):
        if sizes is None:
            yield result
            continue
        start = 0
        for n in sizes:
            yield result[start : start + n]
            start += n
