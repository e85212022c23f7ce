"""Reading a big input as pieces to stream (docs/PROTOCOL.md, "Streamed values"), never whole.

:func:`text_pieces` reads text in blocks and decodes UTF-8 incrementally, so a multi-byte
character split between two blocks is never broken. :func:`json_array_pieces` walks a JSON
array's elements one by one with the standard decoder's ``raw_decode``, so a 1 GB array of
numbers costs the client one block of memory, not the whole list.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["text_pieces", "byte_pieces", "json_array_pieces", "stream_lines", "PIECE_BYTES"]

PIECE_BYTES = 1 << 20  # about this many bytes of input per piece line

_decoder = json.JSONDecoder(parse_constant=lambda name: _reject(name))


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def text_pieces(stream: IO[bytes], piece_bytes: int = PIECE_BYTES) -> Iterator[str]:
    """Successive pieces of a UTF-8 byte stream. Raises UnicodeDecodeError on bad UTF-8."""
    decode = codecs.getincrementaldecoder("utf-8")()
    while True:
        block = stream.read(piece_bytes)
        text = decode.decode(block, final=not block)
        if text:
            yield text
        if not block:
            return


def byte_pieces(stream: IO[bytes], piece_bytes: int = PIECE_BYTES) -> Iterator[bytes]:
    """Successive blocks of a byte stream, never decoded: each is sent as a ``$<n>`` frame of
    a text input, and the server checks the text is UTF-8 where it cuts it (a character split
    between two blocks is whole again there)."""
    while True:
        block = stream.read(piece_bytes)
        if not block:
            return
        yield block


class _ArrayReader:
    """A cursor over the text of a JSON array that keeps only the unread part of one block."""

    def __init__(self, stream: IO[bytes], piece_bytes: int) -> None:
        self.blocks = text_pieces(stream, piece_bytes)
        self.buf, self.pos, self.eof = "", 0, False

    def more(self) -> bool:
        """Read the next block into the buffer, dropping what was consumed; False at the end of the
        input."""
        block = next(self.blocks, None)
        if block is None:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + block
        self.pos = 0
        return True

    def skip_space(self) -> None:
        """Skip whitespace, reading more blocks as needed, up to the next character or the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return

    def peek(self) -> str | None:
        """The next non-space character, or None at the end of the input."""
        self.skip_space()
        return self.buf[self.pos] if self.pos < len(self.buf) else None

    def value(self) -> tuple[Any, int]:
        """Decode the element at the cursor; (value, characters it took)."""
        while True:
            try:
                value, end = _decoder.raw_decode(self.buf, self.pos)
            except ValueError:
                value, end = None, -1
            # A value that reaches the end of the buffer may continue in the next block
            # (a number such as 12|34), so it is decoded again with more text.
            if (end == -1 or end == len(self.buf)) and not self.eof and self.more():
                continue
            if end == -1:
                raise ValueError("the JSON array holds an element that is not valid JSON")
            used, self.pos = end - self.pos, end
            return value, used


def json_array_pieces(stream: IO[bytes], piece_bytes: int = PIECE_BYTES) -> Iterator[list[Any]]:
    """Successive slices of the JSON array in a byte stream, each about ``piece_bytes`` of
    input. Raises ValueError when the stream does not hold exactly one JSON array."""
    r = _ArrayReader(stream, piece_bytes)
    if r.peek() != "[":
        raise ValueError("the input is not a JSON array")
    r.pos += 1
    piece: list[Any] = []
    used = 0
    first = True
    while True:
        c = r.peek()
        if c is None:
            raise ValueError("the JSON array is not closed")
        if c == "]":
            r.pos += 1
            break
        if not first:
            if c != ",":
                raise ValueError(f"expected ',' or ']' in the JSON array, found {c!r}")
            r.pos += 1
            r.skip_space()
        first = False
        value, n = r.value()
        used += n
        piece.append(value)
        if used >= piece_bytes:
            yield piece
            piece, used = [], 0
    if r.peek() is not None:
        raise ValueError("unexpected text after the JSON array")
    if piece:
        yield piece


def stream_lines(
    verb: str,
    task: str,
    pieces: Any,
    options: dict[str, Any],
    dumps: Any,
    max_line: int = 16 << 20,
) -> Iterator[bytes]:
    """The lines of a streamed ``RUN``/``SUBMIT``: the request with ``@``, one ``+`` line per
    piece (a ``bytes`` piece, raw text, as a ``$<n>`` frame instead), and the ``.`` line. A piece too long for the server's ``max_line`` is halved until
    its halves fit, so callers may hand over pieces of any size."""
    opts = {k: v for k, v in options.items() if v is not None}
    head = f"{verb} {task} @" + (" " + dumps(opts) if opts else "")
    yield head.encode("utf-8") + b"\n"
    for piece in pieces:
        yield from _piece_lines(piece, dumps, max_line - 1)
    yield b".\n"


def _piece_lines(piece: Any, dumps: Any, limit: int) -> Iterator[bytes]:
    if isinstance(piece, bytes):  # "$<n>", n raw bytes, "\n"; cut anywhere, the server joins
        for i in range(0, max(1, len(piece)), max(1, limit)):
            part = piece[i : i + limit]
            yield b"$%d\n" % len(part) + part + b"\n"
        return
    line = dumps(piece).encode("utf-8")
    if len(line) <= limit or not isinstance(piece, (list, str)) or len(piece) < 2:
        yield b"+" + line + b"\n"  # (a single element too long is the server's to refuse)
        return
    half = len(piece) // 2
    yield from _piece_lines(piece[:half], dumps, limit)
    yield from _piece_lines(piece[half:], dumps, limit)
