"""clusterd's JSON codec: the standard library's semantics at orjson's speed.

``dumps``/``dumpb`` give exactly what ``json.dumps(value, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` gives (ASCII-escaped when a string holds a lone surrogate,
so every line is valid UTF-8), and ``loads`` gives exactly what ``json.loads`` gives with NaN and
Infinity refused. orjson does the work whenever its answer is provably the same; the standard
library does it in exactly the cases where orjson behaves differently:

- encoding: integers wider than 64 bits, lone surrogates, non-string keys, subclasses of
  built-in types, dataclasses, datetimes, nesting deeper than 254 and unknown types (orjson
  raises; the standard library encodes or raises its own error); NaN and infinities (orjson
  writes ``null``; the standard library raises ``ValueError``). Floats between 1e-10 and 1e-4 are
  spelled differently by orjson (``1e-7``, ``0.00001`` for ``1e-07``, ``1e-05``): those tokens
  are respelled with ``repr`` when that is provably exact, else the standard library encodes.
- decoding: anything orjson refuses (NaN, Infinity, ``1e400``, lone surrogate escapes, nesting
  deeper than 1024, trailing text: the standard library gives its own result or error message),
  and integers wider than 64 bits (orjson reads them as floats, so any float of magnitude at
  least 2**63 in orjson's answer sends the text to the standard library).

One difference is left: orjson also encodes ``uuid.UUID`` and ``enum.Enum`` members, which the
standard library refuses with ``TypeError``. Only task code can produce them; JSON never does.
"""

from __future__ import annotations

import json
import math
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; without it the stdlib does everything
    orjson = None  # type: ignore[assignment]

__all__ = ["dumps", "dumpb", "loads", "try_loads", "MISS", "std_dumps", "std_loads"]

MISS: Any = object()  # what ``try_loads`` returns when only the standard library can answer

