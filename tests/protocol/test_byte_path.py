"""The byte path (docs/PROTOCOL.md, "Streamed values" and "Binary DO"): ``$<n>`` frames of a
streamed text input, text chunks kept as bytes, the binary DO to a worker that registers with
``"bytes": true``, and the same text as JSON to one that does not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from clusterd.core.framing import Frame, LineFramer
from clusterd.core.journal import MemoryJournal
from clusterd.core.messages import do_header_size
from clusterd.core.scheduler import Scheduler
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.testing import LineConn

REGISTRY = Registry(TASKS)
WORDCOUNT = REGISTRY.get("wordcount")


@pytest.fixture
def factory():
    core = Scheduler(REGISTRY, Clock(), MemoryJournal())
    return ServerFactory(core, settings=ConnectionSettings(max_line=4096))


class BinaryWorker(LineConn):
    """A worker registered with ``"bytes": true``: reads binary DOs with the worker's framer."""

    def __init__(self, factory, name="wb") -> None:
        super().__init__(factory, port=3001)
        self.framer = LineFramer(1 << 20, header=do_header_size, marker=b'"bytes":')
        info = {"name": name, "tasks": ["wordcount", "sum"], "slots": 4, "bytes": True}
        self.send("REGISTER " + json.dumps(info) + "\n")
        self.events = []
        self.read()

    def read(self) -> list:
        data = self.tr.value()
        self.tr.clear()
        self.events += self.framer.feed(data)
        return self.events

    def run_all(self) -> int:
        """Answer every DO read so far; how many."""
        n = 0
        for ev in list(self.read()):
            if isinstance(ev, Frame):
                head = json.loads(ev.header[3:])
                result = WORDCOUNT.run(ev.data.decode("utf-8"))
                self.send("DONE " + json.dumps({"id": head["id"], "result": result}) + "\n")
                n += 1
        self.events = []
        return n


def frame(data: bytes) -> bytes:
    return b"$%d\n" % len(data) + data + b"\n"


def test_frames_and_json_pieces_mix_and_reach_a_binary_worker_as_raw_bytes(factory):
    """$<n> frames (split inside a character, many in one read) and +"json" pieces make one
    text; a binary worker gets each chunk as a DO header with "bytes" and the raw bytes."""
    w = BinaryWorker(factory)
    c = LineConn(factory)
    text = "naïve café straße " * 40 + "the end"
    raw = text.encode()
    c.send(f'RUN wordcount @ {{"size":{len(raw)},"chunks":4}}\n')
    c.send(frame(raw[:101]) + frame(raw[101:400]))  # 101 splits the 'ï' of a naïve
    c.send('+"' + raw[400:600].decode() + '"\n')
    c.send(frame(raw[600:]) + b".\n")
    events = w.read()
    heads = [json.loads(e.header[3:]) for e in events if isinstance(e, Frame)]
    assert len(heads) == 4 and all(h["bytes"] > 0 for h in heads)
    assert b"".join(e.data for e in events if isinstance(e, Frame)) == raw
    assert w.run_all() == 4
    [reply] = c.lines()
    assert reply.startswith("RESULT j1 ")
    assert json.loads(reply.split(" ", 2)[2]) == WORDCOUNT.combine([WORDCOUNT.run(text)])


def test_a_worker_without_bytes_gets_the_chunk_as_a_json_string(factory):
    """Text chunks held as bytes still go to a worker that did not register with "bytes" as
    ordinary DO lines whose input is the decoded string."""
    from clusterd.testing import LineWorker

    w = LineWorker(factory, tasks=["wordcount"], slots=2)
    c = LineConn(factory)
    c.send(b"RUN wordcount @\n" + frame("été à Zürich".encode()) + b".\n")
    w._collect(w.lines())
    assert [m["input"] for m in w.todo] == ["été à Zürich"]


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"ok \xff\xfe bad", "BAD_ENCODING"), (b"x" * 5000, "LINE_TOO_LONG")],
)
def test_a_bad_frame_abandons_the_stream_and_framing_resumes(factory, data, code):
    """Invalid UTF-8, or a frame over max_line (skipped, never held), gets one ERR naming the
    job; the following lines are framed and answered again."""
    c = LineConn(factory)
    c.send(b"RUN wordcount @\n" + frame(data) + b".\nPING\n")
    lines = c.lines()
    assert lines[0].startswith(f"ERR {code} ") and "Job j1 was abandoned" in lines[0]
    assert lines[1:] == ["OK PONG"]
    assert c.proto.framer.buffered == 0


