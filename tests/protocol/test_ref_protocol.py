"""Inputs by reference over the wire (docs/PROTOCOL.md, "Inputs by reference"): RUN/SUBMIT
<task> & {"ref":...,"size":N}, the DO's "ref" field, the journaled cut, and the refusals."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import LineConn
from twisted.internet.task import Clock

from clusterd.core.journal import MemoryJournal
from clusterd.core.refs import RefRange, decode_records, read_aligned
from clusterd.core.scheduler import Scheduler
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS

REGISTRY = Registry(TASKS)
TEXT = ("the quick brown fox jumps over the lazy dog " * 7).encode()
LINES = "".join(f"{i}\n" for i in range(1, 41)).encode()
FILES = {"/data/words.txt": TEXT, "/data/nums.jsonl": LINES}


def _file_reader(path: str):
    data = FILES[path]
    return lambda offset, n: data[offset : offset + n]


class RefWorker(LineConn):
    """Registers, then answers each DO by reading its ref from FILES as a worker would."""

    def __init__(self, factory) -> None:
        super().__init__(factory, port=2100)
        info = {"name": "w1", "tasks": ["sum", "wordcount", "primes"], "slots": 4}
        reply = self.ask("REGISTER " + json.dumps(info))
        assert reply[0].startswith("OK REGISTERED"), reply
        self.todo = [json.loads(x[3:]) for x in reply[1:] if x.startswith("DO ")]

    def run_all(self) -> list[dict]:
        seen = []
        while True:
            self.todo += [json.loads(x[3:]) for x in self.lines() if x.startswith("DO ")]
            if not self.todo:
                return seen
            msg = self.todo.pop(0)
            seen.append(msg)
            rng = RefRange.from_wire(msg["ref"])
            value = decode_records(read_aligned(rng, _file_reader(rng.ref)), rng.format)
            result = REGISTRY.get(msg["task"]).run(value)
            self.send(f"DONE {json.dumps({'id': msg['id'], 'result': result})}\n")


@pytest.fixture
def journal():
    return MemoryJournal()


@pytest.fixture
def core(journal):
    return Scheduler(REGISTRY, Clock(), journal)


@pytest.fixture
def factory(core):
    return ServerFactory(core, settings=ConnectionSettings(max_line=4096))


def test_wordcount_by_reference_sends_ranges_and_counts_exactly(factory, journal):
    """A '&' job becomes one DO per byte range (a "ref", no "input"), and its counts are exact."""
    w = RefWorker(factory)
    c = LineConn(factory)
    opts = {"ref": "/data/words.txt", "size": len(TEXT), "chunks": 5}
    c.send(f"SUBMIT wordcount & {json.dumps(opts)}\n")
    assert c.lines() == ["OK j1"]
    seen = w.run_all()
    assert len(seen) == 5 and all("input" not in m for m in seen)
    assert [m["ref"]["start"] for m in seen] == sorted(m["ref"]["start"] for m in seen)
    (reply,) = c.ask("WAIT j1")
    assert json.loads(reply.split(" ", 2)[2]) == dict(Counter(TEXT.decode().split()))
    (rec,) = journal.load().jobs
    assert rec.accepted.options["ref"] == {
        "url": "/data/words.txt",
        "size": len(TEXT),
        "format": "text",
    }
    assert json.loads(rec.accepted.cut_json) == [[m["ref"]["start"], m["ref"]["end"]] for m in seen]
    c.lose()
    w.lose()


def test_json_lines_sum_by_reference(factory):
    """A list task reads JSON lines by reference; the format defaults to "lines"."""
    w = RefWorker(factory)
    c = LineConn(factory)
    c.send(f'RUN sum & {{"ref":"/data/nums.jsonl","size":{len(LINES)},"chunks":3}}\n')
    seen = w.run_all()
    assert {m["ref"]["format"] for m in seen} == {"lines"}
    assert c.lines() == ["RESULT j1 820"]
    c.lose()
    w.lose()


def test_empty_reference_finishes_at_once(factory):
    """A reference of size 0 has no sub-tasks: its answer is the task's combine of nothing."""
    c = LineConn(factory)
    c.send('RUN wordcount & {"ref":"/data/empty","size":0}\n')
    assert c.lines() == ["RESULT j1 {}"]
    c.lose()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('RUN wordcount & {"size":10}', "needs option 'ref'"),
        ('RUN wordcount & {"ref":"/f"}', "needs option 'size'"),
        ("RUN wordcount &", "needs option 'ref'"),
        ('RUN wordcount & {"ref":"data.txt","size":3}', "absolute file path"),
        ('RUN wordcount & {"ref":"/f","size":-3}', "option 'size'"),
        ('RUN wordcount & {"ref":"/f","size":3,"format":"xml"}', "'format' must be"),
        ('RUN wordcount & {"ref":"/f","size":3,"format":"lines"}', "format must be 'text'"),
        ('RUN sum & {"ref":"/f","size":3,"format":"text"}', "format must be 'lines'"),
        ('RUN primes & {"ref":"/f","size":3}', "does not take a streamed input"),
        ('RUN wordcount "a b" {"ref":"/f"}', "only for an input named by reference"),
        ('RUN sum [1] {"format":"lines"}', "only for an input named by reference"),
    ],
)
def test_bad_references_are_refused(factory, line, fragment):
    """Each malformed '&' request gets ERR BAD_REQUEST with a sentence naming what is wrong."""
    c = LineConn(factory)
    (reply,) = c.ask(line)
    assert reply.startswith("ERR BAD_REQUEST") and fragment in reply, reply
    c.lose()


def test_too_many_ranges_are_refused(factory, core):
    """A reference that would cut into more ranges than the server allows is refused."""
    core.config.max_subtasks = 3
    c = LineConn(factory)
    assert c.ask('SUBMIT wordcount & {"ref":"/f","size":100,"chunks":3}') == ["OK j1"]
    (reply,) = c.ask('RUN wordcount & {"ref":"/f","size":100,"chunks":4}')
    assert reply.startswith("ERR TOO_MANY_SUBTASKS"), reply
    c.lose()


def test_reference_job_resumes_the_same_ranges_after_restart(journal, factory):
    """A restarted scheduler rebuilds a '&' job's ranges from the journal, and finishes it."""
    c = LineConn(factory)
    c.send(f'SUBMIT wordcount & {{"ref":"/data/words.txt","size":{len(TEXT)},"chunks":4}}\n')
    assert c.lines() == ["OK j1"]
    before = factory.core.get("j1").chunks
    restarted = Scheduler(REGISTRY, Clock(), journal)
    assert restarted.recover() == 1
    assert restarted.get("j1").chunks == before
    assert all(type(r) is RefRange for r in before)
    f2 = ServerFactory(restarted, settings=ConnectionSettings(max_line=4096))
    w = RefWorker(f2)
    w.run_all()
    c2 = LineConn(f2)
    (reply,) = c2.ask("WAIT j1")
    assert json.loads(reply.split(" ", 2)[2]) == dict(Counter(TEXT.decode().split()))
    for conn in (c, c2, w):
        conn.lose()


def test_a_huge_size_is_refused_before_any_range_is_built(factory):
    """A size of 10**30 bytes is TOO_MANY_SUBTASKS at once: the count is computed, not cut."""
    c = LineConn(factory)
    (reply,) = c.ask('RUN wordcount & {"ref":"/f","size":1000000000000000000000000000000}')
    assert reply.startswith("ERR TOO_MANY_SUBTASKS"), reply
    c.lose()
