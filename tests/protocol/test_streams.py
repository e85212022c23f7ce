"""Streamed inputs over the wire (docs/PROTOCOL.md, "Streamed values"): RUN/SUBMIT <task> @,
piece lines, the '.' line, errors mid-stream, flow control, cancellation and recovery."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import LineConn
from twisted.internet.task import Clock

from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS

REGISTRY = Registry(TASKS)


class Worker(LineConn):
    """Registers, then runs every DO it is sent when asked to."""

    def __init__(self, factory, name="w1", slots=2) -> None:
        super().__init__(factory, port=2000 + len(name))
        info = {"name": name, "tasks": ["sum", "sort", "wordcount"], "slots": slots}
        reply = self.ask("REGISTER " + json.dumps(info))
        assert reply[0].startswith("OK REGISTERED"), reply
        self.todo = [json.loads(x[3:]) for x in reply[1:] if x.startswith("DO ")]

    def collect(self) -> list[dict]:
        for line in self.lines():
            if line.startswith("DO "):
                self.todo.append(json.loads(line[3:]))
            elif line.startswith("CANCEL "):
                gone = json.loads(line[7:])["id"]
                self.todo = [m for m in self.todo if m["id"] != gone]
        return self.todo

    def run_all(self) -> int:
        n = 0
        while self.collect():
            msg = self.todo.pop(0)
            result = REGISTRY.get(msg["task"]).run(msg["input"])
            self.send(f"DONE {json.dumps({'id': msg['id'], 'result': result})}\n")
            n += 1
        return n


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def journal():
    return MemoryJournal()


@pytest.fixture
def core(clock, journal):
    return Scheduler(REGISTRY, clock, journal)


@pytest.fixture
def factory(core):
    return ServerFactory(core, settings=ConnectionSettings(max_line=4096))


def close_all(*conns) -> None:
    for c in conns:
        c.lose()


def test_streamed_run_sums_pieces_and_cuts_by_size(factory, core):
    """Array pieces are concatenated; with size and chunks, sub-tasks are equal slices that are
    dispatched while the input is still arriving."""
    w = Worker(factory)
    c = LineConn(factory)
    assert c.ask('RUN sum @ {"size":10,"chunks":5}') == []
    c.send("+[1,2,3]\n")
    assert [m["input"] for m in w.collect()] == [[1, 2]]  # dispatched before the '.'
    c.send("+[4,5,6,7]\n+[8,9,10]\n")
    w.run_all()
    assert c.lines() == []  # no answer before the end of the input
    c.send(".\n")
    w.run_all()
    assert c.lines() == ["RESULT j1 55"]
    assert core.get("j1").total == 5
    close_all(c, w)


def test_streamed_text_is_cut_at_whitespace_only(factory, core):
    """A text input is cut at whitespace, so word counts are exact whatever the piece edges."""
    w = Worker(factory)
    c = LineConn(factory)
    words = ["alpha", "beta", "gamma", "delta"] * 50
    text = " ".join(words)
    c.send(f'SUBMIT wordcount @ {{"size":{len(text)},"chunks":7}}\n')
    for i in range(0, len(text), 37):  # piece edges fall inside words
        c.send("+" + json.dumps(text[i : i + 37]) + "\n")
    c.send(".\n")
    assert c.lines() == ["OK j1"]
    w.run_all()
    (reply,) = c.ask("WAIT j1")
    assert reply.startswith("RESULT j1 ") and json.loads(reply[10:]) == dict(Counter(words))
    inputs = core.get("j1").total
    assert 5 <= inputs <= 8
    close_all(c, w)


def test_submit_reply_waits_for_the_sealed_input_to_be_durable(clock, factory):
    """The id is shown only once the whole input is journaled."""
    journal = MemoryJournal(hold=True)
    core = Scheduler(REGISTRY, clock, journal)
    c = LineConn(ServerFactory(core))
    c.send("SUBMIT sum @\n+[1,2]\n.\n")
    assert c.lines() == []
    journal.flush()
    assert c.lines() == ["OK j1"]
    kinds = [type(r).__name__ for r in journal.appended]
    assert kinds == ["JobAccepted", "ChunksAdded", "JobSealed"]
    c.lose()


def test_bad_piece_refuses_at_once_and_drops_the_rest(factory, core):
    """A piece of the wrong type gets one ERR at once; the job fails with the same code, the
    remaining pieces are dropped, and the connection carries on after the '.'."""
    c = LineConn(factory)
    c.send("RUN sum @\n+[1,2]\n")
    assert c.ask('+"text"') == [
        "ERR BAD_INPUT piece 2: each piece of this input must be a JSON array. "
        "Job j1 was abandoned."
    ]
    assert c.ask("+[3]") == []
    assert c.ask(".") == []
    assert c.ask("PING") == ["OK PONG"]
    status = json.loads(c.ask("STATUS j1")[0][3:])
    assert status["state"] == "failed" and status["error"]["code"] == "BAD_INPUT"
    c.lose()


def test_piece_failing_the_tasks_rules_is_bad_input(factory):
    """Each cut sub-task input goes through the task's split, which validates it."""
    c = LineConn(factory)
    c.send('RUN sum @ {"size":2,"chunks":1}\n')
    assert c.ask('+[1,"x"]')[0].startswith("ERR BAD_INPUT sum takes a JSON array of numbers")
    c.send(".\n")
    c.lose()


