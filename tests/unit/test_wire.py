"""wire: request parsing, job requests, JSON output and the greeting."""

from __future__ import annotations

import json
import math

import pytest

from clusterd import PROTOCOL_VERSION, __version__
from clusterd.core.wire import (
    CLIENT_VERBS,
    WORKER_VERBS,
    ErrorCode,
    JobRequest,
    Request,
    WireError,
    dumps,
    format_error,
    format_greeting,
    parse_greeting,
    parse_job_request,
    parse_json,
    parse_json_object,
    parse_request,
)


def wire_error(fn, *args) -> WireError:
    with pytest.raises(WireError) as info:
        fn(*args)
    return info.value


# -- parse_request -------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"", b"   ", b"\t", b" \r "])
def test_blank_line_is_no_request(line):
    """A blank or whitespace-only line is None, so pressing Enter in nc is not an error."""
    assert parse_request(line) is None


def test_verb_is_upper_cased_and_rest_kept():
    """The verb is upper-cased and the rest of the line is passed on, trimmed but not parsed."""
    assert parse_request(b"run sum [1, 2]  ") == Request("RUN", "sum [1, 2]")
    assert parse_request(b"  Ping") == Request("PING", "")


@pytest.mark.parametrize(
    "line, request_",
    [
        (b"WAIT\tj1", Request("WAIT", "j1")),
        (b"run\t sum [1]", Request("RUN", "sum [1]")),
        (b"\tPING\t", Request("PING", "")),
    ],
)
def test_verb_is_split_on_any_whitespace(line, request_):
    """A tab (or tab and spaces) after the verb separates it from the rest like a space does."""
    assert parse_request(line) == request_


def test_rest_keeps_inner_spacing():
    """Only the first space separates verb and rest; the rest keeps its own spacing."""
    assert parse_request(b"WAIT   j1") == Request("WAIT", "j1")
    assert parse_request(b'RUN wordcount "a  b"') == Request("RUN", 'wordcount "a  b"')


def test_utf8_is_decoded():
    """Non-ASCII UTF-8 in a request survives decoding."""
    assert parse_request('run wordcount "héllo ✓"'.encode()) == Request(
        "RUN", 'wordcount "héllo ✓"'
    )


def test_invalid_utf8_is_bad_encoding():
    """Bytes that are not UTF-8 raise BAD_ENCODING naming the offending byte offset."""
    err = wire_error(parse_request, b"PING \xff\xfe")
    assert err.code == ErrorCode.BAD_ENCODING
    assert "byte 5" in err.message


# -- parse_job_request ---------------------------------------------------------------------------


def test_task_and_input():
    """`<task> <input-json>` parses to the task name, the decoded input and no options."""
    req = parse_job_request("sum [1,2,3]")
    assert req == JobRequest("sum", [1, 2, 3], {}, "[1,2,3]")
    assert req.chunks is None


def test_input_json_is_the_input_exactly_as_sent():
    """input_json keeps the input's text exactly as sent (for the journal), without the options."""
    req = parse_job_request('sum [1,  2, 3]  {"chunks": 2}')
    assert req.input_json == "[1,  2, 3]"
    assert req.input == [1, 2, 3]


def test_input_may_be_any_json_value():
    """The input is any JSON value: object, string, number, null."""
    assert parse_job_request('primes {"start": 0, "stop": 10}').input == {"start": 0, "stop": 10}
    assert parse_job_request('wordcount "a b c"').input == "a b c"
    assert parse_job_request("sleep 0.5").input == 0.5
    assert parse_job_request("x null").input is None


def test_options_json():
    """A JSON object after the input carries the job options."""
    req = parse_job_request('sum [1, 2] {"chunks": 2}')
    assert req.options == {"chunks": 2}
    assert req.chunks == 2


def test_chunks_null_means_default():
    """`{"chunks": null}` is accepted and means the server picks the chunk count."""
    assert parse_job_request('sum [1] {"chunks": null}').chunks is None


def test_unknown_option_is_bad_request():
    """An option the server does not know is BAD_REQUEST naming it, not silently ignored."""
    err = wire_error(parse_job_request, 'sum [1] {"chunks": 2, "priority": 9}')
    assert err.code == ErrorCode.BAD_REQUEST
    assert "'priority'" in err.message


