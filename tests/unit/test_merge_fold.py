"""Merge tasks: results folded into one accumulator as they are recorded, in any order, once
each; duplicates, cancels, failures and recovery (the journaled results folded again)."""

from __future__ import annotations

import gc
import json
from collections import Counter, deque

import pytest
from helpers import add_worker as add
from helpers import deterministic, restart, result_of
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from clusterd.core.folding import Folded, Kept
from clusterd.core.jobs import JobState
from clusterd.core.journal import JobEnded, MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import ErrorCode
from clusterd.tasks import Registry, Task, task
from clusterd.tasks.builtins import TASKS
from clusterd.tasks.decorator import list_split, task_of

ALL = [t.name for t in TASKS]
WORDS = ["a", "b", "the", "dog", "don't", "x_y", "ünï", "a1"]


def today(text: str, chunks: int) -> str:
    """wordcount's answer as the unfolded path gives it: every result, combined in order."""
    t = Registry(TASKS).get("wordcount")
    return json.dumps(t.combine([t.run(c) for c in t.split(text, chunks)]))


@deterministic
@given(
    words=st.lists(st.sampled_from(WORDS), max_size=60),
    chunks=st.integers(1, 12),
    order=st.randoms(use_true_random=False),
)
def test_wordcount_folded_in_any_order_gives_todays_answer(words, chunks, order):
    """Whatever order (and however duplicated) the results arrive in, the folded wordcount answer
    is byte-identical to combining every result in sub-task order."""
    text = " ".join(words)
    core = Scheduler(Registry(TASKS), Clock())
    w = add(core, "w", slots=64, tasks=ALL)
    job = core.submit("wordcount", text, chunks=chunks)
    assert isinstance(job.results, Folded)
    pending = list(w.pending())
    order.shuffle(pending)
    for sub, d in pending:
        w.answer(sub, d)
        job.record(sub.index, w.registry.get("wordcount").run(sub.input), "w")  # a duplicate
    assert job.state == JobState.DONE
    assert job.duplicates == len(pending)
    assert json.dumps(job.result) == today(text, chunks)


@deterministic
@given(nums=st.lists(st.integers(-(2**70), 2**70), max_size=40), chunks=st.integers(1, 9))
def test_sum_and_primes_fold_integers_exactly_in_any_order(nums, chunks):
    """sum folded in reverse arrival order is the exact sequential sum."""
    core = Scheduler(Registry(TASKS), Clock())
    w = add(core, "w", slots=64)
    job = core.submit("sum", nums, chunks=chunks)
    for sub, d in reversed(w.pending()):
        w.answer(sub, d)
    assert job.result == sum(nums)


def test_a_duplicate_result_is_never_folded_twice(registry, clock):
    """A second result for a sub-task already folded (a speculative copy, a late answer) is
    counted as a duplicate and changes nothing."""
    core = Scheduler(registry, clock)
    job = core.submit("sum", [1, 2, 3, 4], chunks=2)
    assert job.record(0, 3, "w") is True
    assert job.record(0, 3, "w") is False
    assert job.results.ordered() == [3]
    assert (job.done, job.duplicates) == (1, 1)


def held(job) -> int:
    """How many containers the job holds through its results (not its inputs or links)."""
    seen, todo, n = set(), deque([job.results]), 0
    while todo:
        obj = todo.popleft()
        if id(obj) in seen or not isinstance(obj, (Folded, Kept, dict, list, tuple)):
            continue
        seen.add(id(obj))
        n += 1
        todo.extend(gc.get_referents(obj))
    return n


@pytest.mark.parametrize("n", [50, 2000])
def test_a_merge_job_holds_one_accumulator_whatever_its_sub_task_count(registry, clock, n):
    """After every result but the last is in, a merge job holds one accumulator and a byte per
    sub-task, not a result list: the same containers for 50 sub-tasks as for 2,000."""
    core = Scheduler(registry, clock)
    w = add(core, "w", slots=n, tasks=ALL)
    job = core.submit("wordcount", "the dog " * n, chunks=n)
    assert job.total == n
    for sub, d in w.pending()[:-1]:
        w.answer(sub, d)
    assert held(job) == 2  # the Folded and its one accumulator dict
    assert len(job.results.done) == n and isinstance(job.results.done, bytearray)
    w.answer_all()
    assert job.result == {"dog": n, "the": n}


def test_a_kept_job_holds_every_result_for_contrast(registry, clock):
    """A task without merge still keeps each result until its combine (the count grows)."""
    core = Scheduler(registry, clock)
    w = add(core, "w", slots=100)
    job = core.submit("sort", list(range(100)), chunks=100)
    for _sub, d in w.pending()[:-1]:
        d.callback([1])
    assert held(job) >= 100


