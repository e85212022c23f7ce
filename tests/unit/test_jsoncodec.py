"""clusterd.core.jsoncodec answers exactly as the standard library does, orjson or not."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterd.core import jsoncodec, wire
from clusterd.core.jsoncodec import dumpb, dumps, loads, std_dumps
from clusterd.core.wire import ErrorCode, WireError, parse_job_request, parse_json

pytestmark = pytest.mark.skipif(jsoncodec.orjson is None, reason="orjson is not installed")

# Floats orjson spells its own way (1e-7, 0.00001), next to text that looks like them.
tiny_floats = st.floats(min_value=1e-12, max_value=1e-3) | st.floats(
    min_value=-1e-3, max_value=-1e-12
)
floats = st.floats(allow_nan=False, allow_infinity=False) | tiny_floats
ints = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30])
)
texts = st.text() | st.sampled_from(
    ["1e-7", ",1e-7,", ":0.00001]", "null", "[null", "é✓😀", "\u2028", "\x7f", "\ud800", "e-mail"]
)
scalars = st.none() | st.booleans() | ints | floats | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(texts, inner, max_size=6),
    max_leaves=40,
)


def same(a, b):
    """Equal as JSON values, with int/float/bool and -0.0 told apart."""
    return std_dumps(a, allow_nan=True) == std_dumps(b, allow_nan=True)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_dumps_is_byte_identical_to_the_standard_library(value):
    """dumps and dumpb write exactly the bytes the standard library's compact json.dumps writes."""
    expected = std_dumps(value)
    assert dumps(value) == expected
    assert dumpb(value) == expected.encode("utf-8")


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_loads_equals_the_standard_library(value):
    """loads reads any JSON text, as str or bytes, to what the standard library reads."""
    for text in (std_dumps(value), json.dumps(value), json.dumps(value, indent=1)):
        assert same(loads(text), json.loads(text))
        assert same(loads(text.encode("utf-8", "surrogatepass")), json.loads(text))


@settings(max_examples=300, deadline=None)
@given(st.lists(floats, max_size=30))
def test_float_lists_match(values):
    """Lists of floats are written as the standard library writes them and read back equal."""
    assert dumps(values) == std_dumps(values)
    assert same(loads(dumps(values)), values)


@pytest.mark.parametrize(
    "value",
    [
        {"id": 7, "job": "j1", "index": 3, "task": "sum", "attempt": 1, "input": [1, 2, 3]},
        {"id": 7, "job": "j1", "result": 6, "t": 1.2345e-05},
        {"id": 7, "job": "j1", "result": {"naïve": 2, "日本": 1}, "t": 0.0001},
        [1e16, 0.1, -0.0, 0.0, 1e-7, 1e-5, 5e-324, 1.7976931348623157e308, 1e22],
        [2**64, -(2**64), 2**64 - 1, -(2**63)],
        {"a": "x,1e-7,", "b": 1e-7},  # the spelling also inside a string: stdlib answers
        {"a": [2.1e-70, 1e-7]},  # orjson's "1e-7" inside a longer number
        {"s": "\ud800 lone"},
        {1: "int key", "k": (1, 2)},
    ],
)
def test_typical_and_awkward_messages(value):
    """Typical and awkward protocol messages are written exactly as the standard library writes
    them."""
    assert dumps(value) == std_dumps(value)


def test_deep_nesting_matches():
    """Deep nesting, past orjson's own limits, is written and read as the standard library does."""
    deep = [1]
    for _ in range(300):  # past orjson's 254 levels for encoding
        deep = [deep]
    assert dumps(deep) == std_dumps(deep)
    text = "[" * 600 + "]" * 600
    assert loads(text) == json.loads(text)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, [1, math.nan], {"a": [math.inf]}])
def test_nan_and_infinity_are_never_written(bad):
    """NaN and infinity are refused on output unless allow_nan is given."""
    with pytest.raises(ValueError):
        dumps(bad)
    with pytest.raises(ValueError):
        dumpb(bad)
    assert dumps(bad, allow_nan=True) == json.dumps(bad, separators=(",", ":"))


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a":-Infinity}'])
def test_nan_and_infinity_are_refused_on_input(text):
    """NaN and infinity are refused on input (BAD_JSON on the wire) unless allow_nan is given."""
    with pytest.raises(ValueError, match="is not valid JSON"):
        loads(text)
    assert same(loads(text, allow_nan=True), json.loads(text))
    with pytest.raises(WireError) as info:
        parse_json(text, "the job input")
    assert info.value.code == ErrorCode.BAD_JSON
    assert "is not valid JSON: " in info.value.message


