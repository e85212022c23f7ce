"""Values larger than one line: cutting a streamed input into sub-tasks, and a big answer into
pieces.

A streamed value travels as *piece* lines, each a JSON array or a JSON string within the line
limit; the value is their concatenation (arrays are joined end to end, strings likewise, and for
answers only, objects are merged). This keeps every piece readable and typeable in ``nc`` and lets
the server start work before the last piece arrives: :class:`Cutter` turns pieces into sub-task
inputs as soon as a sub-task's worth has arrived, so the server never holds the input twice.

Pure: no sockets, no reactor. The wire syntax (``@``, ``+piece``, ``.``) is documented in
docs/PROTOCOL.md, "Streamed values".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jsontext import parse_json

__all__ = [
    "STREAM_MARK",
    "PIECE",
    "END",
    "Cutter",
    "chunk_target",
    "split_for_lines",
    "Joiner",
    "DEFAULT_TEXT_CHUNK",
    "DEFAULT_LIST_CHUNK",
    "ANSWER_PIECE",
    "piece_lines",
    "KINDS",
    "PIECE_LINE",
    "END_LINE",
    "OTHER_LINE",
    "line_kind",
    "piece_value",
    "ByteCutter",
    "text_input",
]

STREAM_MARK = "@"  # in place of a JSON value: the value follows as piece lines
PIECE = "+"  # a piece line is "+" followed by one JSON array or string
END = "."  # the line that ends a stream

KINDS = {"list": list, "text": str}  # Task.stream -> the JSON type of its pieces

# The one reader of piece lines, for every stream (an input arriving at the server, a worker's
# streamed result, a streamed answer reaching a client): what a line is, and a piece's value.
PIECE_LINE, END_LINE, OTHER_LINE = "piece", "end", "other"


def line_kind(line: bytes | str) -> str:
    """``PIECE_LINE`` (``+<json>``), ``END_LINE`` (a line holding only ``.``) or
    ``OTHER_LINE`` (the stream was left without its end)."""
    stripped = line.strip()
    if stripped in (b".", "."):
        return END_LINE
    if stripped[:1] in (b"+", "+"):
        return PIECE_LINE
    return OTHER_LINE


def piece_value(line: bytes | str, what: str, max_depth: int) -> Any:
    """The JSON value of a piece line. Raises ``WireError``: ``BAD_ENCODING`` (not UTF-8),
    ``BAD_JSON`` or ``JSON_TOO_DEEP``; ``what`` names the piece in the message."""
    text = line.strip()[1:]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError(
                ErrorCode.BAD_ENCODING, f"{what} is not valid UTF-8 (byte {e.start + 1})."
            ) from None
    return parse_json(text, what, max_depth)


DEFAULT_TEXT_CHUNK = 1 << 20  # bytes of text per sub-task when the client gives no size
DEFAULT_LIST_CHUNK = 10_000  # items per sub-task when the client gives no size
# Never more per sub-task than this, whatever size/chunks say: a sub-task's DO line must stay
# well within a worker's line limit (16 MiB by default), even for 4-byte UTF-8 or escapes.
MAX_TEXT_CHUNK = 2 << 20
MAX_LIST_CHUNK = 200_000

ANSWER_PIECE = 1 << 20  # characters per piece of a streamed answer, on average

_SPACE = re.compile(r"\s")


def chunk_target(kind: str, size: int | None, chunks: int) -> int:
    """Items (or characters) per sub-task. With the input's ``size`` announced, ``chunks``
    sub-tasks of equal size; without it the server cannot know how many pieces will come, so a
    fixed sub-task size gives the job as many sub-tasks as its input needs. Capped so that no
    sub-task outgrows a worker's line."""
    if size is not None:
        target = math.ceil(size / max(1, chunks))
    else:
        target = DEFAULT_TEXT_CHUNK if kind == "text" else DEFAULT_LIST_CHUNK
    return max(1, min(target, MAX_TEXT_CHUNK if kind == "text" else MAX_LIST_CHUNK))


