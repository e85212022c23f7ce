"""Inputs read where they live: a job names its input (a file path or an http(s) URL) and
its size; the server cuts that into byte ranges and never touches the bytes; each worker reads
its range and aligns it to record boundaries (docs/PROTOCOL.md, "Inputs by reference").

The alignment rule is Hadoop's line record reader's: a range ``[start, end)`` owns exactly the
records (words for ``text``, lines for ``lines``) that *start* in it. So it skips the record
that began before ``start`` (it belongs to the range before) and reads past ``end`` to finish
the last record it started. Every record of the input is then read by exactly one range,
whatever the cut, and the answers are exact.

Pure: no I/O. :func:`align` is a generator that asks for byte reads (``(offset, n)``) and is
sent the bytes, so one rule serves both the file reader (:func:`read_aligned`, synchronous, in
a worker's pool child) and the URL reader (asynchronous, with treq, in the worker process).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from clusterd.core import jsoncodec
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.streaming import MAX_TEXT_CHUNK

__all__ = [
    "REF_MARK",
    "FORMATS",
    "RefRange",
    "RefError",
    "check_ref_options",
    "cut_ranges",
    "range_count",
    "encode_ranges",
    "ranges_from_cut",
    "align",
    "read_aligned",
    "decode_records",
    "is_url",
]

REF_MARK = "&"  # in place of a JSON input: the input is named by the "ref" option
FORMATS = ("text", "lines")
MAX_RANGE = MAX_TEXT_CHUNK  # bytes per sub-task, at most: the cap a streamed input has
MAX_REF_LENGTH = 4096
BLOCK = 64 << 10  # bytes read ahead at a time to finish a range's last record
MAX_RECORD = 1 << 20  # a record longer than this past its range's end fails the read
# ASCII whitespace that str.split() also splits at: never inside a UTF-8 multi-byte character.
_TEXT_SEP = re.compile(rb"[ \t\n\r\x0b\x0c\x1c-\x1f]")
_LINE_SEP = re.compile(rb"\n")


class RefError(Exception):
    """The reference cannot be read as named: missing, short, the wrong size, or a record too
    long. Raised on a worker; the attempt fails with this message and is retried elsewhere."""


@dataclass(frozen=True, slots=True)
class RefRange:
    """One sub-task's input: bytes ``[start, end)`` of ``ref`` (``size`` bytes in all), read
    as ``format``. A typed value, so a link tells it from user data without guessing."""

    ref: str
    size: int
    start: int
    end: int
    format: str

    def wire(self) -> dict[str, Any]:
        """The object a DO carries in its ``"ref"`` field."""
        return {
            "url": self.ref,
            "size": self.size,
            "start": self.start,
            "end": self.end,
            "format": self.format,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> RefRange:
        """The range a DO's ``"ref"`` field names; raises RefError if it is malformed."""
        if not isinstance(obj, dict):
            raise RefError("the DO's 'ref' is not an object")
        url, fmt = obj.get("url"), obj.get("format")
        nums = [obj.get(k) for k in ("size", "start", "end")]
        if not isinstance(url, str) or fmt not in FORMATS or any(type(n) is not int for n in nums):
            raise RefError("the DO's 'ref' lacks url, size, start, end or format")
        size, start, end = nums
        if not 0 <= start <= end <= size:
            raise RefError(f"the DO's range {start}-{end} is not within {size} bytes")
        if end - start > MAX_RANGE:
            raise RefError(f"the DO's range has {end - start} bytes; at most {MAX_RANGE} are read")
        return cls(url, size, start, end, fmt)


def is_url(ref: str) -> bool:
    """Whether ``ref`` is an http(s) URL (else it is a file path)."""
    return ref.startswith(("http://", "https://"))


def check_ref_options(options: dict[str, Any], by_ref: bool) -> None:
    """Refuse the ``ref``/``format`` options without ``&``, and a ``&`` job whose ``ref`` is not
    an absolute path or an http(s) URL, or whose ``size`` or ``format`` is missing or bad."""
    if not by_ref:
        for name in ("ref", "format"):
            if name in options:
                raise WireError(
                    ErrorCode.BAD_REQUEST,
                    f"option {name!r} is only for an input named by reference (RUN task & ...).",
                )
        return
    ref = options.get("ref")
    if not isinstance(ref, str) or not 0 < len(ref) <= MAX_REF_LENGTH:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"an input by reference ('&') needs option 'ref': a file path or an http(s) URL "
            f"of 1-{MAX_REF_LENGTH} characters.",
        )
    if not (is_url(ref) or ref.startswith("/")) or "\x00" in ref:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            "option 'ref' must be an absolute file path the workers can read, or an http(s) URL.",
        )
    if "size" not in options:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            "an input by reference ('&') needs option 'size': its length in bytes.",
        )
    fmt = options.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise WireError(
            ErrorCode.BAD_REQUEST, 'option \'format\' must be "text" or "lines" (JSON lines).'
        )


