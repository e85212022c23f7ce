"""Property-based tests of the wire layer and the framer on hostile input: anything a peer can
send either parses or is a WireError (never another exception), deep nesting is JSON_TOO_DEEP
rather than a RecursionError, framing is bounded and chunking-independent, and job lines
round-trip."""

from __future__ import annotations

import json

import pytest
from helpers import deterministic
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterd.client.api import job_line
from clusterd.core.framing import LineFramer, LineTooLong
from clusterd.core.wire import (
    ErrorCode,
    WireError,
    dumps,
    parse_greeting,
    parse_job_request,
    parse_json,
    parse_json_object,
    parse_reply,
    parse_request,
)

few = settings(deterministic, max_examples=100)

# -- hostile text --------------------------------------------------------------------------------

# Fragments that steer random text towards the parsers' edges: brackets, quotes, escapes
# (including lone surrogates), the constants JSON lacks, huge numbers, verbs and option names.
FRAGMENTS = [
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    '"',
    "\\",
    '"\\ud800"',
    '"\\udfff\\ud800"',
    "\\u00",
    "NaN",
    "-Infinity",
    "Infinity",
    "1e400",
    "-0",
    "9" * 5000,
    "0.",
    "true",
    "null",
    " ",
    "\t",
    "\r",
    "\x00",
    "\u2028",
    "é",
    "RUN",
    "SUBMIT",
    "sum",
    "RESULT",
    "FAILED",
    "PROGRESS",
    "CANCELLED",
    "OK",
    "ERR",
    "HELLO clusterd 1 ",
    '{"chunks":',
    '"timeout":',
    '"attempts":',
    '"key":',
    "[" * 70,
    "]" * 70,
    "[" * 3000,
]

hostile_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=24
).map("".join)
hostile_bytes = st.one_of(
    st.binary(max_size=64),
    hostile_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.tuples(hostile_text, st.binary(max_size=4), hostile_text).map(
        lambda t: (
            t[0].encode("utf-8", "surrogatepass") + t[1] + t[2].encode("utf-8", "surrogatepass")
        )
    ),
)


def only_wire_errors(fn, *args):
    """Call fn; a WireError is an accepted outcome, any other exception fails the test."""
    try:
        return fn(*args)
    except WireError as e:
        assert e.code in vars(ErrorCode).values(), e.code
        assert isinstance(e.message, str) and e.message
        return e


@few
@given(line=hostile_bytes)
def test_parse_request_on_any_bytes_is_a_request_none_or_wire_error(line):
    """parse_request never raises anything but WireError, and what it returns is upper-cased."""
    out = only_wire_errors(parse_request, line)
    if isinstance(out, WireError):
        assert out.code == ErrorCode.BAD_ENCODING
    elif out is not None:
        assert out.verb == out.verb.upper() and out.verb.strip() == out.verb and out.verb


@few
@given(rest=hostile_text, verb=st.sampled_from(["RUN", "SUBMIT"]), depth=st.integers(1, 80))
def test_parse_job_request_on_any_text_only_raises_wire_error(rest, verb, depth):
    """parse_job_request never raises anything but WireError, whatever the text and depth limit."""
    out = only_wire_errors(parse_job_request, rest, verb, depth)
    if not isinstance(out, WireError):
        assert out.task and " " not in out.task
        assert set(out.options) <= {"chunks", "timeout", "attempts", "key"}


@few
@given(text=hostile_text, depth=st.integers(1, 80))
def test_parse_json_on_any_text_only_raises_wire_error(text, depth):
    """parse_json and parse_json_object never raise anything but WireError."""
    only_wire_errors(parse_json, text, "the payload", depth)
    out = only_wire_errors(parse_json_object, text, "the payload", depth)
    assert isinstance(out, (dict, WireError))


@few
@given(text=hostile_text)
def test_parse_reply_and_greeting_on_any_text_only_raise_wire_error(text):
    """The client's parsers of server lines never raise anything but WireError."""
    for prefix in ("", "OK ", "ERR ", "RESULT j1 ", "PROGRESS j1 ", "FAILED j1 X ", "CANCELLED "):
        only_wire_errors(parse_reply, prefix + text)
    only_wire_errors(parse_greeting, text)
    only_wire_errors(parse_greeting, "HELLO clusterd 1 " + text)


# -- deep nesting --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
@pytest.mark.parametrize("open_, close", [("[", "]"), ('{"a":', "}")])
def test_deep_nesting_is_json_too_deep_everywhere(depth, open_, close):
    """Nesting past the limit, up to far past the recursion limit, is JSON_TOO_DEEP in every
    parser that takes a peer's request JSON, never a RecursionError; replies (task results)
    may nest deeper, up to the recursion limit."""
    doc = open_ * depth + "1" + close * depth
    calls = [
        lambda: parse_json(doc),
        lambda: parse_json_object('{"x":' + doc + "}"),
        lambda: parse_job_request("sum " + doc),
        lambda: parse_job_request('sum [1] {"key":' + doc + "}"),
    ]
    # Replies carry a task's result, which may legitimately nest deeper than requests may;
    # only nesting past Python's recursion limit is refused there.
    replies = [
        lambda: parse_reply("RESULT j1 " + doc),
        lambda: parse_reply("FAILED j1 TASK_ERROR " + '{"x":' + doc + "}"),
    ]
    if depth < 900:
        for call in replies:
            assert call().kind in ("RESULT", "FAILED")
    else:
        calls += replies
    for call in calls:
        with pytest.raises(WireError) as info:
            call()
        assert info.value.code == ErrorCode.JSON_TOO_DEEP


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_unclosed_deep_nesting_is_a_wire_error(depth):
    """Brackets that never close, nested past the recursion limit, are a WireError too."""
    for call in (
        lambda: parse_json("[" * depth),
        lambda: parse_job_request("sum " + "[" * depth),
    ):
        with pytest.raises(WireError) as info:
            call()
        assert info.value.code in (ErrorCode.JSON_TOO_DEEP, ErrorCode.BAD_JSON)


