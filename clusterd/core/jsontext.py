"""JSON text on the wire: one-line encoding and parsing with a nesting limit.

Pure functions shared by requests, replies, worker messages and the journal's records. Errors
are :class:`~clusterd.core.errors.WireError` with the codes of docs/PROTOCOL.md (BAD_JSON,
JSON_TOO_DEEP, BAD_REQUEST). Imports only ``jsoncodec`` and ``errors``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from clusterd.core import jsoncodec
from clusterd.core.errors import ErrorCode, WireError

__all__ = [
    "DEFAULT_MAX_JSON_DEPTH",
    "check_depth",
    "parse_json",
    "parse_json_object",
    "parse_json_objects",
    "dumps",
    "is_finite_number",
]

_decoder = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name))
_JSON_SPACE = " \t\n\r"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


DEFAULT_MAX_JSON_DEPTH = 64


def check_depth(text: str, value: Any, limit: int, what: str) -> None:
    """Refuse JSON nested deeper than ``limit``. Counting brackets (C speed) rules out almost
    every payload; only a payload with more brackets than the limit is walked. Counting costs
    about 1 ms per MiB, so a long payload with few items (a big text in a small object) is
    first walked, within a budget of items, instead."""
    if len(text) < 2 * limit + 2 or not isinstance(value, (list, dict)):
        return  # nesting deeper than the limit takes limit + 1 brackets, opened and closed
    if len(text) > 4096 and _shallow(value, limit, 256):
        return
    if text.count("[") + text.count("{") <= limit:
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise WireError(
                ErrorCode.JSON_TOO_DEEP, f"{what} is nested deeper than {limit} levels."
            )
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))


def _shallow(value: Any, limit: int, budget: int) -> bool:
    """True if walking at most ``budget`` items shows that ``value`` nests at most ``limit``
    deep; False if it nests deeper or has more items (then the caller counts)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        budget -= len(children)
        if depth > limit or budget < 0:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))
    return True


def _decode_prefix(text: str, what: str, max_depth: int) -> tuple[Any, int]:
    """Decode the JSON value at the start of ``text``; returns it and where it ends. Errors
    are WireErrors: malformed is BAD_JSON, too deep (by the limit, or past Python's recursion
    limit) is JSON_TOO_DEEP."""
    try:
        value, end = _decoder.raw_decode(text)
    except RecursionError:
        raise WireError(
            ErrorCode.JSON_TOO_DEEP, f"{what} is nested deeper than {max_depth} levels."
        ) from None
    except ValueError as e:
        raise WireError(ErrorCode.BAD_JSON, f"{what} is not valid JSON: {_short(e)}.") from None
    if isinstance(value, (list, dict)):
        check_depth(text[:end], value, max_depth, what)
    return value, end


def _fast_prefix(text: str) -> tuple[Any, str] | None:
    """The value at the start of ``text`` (stripped) and its JSON text, found by orjson, or
    ``None`` when only the standard library's ``raw_decode`` can tell (including every error).
    Either the whole text is one value, or the value is followed by an object (the job options):
    then some ``{`` near the end starts the options, and the text before it parses as one value.
    A prefix that parses as one whole value ends where ``raw_decode`` stops, since where a JSON
    value ends does not depend on what follows it."""
    if text[-1:] != "}" or text[:1] == "{":  # a lone value that ends in "}" is an object
        value = jsoncodec.try_loads(text)
        if value is not jsoncodec.MISS:
            return value, text
    if text[-1:] == "}":
        i = len(text)
        for _ in range(8):
            i = text.rfind("{", 1, i)
            if i < 1:
                break
            prefix = text[:i]
            value = jsoncodec.try_loads(prefix)
            if value is not jsoncodec.MISS:
                return value, prefix.rstrip(_JSON_SPACE)
    return None


def _decode_prefix_fast(text: str, what: str, max_depth: int) -> tuple[Any, int]:
    """``_decode_prefix``, by orjson where it gives the same answer."""
    found = _fast_prefix(text)
    if found is None:
        return _decode_prefix(text, what, max_depth)
    value, value_text = found
    if not _fast_depth_ok(value_text, value, max_depth, what):
        return _decode_prefix(text, what, max_depth)
    return value, len(value_text)


_FAST_MAX_DEPTH = 500  # the standard library parses this deep whatever the stack depth


def _fast_depth_ok(text: str, value: Any, max_depth: int, what: str) -> bool:
    """Apply the depth limit to orjson's answer. Past 500 levels the standard library may hit
    Python's recursion limit (JSON_TOO_DEEP) where orjson (up to 1024) does not, so when the
    limit allows more than 500 and the value is deeper, only the standard library can say."""
    if not isinstance(value, (list, dict)):
        return True
    if max_depth <= _FAST_MAX_DEPTH:
        check_depth(text, value, max_depth, what)
        return True
    try:
        check_depth(text, value, _FAST_MAX_DEPTH, what)
    except WireError:
        return False
    return True


def parse_json(
    text: str, what: str = "the payload", max_depth: int = DEFAULT_MAX_JSON_DEPTH
) -> Any:
    """Parse one JSON value from ``text``, within ``max_depth`` nesting; raises WireError (BAD_JSON,
    JSON_TOO_DEEP) naming ``what``."""
    text = text.strip()
    value = jsoncodec.try_loads(text) if text else jsoncodec.MISS
    if value is not jsoncodec.MISS and _fast_depth_ok(text, value, max_depth, what):
        return value
    value, end = _decode_prefix(text, what, max_depth)
    if text[end:].strip():
        raise WireError(ErrorCode.BAD_JSON, f"{what} has unexpected text after the JSON value.")
    return value


def parse_json_object(
    text: str, what: str = "the payload", max_depth: int = DEFAULT_MAX_JSON_DEPTH
) -> dict[str, Any]:
    """Parse ``text`` as a JSON object; raises WireError, BAD_REQUEST when it is another JSON
    value."""
    value = parse_json(text, what, max_depth)
    if not isinstance(value, dict):
        raise WireError(ErrorCode.BAD_REQUEST, f"{what} must be a JSON object.")
    return value


def parse_json_objects(
    text: str, what: str = "the payload", max_depth: int = DEFAULT_MAX_JSON_DEPTH
) -> list[dict[str, Any]]:
    """A worker verb's payload in either form: one JSON object, or a JSON array of objects
    (a batch, docs/PROTOCOL.md §5). Returns the objects; an array's own level does not count
    towards ``max_depth``. A payload that is neither, or an array holding anything but
    objects, is refused whole."""
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return [parse_json_object(text, what, max_depth)]
    value = parse_json(stripped, what, max_depth + 1)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise WireError(ErrorCode.BAD_REQUEST, f"{what} must be a JSON object or an array of them.")
    return value


def dumps(value: Any) -> str:
    """Compact JSON on one line; NaN and infinities are refused, since they are not JSON.
    Text stays readable UTF-8, except that a lone surrogate (legal in JSON, not in UTF-8)
    makes the whole value ASCII-escaped, so every line and journal record is valid UTF-8.
    orjson writes it when its bytes are the standard library's (see ``jsoncodec``)."""
    return jsoncodec.dumps(value)


def _short(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(": line")[0]


def is_finite_number(x: Any) -> bool:
    """Whether ``x`` is an int or a finite float (not a bool, NaN or infinity)."""
    return type(x) in (int, float) and (type(x) is int or math.isfinite(x))
