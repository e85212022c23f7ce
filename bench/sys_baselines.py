"""The baselines: a plain loop in one process, multiprocessing.Pool(2), Ray and Dask.

Each runs the same inputs as clusterd with the same task code (the ``inc`` bench task,
clusterd.tasks.builtins.count_primes, and the built-in wordcount's split/run/combine) and its
answers are checked the same way. Every wait has a timeout.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchlib import (
    PRIMES_BELOW,
    Sizes,
    TextInput,
    check,
    inc_answer,
    latency_metrics,
    prime_ranges,
)
from clusterd_bench_tasks import inc_run

from clusterd.tasks import load_registry
from clusterd.tasks.builtins import count_primes

Metrics = list[tuple[str, float, str]]
TIMEOUT = 900.0  # seconds any one wait may take

_WORDCOUNT = load_registry(use_entry_points=False).get("wordcount")
wc_split, wc_run, wc_combine = _WORDCOUNT.split, _WORDCOUNT.run, _WORDCOUNT.combine


def count_range(r: tuple[int, int]) -> int:
    return count_primes(r[0], r[1])


class Baseline:
    """The shared shape of the workloads; subclasses fill in how work is run."""

    name = "?"

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes

    # Hooks: run many calls and return the results in order; run one call.
    def map(self, fn: Callable, items: list) -> list:
        raise NotImplementedError

    def call(self, fn: Callable, arg: Any) -> Any:
        raise NotImplementedError

    def windowed(self, fn: Callable, items: list, window: int) -> Iterator[Any]:
        """Results of fn over items in order, with at most ``window`` calls in flight."""
        raise NotImplementedError

    def map_reduce(self, fn: Callable, items: list, combine: Callable) -> Any:
        return combine(self.map(fn, items))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    # -- workloads -----------------------------------------------------------------------------

    @contextmanager
    def w1(self) -> Iterator[tuple[Callable, Callable]]:
        n = self.sizes.w1_n

        def warm() -> float:
            """Returns the time one run would take at the warm-up's rate."""
            k = min(200, n)
            t0 = time.perf_counter()
            check("W1 warm-up", sum(self.map(inc_run, list(range(k)))), inc_answer(k))
            return (time.perf_counter() - t0) * n / k

        def once() -> Metrics:
            t0 = time.perf_counter()
            total = sum(self.map(inc_run, list(range(n))))
            dt = time.perf_counter() - t0
            check(f"W1 n={n}", total, inc_answer(n))
            return [("subtasks_per_s", n / dt, "sub-tasks/s"), ("submit_to_result_s", dt, "s")]

        yield warm, once

    @contextmanager
    def w1b(self) -> Iterator[tuple[Callable, Callable]]:
        jobs, window = self.sizes.w1b_jobs, self.sizes.w1b_window

        def run_jobs(count: int) -> float:
            t0 = time.perf_counter()
            got = 0
            for k, value in enumerate(self.windowed(inc_run, list(range(count)), window)):
                check(f"W1b job {k}", value, k + 1)
                got += 1
            dt = time.perf_counter() - t0
            check("W1b results", got, count)
            return dt

        def warm() -> float:
            k = min(200, jobs)
            return run_jobs(k) * jobs / k

        def once() -> Metrics:
            dt = run_jobs(jobs)
            return [("jobs_per_s", jobs / dt, "jobs/s"), ("elapsed_s", dt, "s")]

        yield warm, once

    @contextmanager
    def w2(self, seq_time: Callable[[], float | None]) -> Iterator[tuple[Callable, Callable]]:
        stop, chunks = self.sizes.w2_stop, self.sizes.w2_chunks
        ranges = prime_ranges(stop, chunks)

        def warm() -> None:
            check("W2 warm-up", sum(self.map(count_range, [(0, 500), (500, 1000)])), 168)

        def once() -> Metrics:
            t0 = time.perf_counter()
            count = sum(self.map(count_range, ranges))
            dt = time.perf_counter() - t0
            check(f"W2 primes below {stop}", count, PRIMES_BELOW[stop])
            out = [("elapsed_s", dt, "s")]
            base = seq_time()
            if base is not None:
                out.insert(0, ("speedup", base / dt, "x"))
            return out

        yield warm, once

    @contextmanager
    def w3(self) -> Iterator[tuple[Callable, Callable]]:
        runs, warmups = self.sizes.w3_runs, self.sizes.w3_warmup

        def one() -> float:
            t0 = time.perf_counter()
            value = self.call(inc_run, 0)
            dt = time.perf_counter() - t0
            check("W3 inc(0)", value, 1)
            return dt

        def warm() -> None:
            for _ in range(warmups):
                one()

        def once() -> Metrics:
            return latency_metrics([one() for _ in range(runs)])

        yield warm, once

    @contextmanager
    def w4(self, text: Callable[[], TextInput]) -> Iterator[tuple[Callable, Callable]]:
        chunks = self.sizes.w4_chunks
        data = text()

        def count(t: str) -> dict[str, int]:
            return self.map_reduce(wc_run, wc_split(t, chunks), wc_combine)

        def warm() -> None:
            check("W4 warm-up", count("a b a c\n"), {"a": 2, "b": 1, "c": 1})

        def once() -> Metrics:
            t0 = time.perf_counter()
            counts = count(data.text)
            dt = time.perf_counter() - t0
            check("W4 word counts", counts, data.answer)
            return [("mb_per_s", data.mb / dt, "MB/s"), ("elapsed_s", dt, "s")]

        yield warm, once


