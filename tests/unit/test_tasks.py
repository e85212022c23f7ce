"""Built-in tasks and the task registry: split -> run -> combine equals the plain computation."""

from __future__ import annotations

import math
import sys
from collections import Counter

import pytest
from helpers import deterministic
from hypothesis import given
from hypothesis import strategies as st

from clusterd.tasks import Registry, Task, TaskInputError, load_registry
from clusterd.tasks.builtins import TASKS, count_primes, even_slices

REGISTRY = Registry(TASKS)
CHUNK_COUNTS = [1, 2, 3, 7, 16, 1000]


def distributed(name: str, value, chunks: int):
    """Run a task the way the cluster does: split, run each chunk on its own, combine in order."""
    task = REGISTRY.get(name)
    assert task is not None
    pieces = list(task.split(value, chunks))
    return task.combine([task.run(p) for p in pieces])


def primes_by_sieve(start: int, stop: int) -> int:
    if stop <= 2:
        return 0
    sieve = bytearray([1]) * stop
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(stop - 1) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return sum(sieve[max(start, 0) : stop])


def words(text: str) -> dict[str, int]:
    import re

    c = Counter(m.lower() for m in re.findall(r"\w+(?:'\w+)*", text))
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


# -- the built-ins are all there -----------------------------------------------------------------


def test_builtin_names():
    """The built-in registry holds exactly sum, primes, wordcount, sort and sleep."""
    assert REGISTRY.names() == ["primes", "sleep", "sort", "sum", "wordcount"]
    assert REGISTRY.get("wordcount").input_kind == "text"
    assert REGISTRY.get("sum").describe() == {
        "name": "sum",
        "doc": "sum of a JSON array of numbers",
        "input": "json",
        "stream": "list",
        "merge": True,
    }
    assert "stream" not in REGISTRY.get("primes").describe()
    assert REGISTRY.get("wordcount").stream == "text"


# -- sum -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNK_COUNTS)
@pytest.mark.parametrize(
    "value", [[], [5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], list(range(-50, 333)), [10**30, -1, 2]]
)
def test_sum_matches_sequential(value, chunks):
    """sum over any chunk count, including more chunks than items and no items, is sum()."""
    assert distributed("sum", value, chunks) == sum(value)


def test_sum_of_floats_is_close():
    """A float sum computed in chunks is the sequential sum up to rounding."""
    value = [0.1 * i for i in range(100)]
    for chunks in CHUNK_COUNTS:
        assert math.isclose(distributed("sum", value, chunks), sum(value), rel_tol=1e-12)


@deterministic
@given(
    value=st.lists(st.integers(min_value=-(10**12), max_value=10**12)), chunks=st.integers(1, 40)
)
def test_sum_property(value, chunks):
    """For any integer list and chunk count, the chunked sum equals the plain sum."""
    assert distributed("sum", value, chunks) == sum(value)


# -- primes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNK_COUNTS)
@pytest.mark.parametrize(
    "value",
    [
        {"stop": 0},
        {"stop": 1000},
        {"start": 0, "stop": 2},
        {"start": 0, "stop": 3},
        {"start": 97, "stop": 98},
        {"start": 90, "stop": 200},
        {"start": -20, "stop": 30},
        {"start": 500, "stop": 500},
    ],
)
def test_primes_matches_sequential(value, chunks):
    """primes over any chunk count equals counting primes in [start, stop) with a sieve."""
    expected = primes_by_sieve(value.get("start", 0), value["stop"])
    assert distributed("primes", value, chunks) == expected


def test_count_primes_small_values():
    """count_primes knows 2 and 3 are prime and 0, 1 and 4 are not."""
    assert count_primes(0, 2) == 0
    assert count_primes(2, 3) == 1
    assert count_primes(3, 4) == 1
    assert count_primes(4, 5) == 0
    assert count_primes(0, 100) == 25


def test_primes_split_covers_range_without_overlap():
    """primes chunks are contiguous, non-overlapping and cover [start, stop) exactly."""
    pieces = REGISTRY.get("primes").split({"start": 10, "stop": 33}, 4)
    assert pieces[0]["start"] == 10
    assert pieces[-1]["stop"] == 33
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a["stop"] == b["start"]
    assert len(pieces) == 4


# -- wordcount -----------------------------------------------------------------------------------

TEXTS = [
    "",
    "   ",
    "word",
    "the cat and the hat",
    "Don't stop; don't STOP!\n\tthe end.  The END",
    "a-b a_b a'b 'a' b''c 12 3.14",
    "über Über ÜBER naïve café\u00a0café",
    "x " * 200,
    "supercalifragilistic",
]


