"""The pool child's request loop: JSON lines in, JSON lines out."""

from __future__ import annotations

import io
import json

from clusterd.tasks import Registry, Task
from clusterd.tasks.builtins import TASKS
from clusterd.worker.child import serve


def _fail(value):
    raise ZeroDivisionError(f"no {value}")


REGISTRY = Registry(
    [
        *TASKS,
        Task("fail", lambda v, n: [v], _fail, lambda rs: rs[0]),
        Task("nan", lambda v, n: [v], lambda v: float("nan"), lambda rs: rs[0]),
        Task("obj", lambda v, n: [v], lambda v: object(), lambda rs: rs[0]),
        Task("final", lambda v, n: [v], _fail, lambda rs: rs[0], no_retry=(ArithmeticError,)),
    ]
)


def run_child(*requests) -> list[dict]:
    data = b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in requests
    )
    out = io.BytesIO()
    serve(REGISTRY, io.BytesIO(data), out)
    raw = out.getvalue()
    assert raw == b"" or raw.endswith(b"\n")
    replies = [json.loads(line) for line in raw.splitlines()]
    for reply in replies:
        if isinstance(reply, dict) and reply.get("ok"):
            # Every success carries the seconds its task ran; compare the rest exactly.
            assert isinstance(reply.pop("t"), float)
        elif isinstance(reply, dict) and reply.get("ok") is False:
            # Every failure carries the formatted traceback; its content is tested below.
            assert reply.pop("traceback").startswith(("Traceback", reply["type"]))
    return replies


def test_result():
    """A request for a known task is answered ok with the task's result and the same id."""
    assert run_child({"id": 1, "task": "sum", "input": [1, 2, 3]}) == [
        {"id": 1, "ok": True, "result": 6}
    ]


def test_several_requests_answered_in_order():
    """Each request line gets one reply line, in order, each with its own id."""
    replies = run_child(
        {"id": 1, "task": "sort", "input": [3, 1, 2]},
        {"id": 2, "task": "primes", "input": {"start": 0, "stop": 10}},
        {"id": 3, "task": "wordcount", "input": "a b a"},
    )
    assert replies == [
        {"id": 1, "ok": True, "result": [1, 2, 3]},
        {"id": 2, "ok": True, "result": 4},
        {"id": 3, "ok": True, "result": {"a": 2, "b": 1}},
    ]


def test_exception_is_ok_false_with_type_and_message():
    """A task that raises is answered ok false with the exception's type and message."""
    assert run_child({"id": 9, "task": "fail", "input": 5}) == [
        {"id": 9, "ok": False, "type": "ZeroDivisionError", "message": "no 5"}
    ]


def test_exception_does_not_stop_the_loop():
    """After a failing request the child keeps serving the next ones."""
    replies = run_child(
        {"id": 1, "task": "fail", "input": 0},
        {"id": 2, "task": "sum", "input": [2, 2]},
    )
    assert [r["ok"] for r in replies] == [False, True]
    assert replies[1]["result"] == 4


def test_unknown_task():
    """A request for a task the child does not have is ok false, naming the task."""
    [reply] = run_child({"id": 4, "task": "nope", "input": 1})
    assert reply["id"] == 4
    assert reply["ok"] is False
    assert reply["type"] == "LookupError"
    assert "'nope'" in reply["message"]


def test_result_that_is_not_json_is_an_error():
    """A result JSON cannot carry (NaN, an arbitrary object) is ok false, never invalid JSON."""
    replies = run_child({"id": 1, "task": "nan", "input": 0}, {"id": 2, "task": "obj", "input": 0})
    assert [(r["id"], r["ok"]) for r in replies] == [(1, False), (2, False)]
    assert replies[0]["type"] == "ValueError"
    assert replies[1]["type"] == "TypeError"


def test_garbage_lines_are_skipped():
    """Lines that are not JSON objects with an id get no reply and do not stop the loop."""
    replies = run_child(
        b"not json",
        b"",
        b"[1, 2]",
        b"null",
        b'"text"',
        b"42",
        b'{"task": "sum", "input": [1]}',
        b"\xff\xfe",
        {"id": 5, "task": "sum", "input": [5]},
    )
    assert replies == [{"id": 5, "ok": True, "result": 5}]


def test_empty_input_gives_no_output():
    """With no requests the child writes nothing."""
    assert run_child() == []