@pytest.mark.parametrize("value", ["0", "-1", "1.5", '"3"', "true", "false", "[2]", "2.0"])
def test_bad_chunks_values(value):
    """`chunks` must be a positive JSON integer: zero, negatives, floats, strings, booleans fail."""
    err = wire_error(parse_job_request, f'sum [1] {{"chunks": {value}}}')
    assert err.code == ErrorCode.BAD_REQUEST
    assert "chunks" in err.message


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": 1},
        {"timeout": 0.25},
        {"timeout": None},
        {"attempts": 1},
        {"attempts": 100},
        {"key": "k"},
        {"key": "x" * 200},
        {"chunks": 3, "timeout": 5, "attempts": 2, "key": "batch-7"},
    ],
)
def test_timeout_attempts_and_key_options(options):
    """timeout (positive seconds), attempts (1-100) and key (1-200 characters) are job options."""
    assert parse_job_request(f"sum [1] {json.dumps(options)}").options == options


@pytest.mark.parametrize(
    "options, word",
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": [1]}, "timeout"),
        ({"attempts": 0}, "attempts"),
        ({"attempts": 101}, "attempts"),
        ({"attempts": 2.0}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"attempts": "3"}, "attempts"),
        ({"key": ""}, "key"),
        ({"key": "x" * 201}, "key"),
        ({"key": 7}, "key"),
        ({"key": ["k"]}, "key"),
    ],
)
def test_bad_timeout_attempts_and_key_values(options, word):
    """A timeout that is not a positive number, attempts outside 1-100 or not an integer, and a
    key that is not a 1-200 character string are BAD_REQUEST naming the option."""
    err = wire_error(parse_job_request, f"sum [1] {json.dumps(options)}")
    assert err.code == ErrorCode.BAD_REQUEST
    assert f"'{word}'" in err.message


def test_failure_codes_are_stable():
    """The codes a FAILED or ERR line may carry keep their exact spelling (clients match them)."""
    assert (
        ErrorCode.BUSY,
        ErrorCode.TIMEOUT,
        ErrorCode.CHILD_DIED,
        ErrorCode.WORKER_LOST,
        ErrorCode.TASK_MISSING,
    ) == ("BUSY", "TIMEOUT", "CHILD_DIED", "WORKER_LOST", "TASK_MISSING")


def test_big_chunks_is_accepted_by_the_parser():
    """The parser only checks the type; the limit on sub-tasks is the scheduler's business."""
    assert parse_job_request('sum [1] {"chunks": 1000000000}').chunks == 10**9


@pytest.mark.parametrize("rest", ["", "sum", "sum   "])
def test_missing_task_or_input_is_bad_request(rest):
    """A job request without a task name or without a JSON input is BAD_REQUEST."""
    err = wire_error(parse_job_request, rest, "SUBMIT")
    assert err.code == ErrorCode.BAD_REQUEST
    assert "SUBMIT" in err.message


def test_bad_input_json_is_bad_json():
    """An input that is not JSON is BAD_JSON."""
    assert wire_error(parse_job_request, "sum [1,2").code == ErrorCode.BAD_JSON
    assert wire_error(parse_job_request, "sum hello").code == ErrorCode.BAD_JSON


@pytest.mark.parametrize(
    "rest",
    [
        "sum [1] garbage",
        'sum [1] {"chunks": 2} extra',
        'sum [1] {"chunks": 2} {}',
        "sum [1] {",
    ],
)
def test_trailing_garbage_is_bad_json(rest):
    """Anything after the input that is not exactly one JSON object is BAD_JSON."""
    assert wire_error(parse_job_request, rest).code == ErrorCode.BAD_JSON


def test_options_must_be_an_object():
    """Options that are valid JSON but not an object are BAD_REQUEST."""
    assert wire_error(parse_job_request, "sum [1] [2]").code == ErrorCode.BAD_REQUEST
    assert wire_error(parse_job_request, "sum [1] 3").code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "rest",
    [
        "sum [NaN]",
        "sum [1, Infinity]",
        "sum -Infinity",
        "sum NaN",
        'sum [1] {"chunks": NaN}',
    ],
)
def test_nan_and_infinity_are_rejected(rest):
    """NaN and the infinities are not JSON, although Python's json accepts them: BAD_JSON."""
    assert wire_error(parse_job_request, rest).code == ErrorCode.BAD_JSON


def test_deeply_nested_input_is_json_too_deep_not_a_crash():
    """An input nested past the recursion limit is JSON_TOO_DEEP rather than a RecursionError."""
    err = wire_error(parse_job_request, "sum " + "[" * 100_000 + "]" * 100_000)
    assert err.code == ErrorCode.JSON_TOO_DEEP