def test_a_cancelled_merge_job_drops_its_accumulator_and_folds_nothing_late(registry, clock):
    """Cancelling a merge job drops what was folded; a result arriving after is a duplicate."""
    core = Scheduler(registry, clock)
    w = add(core, "w", slots=4, tasks=ALL)
    job = core.submit("wordcount", "a b c d", chunks=4)
    subs = w.pending()
    subs[0][1].callback({"a": 1})
    core.cancel(job.id)
    assert job.state == JobState.CANCELLED
    assert job.results.ordered() == []
    assert job.record(1, {"b": 1}, "w") is False
    assert job.duplicates == 1


def test_a_merge_that_raises_fails_the_job_with_combine_error_at_once(clock):
    """A merge raising on the second result ends the job FAILED (COMBINE_ERROR) without waiting
    for the other sub-tasks, whose copies are cancelled."""

    def bad(a, b):
        raise ArithmeticError("cannot merge these")

    t = Task("bad", list_split, sum, lambda rs: rs[0], merge=bad)
    core = Scheduler(Registry([t]), clock)
    w = add(core, "w", slots=4, tasks=["bad"])
    job = core.submit("bad", [1, 2, 3, 4], chunks=4)
    (s0, d0), (s1, d1) = w.pending()[:2]
    d0.callback(1)
    assert job.state == JobState.RUNNING
    d1.callback(2)
    assert job.state == JobState.FAILED
    assert job.error["code"] == ErrorCode.COMBINE_ERROR
    assert job.error["type"] == "ArithmeticError"
    assert len(w.cancelled) == 2


def test_recovery_folds_the_journaled_results_again(registry, clock):
    """After a crash mid-job, the restarted scheduler folds the journaled results again and,
    with the missing sub-tasks run, gives the exact answer of an uninterrupted run."""
    text = "the cat and the dog and the bird " * 7
    journal = MemoryJournal()
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w", slots=8, tasks=ALL)
    job = core.submit("wordcount", text, chunks=6)
    for sub, d in w.pending()[::2]:
        w.answer(sub, d)
    core2 = restart(registry, journal)
    back = core2.get(job.id)
    assert isinstance(back.results, Folded) and back.recovered == 3
    w2 = add(core2, "w2", slots=8, tasks=ALL)
    assert w2.indices() == [1, 3, 5]
    w2.answer_all()
    assert json.dumps(back.result) == today(text, 6)
    assert result_of(back.wait()).state == JobState.DONE


def test_recovery_with_every_result_journaled_combines_the_refolded_value(registry, clock):
    """A merge job whose results were all durable but whose end was lost is combined from its
    re-folded results during recovery."""
    journal = MemoryJournal(hold=True)
    core = Scheduler(registry, clock, journal=journal)
    w = add(core, "w", slots=3)
    job = core.submit("sum", [1, 2, 3, 4, 5, 6], chunks=3)
    w.answer_all()
    journal.pending = [(r, d) for r, d in journal.pending if not isinstance(r, JobEnded)]
    journal.flush()
    assert restart(registry, journal).get(job.id).result == 21


def test_task_decorator_takes_merge_and_tasks_shows_it():
    """``@task(merge=...)`` makes a merge task whose default combine is the merged value, and
    TASKS shows ``"merge": true``."""

    @task(merge=lambda a, b: a | b, doc="letters used")
    def letters(chunk):
        return dict.fromkeys("".join(chunk), True)

    t = task_of(letters)
    assert t.describe()["merge"] is True and not t.elementwise
    assert t.combine([{"a": True}]) == {"a": True}
    core = Scheduler(Registry([t]), Clock())
    w = add(core, "w", slots=3, tasks=["letters"])
    job = core.submit("letters", ["ab", "bc", "cd"], chunks=3)
    w.answer_all()
    assert sorted(job.result) == ["a", "b", "c", "d"]
    assert Counter(TASKS_MERGING()) == Counter(["sum", "primes", "wordcount"])


def TASKS_MERGING() -> list[str]:
    return [t.name for t in TASKS if t.merge is not None]


def test_the_fakes_answer_a_generator_task_with_its_whole_result(clock):
    """FakeWorker (clusterd.testing) answers a generator run with its parts merged (a merge
    task) or concatenated (another task), as a real worker and server make them."""

    def lines(chunk):
        for x in chunk:
            yield {str(x): 1}

    def halves(chunk):
        yield chunk[: len(chunk) // 2]
        yield chunk[len(chunk) // 2 :]

    merging = Task("m", list_split, lines, lambda rs: rs[0], merge=lambda a, b: {**a, **b})
    joined = Task("j", list_split, halves, lambda rs: [x for r in rs for x in r])
    core = Scheduler(Registry([merging, joined]), clock)
    w = add(core, "w", slots=4, tasks=["m", "j"])
    m = core.submit("m", [1, 2, 3], chunks=2)
    j = core.submit("j", [1, 2, 3, 4, 5], chunks=2)
    w.answer_all()
    assert (m.result, j.result) == ({"1": 1, "2": 1, "3": 1}, [1, 2, 3, 4, 5])
