"""Cutting streamed inputs into sub-tasks and big answers into pieces (core/streaming.py), and the
journal records a streamed job writes (in memory and in SQLite, including the schema upgrade)."""

from __future__ import annotations

import io
import json
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from clusterd.client.pieces import json_array_pieces, stream_lines, text_pieces
from clusterd.core.jobs import Job
from clusterd.core.journal import ChunksAdded, JobAccepted, JobSealed, MemoryJournal
from clusterd.core.streaming import Cutter, Joiner, chunk_target, split_for_lines
from clusterd.core.wire import ReplyReader, dumps
from clusterd.server.protocol import final_lines
from clusterd.server.sqlite_journal import SqliteJournal


def cut_all(cutter: Cutter, pieces) -> list:
    out = []
    for p in pieces:
        out.extend(cutter.feed(p))
    return out + cutter.finish()


@given(st.lists(st.lists(st.integers(), max_size=30), max_size=20), st.integers(1, 25))
def test_list_cuts_concatenate_to_the_input_in_target_sized_slices(pieces, target):
    """A list cutter's sub-task inputs concatenate to the streamed input, each of the target size
    but the last."""
    chunks = cut_all(Cutter("list", target), pieces)
    assert [x for c in chunks for x in c] == [x for p in pieces for x in p]
    assert all(len(c) == target for c in chunks[:-1])
    assert 0 <= len(chunks[-1]) <= target and chunks


@given(
    st.lists(st.text(alphabet="ab \n\t", max_size=40), max_size=20),
    st.integers(1, 30),
)
def test_text_cuts_only_at_whitespace(pieces, target):
    """Concatenation gives the input back, and every cut but the first starts with whitespace,
    so no word is split between two sub-tasks."""
    text = "".join(pieces)
    chunks = cut_all(Cutter("text", target), pieces)
    assert "".join(chunks) == text
    assert all(c[:1].isspace() for c in chunks[1:])
    assert text.split() == [w for c in chunks for w in c.split()]


def test_piece_of_wrong_kind_is_refused():
    """A cutter refuses a piece of the wrong kind: a string for a list stream, a list for a text
    stream."""
    with pytest.raises(TypeError, match="JSON array"):
        Cutter("list", 3).feed("abc")
    with pytest.raises(TypeError, match="JSON string"):
        Cutter("text", 3).feed([1])


def test_chunk_target():
    """size/chunks when the size is known, a fixed size when not, and never past the caps that
    keep a sub-task's DO line within a worker's line limit."""
    assert chunk_target("list", 100, 7) == 15
    assert chunk_target("text", 640, 64) == 10
    assert chunk_target("text", None, 4) == 1 << 20
    assert chunk_target("list", None, 8) == 10_000
    assert chunk_target("list", 0, 5) == 1
    assert chunk_target("text", 200_000_000, 8) == 2 << 20
    assert chunk_target("list", 10**9, 8) == 200_000


@given(
    st.one_of(
        st.lists(st.integers(-(10**6), 10**6), max_size=200),
        st.text(max_size=300),
        st.dictionaries(st.text(max_size=5), st.integers(-(10**6), 10**6), max_size=60),
    )
)
def test_answer_pieces_fit_the_limit_and_join_back(value):
    """An answer cut for lines gives pieces within the limit that join back to the value."""
    encoded = dumps(value)
    pieces = split_for_lines(value, encoded, 40, dumps)
    if pieces is None:
        assert value in ([], "", {})
        return
    joiner = Joiner()
    for text in pieces:
        assert len(text) <= 40
        joiner.add(json.loads(text))
    assert joiner.value() == value


def test_answer_with_one_element_over_the_limit_cannot_be_cut():
    """An answer with one element longer than the line limit cannot be cut, and a scalar is never
    cut."""
    pieces = split_for_lines(["x" * 100], dumps(["x" * 100]), 40, dumps)
    with pytest.raises(ValueError, match="longer than the line limit"):
        list(pieces)
    assert split_for_lines(12345, "12345", 2, dumps) is None


def test_joiner_refuses_mixed_pieces():
    """The joiner refuses pieces of different JSON types."""
    j = Joiner()
    j.add([1])
    with pytest.raises(ValueError, match="one JSON type"):
        j.add("x")


def streamed_records():
    return [
        JobAccepted("j1", 1, "sum", "", 0, {"timeout": None, "attempts": 3}, None, 1.0, True),
        ChunksAdded("j1", 0, ("[1,2]", "[3]")),
        ChunksAdded("j1", 2, ("[4]",)),
        JobSealed("j1", 3),
    ]


