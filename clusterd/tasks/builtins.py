"""The built-in tasks: sum, primes, wordcount, sort, sleep.

Each is checked in tests against the plain sequential computation. Inputs are validated in
``split`` (on the server, before the job is accepted) so a bad input is an ``ERR BAD_INPUT`` for the
client, not a failure discovered later on a worker.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from collections import Counter
from typing import Any

from clusterd.tasks.registry import Task, TaskInputError

__all__ = ["TASKS", "even_slices", "count_primes"]


def even_slices(n: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous [start, stop) ranges covering range(n), sizes differing by at most 1.

    Never more slices than items, and never an empty list: an empty input gives one empty slice, so
    every job has at least one sub-task and its combine sees the identity element.
    """
    chunks = max(1, min(chunks, n))
    size, extra = divmod(n, chunks)
    out, start = [], 0
    for i in range(chunks):
        stop = start + size + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _numbers(value: Any, task: str) -> list[int | float]:
    if not isinstance(value, list):
        raise TaskInputError(f"{task} takes a JSON array of numbers")
    for x in value:
        if type(x) not in (int, float) or (type(x) is float and not math.isfinite(x)):
            raise TaskInputError(f"{task} takes a JSON array of numbers; found {x!r}")
    return value


# --- sum --------------------------------------------------------------------------------------


def _split_list(task: str):
    def split(value: Any, chunks: int) -> list[list]:
        """Check the input is a list of finite numbers (TaskInputError otherwise) and cut it into
        ``chunks`` even slices."""
        nums = _numbers(value, task)
        return [nums[a:b] for a, b in even_slices(len(nums), chunks)]

    return split


def _sum_combine(results: list) -> int | float:
    return sum(results)


def _add(a: int | float, b: int | float) -> int | float:
    """sum's and primes' merge: addition (exact for integers; a float sum is the sequential
    sum up to rounding, as the chunked sum always was)."""
    return a + b


# --- primes -----------------------------------------------------------------------------------


def _primes_split(value: Any, chunks: int) -> list[dict]:
    if not isinstance(value, dict) or set(value) - {"start", "stop"} or "stop" not in value:
        raise TaskInputError('primes takes {"start": A, "stop": B}: count primes in [A, B)')
    start, stop = value.get("start", 0), value["stop"]
    if type(start) is not int or type(stop) is not int:
        raise TaskInputError("primes: start and stop must be integers")
    if stop < start:
        raise TaskInputError("primes: stop must not be less than start")
    return [{"start": start + a, "stop": start + b} for a, b in even_slices(stop - start, chunks)]


def count_primes(start: int, stop: int) -> int:
    """Count primes in [start, stop) by trial division: deliberately CPU-bound pure Python."""
    count = 0
    for n in range(max(start, 2), stop):
        if n < 4:
            count += 1
            continue
        if n % 2 == 0:
            continue
        limit = math.isqrt(n)
        d = 3
        while d <= limit:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def _primes_run(chunk: dict) -> int:
    return count_primes(chunk["start"], chunk["stop"])


# --- wordcount --------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:'\w+)*")


def _wordcount_split(value: Any, chunks: int) -> list[str]:
    if not isinstance(value, str):
        raise TaskInputError("wordcount takes a JSON string of text")
    n = len(value)
    chunks = max(1, min(chunks, n))
    out, start = [], 0
    for i in range(1, chunks + 1):
        stop = n if i == chunks else max(start, n * i // chunks)
        # Move the cut forward to whitespace so no word is split across two chunks.
        while 0 < stop < n and not value[stop].isspace():
            stop += 1
        if stop > start or i == chunks:
            out.append(value[start:stop])
        start = stop
    return out


# Every byte that is not [A-Za-z0-9_'] becomes a space (for ASCII text, \w is [A-Za-z0-9_]).
_ASCII_WORD_BYTES = bytes(
    c if chr(c) in "_'" or (c < 128 and chr(c).isalnum()) else 32 for c in range(256)
)


def _wordcount_run(text: str) -> dict[str, int]:
    if text.isascii():
        return _wordcount_ascii(text)
    return dict(Counter(m.lower() for m in _WORD.findall(text)))


def _wordcount_ascii(text: str) -> dict[str, int]:
    """The regex path's answer for ASCII text, about twice as fast. Splitting at every byte
    other than [A-Za-z0-9_'] leaves tokens; a token without an apostrophe is exactly one word,
    and a token with one holds the words ``_WORD`` finds in it (no match can cross the bytes
    that separate tokens, since they are neither word characters nor apostrophes)."""
    raw = text.encode("ascii").translate(_ASCII_WORD_BYTES).lower()
    if b"'" not in raw:  # every token is a word: count them as str, no per-word decode
        return dict(Counter(raw.decode("ascii").split()))
    tokens = Counter(raw.split())
    counts = {t.decode("ascii"): n for t, n in tokens.items() if b"'" not in t}
    for t, n in tokens.items():
        if b"'" in t:
            for word in _WORD.findall(t.decode("ascii")):
                counts[word] = counts.get(word, 0) + n
    return counts


def _wordcount_combine(results: list[dict[str, int]]) -> dict[str, int]:
    if len(results) == 1:  # the one merged value (the server folds wordcount's results)
        total = results[0]
    else:
        total = Counter()
        for r in results:
            total.update(r)
    # Most frequent first, ties alphabetically: a stable, readable answer.
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def _wordcount_merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Add the counts of ``b`` into ``a`` and return it: the server's fold owns its accumulator
    (``a``) and never uses it again, so folding a sub-task's counts costs their size, not the
    accumulator's. ``b`` is left as it is."""
    get = a.get
    for word, n in b.items():
        a[word] = get(word, 0) + n
    return a


# --- sort -------------------------------------------------------------------------------------


def _sort_combine(results: list[list]) -> list:
    return list(heapq.merge(*results))


# --- sleep ------------------------------------------------------------------------------------


def _sleep_split(value: Any, chunks: int) -> list[list]:
    if type(value) in (int, float):
        value = [value]
    nums = _numbers(value, "sleep")
    if any(x < 0 or x > 3600 for x in nums):
        raise TaskInputError("sleep: each duration must be between 0 and 3600 seconds")
    return [nums[a:b] for a, b in even_slices(len(nums), chunks)]


def _sleep_run(chunk: list) -> list:
    for seconds in chunk:
        time.sleep(seconds)
    return chunk


def _concat(results: list[list]) -> list:
    return [x for r in results for x in r]


TASKS = [
    Task(
        "sum",
        _split_list("sum"),
        sum,
        _sum_combine,
        "sum of a JSON array of numbers",
        stream="list",
        merge=_add,
    ),
    Task(
        "primes",
        _primes_split,
        _primes_run,
        _sum_combine,
        'count primes in [start, stop) by trial division: {"start":0,"stop":1000000}',
        merge=_add,
    ),
    Task(
        "wordcount",
        _wordcount_split,
        _wordcount_run,
        _wordcount_combine,
        "count words (lower-cased) in a JSON string; most frequent first",
        input_kind="text",
        stream="text",
        merge=_wordcount_merge,
    ),
    Task(
        "sort",
        _split_list("sort"),
        sorted,
        _sort_combine,
        "sort a JSON array of numbers",
        stream="list",
    ),
    Task(
        "sleep",
        _sleep_split,
        _sleep_run,
        _concat,
        "for tests: sleep for each duration in a JSON array (seconds) and return the array",
        stream="list",
    ),
]