class Cutter:
    """Turns the pieces of a streamed input into sub-task inputs, in order.

    A list input is cut every ``target`` items. A text input is cut at the first whitespace at
    or after ``target`` characters (the whitespace starts the next sub-task), so no word is ever
    split between two sub-tasks; the same rule as the text tasks' ``split``.
    """

    def __init__(self, kind: str, target: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown stream kind {kind!r}")
        self.kind = kind
        self.target = max(1, target)
        self.size = 0  # items or characters received
        self.cut = 0  # sub-task inputs produced
        self._parts: list[Any] = []
        self._held = 0  # items or characters in _parts

    def feed(self, piece: Any) -> list[Any]:
        """Take one piece; return the sub-task inputs it completes (often none)."""
        if not isinstance(piece, KINDS[self.kind]):
            want = "a JSON array" if self.kind == "list" else "a JSON string"
            raise TypeError(f"each piece of this input must be {want}")
        if not piece:
            return []
        self.size += len(piece)
        self._parts.append(piece)
        self._held += len(piece)
        if self._held < self.target:
            return []
        return self._cut_text() if self.kind == "text" else self._cut_list()

    def finish(self) -> list[Any]:
        """The end of the input: whatever is held is the last sub-task. An empty input still
        gives one empty sub-task, as the tasks' ``split`` does."""
        out: list[Any] = []
        if self._held or self.cut == 0:
            joined = "".join(self._parts) if self.kind == "text" else _concat(self._parts)
            out.append(joined)
        self._parts, self._held = [], 0
        self.cut += len(out)
        return out

    def _cut_list(self) -> list[Any]:
        items = _concat(self._parts)
        n = len(items) - len(items) % self.target
        out = [items[i : i + self.target] for i in range(0, n, self.target)]
        rest = items[n:]
        self._parts, self._held = ([rest] if rest else []), len(rest)
        self.cut += len(out)
        return out

    def _cut_text(self) -> list[Any]:
        text = "".join(self._parts)
        out, start = [], 0
        while len(text) - start >= self.target:
            m = _SPACE.search(text, start + self.target)
            if m is None:
                break  # a word runs past the held text: wait for more
            out.append(text[start : m.start()])
            start = m.start()
        rest = text[start:]
        self._parts, self._held = ([rest] if rest else []), len(rest)
        self.cut += len(out)
        return out


_ASCII_SPACE = re.compile(rb"[ \t\n\r\f\v]")


def text_input(value: Any) -> Any:
    """A sub-task input as task code takes it: a text stream's chunk (UTF-8 ``bytes``, checked
    when it was cut) becomes the ``str`` a text task's ``run`` expects; anything else as is."""
    return value.decode("utf-8") if isinstance(value, bytes | bytearray | memoryview) else value


class ByteCutter:
    """The :class:`Cutter` of text streams, on UTF-8 bytes: a chunk ends at the first ASCII
    whitespace byte at or after ``target`` bytes (that byte starts the next chunk). UTF-8
    continuation bytes are >= 0x80, so a cut never splits a character, and cutting only at
    whitespace never splits a word. Each chunk is one ``bytes`` object (the held pieces joined
    once), checked to be UTF-8 (``isascii`` first, the full check only for non-ASCII chunks);
    ``feed`` and ``finish`` raise UnicodeDecodeError for a chunk that is not."""

    kind = "text"

    def __init__(self, target: int) -> None:
        self.target = max(1, target)
        self.size = 0  # bytes received
        self.cut = 0  # sub-task inputs produced
        self._parts: list[bytes | memoryview] = []
        self._held = 0
        self._scanned = 0  # held bytes already searched for a cut in vain

    def feed(self, piece: bytes) -> list[bytes]:
        """Take the next bytes of the text; the sub-task inputs they complete (often none).
        The held pieces are never joined just to search them: each chunk is made by one
        ``join`` of the pieces it spans, and what follows its cut stays a memoryview."""
        if not piece:
            return []
        self.size += len(piece)
        self._parts.append(piece)
        self._held += len(piece)
        out: list[bytes] = []
        while self._held >= self.target:
            cut = self._find_cut(max(self.target, self._scanned))
            if cut is None:
                self._scanned = self._held  # a word runs past the held text: wait for more
                break
            out.append(_utf8(self._take(cut)))
        self.cut += len(out)
        return out

    def _find_cut(self, offset: int) -> int | None:
        """The offset (in the held bytes) of the first ASCII whitespace at or after ``offset``."""
        base = 0
        for part in self._parts:
            if base + len(part) > offset:
                m = _ASCII_SPACE.search(part, max(0, offset - base))
                if m is not None:
                    return base + m.start()
            base += len(part)
        return None

    def _take(self, cut: int) -> bytes:
        """Remove and return the first ``cut`` held bytes as one bytes object."""
        taken: list[bytes | memoryview] = []
        need = cut
        parts = self._parts
        while need:
            part = parts[0]
            if len(part) <= need:
                taken.append(parts.pop(0))
                need -= len(part)
            else:
                view = memoryview(part)
                taken.append(view[:need])
                parts[0] = view[need:]
                need = 0
        self._held -= cut
        self._scanned = 0
        if len(taken) == 1 and isinstance(taken[0], bytes):
            return taken[0]
        return b"".join(taken)

    def finish(self) -> list[bytes]:
        """The end of the text: what is held is the last chunk (one empty chunk for no text)."""
        out: list[bytes] = []
        if self._held or self.cut == 0:
            out.append(_utf8(b"".join(self._parts)))
        self._parts, self._held = [], 0
        self.cut += len(out)
        return out


def _utf8(chunk: bytes) -> bytes:
    if not chunk.isascii():
        chunk.decode("utf-8")  # raises UnicodeDecodeError: the caller reports BAD_ENCODING
    return chunk


def _concat(parts: list[list[Any]]) -> list[Any]:
    if len(parts) == 1:
        return parts[0]
    out: list[Any] = []
    for p in parts:
        out.extend(p)
    return out


def split_for_lines(
    value: Any, encoded: str, limit: int, dumps: Any, target: int | None = None
) -> Iterator[str] | None:
    """The encoded pieces of ``value`` (whose full encoding is ``encoded``), each at most
    ``limit`` characters and about ``target`` (default: ``limit``) on average, whose
    concatenation (:class:`Joiner`) is ``value``; None when the value cannot be cut that way (a
    number). The iterator raises ValueError on reaching one element longer than the limit.

    Pieces are sized from the average element's encoded size, halved when one comes out too
    long, so cutting costs about one extra encoding of the value, spread over the pieces."""
    if isinstance(value, str):
        items: Any = value
    elif isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        return None
    n = len(items)
    if n == 0:
        return None
    per = max(1, int(n * min(limit, target or limit) / (2 * max(1, len(encoded)))))

    def encode(part: Any) -> str:
        """Encode one piece; a slice of a dict's items goes back to a dict."""
        return dumps(dict(part) if isinstance(value, dict) else part)

    def pieces() -> Iterator[str]:
        """Yield the encoded pieces, halving a piece's size while it is longer than the limit."""
        i, step = 0, per
        while i < n:
            text = encode(items[i : i + step])
            if len(text) > limit:
                if step == 1:
                    raise ValueError("one element of the answer is longer than the line limit")
                step = max(1, step // 2)
                continue
            yield text
            i += step
            step = per

    return pieces()


def piece_lines(value: Any, encoded: str, max_line: int, dumps: Any) -> Iterator[str] | None:
    """The ``+<piece>`` lines of a value too long for one line (``encoded`` is its encoding),
    each within ``max_line`` bytes and about ANSWER_PIECE characters: how the server sends a big
    answer and a worker a big result. None when the value cannot be cut (a number); the
    iterator raises ValueError on reaching one element longer than a line."""
    limit = max_line - 1 if encoded.isascii() else (max_line - 1) // 4  # UTF-8: <= 4 bytes
    pieces = split_for_lines(value, encoded, limit, dumps, ANSWER_PIECE)
    return None if pieces is None else (PIECE + p for p in pieces)


class Joiner:
    """Reassembles a streamed value from its pieces (the client side of :func:`split_for_lines`
    and of streamed inputs)."""

    def __init__(self) -> None:
        self._parts: list[Any] = []

    def add(self, piece: Any) -> None:
        """Add the next piece; raises ValueError when it is not an array, string or object, or not
        of the first piece's type."""
        if self._parts and type(piece) is not type(self._parts[0]):
            raise ValueError("the pieces of one streamed value must all be of one JSON type")
        if not isinstance(piece, (list, str, dict)):
            raise ValueError("a piece must be a JSON array, string or object")
        self._parts.append(piece)

    def value(self) -> Any:
        """The value the pieces make: strings and arrays concatenated, objects merged ([] for no
        pieces)."""
        if not self._parts:
            return []
        first = self._parts[0]
        if isinstance(first, str):
            return "".join(self._parts)
        if isinstance(first, list):
            return _concat(self._parts)
        out: dict[str, Any] = {}
        for p in self._parts:
            out.update(p)
        return out
