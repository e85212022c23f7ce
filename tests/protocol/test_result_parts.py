"""Results in parts: a generator run's parts forwarded as produced (worker side), and folded
into a per-attempt partial for a merge task (server side), end to end over iosim."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from test_worker_protocol import GREETING, Client, Cluster, Worker, do_line
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from clusterd.core import jsoncodec
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import ErrorCode
from clusterd.server.protocol import ServerFactory
from clusterd.tasks import Registry, Task
from clusterd.tasks.builtins import TASKS
from clusterd.tasks.decorator import list_split
from clusterd.testing import LineConn
from clusterd.worker.pool import PoolService, RunResult


def count_lines(text: str):
    """A generator run: the word counts of each line, one part per line."""
    for line in text.split("\n"):
        yield dict(Counter(line.split()))


def add_counts(a: dict, b: dict) -> dict:
    for k, n in b.items():
        a[k] = a.get(k, 0) + n
    return a


def pieces(text: str):
    """A generator run of a task without merge: its parts are concatenated."""
    for word in text.split():
        yield [word.upper()]


REGISTRY = Registry(
    [
        *TASKS,
        Task(
            "wc",
            lambda v, n: list_split(v, n),
            lambda c: count_lines("\n".join(c)),
            lambda rs: dict(sorted(rs[0].items())),
            merge=add_counts,
        ),
        Task("upper", lambda v, n: [v], pieces, lambda rs: rs[0]),
    ]
)


class PartsPool:
    """A pool whose runs stream parts: ``manual`` leaves each run to the test (on_part and the
    Deferred are recorded); else it runs the task at once, sending each part as the child would."""

    TaskError = PoolService.TaskError
    streams_parts = True

    def __init__(self, manual: bool = False, fail_first: int = 0) -> None:
        self.manual = manual
        self.fail_first = fail_first  # runs that fail after their first part
        self.calls: list[tuple[str, object, object, Deferred]] = []

    def run(self, task, value, on_part=None):
        if on_part is None and not self.manual:
            return succeed(RunResult(REGISTRY.get(task).run_whole(value), 0.001))
        if self.manual:
            d = Deferred()
            self.calls.append((task, value, on_part, d))
            return d
        n = 0
        for part in REGISTRY.get(task).run(value):
            on_part(jsoncodec.dumpb(part))
            n += 1
            if self.fail_first:
                self.fail_first -= 1
                return fail(PoolService.TaskError("OSError", "the disk went away"))
        return succeed(RunResult(None, 0.001, n))


@pytest.fixture
def clock():
    c = Clock()
    yield c
    from test_worker_protocol import _OPEN

    for w in _OPEN:
        w.lose()
    _OPEN.clear()
    assert c.getDelayedCalls() == []


def register_parts(w: Worker) -> None:
    """Register as with a server that takes results in parts (its OK REGISTERED says so)."""
    w.send(GREETING)
    assert '"parts":true' in w.lines()[0]
    w.send('OK REGISTERED {"name":"w1","protocol":1,"parts":true}\n')


def test_a_server_that_takes_no_parts_gets_one_done(clock):
    """A worker whose server's OK REGISTERED does not say "parts" runs without on_part (the
    child then answers one value) and answers one DONE."""
    pool = PartsPool(manual=True)
    w = Worker(pool, clock, tasks=["wc"])
    w.register()
    w.send(do_line(1, "wc", ["a"]))
    [(_, _, on_part, d)] = pool.calls
    assert on_part is None
    d.callback(RunResult({"a": 1}, 0.1))
    assert w.lines() == ['DONE {"id":1,"job":"j1","result":{"a":1},"t":0.1}']


def test_parts_go_out_as_produced_and_other_lines_wait_for_the_end(clock):
    """Each part is a '+' line of a DONE stream the moment the pool hands it over; another
    run's answer waits for the stream's '.', while the heartbeat's PING passes through."""
    pool = PartsPool(manual=True)
    w = Worker(pool, clock, tasks=["wc", "sum"])
    register_parts(w)
    w.send(do_line(1, "wc", ["a b"], job="j4"))
    w.send(do_line(2, "wc", ["c"], job="j4", index=1))
    _, _, part1, d1 = pool.calls[0]
    _, _, part2, d2 = pool.calls[1]
    part1(b'{"a":1}')
    assert w.lines() == [
        'DONE {"id":1,"job":"j4","task":"wc","stream":true,"parts":true}',
        '+{"a":1}',
    ]
    part2(b'{"c":1}')  # a second stream waits for the first
    d2.callback(RunResult(None, 0.1, 1))
    clock.advance(5)  # the heartbeat's PING is not held
    assert w.lines() == ["PING"]
    part1(b'{"b":1}')
    assert w.lines() == ['+{"b":1}']
    d1.callback(RunResult(None, 0.2, 2))
    assert w.lines() == [
        ".",
        'DONE {"id":2,"job":"j4","task":"wc","stream":true,"parts":true}',
        '+{"c":1}',
        ".",
    ]


