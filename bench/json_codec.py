"""Micro-benchmark: clusterd's JSON paths with orjson (clusterd.core.jsoncodec) and without.

    python bench/json_codec.py [--rounds 7] [--target 0.05]

"stdlib" runs the very same clusterd functions with orjson switched off, which is the code path
clusterd used before the codec (stdlib ``json``). The two are interleaved round by round, so both
see the same machine load; each figure is the median over the rounds of the time per call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time
from collections.abc import Callable
from typing import Any

from clusterd.core import jsoncodec
from clusterd.core.wire import dumps, parse_job_request, parse_json_object


def _messages() -> list[tuple[str, Callable[[], Any]]]:
    rng = random.Random(7)
    do = {"id": 41, "job": "j3", "index": 7, "task": "sum", "attempt": 1, "input": [1, 2, 3]}
    done = {"id": 41, "job": "j3", "result": 6, "t": 1.8312e-05}
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(5000)]
    words += ["re-enter", "don't", "C++"]
    text = ""
    while len(text) < 1 << 20:
        text += " ".join(rng.choices(words, k=1000)) + ".\n"
    text = text[: 1 << 20]
    big_do = dict(do, task="wordcount", input=text)
    # One accented word makes the string non-ASCII, which both libraries build more slowly.
    big_do_utf8 = dict(big_do, input=text[:-6] + " café")
    counts = {w: rng.randint(1, 500) for w in words}
    big_done = dict(done, result=counts)
    ints = [rng.randint(0, 10**9) for _ in range(20_000)]
    lines = {k: dumps(v) for k, v in [("do", do), ("done", done), ("big_do", big_do)]}
    lines["big_done"] = dumps(big_done)
    lines["big_do_utf8"] = dumps(big_do_utf8)
    run_ints = "sum " + dumps(ints) + ' {"chunks":8}'
    return [
        ("encode DO line", lambda: dumps(do)),
        ("decode DO line", lambda: parse_json_object(lines["do"], "DO")),
        ("encode DONE line", lambda: dumps(done)),
        ("decode DONE line", lambda: parse_json_object(lines["done"], "DONE", 100_000)),
        ("encode DO, 1 MiB ASCII text", lambda: dumps(big_do)),
        ("decode DO, 1 MiB ASCII text", lambda: parse_json_object(lines["big_do"], "DO")),
        ("encode DO, 1 MiB text, not ASCII", lambda: dumps(big_do_utf8)),
        ("decode DO, 1 MiB text, not ASCII", lambda: parse_json_object(lines["big_do_utf8"], "DO")),
        ("encode DONE, 5k-word counts", lambda: dumps(big_done)),
        ("decode DONE, 5k-word counts", lambda: parse_json_object(lines["big_done"], "DONE")),
        ("encode 20,000-int list", lambda: dumps(ints)),
        ("decode RUN sum <20,000 ints> {opts}", lambda: parse_job_request(run_ints)),
    ]


def _per_call(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _loops(fn: Callable[[], Any], target: float) -> int:
    n = 1
    while True:
        t = _per_call(fn, n) * n
        if t >= target / 4:
            return max(1, int(n * target / t))
        n *= 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.05, help="seconds per timed round")
    args = ap.parse_args()
    if jsoncodec.orjson is None:
        raise SystemExit("orjson is not installed")
    fast = jsoncodec.orjson
    print(f"orjson {fast.__version__}; median of {args.rounds} rounds, time per call")
    print(f"{'operation':38} {'stdlib':>10} {'orjson':>10} {'speedup':>8}")
    for name, fn in _messages():
        jsoncodec.orjson = None
        n_std = _loops(fn, args.target)
        jsoncodec.orjson = fast
        n_fast = _loops(fn, args.target)
        std, new = [], []
        for _ in range(args.rounds):
            jsoncodec.orjson = None
            std.append(_per_call(fn, n_std))
            jsoncodec.orjson = fast
            new.append(_per_call(fn, n_fast))
        s, f = statistics.median(std), statistics.median(new)
        print(f"{name:38} {_fmt(s):>10} {_fmt(f):>10} {s / f:7.1f}x")


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    main()
