"""The byte path's pure parts: frame framing, the byte cutter, the pool's binary hand-over,
the child reading it, and text chunks journaled as BLOBs and restored as bytes."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import time

import pytest
from helpers import QueueReactor, result_of

from clusterd.core.errors import WireError
from clusterd.core.framing import Frame, LineFramer, LineTooLong, frame_header
from clusterd.core.journal import ChunksAdded, JobAccepted, JobEnded, JobSealed, ResultRecorded
from clusterd.core.recovery import journaled_inputs
from clusterd.core.streaming import ByteCutter, Cutter
from clusterd.server.sqlite_journal import SqliteJournal
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.worker.child import serve
from clusterd.worker.pool import PoolService

STREAM = (
    b'RUN wordcount @\n+"ab"\n$5\nhe\nlo\n$0\n\n$3\r\nxyz\r\n.\nPING\n$200\n'
    + b"x" * 200
    + b"\nPING\n"
)


def frame_all(chunks, limit=100):
    f = LineFramer(limit, header=frame_header)
    out = []
    for c in chunks:
        out += f.feed(c)
    return out, f


def test_frames_are_framed_the_same_however_the_bytes_are_split():
    """A frame's n bytes (newlines and all) come out as one Frame whether they arrive in one
    read, byte by byte, or split at random; an overlong frame is one LineTooLong, never held."""
    whole, _ = frame_all([STREAM])
    assert whole == [
        b"RUN wordcount @",
        b'+"ab"',
        Frame(b"$5", b"he\nlo"),
        Frame(b"$0", b""),
        Frame(b"$3", b"xyz"),
        b".",
        b"PING",
        LineTooLong(200, 100),
        b"PING",
    ]
    rng = random.Random(13)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 25)))
        parts = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert frame_all(parts)[0] == whole
    bytewise, framer = frame_all([bytes([b]) for b in STREAM])
    assert bytewise == whole and framer.buffered == 0


def test_a_framer_without_a_header_function_treats_dollar_lines_as_lines():
    """Plain framing is unchanged: '$5' is just a line when frames are not on."""
    assert LineFramer(100).feed(b"$5\nabc\n") == [b"$5", b"abc"]
    assert frame_header(b"$12") == 12 and frame_header(b"$x") is None
    assert frame_header(b"+$1") is None


def test_byte_cutter_cuts_at_ascii_whitespace_as_the_text_cutter_does():
    """On ASCII text the byte cutter gives the text cutter's chunks (as bytes); on any text its
    chunks never split a character or a word, and join back to the input."""
    rng = random.Random(5)
    words = ["naïve", "日本語", "word", "a", "straße", "x" * 30]
    text = " ".join(rng.choice(words) for _ in range(3000))
    ascii_text = " ".join(rng.choice(["ab", "cde", "f" * 20]) for _ in range(3000))
    for t in (text, ascii_text):
        raw = t.encode()
        bc, out = ByteCutter(97), []
        for i in range(0, len(raw), 61):  # pieces split inside characters
            out += bc.feed(raw[i : i + 61])
        out += bc.finish()
        assert b"".join(out) == raw
        assert all(c.decode() for c in out)  # each chunk is whole UTF-8
        assert all(len(c) >= 97 for c in out[:-1])
        assert all(c[:1].isspace() for c in out[1:])
    tc, ref = Cutter("text", 97), []
    for i in range(0, len(ascii_text), 61):
        ref += tc.feed(ascii_text[i : i + 61])
    ref += tc.finish()
    assert [c.decode() for c in out] == ref
    assert ByteCutter(10).finish() == [b""]


def test_byte_cutter_refuses_invalid_utf8():
    """A chunk that is not UTF-8 raises UnicodeDecodeError (the server's BAD_ENCODING)."""
    with pytest.raises(UnicodeDecodeError):
        ByteCutter(4).feed(b"abc\xff def ")


class _Transport:
    def __init__(self, proto):
        self.chunks: list[bytes] = []
        proto.makeConnection(self)

    def write(self, data):
        self.chunks.append(data)

    def writeSequence(self, seq):
        self.chunks.extend(seq)


class _Reactor:
    def __init__(self):
        self.transports = []

    def spawnProcess(self, proto, *a, **k):
        self.transports.append(_Transport(proto))


def test_pool_hands_a_bytes_input_alone_and_raw_to_its_child():
    """A bytes input goes to the child as a header with "bytes" and the same bytes object (no
    copy, never inside a JSON batch); JSON inputs queued behind it go in a batch of their own."""
    reactor = _Reactor()
    pool = PoolService(1, [], reactor)
    pool.startService()
    [tr] = reactor.transports
    text = "café au lait ".encode() * 3
    pool.run("wordcount", text)
    head, body, nl = tr.chunks
    assert json.loads(head) == {"id": 1, "task": "wordcount", "bytes": len(text)}
    assert body is text and nl == b"\n"
    pool.run("sum", [1])
    pool.run("wordcount", b"b c")
    pool.run("sum", [2])
    tr.chunks.clear()
    child = pool.children[0]
    child.outReceived(b'{"id":1,"ok":true,"result":{}}\n')  # the next message: "sum" alone
    assert json.loads(b"".join(tr.chunks)) == {"id": 2, "task": "sum", "input": [1]}


def test_child_reads_a_bytes_request_and_runs_the_task_on_the_decoded_text():
    """The child reads n raw bytes after a "bytes" header, decodes them once, and the task gets
    a str; bad UTF-8 is that run's error, and the next request is read correctly."""
    registry = Registry(TASKS)
    good = "Ünïcode words, words".encode()
    data = (
        json.dumps({"id": 1, "task": "wordcount", "bytes": len(good)}).encode()
        + b"\n"
        + good
        + b"\n"
        + b'{"id":2,"task":"wordcount","bytes":3}\n\xff\xfe\n\n'
        + b'{"id":3,"task":"sum","input":[1,2]}\n'
    )
    out = io.BytesIO()
    serve(registry, io.BytesIO(data), out)
    replies = [json.loads(x) for x in out.getvalue().splitlines()]
    assert replies[0]["result"] == {"words": 2, "ünïcode": 1}
    assert replies[1]["ok"] is False and "UTF-8" in replies[1]["message"]
    assert replies[2]["result"] == 3


def _accepted(job: str) -> JobAccepted:
    return JobAccepted(job, 1, "wordcount", "", 0, {}, None, 1.0, streamed=True)


def test_text_chunks_go_to_input_files_and_come_back_as_the_same_bytes(tmp_path):
    """ChunksAdded with bytes is appended to the job's input file (the row keeps @offset:length,
    no JSON) and restored byte for byte, as is a big result's JSON; BLOB rows and the JSON text chunks of older journals
    still restore; a job's end removes its file."""
    path = str(tmp_path / "j.sqlite")
    j = SqliteJournal(path, reactor=None)
    chunks = ("naïve ".encode(), b"\xe6\x97\xa5 end", b"")
    big = json.dumps({f"wörd{i}": i for i in range(3000)}, ensure_ascii=False)
    j._write(
        [
            _accepted("j1"),
            ChunksAdded("j1", 0, chunks),
            JobSealed("j1", 3),
            _accepted("j2"),
            ChunksAdded("j2", 0, ('"old text"', '" more"')),
            JobSealed("j2", 2),
            _accepted("j3"),
            JobSealed("j3", 1),
            ResultRecorded("j1", 0, big),
            ResultRecorded("j1", 1, "7"),
        ]
    )
    result_of(j.close())
    con = sqlite3.connect(path)
    rows = con.execute("SELECT job, input FROM inputs ORDER BY job, idx").fetchall()
    con.execute("INSERT INTO inputs VALUES ('j3', 0, ?)", (b"a blob chunk",))
    con.commit()
    con.close()
    assert [r[1] for r in rows[:3]] == ["@0:7", "@7:7", "@14:0"]
    kept = (tmp_path / "j.sqlite-inputs" / "j1.txt").read_bytes()
    assert kept == b"".join(chunks) + big.encode()
    j2 = SqliteJournal(path, reactor=None)
    by_id = {r.accepted.job: r for r in j2.load().jobs}
    assert journaled_inputs(by_id["j1"]) == list(chunks)
    assert journaled_inputs(by_id["j2"]) == ["old text", " more"]
    assert journaled_inputs(by_id["j3"]) == [b"a blob chunk"]
    assert by_id["j1"].results == {0: big, 1: "7"}  # the big one kept in the file too
    j2._write([JobEnded("j1", "done", "{}", None, 3, 2.0)])
    assert not (tmp_path / "j.sqlite-inputs" / "j1.txt").exists()
    result_of(j2.close())


def test_a_missing_input_file_fails_only_its_job_and_orphans_are_swept(tmp_path):
    """An input file lost while the server was down fails its job (JOURNAL_ERROR) at recovery
    instead of stopping the server; the file of a job that is not unfinished is removed at
    start."""
    path = str(tmp_path / "j.sqlite")
    j = SqliteJournal(path, reactor=None)
    j._write([_accepted("j1"), ChunksAdded("j1", 0, (b"abc",)), JobSealed("j1", 1)])
    result_of(j.close())
    inputs = tmp_path / "j.sqlite-inputs"
    (inputs / "j1.txt").unlink()
    (inputs / "j9.txt").write_bytes(b"left by a crash")
    j2 = SqliteJournal(path, reactor=None)
    [rec] = j2.load().jobs
    result_of(j2.close())
    with pytest.raises(WireError) as e:
        journaled_inputs(rec)
    assert e.value.code == "JOURNAL_ERROR"
    assert not (inputs / "j9.txt").exists()


def test_a_header_split_over_reads_without_its_marker_is_still_a_header():
    """A read that only ends a held partial line ('5\\n' after '$') still starts the frame, and
    a zero-byte frame there is followed by plain lines."""
    f = LineFramer(100, header=frame_header)
    assert f.feed(b"PING\n$") == [b"PING"]
    assert f.feed(b"0\n\nPING\nPO") == [Frame(b"$0", b""), b"PING"]
    assert f.feed(b"NG\n$") == [b"PONG"]
    assert f.feed(b"2\nab\nX\n") == [Frame(b"$2", b"ab"), b"X"]


def test_an_input_file_that_cannot_be_written_breaks_the_journal_and_commits_nothing(tmp_path):
    """A failed write of a text chunk to its input file is a failed write of the journal: its
    batch fails with the OS's reason, the journal is broken for good, and the rows that would
    have named the chunk were never committed."""
    from twisted.python.failure import Failure

    from clusterd.core.journal import JournalError

    path = str(tmp_path / "j.sqlite")
    (tmp_path / "j.sqlite-inputs").write_text("not a directory")
    reactor = QueueReactor()
    j = SqliteJournal(path, reactor, linger=0)
    j.start()
    ok = j.append(_accepted("j1"))
    lost = j.append(ChunksAdded("j1", 0, (b"some text",)))
    deadline = time.monotonic() + 10
    while j.failure is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    closed = j.close()
    j._thread.join(10)
    reactor.run_calls()
    result_of(closed)
    out: list = []
    lost.addBoth(out.append)
    assert isinstance(out[0], Failure) and isinstance(out[0].value, JournalError)
    assert "cannot be written" in str(j.failure)
    ok.addErrback(lambda f: None)
    reopened = SqliteJournal(path, QueueReactor())
    assert all(not r.chunks for r in reopened.load().jobs)
    result_of(reopened.close())


def test_input_files_keep_a_bounded_number_open_and_lose_no_bytes(tmp_path):
    """Many jobs streaming at once hold at most MAX_OPEN input files open (descriptors are
    the connections' too); a file closed to make room is reopened and every byte reads back."""
    from clusterd.server.sqlite_inputs import MAX_OPEN, InputFiles

    files = InputFiles(str(tmp_path / "j.sqlite"))
    n = MAX_OPEN * 3
    refs = {}
    for round_ in range(2):
        for i in range(n):
            refs[(i, round_)] = files.append(f"j{i}", f"job {i} part {round_} ".encode())
            assert len(files._fds) <= MAX_OPEN
        files.flush()
    for (i, round_), ref in refs.items():
        assert files.read(f"j{i}", ref) == f"job {i} part {round_} ".encode()
    files.close()
