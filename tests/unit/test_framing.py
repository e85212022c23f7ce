"""LineFramer: bytes in, lines and LineTooLong events out."""

from __future__ import annotations

from helpers import deterministic
from hypothesis import given
from hypothesis import strategies as st

from clusterd.core.framing import DEFAULT_MAX_LINE, LineFramer, LineTooLong


def feed_all(framer: LineFramer, chunks) -> list:
    events = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    return events


def test_newline_terminates_a_line():
    """A line ending in \\n comes out without its terminator."""
    assert LineFramer(100).feed(b"PING\n") == [b"PING"]


def test_crlf_terminates_a_line():
    """A line ending in \\r\\n comes out without the \\r either."""
    assert LineFramer(100).feed(b"PING\r\n") == [b"PING"]


def test_mixed_terminators_in_one_feed():
    """\\n and \\r\\n may be mixed on one connection, and blank lines come out as empty lines."""
    assert LineFramer(100).feed(b"a\r\nb\n\n\r\nc\n") == [b"a", b"b", b"", b"", b"c"]


def test_only_the_last_carriage_return_is_stripped():
    """A \\r inside a line is data; only the one right before \\n is part of the terminator."""
    assert LineFramer(100).feed(b"a\rb\r\r\n") == [b"a\rb\r"]


def test_partial_line_is_held_until_its_newline():
    """A line split over several feeds is emitted once, whole, when its \\n arrives."""
    f = LineFramer(100)
    assert f.feed(b"HEL") == []
    assert f.buffered == 3
    assert f.feed(b"LO wor") == []
    assert f.feed(b"ld") == []
    assert f.feed(b"\nnext") == [b"HELLO world"]
    assert f.buffered == 4
    assert f.feed(b"\n") == [b"next"]
    assert f.buffered == 0


def test_crlf_split_between_feeds():
    """A \\r\\n terminator split across two feeds still ends the line cleanly."""
    f = LineFramer(100)
    assert f.feed(b"PING\r") == []
    assert f.feed(b"\nPONG\r") == [b"PING"]
    assert f.feed(b"\n") == [b"PONG"]


def test_many_lines_in_one_feed():
    """Every complete line in one chunk is emitted, in order; the unfinished tail is kept."""
    f = LineFramer(100)
    data = b"".join(b"line %d\n" % i for i in range(1000)) + b"tail"
    assert f.feed(data) == [b"line %d" % i for i in range(1000)]
    assert f.buffered == 4


def test_empty_feed_is_harmless():
    """Feeding no bytes yields no events and changes nothing."""
    f = LineFramer(100)
    assert f.feed(b"") == []
    assert f.feed(b"ab") == []
    assert f.feed(b"") == []
    assert f.feed(b"\n") == [b"ab"]


def test_default_limit_is_sixteen_mebibytes():
    """Without an explicit limit the framer allows lines up to DEFAULT_MAX_LINE (16 MiB)."""
    assert DEFAULT_MAX_LINE == 16 * 1024 * 1024
    assert LineFramer().limit == DEFAULT_MAX_LINE


def test_line_exactly_at_limit_passes():
    """A line of exactly `limit` bytes is a line, with either terminator, whole or byte by byte."""
    line = b"x" * 10
    assert LineFramer(10).feed(line + b"\n") == [line]
    assert LineFramer(10).feed(line + b"\r\n") == [line]
    f = LineFramer(10)
    assert feed_all(f, [bytes([b]) for b in line + b"\r\n"]) == [line]
    f = LineFramer(10)
    assert feed_all(f, [bytes([b]) for b in line + b"\n"]) == [line]


def test_line_one_over_limit_is_too_long():
    """A line of limit+1 bytes is refused, whether it arrives whole or byte by byte."""
    assert LineFramer(10).feed(b"x" * 11 + b"\nok\n") == [LineTooLong(11, 10), b"ok"]
    f = LineFramer(10)
    events = feed_all(f, [b"x"] * 11 + [b"\n", b"ok\n"])
    assert events == [LineTooLong(11, 10), b"ok"]


def test_line_one_over_limit_with_crlf_is_too_long():
    """With \\r\\n the \\r is not counted, but limit+1 bytes of content still are too many."""
    assert LineFramer(10).feed(b"x" * 11 + b"\r\nok\n") == [LineTooLong(11, 10), b"ok"]
    f = LineFramer(10)
    events = feed_all(f, [b"x"] * 11 + [b"\r", b"\n", b"ok\n"])
    assert [type(e) for e in events] == [LineTooLong, bytes]
    assert events[1] == b"ok"


