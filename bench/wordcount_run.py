"""Micro-benchmark: the built-in wordcount task's run function on one chunk of ASCII text.

    python bench/wordcount_run.py [--mb 4] [--rounds 5]

Compares the regex path (``_WORD.findall`` and ``Counter``, used for non-ASCII text) with the
bytes fast path that ``_wordcount_run`` takes for ASCII text, round by round on the same text,
and checks that both give the same counts. Prints medians in MB/s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time
from collections import Counter

from clusterd.tasks.builtins import _WORD, _wordcount_run


def _regex(text: str) -> dict[str, int]:
    return dict(Counter(m.lower() for m in _WORD.findall(text)))


def _text(mb: float) -> str:
    rng = random.Random(3)
    vocab = [
        "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 10))) for _ in range(20_000)
    ]
    vocab += ["don't", "it's", "o'clock", "rock'n'roll", "x_1", "2026", "'quoted'"]
    seps = [" "] * 12 + [", ", ". ", "; ", "! ", "\n", " - ", " (", ") "]
    out, size = [], 0
    while size < mb * 1e6:
        piece = rng.choice(vocab) + rng.choice(seps)
        out.append(piece)
        size += len(piece)
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    text = _text(args.mb)
    assert text.isascii() and _wordcount_run(text) == _regex(text)
    regex, fast = [], []
    for _ in range(args.rounds):
        for fn, times in ((_regex, regex), (_wordcount_run, fast)):
            start = time.perf_counter()
            fn(text)
            times.append(time.perf_counter() - start)
    mb = len(text) / 1e6
    r, f = statistics.median(regex), statistics.median(fast)
    print(f"{mb:.1f} MB of ASCII text, median of {args.rounds} rounds")
    print(f"regex path  {mb / r:6.1f} MB/s  ({r * 1e3:.0f} ms)")
    print(f"fast path   {mb / f:6.1f} MB/s  ({f * 1e3:.0f} ms)   {r / f:.2f}x")


if __name__ == "__main__":
    main()