def test_a_run_failing_mid_stream_ends_it_with_its_error_line(clock):
    """A run that fails after its stream opened answers with one ERROR line, which ends the
    stream; a cancelled one ends it with '.'; a part too long for the server's line makes
    the answer ResultTooLarge."""
    pool = PartsPool(manual=True)
    w = Worker(pool, clock, tasks=["wc"])
    register_parts(w)
    w.send(do_line(1, "wc", ["a"]) + do_line(2, "wc", ["b"]) + do_line(3, "wc", ["c"]))
    (_, _, p1, d1), (_, _, p2, d2), (_, _, p3, d3) = pool.calls
    p1(b'{"a":1}')
    d1.errback(PoolService.TaskError("OSError", "the disk went away"))
    lines = w.lines()
    assert lines[:2] == [
        'DONE {"id":1,"job":"j1","task":"wc","stream":true,"parts":true}',
        '+{"a":1}',
    ]
    assert json.loads(lines[2][6:])["type"] == "OSError" and len(lines) == 3
    p2(b'{"b":1}')
    w.send('CANCEL {"id":2}\n')
    assert w.lines()[-1] == "."
    w.proto.server_max_line = 10
    p3(b'{"long":12345}')
    d3.callback(RunResult(None, 0.1, 1))
    [line] = w.lines()
    assert line.startswith("ERROR ") and json.loads(line[6:])["type"] == "ResultTooLarge"


def test_a_merge_tasks_parts_fold_into_the_answer_end_to_end():
    """A merge task whose run yields a part per line gives the same answer as counting the
    whole input, over a real server and worker connected in memory."""
    cluster = Cluster(REGISTRY)
    try:
        worker, server, pump = cluster.connect(PartsPool(), tasks=["wc", "upper"])
        client = Client(cluster.server_factory)
        text = ["the cat\nthe dog", "a cat\nthe end", "x"]
        client.ask("RUN wc " + json.dumps(text) + ' {"chunks": 3}')
        pump.flush()
        [line] = client.lines()
        want = dict(sorted(Counter(" ".join(text).split()).items()))
        assert line == "RESULT j1 " + json.dumps(want, separators=(",", ":"))
        client.ask('RUN upper "a b c"')
        pump.flush()
        assert client.lines() == ['RESULT j2 ["A","B","C"]']
    finally:
        cluster.close()


def test_a_failed_attempts_partial_is_dropped_and_the_retry_counts_once():
    """An attempt that fails after streaming a part leaves nothing in the job: the retry's
    parts alone make the answer (no count is doubled)."""
    cluster = Cluster(REGISTRY, retry_base=0.0)
    try:
        worker, server, pump = cluster.connect(PartsPool(fail_first=1), tasks=["wc"])
        client = Client(cluster.server_factory)
        client.ask('RUN wc ["a a\\nb"] {"chunks": 1, "attempts": 2}')
        pump.flush()
        cluster.clock.advance(1)
        pump.flush()
        assert client.lines() == ['RESULT j1 {"a":2,"b":1}']
        assert cluster.core.get("j1").status()["done"] == 1
        assert cluster.core.stats()["subtasks_retried"] == 1
    finally:
        cluster.close()


def test_max_result_bytes_bounds_a_parts_stream():
    """The parts of one sub-task's result count against --max-result-bytes as streamed pieces
    do: past it the job fails RESULT_TOO_LARGE."""
    cluster = Cluster(REGISTRY, max_result_bytes=40)
    try:
        worker, server, pump = cluster.connect(PartsPool(), tasks=["wc"])
        client = Client(cluster.server_factory)
        client.ask('RUN wc ["a\\nb\\nc\\nd\\ne\\nf\\ng\\nh"] {"chunks": 1}')
        pump.flush()
        [line] = client.lines()
        assert line.startswith("FAILED j1 ") and ErrorCode.RESULT_TOO_LARGE in line
    finally:
        cluster.close()


def protocol_transcript() -> list[str]:
    """The worker-by-hand transcript of docs/PROTOCOL.md, "Results in parts"."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("### Results in parts") :]
    block = section[section.index("```\n") + 4 :]
    return block[: block.index("```")].splitlines()


def test_the_protocol_md_parts_transcript_replays(clock):
    """The transcript in PROTOCOL.md, "Results in parts", replayed against a real server
    protocol: each '>' line sent by the worker, each other line the server's next, and each
    client's answer the one its comment shows."""
    core = Scheduler(Registry(TASKS), clock, retry_base=0.0)
    factory = ServerFactory(core)
    worker = LineConn(factory, "10.0.0.9", 1)
    [ok] = worker.ask('REGISTER {"name":"me","tasks":["wordcount"],"slots":1,"parts":true}')
    assert ok.startswith("OK REGISTERED") and ok.endswith(',"parts":true}')
    client = LineConn(factory, "10.0.0.8", 2)
    client.send('RUN wordcount "the cat the dog" {"chunks":1}\n')
    answers = []
    for line in protocol_transcript():
        if line.startswith("> "):
            worker.send(line[2:] + "\n")
        elif line.startswith("#"):
            want = re.search(r"RESULT j\d \{[^}]*\}", line).group(0)
            assert client.lines() == [want]
            answers.append(want)
            if want.startswith("RESULT j1"):
                client.send('RUN wordcount "a b a" {"chunks":1}\n')
        else:
            clock.advance(0)  # a retry's backoff (0 s here)
            assert worker.lines() == [line]
    assert len(answers) == 2
    worker.lose()
    client.lose()