def test_a_batch_line_gets_one_reply_line_in_order():
    """A JSON array of requests (a batch) is answered by one line: an array of replies in the
    same order, failures included, each with the seconds its task ran when it succeeded."""
    out = io.BytesIO()
    batch = [
        {"id": 1, "task": "sum", "input": [1, 2]},
        {"id": 2, "task": "nosuch", "input": 1},
        {"id": 3, "task": "sort", "input": [2, 1]},
    ]
    serve(REGISTRY, io.BytesIO(json.dumps(batch).encode() + b"\n"), out)
    [line] = out.getvalue().splitlines()
    replies = json.loads(line)
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert (replies[0]["result"], replies[2]["result"]) == (3, [1, 2])
    assert replies[1]["ok"] is False and replies[1]["type"] == "LookupError"
    assert all(r["t"] >= 0 for r in (replies[0], replies[2]))


def test_failure_carries_the_task_traceback():
    """A task that raises is answered with its formatted traceback, naming the task's frame."""
    out = io.BytesIO()
    serve(REGISTRY, io.BytesIO(b'{"id": 1, "task": "fail", "input": 5}\n'), out)
    reply = json.loads(out.getvalue())
    assert reply["traceback"].startswith("Traceback (most recent call last):")
    assert "in _fail" in reply["traceback"]
    assert reply["traceback"].rstrip().endswith("ZeroDivisionError: no 5")
    assert "_run" not in reply["traceback"]  # the child's own frame is left out
    assert "retry" not in reply


def test_no_retry_exception_is_answered_retry_false():
    """An exception the task lists in no_retry is answered with "retry": false."""
    assert run_child({"id": 2, "task": "final", "input": 1}) == [
        {"id": 2, "ok": False, "type": "ZeroDivisionError", "message": "no 1", "retry": False}
    ]


# -- generator runs: parts written as produced -----------------------------------------------


def test_a_generator_runs_parts_are_written_as_produced():
    """Each part a generator run yields is written (and flushed) as ``+<id> <json>`` before the
    next is computed; the reply then says how many parts there were instead of a result."""
    out = io.BytesIO()
    seen: list[bytes] = []

    def gen(n):
        for i in range(n):
            seen.append(out.getvalue())  # what the worker could already read
            yield {"i": i}

    reg = Registry([Task("g", lambda v, n: [v], gen, lambda rs: rs[0], merge=lambda a, b: a)])
    serve(reg, io.BytesIO(b'{"id":5,"task":"g","input":3,"parts":true}\n'), out)
    lines = out.getvalue().splitlines()
    assert lines[:3] == [b'+5 {"i":0}', b'+5 {"i":1}', b'+5 {"i":2}']
    assert seen[2].splitlines() == lines[:2]  # part 1 was out before part 2 was made
    reply = json.loads(lines[3])
    assert (reply["id"], reply["ok"], reply["parts"], "result" in reply) == (5, True, 3, False)


def test_a_generator_failing_midway_or_empty_answers_an_error():
    """A generator that raises after some parts answers ok: false; a merge task's generator
    that yields nothing is an error, another task's is one empty-list part."""

    def broken(v):
        yield [1]
        raise OSError("gone")

    def empty(v):
        yield from ()

    reg = Registry(
        [
            Task("broken", lambda v, n: [v], broken, lambda rs: rs[0]),
            Task("none", lambda v, n: [v], empty, lambda rs: rs[0], merge=lambda a, b: a),
            Task("nolist", lambda v, n: [v], empty, lambda rs: rs[0]),
        ]
    )
    data = b"".join(
        json.dumps({"id": i, "task": t, "input": 0, "parts": True}).encode() + b"\n"
        for i, t in enumerate(["broken", "none", "nolist"])
    )
    out = io.BytesIO()
    serve(reg, io.BytesIO(data), out)
    lines = out.getvalue().splitlines()
    assert lines[0] == b"+0 [1]"
    assert json.loads(lines[1])["type"] == "OSError"
    assert json.loads(lines[2])["type"] == "ValueError"
    assert lines[3] == b"+2 []" and json.loads(lines[4])["parts"] == 1


def test_a_generator_run_not_asked_for_parts_answers_one_value():
    """Without ``"parts": true`` (a server that takes no parts) a generator run's parts are made
    into one result in the child: merged for a merge task, concatenated otherwise."""

    def gen(v):
        yield {"a": 1}
        yield {"a": 2, "b": 1}

    def lists(v):
        yield [1]
        yield [2, 3]

    merge = lambda a, b: {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}  # noqa: E731
    reg = Registry(
        [
            Task("g", lambda v, n: [v], gen, lambda rs: rs[0], merge=merge),
            Task("l", lambda v, n: [v], lists, lambda rs: rs[0]),
        ]
    )
    out = io.BytesIO()
    serve(reg, io.BytesIO(b'{"id":1,"task":"g","input":0}\n{"id":2,"task":"l","input":0}\n'), out)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["result"], second["result"]) == ({"a": 3, "b": 1}, [1, 2, 3])
