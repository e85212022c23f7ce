"""The quick-start demo: a local server, two workers, one real job, then everything stops.

python -m clusterd.demo [--workers 2] [--stop 2000000] [--chunks 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from clusterd.launch import LocalCluster


def main(argv: list[str] | None = None) -> int:
    """Run the quick-start demo: a local server and workers, one ``primes`` job, its result and
    timing; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m clusterd.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker processes to start (default 2)")
    p.add_argument("--slots", type=int, default=1, help="slots per worker (default 1)")
    p.add_argument("--stop", type=int, default=2_000_000, help="count primes below this")
    p.add_argument("--chunks", type=int, default=64, help="sub-tasks to split the job into")
    args = p.parse_args(argv)

    with LocalCluster() as cluster:
        t0 = time.perf_counter()
        cluster.start_server()
        print(f"server listening on {cluster.address} (logs in {cluster.workdir})")
        for i in range(1, args.workers + 1):
            cluster.start_worker(f"worker{i}", slots=args.slots)
        cluster.wait_workers()
        print(f"{args.workers} workers registered in {time.perf_counter() - t0:.2f}s")
        line = f'RUN primes {{"start":0,"stop":{args.stop}}} {{"chunks":{args.chunks}}}'
        print(f"> {line}")
        with cluster.client() as c:
            t1 = time.perf_counter()
            reply = c.request(line)
            elapsed = time.perf_counter() - t1
            status = c.status(reply.job)
        print(f"< RESULT {reply.job} {reply.value}")
        print(
            f"{reply.value} primes below {args.stop:,} in {elapsed:.2f}s, "
            f"{status['total']} sub-tasks spread over workers {status['ran_on']} "
            f"({os.cpu_count()} CPUs here)"
        )
    print("stopped the server and workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