_WIDE = float(2**63)  # orjson reads integers outside [-2**63, 2**64) as floats
_SMALL = 1e-4  # orjson spells floats below this (down to 1e-10) differently from repr
_INF = math.inf
_NUMBERS = frozenset((int, float))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_std_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def std_dumps(value: Any, allow_nan: bool = False) -> str:
    """The standard library's answer, which the fast path must match byte for byte."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(value, separators=(",", ":"), allow_nan=allow_nan)
    return text


def std_loads(data: str | bytes | bytearray, allow_nan: bool = False) -> Any:
    """``json.loads`` with NaN and Infinity refused (``ValueError``), unless ``allow_nan``."""
    if allow_nan:
        return json.loads(data)
    if not isinstance(data, str):
        return json.loads(data, parse_constant=_reject_constant)
    return _std_decoder.decode(data)


if orjson is not None:
    _OPTS = (
        orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )
    _EncodeError: type[Exception] = orjson.JSONEncodeError
    _DecodeError: type[Exception] = orjson.JSONDecodeError


def _has_wide_float(value: Any) -> bool:
    """True if orjson's answer holds a float that may have been a wide integer (a float of
    magnitude 2**63 or more). A value with few items is walked; a bigger one is encoded again,
    since orjson writes every such float with "e+" and a "+" is rare elsewhere (finding one
    byte runs at memchr speed, where a walk costs tens of ns per item)."""
    found = _walk_for_wide(value, 64)
    if found is not None:
        return found
    try:
        if orjson.dumps(value).find(b"+") < 0:
            return False
    except _EncodeError:  # nesting past orjson's encoding limit
        return True
    return bool(_walk_for_wide(value, None))


def _walk_for_wide(value: Any, budget: int | None) -> bool | None:
    """Walk ``value`` for wide floats; ``None`` once more than ``budget`` items were seen."""
    t = type(value)
    if t is float:
        return not -_WIDE < value < _WIDE
    if t is dict:
        stack: list[Any] = [value.values()]
    elif t is list:
        stack = [value]
    else:
        return False
    while stack:
        items = stack.pop()
        if budget is not None:
            budget -= len(items)
            if budget < 0:
                return None
        for x in items:
            tx = type(x)
            if tx is float:
                if not -_WIDE < x < _WIDE:
                    return True
            elif tx is list:
                stack.append(x)
            elif tx is dict:
                stack.append(x.values())
    return False


def _odd_floats(value: Any) -> dict[float, int] | None:
    """The floats orjson spells differently from the standard library, with how often each
    occurs; ``None`` if the value holds NaN or an infinity (which only the standard library
    may answer, by raising). Walked as in :func:`_has_wide_float`."""
    odd: dict[float, int] = {}
    t = type(value)
    if t is dict:
        stack: list[Any] = [value.values()]
    elif t is list:
        stack = [value]
    else:
        stack = [(value,)]
    while stack:
        items = stack.pop()
        if len(items) <= 16:
            for x in items:
                tx = type(x)
                if tx is float:
                    if not -_INF < x < _INF:
                        return None  # NaN fails both comparisons
                    if x and -_SMALL < x < _SMALL:
                        odd[x] = odd.get(x, 0) + 1
                elif tx is list:
                    stack.append(x)
                elif tx is dict:
                    stack.append(x.values())
            continue
        types = set(map(type, items))
        if float in types:
            floats = items if types <= _NUMBERS else [x for x in items if type(x) is float]
            if any(map(math.isnan, floats)) or any(map(math.isinf, floats)):
                return None
            if min(map(abs, floats)) < _SMALL:
                for x in floats:
                    if type(x) is float and x and -_SMALL < x < _SMALL:
                        odd[x] = odd.get(x, 0) + 1
        if list in types:
            stack.extend(x for x in items if type(x) is list)
        if dict in types:
            stack.extend(x.values() for x in items if type(x) is dict)
    return odd


def _respell(out: Any, value: Any) -> Any:
    """orjson's output (``str`` or ``bytes``) made equal to the standard library's, or ``None``
    when only the standard library can encode ``value``.

    A NaN or an infinity becomes a ``null`` token, and a float below 1e-4 holds ``e-`` or
    ``0.0000``; only output holding one of those is looked at again, by walking ``value`` for
    its floats (the same bytes inside strings are harmless). orjson's spelling of each odd float
    is replaced by ``repr``'s when it occurs exactly as often as that float, so that no string
    or longer number holds it; otherwise the standard library encodes."""
    odd = _odd_floats(value)
    if odd is None:
        return None
    text = type(out) is str
    spellings = []
    for x, n in odd.items():
        mine, theirs = orjson.dumps(x), repr(x)
        if text:
            mine = mine.decode()
        else:
            theirs = theirs.encode()  # type: ignore[assignment]
        if mine != theirs:
            if out.count(mine) != n:
                return None
            spellings.append((mine, theirs))
    for mine, theirs in spellings:
        out = out.replace(mine, theirs)
    return out


def dumps(value: Any, allow_nan: bool = False) -> str:
    """Compact JSON text, exactly as :func:`std_dumps` writes it: NaN and infinities raise
    ``ValueError`` (or, with ``allow_nan``, are written as the standard library writes them)."""
    if orjson is not None:
        try:
            out = orjson.dumps(value, option=_OPTS).decode("utf-8")
        except _EncodeError:
            return std_dumps(value, allow_nan)
        # (``in`` on str is much cheaper than on bytes.)
        if "null" not in out and "e-" not in out and "0.0000" not in out:
            return out
        out = _respell(out, value)
        if out is not None:
            return out
    return std_dumps(value, allow_nan)


def dumpb(value: Any, allow_nan: bool = False) -> bytes:
    """:func:`dumps` as UTF-8 bytes, for pipes and sockets."""
    if orjson is not None:
        try:
            out = orjson.dumps(value, option=_OPTS)
        except _EncodeError:
            return std_dumps(value, allow_nan).encode("utf-8")
        if out.find(b"null") < 0 and out.find(b"e-") < 0 and out.find(b"0.0000") < 0:
            return out
        out = _respell(out, value)
        if out is not None:
            return out
    return std_dumps(value, allow_nan).encode("utf-8")


def try_loads(data: str | bytes | bytearray) -> Any:
    """orjson's answer when it equals the standard library's, else :data:`MISS` (also for text
    that is not JSON: the caller asks the standard library, for its result or its error)."""
    if orjson is None:
        return MISS
    try:
        value = orjson.loads(data)
    except _DecodeError:
        return MISS
    if len(data) <= 4096:
        # For a small value, encoding it again is cheaper than walking it (see below).
        try:
            if "+" not in orjson.dumps(value).decode("utf-8"):
                return value
        except _EncodeError:
            return MISS
    if _has_wide_float(value):
        return MISS
    return value


def loads(data: str | bytes | bytearray, allow_nan: bool = False) -> Any:
    """``json.loads`` with NaN and Infinity refused (unless ``allow_nan``): raises
    ``ValueError``, or ``RecursionError`` past Python's recursion limit, as the standard library
    does. (Nesting from about 1000 to 1024 levels parses here and not in the standard library;
    ``wire.parse_json`` keeps the standard library's answer for anything over 500.)"""
    value = try_loads(data)
    if value is MISS:
        return std_loads(data, allow_nan)
    return value