def test_malformed_piece_json_is_bad_json(factory):
    """A streamed piece that is not valid JSON is refused with BAD_JSON, and the end line then gets
    no second reply."""
    c = LineConn(factory)
    c.send("SUBMIT sum @\n")
    assert c.ask("+[1,")[0].startswith("ERR BAD_JSON piece 1 is not valid JSON")
    assert c.ask(".") == []
    c.lose()


def test_stream_left_without_end_line_is_refused_and_line_read_as_request(factory):
    """A line that is neither a piece nor '.' ends the stream with an ERR, and is then read
    as the request it looks like, so a forgotten '.' cannot swallow a session."""
    c = LineConn(factory)
    c.send("RUN sum @\n+[1]\n")
    out = c.ask("PING")
    assert out[0].startswith("ERR BAD_REQUEST a streamed input is piece lines")
    assert out[1:] == ["OK PONG"]
    c.lose()


def test_overlong_piece_is_line_too_long(factory):
    """A streamed piece longer than the line limit is refused with LINE_TOO_LONG, and the end line
    then gets no second reply."""
    c = LineConn(factory)
    c.send("RUN sum @\n")
    out = c.ask("+[" + "1," * 3000 + "1]")
    assert out[0].startswith("ERR LINE_TOO_LONG a piece is longer than 4096 bytes")
    assert c.ask(".") == []
    c.lose()


def test_input_byte_limit(clock):
    """A streamed input growing past max_input_bytes is refused with INPUT_TOO_LARGE."""
    core = Scheduler(REGISTRY, clock, max_input_bytes=20)
    c = LineConn(ServerFactory(core))
    c.send("RUN sum @\n+[1,2,3,4]\n")
    assert c.ask("+[5,6,7,8,9,10,11]")[0].startswith("ERR INPUT_TOO_LARGE")
    c.send(".\n")
    c.lose()


def test_too_many_subtasks_while_streaming(clock):
    """A streamed input that would cut into more than max_subtasks sub-tasks is refused with
    TOO_MANY_SUBTASKS."""
    core = Scheduler(REGISTRY, clock, max_subtasks=3)
    c = LineConn(ServerFactory(core))
    c.send('RUN sum @ {"size":10,"chunks":3}\n')
    out = c.ask("+" + json.dumps(list(range(20))))
    assert out[0].startswith("ERR TOO_MANY_SUBTASKS")
    c.send(".\n")
    c.lose()


def test_task_without_streaming_and_bad_size_are_refused(factory):
    """A stream for a task that takes none, a size option without a stream, and a negative size are
    refused with BAD_REQUEST."""
    c = LineConn(factory)
    assert c.ask("RUN primes @")[0].startswith(
        "ERR BAD_REQUEST task primes does not take a streamed input"
    )
    assert c.ask('RUN sum [1] {"size":3}')[0].startswith(
        "ERR BAD_REQUEST option 'size' is only for a streamed input"
    )
    assert c.ask('RUN sum @ {"size":-1}')[0].startswith("ERR BAD_REQUEST option 'size'")
    c.lose()