@few
@given(depth=st.integers(1, 40), limit=st.integers(1, 40), kind=st.sampled_from("[{"))
def test_depth_limit_is_exact_for_any_limit(depth, limit, kind):
    """A document nested ``depth`` levels parses exactly when depth <= limit."""
    doc = (
        ("[" * depth + "0" + "]" * depth) if kind == "[" else ('{"k":' * depth + "0" + "}" * depth)
    )
    out = only_wire_errors(parse_json, doc, "the payload", limit)
    if depth <= limit:
        assert not isinstance(out, WireError)
    else:
        assert isinstance(out, WireError) and out.code == ErrorCode.JSON_TOO_DEEP


# -- framing -------------------------------------------------------------------------------------

framer_stream = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"\r", b"\r\r\n", b"PING", b"x" * 7, b"y" * 30]),
        st.binary(max_size=40),
    ),
    max_size=40,
).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def same_events(events):
    """LineTooLong.size depends on when the line was noticed: compare only that it happened."""
    return [("too-long", e.limit) if isinstance(e, LineTooLong) else e for e in events]


@few
@given(
    data=framer_stream,
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    limit=st.integers(0, 24),
)
def test_framer_holds_at_most_limit_plus_one_bytes_however_the_stream_is_cut(data, cuts, limit):
    """After every feed, whatever the cut points, at most limit+1 bytes are held, and every
    line it yields is within the limit and has no terminator left in it."""
    f = LineFramer(limit)
    for chunk in chunked(data, cuts):
        for event in f.feed(chunk):
            if not isinstance(event, LineTooLong):
                assert len(event) <= limit
                assert b"\n" not in event
        assert 0 <= f.buffered <= limit + 1


@few
@given(
    data=framer_stream,
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    limit=st.integers(0, 24),
)
def test_framer_events_do_not_depend_on_chunking(data, cuts, limit):
    """Any split of the stream yields the same lines and overlong-line events as one feed, and
    the same number of bytes held at the end."""
    whole = LineFramer(limit)
    expected = whole.feed(data)
    pieces = LineFramer(limit)
    got = [e for chunk in chunked(data, cuts) for e in pieces.feed(chunk)]
    assert same_events(got) == same_events(expected)
    assert pieces.buffered == whole.buffered


@few
@given(data=framer_stream, limit=st.integers(0, 24))
def test_framer_emits_one_event_per_newline(data, limit):
    """Every \\n ends exactly one event (a line or the LineTooLong that stood for it), except that
    an overlong line noticed before its \\n is reported once, early."""
    events = LineFramer(limit).feed(data)
    lines = [e for e in events if not isinstance(e, LineTooLong)]
    assert len(lines) <= data.count(b"\n") <= len(events) + data.count(b"\n")
    assert len(events) <= data.count(b"\n") + 1


# -- job lines round-trip ------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=20,
)
task_names = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x2FF)
    | st.sampled_from("_.-:"),
    min_size=1,
    max_size=20,
)
options = st.fixed_dictionaries(
    {},
    optional={
        "chunks": st.integers(1, 10**6) | st.none(),
        "timeout": st.floats(min_value=1e-6, max_value=1e9) | st.integers(1, 10**6) | st.none(),
        "attempts": st.integers(1, 100) | st.none(),
        "key": st.text(min_size=1, max_size=200) | st.none(),
    },
)


@settings(few, max_examples=80)
@given(verb=st.sampled_from(["RUN", "SUBMIT"]), task=task_names, value=json_values, opts=options)
def test_job_line_round_trips_through_parse_job_request(verb, task, value, opts):
    """What the client library writes for a job is parsed back by the server to the same task,
    input (exactly as sent) and options, with None-valued options left out."""
    chunks = opts.pop("chunks", None)
    line = job_line(verb, task, value, chunks, **opts)
    assert "\n" not in line
    request = parse_request(line.encode("utf-8"))
    assert request is not None and request.verb == verb
    parsed = parse_job_request(request.rest, verb)
    assert parsed.task == task
    assert parsed.input == value
    assert dumps(parsed.input) == dumps(value)  # no 1 -> True or 1.0 -> 1 drift
    assert parsed.input_json == dumps(value)
    sent = {k: v for k, v in {"chunks": chunks, **opts}.items() if v is not None}
    assert parsed.options == sent
    assert parsed.chunks == sent.get("chunks")
    assert json.loads(dumps(parsed.options)) == sent