@pytest.mark.parametrize("chunks", CHUNK_COUNTS)
@pytest.mark.parametrize("text", TEXTS)
def test_wordcount_matches_sequential(text, chunks):
    """wordcount over any chunk count equals counting the words of the whole text."""
    assert distributed("wordcount", text, chunks) == words(text)


def test_wordcount_never_splits_a_word():
    """Chunk boundaries fall on whitespace, so the chunks rejoin to the input with no word cut."""
    text = "alpha beta gamma delta epsilon"
    pieces = REGISTRY.get("wordcount").split(text, 4)
    assert "".join(pieces) == text
    for p in pieces[1:]:
        assert p[0].isspace()


def test_wordcount_orders_most_frequent_first():
    """The wordcount answer lists words most frequent first, ties alphabetically."""
    result = distributed("wordcount", "b a c b a b", 3)
    assert list(result.items()) == [("b", 3), ("a", 2), ("c", 1)]


@deterministic
@given(text=st.text(max_size=200), chunks=st.integers(1, 30))
def test_wordcount_property(text, chunks):
    """For any text and chunk count, the chunked word count equals the whole-text count."""
    pieces = REGISTRY.get("wordcount").split(text, chunks)
    assert "".join(pieces) == text
    assert distributed("wordcount", text, chunks) == words(text)


# -- sort ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNK_COUNTS)
@pytest.mark.parametrize(
    "value", [[], [1], [3, 1, 2], list(range(100, 0, -1)), [2.5, -1, 2, 2.5, 0, -0.5, 10**20]]
)
def test_sort_matches_sequential(value, chunks):
    """sort over any chunk count equals sorted()."""
    assert distributed("sort", value, chunks) == sorted(value)


@deterministic
@given(
    value=st.lists(
        st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False))
    ),
    chunks=st.integers(1, 40),
)
def test_sort_property(value, chunks):
    """For any list of finite numbers and chunk count, the merged chunks equal sorted()."""
    assert distributed("sort", value, chunks) == sorted(value)


# -- sleep ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNK_COUNTS)
@pytest.mark.parametrize("value", [[], [0], [0, 0.0, 0], [0] * 10])
def test_sleep_matches_sequential(value, chunks):
    """sleep with zero durations returns its durations in input order over any chunk count."""
    assert distributed("sleep", value, chunks) == value


def test_sleep_takes_a_single_number():
    """sleep also takes one number, treated as a one-element array."""
    assert distributed("sleep", 0, 3) == [0]


# -- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("sum", {}),
        ("sum", "1,2"),
        ("sum", 3),
        ("sum", None),
        ("sum", [1, "2"]),
        ("sum", [True]),
        ("sum", [None]),
        ("sum", [[1]]),
        ("sum", [math.nan]),
        ("sum", [math.inf]),
        ("sort", [1, "a"]),
        ("sort", {"a": 1}),
        ("primes", []),
        ("primes", {}),
        ("primes", {"start": 1}),
        ("primes", {"stop": "10"}),
        ("primes", {"start": 1.5, "stop": 3}),
        ("primes", {"start": 0, "stop": True}),
        ("primes", {"start": 5, "stop": 1}),
        ("primes", {"stop": 5, "step": 2}),
        ("wordcount", 5),
        ("wordcount", ["a b"]),
        ("wordcount", None),
        ("sleep", -1),
        ("sleep", [0, 3601]),
        ("sleep", "1"),
        ("sleep", [False]),
        ("sleep", math.inf),
    ],
)
def test_bad_inputs_raise_task_input_error(name, value):
    """A built-in's split refuses an input of the wrong shape with TaskInputError."""
    with pytest.raises(TaskInputError):
        REGISTRY.get(name).split(value, 4)


def test_task_input_error_is_a_value_error():
    """TaskInputError subclasses ValueError, so generic handlers still catch it."""
    assert issubclass(TaskInputError, ValueError)


# -- even_slices ---------------------------------------------------------------------------------


@deterministic
@given(n=st.integers(0, 500), chunks=st.integers(-5, 600))
def test_even_slices_properties(n, chunks):
    """even_slices covers range(n) contiguously with max(1, min(chunks, n)) near-equal slices."""
    slices = even_slices(n, chunks)
    assert len(slices) == max(1, min(chunks, n))
    assert slices[0][0] == 0
    assert slices[-1][1] == n
    for (_, stop), (start, _) in zip(slices, slices[1:], strict=False):
        assert stop == start
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= (1 if n else 0)
    assert sizes == sorted(sizes, reverse=True)