def test_empty_stream_is_one_empty_subtask(factory):
    """An empty streamed input runs as one empty sub-task and answers its result."""
    w = Worker(factory)
    c = LineConn(factory)
    c.send("RUN sum @\n.\n")
    w.run_all()
    assert c.lines() == ["RESULT j1 0"]
    close_all(c, w)


def test_connection_lost_mid_stream_fails_the_job(factory, core):
    """A connection lost in the middle of a streamed input fails the job with UPLOAD_INCOMPLETE."""
    c = LineConn(factory)
    c.send("SUBMIT sum @\n+[1,2]\n")
    c.lose()
    job = core.get("j1")
    assert job.state == "failed" and job.error["code"] == "UPLOAD_INCOMPLETE"


def test_half_close_mid_stream_answers_err_and_closes(factory, core):
    """A half-close in the middle of a streamed input answers ERR UPLOAD_INCOMPLETE and closes the
    connection."""
    c = LineConn(factory)
    c.send("RUN sum @\n+[1,2]\n")
    c.proto.readConnectionLost()
    assert c.lines()[0].startswith("ERR UPLOAD_INCOMPLETE")
    assert c.tr.disconnecting
    c.lose()


def test_cancel_while_streaming_reads_rest_and_reports_cancelled(factory, core):
    """A job cancelled while its input streams in still reads the rest of the stream, then answers
    CANCELLED."""
    c = LineConn(factory)
    other = LineConn(factory)
    c.send("RUN sum @\n+[1,2]\n")
    assert other.ask("CANCEL j1") == ["OK j1 cancelled"]
    c.send("+[3]\n.\n")
    assert c.lines() == ["CANCELLED j1"]
    close_all(c, other)


def test_known_key_returns_existing_job_and_drops_pieces(factory, core):
    """A streamed SUBMIT with a known key answers the existing job's id and drops its pieces."""
    w = Worker(factory)
    c = LineConn(factory)
    c.send('SUBMIT sum @ {"key":"k1"}\n+[1,2]\n.\n')
    assert c.lines() == ["OK j1"]
    c.send('SUBMIT sum @ {"key":"k1"}\n+[100]\n.\n')
    assert c.lines() == ["OK j1"]
    w.run_all()
    assert c.ask("WAIT j1") == ["RESULT j1 3"]
    assert len(core.jobs()) == 1
    close_all(c, w)


def test_flow_control_pauses_reading_until_work_is_done(factory, core):
    """With no worker to take sub-tasks, reading stops once enough are queued, and resumes
    as results arrive: the server holds what the job needs now, not the whole input."""
    c = LineConn(factory)
    c.send('RUN sum @ {"size":1000,"chunks":100}\n')
    for i in range(20):
        c.send(json.dumps(list(range(i * 10, i * 10 + 10))).join(["+", "\n"]))
    assert c.tr.producerState == "paused"
    job = core.get("j1")
    assert job.queued >= 8
    w = Worker(factory, slots=1)
    w.run_all()
    assert c.tr.producerState == "producing"
    c.lose()
    w.lose()


def test_a_held_upload_resumes_when_workers_take_sub_tasks_before_any_result(factory, core, clock):
    """A held upload reads again on the next turn after a worker takes queued sub-tasks,
    without waiting for a result: workers prefetch, and must not drain the queue and idle
    while the next pieces wait in TCP buffers."""
    c = LineConn(factory)
    c.send('RUN sum @ {"size":1000,"chunks":100}\n')
    for i in range(20):
        c.send(json.dumps(list(range(i * 10, i * 10 + 10))).join(["+", "\n"]))
    assert c.tr.producerState == "paused"
    job = core.get("j1")
    cut = job.total  # sub-tasks cut from the pieces read so far; the rest wait unread
    w = Worker(factory, slots=4)  # takes sub-tasks, answers none
    assert job.queued < 8 and w.collect()
    assert job.total == cut  # nothing read from inside the dispatch loop
    clock.advance(0)
    assert job.total > cut and job.queued == 8  # read again, until enough is queued
    c.lose()
    w.lose()


