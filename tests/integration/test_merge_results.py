"""Merge tasks and results in parts over real processes: generator results streamed by real pool
children, wordcount's answer unchanged, and a SIGKILLed server re-folding journaled results."""

from __future__ import annotations

import random
import re
import signal
import time
from collections import Counter

from clusterd.tasks.builtins import TASKS

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "don't", "ünï"]


def sequential_words(text: str) -> dict[str, int]:
    c = Counter(m.lower() for m in re.findall(r"\w+(?:'\w+)*", text))
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def test_generator_results_stream_through_real_workers(cluster):
    """A merge task whose run yields a part per line, and a task without merge yielding list
    parts, give the answers of the sequential computation over real pool children."""
    rng = random.Random(7)
    lines = [" ".join(rng.choices(WORDS, k=50)) for _ in range(400)]
    want = dict(sorted(Counter(" ".join(lines).split()).items()))
    with cluster.client(timeout=60) as c:
        assert c.run("wc_lines", {"lines": lines}, 8) == want
        big = c.run("expand_parts", 300_000)  # ~5 MB of parts, more than one line holds
        assert len(big) == 300_000 and big[-1] == "item-00299999"


def test_wordcount_over_a_big_input_gives_todays_answer(cluster):
    """wordcount over a 6 MB text (folded as results arrive) equals the sequential count and the
    unfolded combine of every result, byte for byte."""
    rng = random.Random(3)
    text = "\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(90_000))
    wc = next(t for t in TASKS if t.name == "wordcount")
    unfolded = wc.combine([wc.run(x) for x in wc.split(text, 24)])
    with cluster.client(timeout=120) as c:
        got = c.run("wordcount", text, 24)
    assert got == sequential_words(text) == unfolded
    assert list(got) == list(unfolded)  # the same order: most frequent first, ties by word


def test_a_sigkilled_server_refolds_journaled_results_to_the_exact_answer(fresh_cluster):
    """SIGKILL the server while a merge job is half done; after a restart on the same journal
    the journaled results are folded again, the rest run, and the answer is exact."""
    c = fresh_cluster
    lines = [f"w{i % 7} w{i % 3} common" for i in range(24)]
    want = dict(sorted(Counter(" ".join(lines).split()).items()))
    with c.client(timeout=60) as client:
        job = client.submit("wc_lines", {"lines": lines, "delay": 0.05}, 24)
        deadline = time.monotonic() + 60
        while client.status(job)["done"] < 10:
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.05)
    c.kill_server(signal.SIGKILL)
    c.start_server(c.port)
    c.wait_workers(["w1", "w2"], timeout=60)
    with c.client(timeout=60) as client:
        status = client.status(job)
        # Results are journaled without a waiter: the last few before the kill may be lost
        # (and run again); those that were durable come back folded.
        assert status["recovered"] >= 1 and status["total"] == 24
        assert client.wait(job) == want