@pytest.mark.parametrize(
    "text", ["123456789012345678901234567890", "-9223372036854775809", "[18446744073709551616]"]
)
def test_wide_integers_round_trip(text):
    """Integers wider than 64 bits are read and written back unchanged."""
    value = loads(text)
    assert value == json.loads(text) and same(value, json.loads(text))
    assert dumps(value) == text
    assert parse_json(text) == json.loads(text)


def test_stdlib_quirks_are_kept():
    """The standard library's quirks are kept: an overflowing number reads as infinity, a lone
    surrogate round-trips ASCII-escaped, and trailing text is refused."""
    assert loads("1e400") == math.inf  # the standard library reads an overflow as infinity
    assert loads('"\\ud800"') == "\ud800"
    assert dumps("\ud800") == '"\\ud800"'  # ASCII-escaped, so the line stays valid UTF-8
    with pytest.raises(ValueError):
        loads("[1] x")


def test_depth_limit_and_trailing_text_on_the_wire():
    """parse_json refuses JSON nested deeper than its limit with JSON_TOO_DEEP, and trailing text
    after the value."""
    with pytest.raises(WireError) as info:
        parse_json("[" * 65 + "]" * 65, "the job input")
    assert info.value.code == ErrorCode.JSON_TOO_DEEP
    assert parse_json("[" * 64 + "]" * 64) is not None
    # Deeper than 500, a generous limit is the standard library's call (its recursion limit).
    with pytest.raises(WireError) as info:
        parse_json("[" * 1000 + "]" * 1000, "the reply", 100_000)
    assert info.value.code == ErrorCode.JSON_TOO_DEEP
    with pytest.raises(WireError) as info:
        parse_json("[1] [2]", "the payload")
    assert info.value.message == "the payload has unexpected text after the JSON value."


def _stdlib_only(call):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(jsoncodec, "orjson", None)
        return _outcome(call)


def _outcome(call):
    try:
        return ("ok", call())
    except WireError as e:
        return ("err", e.code, e.message)


separators = st.sampled_from(["", " ", "  ", "\t", "\x0b", " x ", "\u00a0"])
options = st.sampled_from(
    ['{"chunks":2}', '{"key":"a{b"}', '{"chunks":}', "{}", '{"key":"{{{{{{{{{{"}', "[1]", "{"]
)


@settings(max_examples=300, deadline=None)
@given(json_values, separators, options | st.just(""))
def test_job_requests_parse_as_with_the_standard_library_alone(value, sep, opts):
    """RUN's ``<input> [<options>]``: orjson's split of the payload is raw_decode's."""
    for text in (std_dumps(value), json.dumps(value)):
        rest = "sum " + text + sep + opts
        fast = _outcome(lambda rest=rest: parse_job_request(rest))
        assert fast == _stdlib_only(lambda rest=rest: parse_job_request(rest))
        if fast[0] == "ok":
            assert fast[1].input_json == text.strip()


@pytest.mark.parametrize(
    "rest",
    [
        'sum [1,2] {"chunks":2}',
        'primes {"start":0,"stop":10}',
        'primes {"start":0,"stop":10} {"chunks":2}',
        'wordcount "a {b} c" {"key":"{x}"}',
        "sum [NaN]",
        "sum [1,2",
        'sum 12{"chunks":2}',
        'sum [1]\x0b{"chunks":2}',
        'sum {"a":1}{"chunks":2} {"attempts":2}',
    ],
)
def test_job_request_examples(rest):
    """parse_job_request gives the same outcome with the fast codec as with the standard library
    alone."""
    assert _outcome(lambda: parse_job_request(rest)) == _stdlib_only(
        lambda: parse_job_request(rest)
    )


def test_wire_dumps_is_the_codec():
    """wire.dumps writes compact JSON with UTF-8 text unescaped, as the codec does."""
    assert wire.dumps({"a": [1, 2.5, "é"]}) == '{"a":[1,2.5,"é"]}'


@pytest.mark.parametrize(
    "filler", ["x" * 5000, list(range(3000)), {f"k{i}": i for i in range(600)}]
)
def test_long_payloads_take_the_same_decisions(filler):
    """Past 4096 characters the depth check and the wide-integer check take other routes
    (a budgeted walk, encoding again); their answers stay the stdlib's."""
    ok = filler
    for _ in range(63 if isinstance(filler, (list, dict)) else 64):
        ok = [ok]  # 64 levels in all
    assert parse_json(std_dumps(ok), "the job input") == ok
    with pytest.raises(WireError) as info:
        parse_json(std_dumps([ok]), "the job input")
    assert info.value.code == ErrorCode.JSON_TOO_DEEP
    for extra in (2**64, -(2**63) - 1, 1e19, "C++ e+5", 10**30):
        value = {"a": filler, "b": [extra]}
        text = std_dumps(value)
        assert same(loads(text), json.loads(text))
        assert same(parse_json(text), json.loads(text))