def test_streamed_job_survives_restart_from_journaled_inputs(clock, journal, factory):
    """A sealed streamed job resumes from its journaled sub-task inputs; an unsealed one fails
    with UPLOAD_INCOMPLETE."""
    c = LineConn(factory)
    c.send('SUBMIT sum @ {"size":6,"chunks":3}\n+[1,2,3,4,5,6]\n.\n')
    assert c.lines() == ["OK j1"]
    c.send("SUBMIT sum @\n+[1]\n")
    restarted = Scheduler(REGISTRY, clock, journal)
    assert restarted.recover() == 2  # both unfinished; the unsealed one fails at once
    f2 = ServerFactory(restarted)
    w = Worker(f2)
    w.run_all()
    c2 = LineConn(f2)
    assert c2.ask("WAIT j1") == ["RESULT j1 21"]
    assert c2.ask("WAIT j2")[0].startswith("FAILED j2 UPLOAD_INCOMPLETE")
    close_all(c, c2, w)


@pytest.mark.parametrize(
    "start, code",
    [
        ("RUN nosuch @", "UNKNOWN_TASK"),
        ("RUN primes @", "BAD_REQUEST"),
        ('SUBMIT sum @ {"chunks":0}', "BAD_REQUEST"),
    ],
)
def test_stream_refused_at_its_first_line_gets_one_reply(factory, start, code):
    """A streamed request refused at once still has its pieces and '.' on the wire: they are
    read without replies, so the next request's reply is not shifted."""
    c = LineConn(factory)
    c.send(start + "\n+[1,2]\n+[3]\n.\n")
    out = c.ask("PING")
    assert len(out) == 2 and out[0].startswith(f"ERR {code} ") and out[1] == "OK PONG"
    c.lose()


def test_stream_refused_by_noauth_gets_one_reply(clock):
    """A streamed request before authentication gets one ERR NOAUTH for the whole stream, and the
    next request is answered."""
    core = Scheduler(REGISTRY, clock)
    settings = ConnectionSettings(secrets={"client": b"s" * 32})
    c = LineConn(ServerFactory(core, settings=settings))
    c.send("RUN sum @\n+[1]\n.\n")
    out = c.ask("PING")
    assert out[0].startswith("ERR NOAUTH") and out[1:] == ["OK PONG"]
    c.lose()


def test_streamed_answer_goes_out_a_few_pieces_per_turn_and_waits_for_room(clock):
    """An answer longer than the line limit is sent as RESULT @, pieces, '.': a few pieces
    per reactor turn, none while the transport's buffer is full (pauseProducing)."""
    core = Scheduler(REGISTRY, clock)
    factory = ServerFactory(core, settings=ConnectionSettings(max_line=100))
    w = LineConn(factory, port=3000)
    w.send('REGISTER {"name":"w","tasks":["sort"],"slots":4}\n')
    c = LineConn(factory)
    values = list(range(300, 0, -1))
    c.send("RUN sort @ " + json.dumps({"size": 300, "chunks": 30}) + "\n")
    for i in range(0, 300, 10):
        c.send("+" + compact(values[i : i + 10]) + "\n")
    c.send(".\n")
    answer_sorts(w, 40)
    first = c.lines()
    assert first[0] == "RESULT j1 @" and len(first) == 5  # the first turn: 4 pieces
    c.proto.pauseProducing()
    clock.advance(0)
    assert c.lines() == []  # no room: nothing more
    c.proto.resumeProducing()
    out = first + c.lines()
    while out[-1] != ".":
        clock.advance(0)
        out += c.lines()
    assert all(len(x) <= 100 for x in out)
    assert [x for line in out[1:-1] for x in json.loads(line[1:])] == sorted(values)
    close_all(c, w)
    assert clock.getDelayedCalls() == []


def test_connection_lost_mid_answer_stops_sending(clock):
    """A client lost in the middle of a long streamed answer stops the sending."""
    core = Scheduler(REGISTRY, clock)
    factory = ServerFactory(core, settings=ConnectionSettings(max_line=100))
    w = LineConn(factory, port=3000)
    w.send('REGISTER {"name":"w","tasks":["sort"],"slots":4}\n')
    c = LineConn(factory)
    c.send('RUN sort @ {"size":120,"chunks":20}\n')
    for i in range(0, 120, 10):
        c.send("+" + compact(list(range(i, i + 10))) + "\n")
    c.send(".\n")
    answer_sorts(w, 30)
    assert c.lines()[0] == "RESULT j1 @"
    c.lose()  # mid-answer: its next step must not stay scheduled
    w.lose()
    assert clock.getDelayedCalls() == []


