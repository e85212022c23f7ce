"""Inputs by reference, the pure part: cutting into byte ranges and aligning each range to
record boundaries (clusterd/core/refs.py), and the file reader (clusterd/worker/refs.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterd.core.errors import WireError
from clusterd.core.refs import (
    MAX_RANGE,
    RefError,
    RefRange,
    check_ref_options,
    cut_ranges,
    decode_records,
    encode_ranges,
    ranges_from_cut,
    read_aligned,
)
from clusterd.worker.refs import read_file


def _reader(data: bytes):
    return lambda offset, n: data[offset : offset + n]


def _read_all(data: bytes, bounds: list[int], fmt: str) -> list[bytes]:
    """Every range of ``data`` cut at ``bounds``, aligned."""
    edges = [0, *sorted(set(bounds)), len(data)]
    out = []
    for s, e in zip(edges, edges[1:], strict=False):
        if s < e:
            rng = RefRange("mem", len(data), s, e, fmt)
            out.append(read_aligned(rng, _reader(data)))
    return out


_WORDS = st.lists(
    st.tuples(
        st.text(alphabet="ab\u00e9\u4e2d", min_size=1, max_size=6),
        st.sampled_from([" ", "\n", "  ", "\t", " \n "]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_WORDS, st.lists(st.integers(min_value=0, max_value=400), max_size=8), st.booleans())
def test_ranges_hold_every_word_once(words, cuts, lead):
    """For any text and any cut, the ranges' words are exactly the whole input's, each once."""
    text = (" " if lead else "") + "".join(w + sep for w, sep in words)
    data = text.encode("utf-8")
    bounds = [c for c in cuts if 0 < c < len(data)]
    got = []
    for part in _read_all(data, bounds, "text"):
        got.extend(part.decode("utf-8").split())
    assert got == text.split()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=-(10**6), max_value=10**6), max_size=30),
    st.lists(st.integers(min_value=0, max_value=300), max_size=8),
    st.booleans(),
)
def test_ranges_hold_every_line_once(values, cuts, trailing_newline):
    """For any JSON lines and any cut, the ranges' values are exactly the input's, each once."""
    text = "\n".join(json.dumps(v) for v in values) + ("\n" if trailing_newline else "")
    data = text.encode("utf-8")
    bounds = [c for c in cuts if 0 < c < len(data)]
    got = []
    for part in _read_all(data, bounds, "lines"):
        got.extend(decode_records(part, "lines"))
    assert got == values


def test_cut_ranges_cover_the_input_and_respect_the_cap():
    """Ranges tile [0, size) in order, as many as asked, more when one would exceed MAX_RANGE."""
    ranges = cut_ranges("/x", 10, 3, "text")
    assert [(r.start, r.end) for r in ranges] == [(0, 3), (3, 6), (6, 10)]
    assert cut_ranges("/x", 0, 4, "text") == []
    assert len(cut_ranges("/x", 2, 8, "text")) == 2  # never an empty range
    big = cut_ranges("/x", 5 * MAX_RANGE, 2, "text")
    assert len(big) == 5 and all(r.end - r.start <= MAX_RANGE for r in big)


def test_cut_round_trips_through_the_journal_form():
    """The journaled cut and the job's ref option rebuild the very same ranges."""
    ranges = cut_ranges("http://h/f", 1000, 7, "lines")
    pieces = json.loads(encode_ranges(ranges))
    spec = {"url": "http://h/f", "size": 1000, "format": "lines"}
    assert ranges_from_cut(spec, pieces) == ranges
    with pytest.raises(ValueError):
        ranges_from_cut(spec, [[0, "x"]])


def test_a_record_spanning_a_range_belongs_to_the_range_it_starts_in():
    """A word longer than a range is read whole by the range it starts in, by no other."""
    data = b"ab " + b"x" * 50 + b" cd"
    parts = _read_all(data, [10, 20, 30], "text")
    assert b" ".join(parts).split() == [b"ab", b"x" * 50, b"cd"]