def test_memory_journal_keeps_streamed_inputs():
    """The memory journal keeps a streamed job's inputs and its sealed size."""
    j = MemoryJournal()
    for r in streamed_records():
        j.append(r)
    (rec,) = j.load().jobs
    assert rec.accepted.streamed and rec.sealed == 3
    assert rec.chunks == {0: "[1,2]", 1: "[3]", 2: "[4]"}


def test_sqlite_journal_keeps_streamed_inputs(tmp_path):
    """The SQLite journal keeps a streamed job's inputs and its sealed size across reopening."""
    path = str(tmp_path / "j.sqlite")
    j = SqliteJournal(path, Clock())
    j._write(streamed_records())
    j.close()  # lets go of the journal's lock too: one journal object per file at a time
    (rec,) = SqliteJournal(path, Clock()).load().jobs
    assert rec.accepted.streamed and rec.sealed == 3
    assert rec.chunks == {0: "[1,2]", 1: "[3]", 2: "[4]"}


def test_sqlite_journal_upgrades_schema_1_in_place(tmp_path):
    """A journal written before streamed inputs existed opens, keeps its jobs, and is upgraded."""
    path = str(tmp_path / "old.sqlite")
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY, seq INTEGER NOT NULL, task TEXT NOT NULL, input TEXT NOT NULL,
            chunks INTEGER NOT NULL, options TEXT NOT NULL, key TEXT, submitted REAL NOT NULL,
            state TEXT, result TEXT, error TEXT, total INTEGER, finished REAL);
        CREATE TABLE results (
            job TEXT NOT NULL, idx INTEGER NOT NULL, result TEXT NOT NULL,
            PRIMARY KEY (job, idx)) WITHOUT ROWID;
        INSERT INTO meta VALUES ('schema', '1');
        INSERT INTO jobs (id, seq, task, input, chunks, options, key, submitted)
            VALUES ('j4', 4, 'sum', '[1,2]', 2, '{"attempts":3}', NULL, 1.0);
        """
    )
    conn.commit()
    conn.close()
    j = SqliteJournal(path, Clock())
    (rec,) = j.load().jobs
    assert rec.accepted.input_json == "[1,2]" and not rec.accepted.streamed
    assert j._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
    j._conn.close()


# -- the client's side: reading pieces, writing streamed requests, reading streamed answers -----


@given(st.text(max_size=200), st.integers(1, 17))
def test_text_pieces_decode_utf8_across_block_edges(text, block):
    """Multi-byte characters split between two blocks come out whole."""
    pieces = list(text_pieces(io.BytesIO(text.encode("utf-8")), block))
    assert "".join(pieces) == text


def test_text_pieces_refuse_bad_utf8():
    """text_pieces refuses input that is not valid UTF-8."""
    with pytest.raises(UnicodeDecodeError):
        list(text_pieces(io.BytesIO(b"ok \xff"), 2))


@given(
    st.lists(
        st.one_of(st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3)),
        max_size=40,
    ),
    st.integers(1, 23),
    st.sampled_from(["", " ", "\n  "]),
)
def test_json_array_pieces_walk_the_array_lazily(items, block, space):
    """Slices of the array come out in order, whatever the block size and spacing; a number
    cut by a block edge (12|34) is read whole."""
    text = "[" + space + ("," + space).join(json.dumps(x) for x in items) + space + "]" + space
    pieces = list(json_array_pieces(io.BytesIO(text.encode()), block))
    assert [x for p in pieces for x in p] == items
    assert all(pieces)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a":1}', "not a JSON array"),
        ("[1,2", "not closed"),
        ("[1 2]", "expected ','"),
        ("[1,nope]", "not valid JSON"),
        ("[1] x", "unexpected text"),
        ("[NaN]", "not valid JSON"),
    ],
)
def test_json_array_pieces_refuse_what_is_not_one_array(text, message):
    """json_array_pieces refuses any input that is not exactly one JSON array."""
    with pytest.raises(ValueError, match=message):
        list(json_array_pieces(io.BytesIO(text.encode()), 4))


def test_stream_lines():
    """stream_lines writes the head line with the options that are set, one line per piece, and the
    end line."""
    lines = list(stream_lines("RUN", "sum", iter([[1], [2, 3]]), {"chunks": 2, "key": None}, dumps))
    assert lines == [b'RUN sum @ {"chunks":2}\n', b"+[1]\n", b"+[2,3]\n", b".\n"]


def test_reply_reader_joins_a_streamed_result():
    """The reply reader joins a streamed RESULT into one reply, then reads plain replies again."""
    r = ReplyReader()
    assert r.feed("RESULT j4 @") is None
    assert r.feed("+[1,2]") is None
    assert r.feed("+[3]") is None
    reply = r.feed(".")
    assert (reply.kind, reply.job, reply.value) == ("RESULT", "j4", [1, 2, 3])
    assert r.feed("OK PONG").text == "PONG"


def test_final_lines_streams_an_answer_longer_than_a_line():
    """An answer longer than the line limit goes out as RESULT @, pieces within the limit, '.';
    a short one stays one line."""
    job = Job("j1", "sort", [[0]], 0.0)
    value = list(range(2000))
    job.finish("done", 1.0, result=value)
    job.result_json = dumps(value)
    first, rest = final_lines(job, 1000)
    lines = [first, *rest]
    assert lines[0] == "RESULT j1 @" and lines[-1] == "."
    assert all(len(x.encode()) <= 1000 for x in lines)
    r = ReplyReader()
    replies = [r.feed(x) for x in lines]
    assert replies[-1].value == value
    assert final_lines(job, 100_000) == (f"RESULT j1 {job.result_json}", None)


NO_SURROGATES = st.characters(blacklist_categories=("Cs",))


@given(
    st.one_of(
        st.lists(st.one_of(st.integers(), st.text(NO_SURROGATES, max_size=3)), max_size=60),
        st.dictionaries(st.text(NO_SURROGATES, max_size=4), st.integers(), max_size=60),
        st.integers(),
    )
)
def test_dumps_big_is_the_same_json_as_dumps(value):
    """Encoding in parts gives the same text as one encode (parts of 7 here, so most values
    are cut several times)."""
    import clusterd.core.wire as wire

    old, wire.BIG_PART = wire.BIG_PART, 7
    try:
        assert wire.dumps_big(value) == dumps(value)
    finally:
        wire.BIG_PART = old


def test_dumps_big_with_a_lone_surrogate_stays_valid_utf8_json(monkeypatch):
    """dumps_big writes valid UTF-8 JSON even when a lone surrogate falls in one of its parts."""
    import clusterd.core.wire as wire

    monkeypatch.setattr(wire, "BIG_PART", 5)
    value = ["\ud800", "é"] + ["x"] * 20
    text = wire.dumps_big(value)
    text.encode("utf-8")  # no UnicodeEncodeError
    assert json.loads(text) == value


def test_upload_bar_shows_what_was_sent_and_passes_pieces_through():
    """The upload bar passes pieces through unchanged and shows the bytes sent of the total
    (rich's Progress) when enabled, nothing when not."""
    from rich.console import Console

    from clusterd.client.cli import UploadBar

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    bar = UploadBar(out, True, 4, console=console)
    assert list(bar.count(["ab", "cd"])) == ["ab", "cd"]
    bar.close()
    assert "upload" in out.getvalue() and "4/4 bytes" in out.getvalue()
    silent = io.StringIO()
    quiet = UploadBar(silent, False, None)
    assert list(quiet.count([[1], [2]])) == [[1], [2]]
    quiet.close()
    assert silent.getvalue() == ""


def test_one_reader_tells_piece_end_and_other_lines_apart_in_bytes_and_text():
    """The shared piece-line reader classifies server-side bytes and client-side text alike."""
    from clusterd.core.streaming import END_LINE, OTHER_LINE, PIECE_LINE, line_kind

    assert [line_kind(x) for x in (b"+[1]", b" . ", b"PING", '+"a"', ".", "RESULT j1 3")] == [
        PIECE_LINE,
        END_LINE,
        OTHER_LINE,
        PIECE_LINE,
        END_LINE,
        OTHER_LINE,
    ]


def test_a_piece_value_names_the_piece_in_every_refusal():
    """A piece that is not UTF-8, not JSON or too deep is refused with its own code and name."""
    from clusterd.core.streaming import piece_value
    from clusterd.core.wire import WireError

    assert piece_value(b"+[1,2]", "piece 1", 64) == [1, 2]
    for line, code in (
        (b"+\xff", "BAD_ENCODING"),
        (b"+[1,", "BAD_JSON"),
        (b"+" + b"[" * 9 + b"]" * 9, "JSON_TOO_DEEP"),
    ):
        with pytest.raises(WireError) as e:
            piece_value(line, "piece 7", 4)
        assert e.value.code == code and "piece 7" in e.value.message