@pytest.mark.parametrize("depth, ok", [(64, True), (65, False)])
def test_json_depth_limit_is_exact(depth, ok):
    """Nesting up to the limit (64 by default) parses; one level more is JSON_TOO_DEEP, in the
    job input, in its options and in any JSON payload."""
    doc = "[" * depth + "1" + "]" * depth
    if ok:
        assert parse_job_request("sum " + doc).input is not None
        assert parse_json(doc) is not None
    else:
        assert wire_error(parse_job_request, "sum " + doc).code == ErrorCode.JSON_TOO_DEEP
        assert wire_error(parse_json, doc).code == ErrorCode.JSON_TOO_DEEP
        deep_options = '[1] {"chunks": 1, "key": ' + doc.replace("1", '"k"', 1) + "}"
        assert wire_error(parse_job_request, "sum " + deep_options).code == ErrorCode.JSON_TOO_DEEP


def test_json_depth_limit_is_configurable():
    """A smaller depth limit applies to the job input."""
    assert wire_error(parse_job_request, "sum [[[1]]]", "RUN", 2).code == ErrorCode.JSON_TOO_DEEP
    assert parse_job_request("sum [[1]]", "RUN", 2).input == [[1]]


def test_parse_json_and_object():
    """parse_json decodes one value; parse_json_object also insists on an object."""
    assert parse_json('{"a": [1]} ') == {"a": [1]}
    assert wire_error(parse_json, "NaN").code == ErrorCode.BAD_JSON
    assert wire_error(parse_json, "1 2").code == ErrorCode.BAD_JSON
    assert parse_json_object('{"x": 1}') == {"x": 1}
    assert wire_error(parse_json_object, "[1]").code == ErrorCode.BAD_REQUEST


# -- output --------------------------------------------------------------------------------------


def test_dumps_is_compact_one_line_json():
    """dumps writes JSON with no spaces and no newlines, keeping non-ASCII as is."""
    out = dumps({"a": [1, 2], "b": "x\ny", "c": "é"})
    assert out == '{"a":[1,2],"b":"x\\ny","c":"é"}'
    assert "\n" not in out
    assert json.loads(out) == {"a": [1, 2], "b": "x\ny", "c": "é"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1, math.nan]])
def test_dumps_refuses_nan(value):
    """dumps refuses NaN and infinities instead of writing non-JSON tokens."""
    with pytest.raises(ValueError):
        dumps(value)


def test_format_error():
    """An error line is `ERR <code> <message>`."""
    assert format_error(ErrorCode.UNKNOWN_JOB, "no job 'j9'.") == "ERR UNKNOWN_JOB no job 'j9'."


def test_greeting_format():
    """The greeting is `HELLO clusterd <protocol> <info-json>` with server version, role, limit."""
    line = format_greeting("server", 1234)
    assert line.startswith(f"HELLO clusterd {PROTOCOL_VERSION} {{")
    info = json.loads(line.split(" ", 3)[3])
    assert info == {"server": f"clusterd/{__version__}", "role": "server", "max_line": 1234}


def test_greeting_round_trip():
    """parse_greeting reads back what format_greeting writes."""
    version, info = parse_greeting(format_greeting("server", 99))
    assert version == PROTOCOL_VERSION
    assert info["max_line"] == 99
    assert info["role"] == "server"


def test_greeting_without_info():
    """A bare `HELLO clusterd <n>` is a greeting with empty info."""
    assert parse_greeting("HELLO clusterd 7") == (7, {})


@pytest.mark.parametrize(
    "text, code",
    [
        ("HELLO other 1", ErrorCode.BAD_REQUEST),
        ("HI clusterd 1", ErrorCode.BAD_REQUEST),
        ("HELLO clusterd", ErrorCode.BAD_REQUEST),
        ("HELLO clusterd one", ErrorCode.BAD_REQUEST),
        ("HELLO clusterd 1 {bad", ErrorCode.BAD_JSON),
        ("HELLO clusterd 1 [1]", ErrorCode.BAD_REQUEST),
    ],
)
def test_bad_greetings(text, code):
    """Anything that is not a clusterd greeting raises a WireError."""
    assert wire_error(parse_greeting, text).code == code


def test_wire_error_str():
    """A WireError reads as `<code>: <message>`."""
    assert str(WireError("BAD_JSON", "nope")) == "BAD_JSON: nope"


def test_verb_tables_overlap_only_in_ping():
    """Only PING is both a client and a worker verb (both roles answer it OK PONG), so the role
    decides every other verb unambiguously."""
    assert set(CLIENT_VERBS) & set(WORKER_VERBS) == {"PING"}
    assert {"RUN", "SUBMIT", "PING", "QUIT"} <= set(CLIENT_VERBS)
    assert set(WORKER_VERBS) == {"REGISTER", "DONE", "ERROR", "DRAIN", "PING"}