def test_overlong_line_in_one_big_chunk_gives_one_event_and_resyncs():
    """An overlong line inside one chunk becomes one LineTooLong and the following lines survive."""
    f = LineFramer(10)
    events = f.feed(b"before\n" + b"y" * 5000 + b"\nafter\n")
    assert events == [b"before", LineTooLong(5000, 10), b"after"]
    assert f.buffered == 0


def test_overlong_line_in_small_chunks_gives_one_event_and_resyncs():
    """An overlong line fed in many small chunks gives exactly one LineTooLong, then resyncs."""
    f = LineFramer(10)
    events = f.feed(b"before\n")
    for _ in range(1000):
        events += f.feed(b"zzz")
    events += f.feed(b"zz\nafter\n")
    assert [e for e in events if isinstance(e, LineTooLong)] == [LineTooLong(12, 10)]
    assert events[0] == b"before"
    assert events[-1] == b"after"
    assert len(events) == 3


def test_overlong_tail_of_a_chunk_then_newline_later():
    """An overlong unterminated tail is reported once; the bytes up to the next \\n are dropped."""
    f = LineFramer(10)
    assert f.feed(b"ok\n" + b"q" * 50) == [b"ok", LineTooLong(50, 10)]
    assert f.feed(b"q" * 50) == []
    assert f.feed(b"qqq\r\nPING\r\n") == [b"PING"]


def test_two_overlong_lines_give_two_events():
    """Each overlong line gets its own LineTooLong, even back to back."""
    f = LineFramer(5)
    events = feed_all(f, [b"a" * 20, b"\n", b"b" * 20, b"\nok\n"])
    assert [type(e) for e in events] == [LineTooLong, LineTooLong, bytes]
    assert events[-1] == b"ok"


def test_memory_stays_bounded_while_skipping():
    """While an overlong line is being skipped nothing is buffered, however many bytes arrive."""
    f = LineFramer(100)
    assert f.feed(b"a" * 100) == []
    assert f.buffered == 100
    first = f.feed(b"a" * 2)
    assert first == [LineTooLong(102, 100)]
    assert f.buffered == 0
    for _ in range(2000):
        assert f.feed(b"a" * 1024) == []
        assert f.buffered == 0
    assert f.feed(b"a\nnext") == []
    assert f.buffered == 4
    assert f.feed(b"\n") == [b"next"]


def test_buffer_never_exceeds_limit_plus_one():
    """Before an overlong line is noticed at most limit+1 bytes are held (room for a \\r)."""
    f = LineFramer(8)
    sizes = []
    for _ in range(30):
        f.feed(b"k")
        sizes.append(f.buffered)
    assert max(sizes) == 9
    assert sizes[-1] == 0


def normalise(events):
    """LineTooLong.size depends on when the line was noticed; compare only that it happened."""
    return [("too-long", e.limit) if isinstance(e, LineTooLong) else e for e in events]


# Bytes that exercise the framer's edges: terminators, \r, and long runs to cross the limit.
stream = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"\r", b"x", b"xxxxxxx", b"PING", b" "]),
        st.binary(max_size=12),
    ),
    max_size=40,
).map(b"".join)


@deterministic
@given(data=stream, cuts=st.lists(st.integers(min_value=0), max_size=12), limit=st.integers(1, 16))
def test_splitting_the_stream_never_changes_the_events(data, cuts, limit):
    """Cutting a byte stream at arbitrary points yields the same events as feeding it whole."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole = LineFramer(limit)
    pieces = LineFramer(limit)
    expected = whole.feed(data)
    got = feed_all(pieces, chunks)
    assert normalise(got) == normalise(expected)
    assert pieces.buffered == whole.buffered


@deterministic
@given(data=stream, limit=st.integers(1, 16))
def test_byte_by_byte_matches_whole(data, limit):
    """Feeding one byte at a time yields the same events as feeding the stream whole."""
    expected = LineFramer(limit).feed(data)
    got = feed_all(LineFramer(limit), [data[i : i + 1] for i in range(len(data))])
    assert normalise(got) == normalise(expected)


@deterministic
@given(lines=st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), max_size=20))
def test_short_lines_round_trip(lines):
    """Lines within the limit, each ending in \\n, come out exactly as they went in (less one
    trailing \\r)."""
    data = b"".join(line + b"\n" for line in lines)
    expected = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    assert LineFramer(20).feed(data) == expected