def answer_sorts(w: LineConn, rounds: int) -> None:
    """Answer the sort DOs a worker connection gets, for ``rounds`` rounds of lines."""
    for _ in range(rounds):
        for line in w.lines():
            if line.startswith("DO "):
                m = json.loads(line[3:])
                w.send("DONE " + compact({"id": m["id"], "result": sorted(m["input"])}) + "\n")


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- a worker's result too long for one line ---------------------------------------------------


def streamed_done(w: LineConn, msg: dict, result, piece: int = 10, t: float = 0.5) -> None:
    """Answer ``msg`` as a worker whose DONE line would be too long: head, pieces, '.'."""
    w.send("DONE " + compact({"id": msg["id"], "t": t, "stream": True}) + "\n")
    for i in range(0, len(result), piece):
        w.send("+" + compact(result[i : i + piece]) + "\n")
    w.send(".\n")


def one_do(w: LineConn) -> dict:
    (line,) = [x for x in w.lines() if x.startswith("DO ")]
    return json.loads(line[3:])


def test_worker_result_in_pieces_is_joined_and_combined(factory, core):
    """A worker result streamed in pieces is joined, combined and answered, and both connections
    are back to normal lines after it."""
    w = Worker(factory)
    c = LineConn(factory)
    c.send('RUN sort [3,1,2] {"chunks":1}\n')
    msg = w.collect()[0]
    w.todo.clear()
    streamed_done(w, msg, list(range(1, 101)))
    assert c.lines() == ["RESULT j1 " + compact(list(range(1, 101)))]
    assert core.get("j1").status()["ran_on"] == {"w1": 1}
    assert c.ask("PING") == ["OK PONG"]  # the worker connection is back to normal lines too
    assert w.ask("PING") == ["OK PONG"]
    close_all(c, w)


def test_worker_result_stream_past_max_result_bytes_fails_the_job(clock):
    """A worker result streamed past max_result_bytes fails the job with RESULT_TOO_LARGE."""
    core = Scheduler(REGISTRY, clock, max_result_bytes=50)
    factory = ServerFactory(core)
    w = Worker(factory)
    c = LineConn(factory)
    c.send('RUN sort [3,1,2] {"chunks":1}\n')
    msg = w.collect()[0]
    streamed_done(w, msg, list(range(100)))
    (reply,) = c.lines()
    assert reply.startswith("FAILED j1 RESULT_TOO_LARGE")
    close_all(c, w)


def test_bad_result_piece_is_a_failed_attempt_that_is_retried(factory, core):
    """A worker result piece that is not valid JSON counts as a failed attempt, and the sub-task is
    retried after its backoff."""
    w = Worker(factory)
    c = LineConn(factory)
    c.send('SUBMIT sort [3,1,2] {"chunks":1,"attempts":2}\n')
    msg = w.collect()[0]
    w.todo.clear()
    w.send("DONE " + compact({"id": msg["id"], "stream": True}) + "\n+[1,\n.\n")
    assert core.get("j1").failures == {0: 1}
    clock = core.clock
    clock.advance(1)  # the retry's backoff
    w.run_all()
    assert c.ask("WAIT j1") == ["OK j1", "RESULT j1 [1,2,3]"]
    close_all(c, w)


def test_worker_lost_mid_result_stream_requeues_the_subtask(factory, core):
    """A worker lost in the middle of streaming a result has its sub-task requeued."""
    w = Worker(factory)
    c = LineConn(factory)
    c.send('SUBMIT sort [3,1,2] {"chunks":1}\n')
    msg = w.collect()[0]
    w.send("DONE " + compact({"id": msg["id"], "stream": True}) + "\n+[1]\n")
    w.lose()
    job = core.get("j1")
    assert job.queued == 1 and job.requeued == 1
    c.lose()