def test_short_read_and_bad_utf8_raise_ref_error():
    """A reader that returns fewer bytes than asked, or bytes that are not UTF-8, fail clearly."""
    rng = RefRange("mem", 100, 0, 50, "text")
    with pytest.raises(RefError, match="short read"):
        read_aligned(rng, lambda offset, n: b"a b")
    with pytest.raises(RefError, match="UTF-8"):
        decode_records(b"\xff\xfe", "text")
    with pytest.raises(RefError, match="not JSON"):
        decode_records(b"1\n{oops\n", "lines")


def test_from_wire_refuses_malformed_and_oversized_ranges():
    """A DO's ref must name a url, a format and a range within the size and the read cap."""
    good = RefRange("/f", 10, 2, 5, "text")
    assert RefRange.from_wire(good.wire()) == good
    for bad in ("x", {"url": "/f"}, {**good.wire(), "end": 11}, {**good.wire(), "format": "csv"}):
        with pytest.raises(RefError):
            RefRange.from_wire(bad)
    huge = {**good.wire(), "size": 3 * MAX_RANGE, "start": 0, "end": 2 * MAX_RANGE}
    with pytest.raises(RefError, match="at most"):
        RefRange.from_wire(huge)


@pytest.mark.parametrize(
    "options, by_ref, fragment",
    [
        ({"ref": "/f"}, False, "only for an input named by reference"),
        ({"format": "text"}, False, "only for an input named by reference"),
        ({}, True, "needs option 'ref'"),
        ({"ref": 5, "size": 1}, True, "needs option 'ref'"),
        ({"ref": "rel/path", "size": 1}, True, "absolute file path"),
        ({"ref": "ftp://h/f", "size": 1}, True, "absolute file path"),
        ({"ref": "/f"}, True, "needs option 'size'"),
        ({"ref": "/f", "size": 1, "format": "csv"}, True, "'format' must be"),
    ],
)
def test_ref_options_are_checked(options, by_ref, fragment):
    """Each bad ref/size/format combination is refused with its own sentence."""
    with pytest.raises(WireError, match=fragment):
        check_ref_options(options, by_ref)


def test_read_file_reads_its_range_and_checks_the_size(tmp_path):
    """The file reader aligns its range, and refuses a missing file or one of another size."""
    path = tmp_path / "in.txt"
    path.write_bytes(b"one two three four")
    size = path.stat().st_size
    assert read_file(RefRange(str(path), size, 5, 9, "text")) == "three"
    with pytest.raises(RefError, match="cannot open"):
        read_file(RefRange(str(tmp_path / "none"), size, 0, 3, "text"))
    with pytest.raises(RefError, match="the job names 99"):
        read_file(RefRange(str(path), 99, 0, 3, "text"))


def test_ref_roots_confine_what_a_worker_reads(tmp_path):
    """With --ref-root, a file outside the roots (also through a symlink) or a URL outside the
    listed prefixes is refused; without roots, nothing is read."""
    from clusterd.worker.refs import permitted, ref_root

    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "a.txt").write_text("x")
    (tmp_path / "secret.txt").write_text("y")
    (inside / "link.txt").symlink_to(tmp_path / "secret.txt")
    roots = (ref_root(str(inside)), ref_root("http://files.example"))
    assert roots[1] == "http://files.example/"
    assert permitted(str(inside / "a.txt"), roots) == str((inside / "a.txt").resolve())
    assert permitted("http://files.example/a.txt", roots) == "http://files.example/a.txt"
    for bad in (
        str(tmp_path / "secret.txt"),
        str(inside / "link.txt"),
        str(inside / ".." / "secret.txt"),
        str(tmp_path / "data2" / "a.txt"),
        "http://files.example.evil/a.txt",
        "http://other.example/a.txt",
    ):
        with pytest.raises(RefError, match="--ref-root"):
            permitted(bad, roots)
    for ref in (str(tmp_path / "secret.txt"), str(inside / "a.txt"), "http://files.example/a"):
        with pytest.raises(RefError, match="reads no inputs by reference"):
            permitted(ref, ())