def ref_format(options: dict[str, Any], task_name: str, kind: str) -> str:
    """The job's format: the ``format`` option, or the one the task's stream kind reads
    (``text`` for text tasks, ``lines`` for list tasks); raises WireError on a mismatch."""
    wanted = "text" if kind == "text" else "lines"
    fmt = options.get("format") or wanted
    if fmt != wanted:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"task {task_name} takes a {kind} input: its reference's format must be {wanted!r}.",
        )
    return fmt


def range_count(size: int, chunks: int) -> int:
    """How many ranges :func:`cut_ranges` makes: ``chunks``, more if a range would exceed
    MAX_RANGE bytes, fewer if there are fewer bytes; 0 for an empty input. O(1), so a huge
    ``size`` is refused before anything is built."""
    if size <= 0:
        return 0
    return min(size, max(1, chunks, -(-size // MAX_RANGE)))


def cut_ranges(ref: str, size: int, chunks: int, fmt: str) -> list[RefRange]:
    """``size`` bytes cut into :func:`range_count` ranges of equal length (never empty). An
    empty input has no ranges (the job has no sub-tasks)."""
    count = range_count(size, chunks)
    if count == 0:
        return []
    bounds = [size * i // count for i in range(count + 1)]
    return [RefRange(ref, size, bounds[i], bounds[i + 1], fmt) for i in range(count)]


def encode_ranges(ranges: list[RefRange]) -> str:
    """The cut as the journal keeps it: ``[[start,end],...]`` (the ref is in the options)."""
    return jsoncodec.dumps([[r.start, r.end] for r in ranges])


def ranges_from_cut(spec: Any, pieces: list[Any]) -> list[RefRange]:
    """The ranges a journaled cut names, with the job's ``ref`` option (``{"url", "size",
    "format"}``); raises ValueError if either is damaged."""
    if not isinstance(spec, dict):
        raise ValueError("the journaled reference is damaged")
    url, size, fmt = spec.get("url"), spec.get("size"), spec.get("format")
    if not isinstance(url, str) or type(size) is not int or fmt not in FORMATS:
        raise ValueError("the journaled reference is damaged")
    out = []
    for p in pieces:
        if not (isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)):
            raise ValueError("the journaled cut of a reference is damaged")
        out.append(RefRange(url, size, p[0], p[1], fmt))
    return out


def _find(sep: re.Pattern[bytes], data: bytes, pos: int = 0) -> int:
    m = sep.search(data, pos)
    return -1 if m is None else m.start()


Reads = Generator[tuple[int, int], bytes, bytes]


def align(start: int, end: int, size: int, fmt: str, block: int = BLOCK) -> Reads:
    """The bytes of the records that start in ``[start, end)``: yields ``(offset, n)`` reads,
    is sent each one's bytes, and returns the records' bytes. A range with ``start > 0`` begins
    after the first separator at or after ``start - 1``; it ends at the first separator at or
    after ``end - 1``, or at the end of the input. Raises RefError on a short read or a
    record longer than MAX_RECORD past ``end``."""
    sep = _TEXT_SEP if fmt == "text" else _LINE_SEP
    if start >= end:
        return b""
    lo = start - 1 if start > 0 else 0
    data = yield (lo, end - lo)
    _check_read(data, lo, end - lo)
    begin = 0
    if start > 0:
        first = _find(sep, data)
        if first < 0:
            return b""  # one record spans the range: it started in an earlier one
        begin = first + 1
    if end >= size or sep.match(data, len(data) - 1):
        return data[begin:]
    tail: list[bytes] = []
    offset = end
    while offset < size:
        n = min(block, size - offset)
        more = yield (offset, n)
        _check_read(more, offset, n)
        cut = _find(sep, more)
        if cut >= 0:
            tail.append(more[:cut])
            break
        tail.append(more)
        offset += n
        if offset - end > MAX_RECORD:
            raise RefError(f"a record runs more than {MAX_RECORD} bytes past byte {end}")
    return b"".join([data[begin:], *tail])


def _check_read(data: bytes, offset: int, n: int) -> None:
    if len(data) != n:
        raise RefError(f"short read: {len(data)} bytes at offset {offset}, {n} expected")


def read_aligned(rng: RefRange, read: Callable[[int, int], bytes]) -> bytes:
    """Drive :func:`align` with a synchronous ``read(offset, n)`` (a file's)."""
    gen = align(rng.start, rng.end, rng.size, rng.format)
    try:
        want = next(gen)
        while True:
            want = gen.send(read(*want))
    except StopIteration as stop:
        return stop.value


def decode_records(data: bytes, fmt: str) -> Any:
    """A range's bytes as the task's input: the text (UTF-8), or for ``lines`` the list of the
    JSON values of its non-blank lines. Raises RefError on bad UTF-8 or a bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RefError(f"the input is not valid UTF-8 near byte {e.start} of the range") from None
    if fmt == "text":
        return text
    out = []
    for n, line in enumerate(text.split("\n")):
        if line.strip():
            try:
                out.append(jsoncodec.loads(line))
            except ValueError as e:
                raise RefError(f"line {n + 1} of the range is not JSON: {e}") from None
    return out