class Sequential(Baseline):
    """A plain loop in this process: the one-process baseline."""

    name = "sequential"

    def map(self, fn: Callable, items: list) -> list:
        return [fn(x) for x in items]

    def call(self, fn: Callable, arg: Any) -> Any:
        return fn(arg)

    def windowed(self, fn: Callable, items: list, window: int) -> Iterator[Any]:
        return (fn(x) for x in items)


def _default_signals() -> None:
    """Pool workers are forked from the suite, which turns SIGTERM into KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MultiprocessingPool(Baseline):
    """multiprocessing.Pool(2) with chunksize=1, so each item is its own message."""

    name = "multiprocessing"

    def start(self) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(2, initializer=_default_signals)

    def stop(self) -> None:
        self.pool.close()
        self.pool.terminate()
        self.pool.join()

    def map(self, fn: Callable, items: list) -> list:
        return self.pool.map_async(fn, items, chunksize=1).get(TIMEOUT)

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.pool.apply_async(fn, (arg,)).get(TIMEOUT)

    def windowed(self, fn: Callable, items: list, window: int) -> Iterator[Any]:
        pending: deque = deque()
        for x in items:
            if len(pending) >= window:
                yield pending.popleft().get(TIMEOUT)
            pending.append(self.pool.apply_async(fn, (x,)))
        while pending:
            yield pending.popleft().get(TIMEOUT)


class RaySystem(Baseline):
    """Ray on this machine: ray.init(num_cpus=2) on 127.0.0.1, one remote task per item."""

    name = "ray"

    def start(self) -> None:
        import ray

        self.ray = ray
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.WARNING,
            object_store_memory=1_000_000_000,
        )
        self._remote: dict[Callable, Any] = {}

    def stop(self) -> None:
        self.ray.shutdown()

    def _r(self, fn: Callable) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn]

    def map(self, fn: Callable, items: list) -> list:
        f = self._r(fn)
        return self.ray.get([f.remote(x) for x in items], timeout=TIMEOUT)

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.ray.get(self._r(fn).remote(arg), timeout=TIMEOUT)

    def windowed(self, fn: Callable, items: list, window: int) -> Iterator[Any]:
        f = self._r(fn)
        pending: deque = deque()
        for x in items:
            if len(pending) >= window:
                yield self.ray.get(pending.popleft(), timeout=TIMEOUT)
            pending.append(f.remote(x))
        while pending:
            yield self.ray.get(pending.popleft(), timeout=TIMEOUT)


class DaskSystem(Baseline):
    """dask.distributed LocalCluster: 2 worker processes x 1 thread on 127.0.0.1."""

    name = "dask"

    def start(self) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster, timeout=60)

    def stop(self) -> None:
        try:
            self.client.close(timeout=30)
        finally:
            self.cluster.close(timeout=30)

    def _map(self, fn: Callable, items: list) -> list:
        from dask.distributed import wait

        if items and isinstance(items[0], str) and len(items[0]) > 100_000:
            # Large inputs go to the workers first, as Dask recommends, instead of in the graph.
            items = self.client.scatter(items)
        futures = self.client.map(fn, items, pure=False)
        done = wait(futures, timeout=TIMEOUT)
        if done.not_done:
            raise TimeoutError("dask map did not finish")
        return futures

    def map(self, fn: Callable, items: list) -> list:
        return self.client.gather(self._map(fn, items))

    def map_reduce(self, fn: Callable, items: list, combine: Callable) -> Any:
        # Combine on the cluster, as a Dask user would: gathering 100 word-count dicts to the
        # client is very slow in Dask (seconds per dict of 5,000 keys).
        return self.client.submit(combine, self._map(fn, items), pure=False).result(TIMEOUT)

    def call(self, fn: Callable, arg: Any) -> Any:
        return self.client.submit(fn, arg, pure=False).result(timeout=TIMEOUT)

    def windowed(self, fn: Callable, items: list, window: int) -> Iterator[Any]:
        pending: deque = deque()
        for x in items:
            if len(pending) >= window:
                yield pending.popleft().result(timeout=TIMEOUT)
            pending.append(self.client.submit(fn, x, pure=False))
        while pending:
            yield pending.popleft().result(timeout=TIMEOUT)


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available(name: str) -> tuple[bool, str]:
    if name == "ray" and not importable("ray"):
        return False, "ray is not installed (pip install '.[bench]'); skipping ray"
    if name == "dask" and not (importable("dask") and importable("distributed")):
        return False, "dask[distributed] is not installed (pip install '.[bench]'); skipping dask"
    return True, ""


BASELINE_CLASSES = {
    "sequential": Sequential,
    "multiprocessing": MultiprocessingPool,
    "ray": RaySystem,
    "dask": DaskSystem,
}

__all__ = ["BASELINE_CLASSES", "available"]