def test_even_slices_examples():
    """even_slices gives the bigger slices first and one empty slice for no items."""
    assert even_slices(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert even_slices(0, 5) == [(0, 0)]
    assert even_slices(2, 5) == [(0, 1), (1, 2)]


# -- registry ------------------------------------------------------------------------------------


def _double() -> Task:
    return Task("double", lambda v, n: [v], lambda x: 2 * x, lambda rs: rs[0])


def test_registry_lookup():
    """A registry finds tasks by name, answers `in`, iterates and lists names sorted."""
    reg = Registry([_double()])
    assert reg.get("double").run(4) == 8
    assert reg.get("nope") is None
    assert "double" in reg
    assert "nope" not in reg
    assert [t.name for t in reg] == ["double"]


def test_registry_rejects_duplicate_names():
    """Adding a second task under a name already taken is an error, not a silent shadow."""
    reg = Registry([_double()])
    with pytest.raises(ValueError, match="double"):
        reg.add(_double())
    with pytest.raises(ValueError):
        Registry([*TASKS, Task("sum", lambda v, n: [v], sum, sum)])


def test_registry_rejects_non_tasks():
    """Only Task objects can be registered."""
    with pytest.raises(TypeError):
        Registry().add(lambda x: x)


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    """Write a module into a temporary directory on sys.path; forget it from sys.modules after."""
    names = []

    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_load_registry_with_a_tasks_module(task_module):
    """load_registry adds the TASKS of a named module after the built-ins."""
    name = task_module(
        "clusterd_test_tasks_ok",
        "from clusterd.tasks import Task\n"
        "TASKS = [Task('triple', lambda v, n: [v], lambda x: 3 * x, lambda rs: rs[0], 'x3')]\n",
    )
    reg = load_registry([name], use_entry_points=False)
    assert "triple" in reg
    assert "sum" in reg
    task = reg.get("triple")
    assert task.combine([task.run(c) for c in task.split(5, 4)]) == 15


def test_load_registry_default_has_builtins():
    """load_registry with no modules holds the built-ins (entry points included when present)."""
    reg = load_registry()
    assert {"sum", "primes", "wordcount", "sort", "sleep"} <= set(reg.names())


def test_load_registry_rejects_a_module_without_tasks(task_module):
    """A --tasks module that defines no TASKS list is an error naming the module."""
    name = task_module("clusterd_test_tasks_none", "X = 1\n")
    with pytest.raises(ValueError, match="TASKS"):
        load_registry([name], use_entry_points=False)


def test_load_registry_rejects_tasks_that_are_not_tasks(task_module):
    """A module whose TASKS holds something other than Task objects is rejected."""
    name = task_module("clusterd_test_tasks_bad", "TASKS = ['sum']\n")
    with pytest.raises(ValueError):
        load_registry([name], use_entry_points=False)


def test_load_registry_rejects_a_module_shadowing_a_builtin(task_module):
    """A module may not redefine a built-in task's name."""
    name = task_module(
        "clusterd_test_tasks_shadow",
        "from clusterd.tasks import Task\nTASKS = [Task('sum', lambda v, n: [v], sum, sum)]\n",
    )
    with pytest.raises(ValueError, match="sum"):
        load_registry([name], use_entry_points=False)


# Every ASCII character class the fast path treats differently: word characters, apostrophes
# (inside, around and doubled), other punctuation, every kind of ASCII whitespace and controls.
ascii_texts = st.text(
    alphabet=st.sampled_from(
        list("abcXYZ019_")
        + ["'"] * 4
        + list('-.,;:!?"()[]{}@#$%^&*+=/\\|<>`~')
        + list(" \t\n\r\x0b\x0c")
        + ["\x00", "\x1f", "\x7f"]
    ),
    max_size=300,
)


@deterministic
@given(text=ascii_texts)
def test_wordcount_ascii_fast_path_equals_the_regex(text):
    """For ASCII text, the bytes fast path counts exactly what the regex counts."""
    from clusterd.tasks.builtins import _WORD, _wordcount_ascii, _wordcount_run

    expected = dict(Counter(m.lower() for m in _WORD.findall(text)))
    assert _wordcount_ascii(text) == expected
    assert _wordcount_run(text) == expected


@pytest.mark.parametrize(
    "text", ["Don't 'quote' it''s rock'n'roll o'clock ''' a'", "A_b 9'9 _'_ x' 'y", "\x00a\x7fb"]
)
def test_wordcount_ascii_examples(text):
    """The ASCII fast path of wordcount counts the same words as the regular expression does."""
    from clusterd.tasks.builtins import _WORD, _wordcount_ascii

    assert _wordcount_ascii(text) == dict(Counter(m.lower() for m in _WORD.findall(text)))
