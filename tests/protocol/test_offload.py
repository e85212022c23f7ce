"""Long work off the reactor: a big job's combine and a big request line's parse and split go
through ``Scheduler.offload`` (a thread in the server), while requests keep their order."""

from __future__ import annotations

import json

from helpers import LineConn, ManualOffload
from twisted.internet.task import Clock

from clusterd.core.scheduler import OFFLOAD_SUBTASKS, Scheduler
from clusterd.server.protocol import OFFLOAD_LINE, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS

REGISTRY = Registry(TASKS)


def make(offload):
    core = Scheduler(REGISTRY, Clock(), offload=offload)
    return core, ServerFactory(core)


def worker(factory) -> LineConn:
    w = LineConn(factory, port=999)
    assert w.ask('REGISTER {"name":"w","tasks":["sum","sort"],"slots":64}')[0].startswith("OK")
    return w


def answer_all(w: LineConn) -> None:
    for line in w.lines():
        if line.startswith("DO "):
            m = json.loads(line[3:])
            w.send(f"DONE {json.dumps({'id': m['id'], 'result': sum(m['input'])})}\n")


def test_big_jobs_combine_goes_through_offload_small_ones_inline():
    """A job with many sub-tasks is combined through the offload, a small one inline, and pipelined
    replies keep their order."""
    off = ManualOffload()
    core, factory = make(off)
    w = worker(factory)
    c = LineConn(factory)
    c.send('RUN sum [1,2,3] {"chunks":2}\n')
    answer_all(w)
    assert c.lines() == ["RESULT j1 6"] and off.calls == []
    c.send(f'RUN sum {json.dumps(list(range(100)))} {{"chunks":{OFFLOAD_SUBTASKS}}}\n')
    answer_all(w)
    assert c.lines() == [] and len(off.calls) == 1  # combining elsewhere; nothing sent yet
    assert c.ask("PING") == []  # pipelined behind the RUN, as always
    off.run_all()
    assert c.lines() == ["RESULT j2 4950", "OK PONG"]
    c.lose()
    w.lose()


def test_cancel_while_combining_wins_and_a_failing_combine_is_combine_error():
    """A cancel during an offloaded combine wins, and a combine that raises fails the job with
    COMBINE_ERROR."""
    off = ManualOffload()
    core, factory = make(off)
    w = worker(factory)
    c = LineConn(factory)
    c.send(f'SUBMIT sum {json.dumps(list(range(40)))} {{"chunks":{OFFLOAD_SUBTASKS}}}\n')
    answer_all(w)
    assert c.ask("CANCEL j1") == ["OK j1", "OK j1 cancelled"]
    off.run_all()
    assert core.get("j1").state == "cancelled"
    c.send(f'SUBMIT sort {json.dumps([3, "x"] * 20)} {{"chunks":{OFFLOAD_SUBTASKS}}}\n')
    assert c.lines()[-1].startswith("ERR BAD_INPUT")  # split checks it on the server first
    job = core.submit("sum", list(range(40)), OFFLOAD_SUBTASKS)
    job_id = job.id
    for line in w.lines():
        if line.startswith("DO "):
            m = json.loads(line[3:])
            w.send(f"DONE {json.dumps({'id': m['id'], 'result': 'not a number'})}\n")
    off.run_all()
    assert core.get(job_id).error["code"] == "COMBINE_ERROR"
    c.lose()
    w.lose()


def test_big_request_line_is_parsed_off_the_reactor_in_order():
    """A RUN line over OFFLOAD_LINE is parsed and split on the offload; the connection reads
    nothing more meanwhile, so the SUBMIT pipelined behind it gets the next id and its reply
    comes second."""
    off = ManualOffload()
    core, factory = make(off)
    c = LineConn(factory)
    numbers = list(range(OFFLOAD_LINE // 7))
    big = f"SUBMIT sum {json.dumps(numbers)}\n"
    assert len(big) > OFFLOAD_LINE
    c.send(big + "SUBMIT sum [1]\nPING\n")
    assert c.lines() == [] and core.jobs() == []  # held: the small SUBMIT waits its turn
    assert c.tr.producerState == "paused"
    off.run_all()
    assert c.lines() == ["OK j1", "OK j2", "OK PONG"]
    assert core.get("j1").total == 16 and c.tr.producerState == "producing"
    c.lose()


def test_big_request_line_with_bad_json_is_refused_in_order():
    """A big request line with bad JSON, parsed off the reactor, is refused with BAD_JSON before
    the pipelined PING is answered."""
    off = ManualOffload()
    core, factory = make(off)
    c = LineConn(factory)
    c.send("RUN sum [" + "1," * OFFLOAD_LINE + "\nPING\n")
    off.run_all()
    out = c.lines()
    assert out[0].startswith("ERR BAD_JSON the job input is not valid JSON")
    assert out[1:] == ["OK PONG"]
    c.lose()