def test_a_frame_outside_a_stream_or_in_a_list_stream_is_refused(factory):
    """$<n> outside a streamed input gets ERR BAD_REQUEST (its bytes dropped, not run as a
    request); in a list task's stream it is BAD_INPUT, since frames carry text."""
    c = LineConn(factory)
    c.send(b"$4\nPING\nPING\n")
    [refused, pong] = c.lines()
    assert refused.startswith("ERR BAD_REQUEST a $<n> frame") and pong == "OK PONG"
    c.send(b"RUN sum @\n" + frame(b"[1,2]") + b".\n")
    [err] = c.lines()
    assert err.startswith("ERR BAD_INPUT piece 1: each piece of this input must be a JSON array")


# -- the transcripts in docs/PROTOCOL.md ---------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def _block(title: str) -> list[str]:
    """The lines of the code block under the heading ``title`` in PROTOCOL.md."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(title)
    m = re.search(r"```\n(.*?)```", text[start:], re.S)
    assert m is not None
    return m.group(1).splitlines()


def _wire(lines: list[str]) -> tuple[bytes, list[str]]:
    """A transcript's sent bytes (``> `` lines, ``\\n``-ended) and expected reply lines."""
    sent = b"".join(x[2:].encode() + b"\n" for x in lines if x.startswith("> "))
    want = [x for x in lines if x and not x.startswith(("> ", "#", "$ "))]
    return sent, want


def test_protocol_md_frame_transcript_replays(factory):
    """The "$<n> frames" transcript of PROTOCOL.md replays against a server with one worker."""
    w = BinaryWorker(factory)
    c = LineConn(factory)
    sent, want = _wire(_block("#### Transcript: `$<n>` frames"))
    c.send(sent)
    while w.run_all():
        pass
    assert c.lines() == want


def test_protocol_md_binary_do_transcript_replays(factory):
    """The binary DO transcript of PROTOCOL.md replays: W>/C> lines are sent on a worker and a
    client connection in order, and each connection receives exactly its W</C< lines."""
    conns = {"W": LineConn(factory, port=4444), "C": LineConn(factory)}
    got: dict[str, list[str]] = {"W": [], "C": []}
    want: dict[str, list[str]] = {"W": [], "C": []}
    for line in _block("#### Transcript: a binary DO"):
        who, arrow, text = line[:1], line[1:2], line[3:]
        if arrow == ">":
            conns[who].send(text + "\n")
        elif arrow == "<":
            want[who].append(text)
        for k, conn in conns.items():
            got[k] += conn.lines()
    assert got == want


def test_a_limit_passed_by_the_last_cut_abandons_the_job_with_its_code():
    """A limit passed only when '.' cuts the last sub-task (here --max-subtasks) ends the job
    failed with that code and an ERR naming it, instead of leaving it open and never sealed."""
    core = Scheduler(REGISTRY, Clock(), MemoryJournal(), max_subtasks=2)
    factory = ServerFactory(core, settings=ConnectionSettings(max_line=4096))
    c = LineConn(factory)
    c.send(b'SUBMIT sum @ {"size":4,"chunks":2}\n+[1,2]\n+[3,4]\n+[5]\n.\nSTATUS j1\n')
    err, status = c.lines()
    assert err.startswith("ERR TOO_MANY_SUBTASKS ") and "Job j1 was abandoned" in err
    assert json.loads(status[3:])["state"] == "failed"


def test_client_stream_lines_send_bytes_pieces_as_frames_within_the_line_limit():
    """run_stream/submit_stream send a bytes piece as $<n> frames, cut to fit max_line."""
    from clusterd.client.pieces import stream_lines

    lines = list(stream_lines("RUN", "wordcount", [b"abcdefghij", "xy"], {}, json.dumps, 5))
    assert b"".join(lines) == b'RUN wordcount @\n$4\nabcd\n$4\nefgh\n$2\nij\n+"xy"\n.\n'
