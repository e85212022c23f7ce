"""Parsing and formatting of clusterd's line protocol, with its stable error codes.

Everything here is pure: a protocol hands a framed line in and gets a request (or a
:class:`WireError`) out, and formats replies with the helpers below. The verbs, replies and codes
are documented in ``docs/PROTOCOL.md``; change both together.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from clusterd import PROTOCOL_VERSION, __version__
from clusterd.core import jsoncodec
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.streaming import END, PIECE, STREAM_MARK, Joiner

__all__ = [
    "ErrorCode",
    "WireError",
    "Request",
    "JobRequest",
    "parse_request",
    "parse_job_request",
    "parse_json",
    "refusal_line",
    "parse_json_object",
    "parse_json_objects",
    "dumps",
    "format_error",
    "format_greeting",
    "parse_greeting",
    "CLIENT_VERBS",
    "WORKER_VERBS",
    "JOB_OPTIONS",
    "Reply",
    "parse_reply",
    "ReplyReader",
]


CLIENT_VERBS: dict[str, str] = {
    "RUN": "RUN <task> <input-json|@> [<options-json>]  submit a job and wait for its result; @: the input follows as +<json> piece lines ended by a . line",
    "SUBMIT": "SUBMIT <task> <input-json|@> [<options-json>]  submit a job; replies OK <job-id> once it is recorded",
    "WAIT": "WAIT <job-id>  wait for a job's result",
    "STATUS": "STATUS <job-id>  a job's state and progress",
    "WATCH": "WATCH <job-id>  PROGRESS lines until the job ends, then its result",
    "CANCEL": "CANCEL <job-id>  cancel a job",
    "JOBS": 'JOBS [{"limit":N,"before":"<job-id>"}]  jobs the server holds, newest first (100 by default)',
    "WORKERS": "WORKERS  connected workers",
    "TASKS": "TASKS  tasks the server knows, and how many worker slots can run each",
    "STATS": "STATS  server counters",
    "PING": "PING  liveness check; replies OK PONG",
    "HELP": "HELP  this list",
    "AUTH": "AUTH <client|worker> <hmac-hex>  prove a role's secret (see SECURITY.md)",
    "QUIT": "QUIT  close the connection",
}

WORKER_VERBS: dict[str, str] = {
    "REGISTER": 'REGISTER {"name":..., "tasks":[...], "slots":N, "protocol":1}  become a worker',
    "DONE": 'DONE {"id":N, "result":...}  the sub-task sent as DO {"id":N,...} finished',
    "ERROR": 'ERROR {"id":N, "type":..., "message":...}  that sub-task raised',
    "DRAIN": "DRAIN  send me nothing new (I am stopping); what I hold, I still answer",
    "PING": "PING  liveness; either side may send it, the other answers OK PONG",
}

JOB_OPTIONS = {"chunks", "timeout", "attempts", "key", "size"}
MAX_ATTEMPTS = 100
MAX_KEY_LENGTH = 200

_decoder = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name))
_JSON_SPACE = " \t\n\r"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass(frozen=True)
class Request:
    """One request line: an upper-cased verb and the rest of the line, unparsed."""

    verb: str
    rest: str


@dataclass(frozen=True)
class JobRequest:
    task: str
    input: Any
    options: dict[str, Any] = field(default_factory=dict)
    input_json: str | None = None  # the input exactly as sent, for the journal
    streamed: bool = False  # the input is "@": it follows as piece lines

    @property
    def chunks(self) -> int | None:
        return self.options.get("chunks")


def parse_request(line: bytes) -> Request | None:
    """Decode one framed line; ``None`` for a blank line (people press Enter in ``nc``)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(
            ErrorCode.BAD_ENCODING, f"the line is not valid UTF-8 (byte {e.start})."
        ) from None
    text = text.strip()
    if not text:
        return None
    parts = text.split(None, 1)
    return Request(parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")


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


def parse_job_request(
    rest: str, verb: str = "RUN", max_depth: int = DEFAULT_MAX_JSON_DEPTH
) -> JobRequest:
    """Parse ``<task> <input-json> [<options-json>]`` as RUN and SUBMIT take it."""
    parts = rest.split(None, 1)
    task = parts[0] if parts else ""
    payload = parts[1] if len(parts) > 1 else ""
    if not task:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"{verb} needs a task name and a JSON input, e.g. {verb} sum [1,2,3].",
        )
    payload = payload.strip()
    if not payload:
        raise WireError(
            ErrorCode.BAD_REQUEST, f"{verb} {task} needs a JSON input after the task name."
        )
    streamed = payload[0] == STREAM_MARK and (len(payload) == 1 or payload[1].isspace())
    if streamed:
        value, end = None, 1
    else:
        value, end = _decode_prefix_fast(payload, "the job input", max_depth)
    options_text = payload[end:].strip()
    options: dict[str, Any] = {}
    if options_text:
        options = parse_json_object(options_text, "the job options", max_depth)
    unknown = sorted(set(options) - JOB_OPTIONS)
    if unknown:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"unknown job option {unknown[0]!r}; known options: {', '.join(sorted(JOB_OPTIONS))}.",
        )
    chunks = options.get("chunks")
    if chunks is not None and (type(chunks) is not int or chunks < 1):
        raise WireError(ErrorCode.BAD_REQUEST, "option 'chunks' must be a positive integer.")
    timeout = options.get("timeout")
    if timeout is not None and not (is_finite_number(timeout) and timeout > 0):
        raise WireError(
            ErrorCode.BAD_REQUEST, "option 'timeout' must be a positive number of seconds."
        )
    attempts = options.get("attempts")
    if attempts is not None and (type(attempts) is not int or not 1 <= attempts <= MAX_ATTEMPTS):
        raise WireError(
            ErrorCode.BAD_REQUEST, f"option 'attempts' must be an integer from 1 to {MAX_ATTEMPTS}."
        )
    key = options.get("key")
    if isinstance(key, str) and not _is_utf8(key):
        raise WireError(ErrorCode.BAD_REQUEST, "option 'key' must be valid Unicode text.")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH):
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"option 'key' must be a string of 1-{MAX_KEY_LENGTH} characters.",
        )
    size = options.get("size")
    if size is not None and (type(size) is not int or size < 0):
        raise WireError(
            ErrorCode.BAD_REQUEST,
            "option 'size' must be a non-negative integer: the streamed input's length.",
        )
    if size is not None and not streamed:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"option 'size' is only for a streamed input ({verb} {task} @ ...).",
        )
    return JobRequest(task, value, options, None if streamed else payload[:end], streamed)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps(value: Any) -> str:
    """Compact JSON on one line; NaN and infinities are refused, since they are not JSON.
    Text stays readable UTF-8, except that a lone surrogate (legal in JSON, not in UTF-8)
    makes the whole value ASCII-escaped, so every line and journal record is valid UTF-8.
    orjson writes it when its bytes are the standard library's (see ``jsoncodec``)."""
    return jsoncodec.dumps(value)


BIG_PART = 10_000  # elements encoded per call by dumps_big


def dumps_big(value: Any) -> str:
    """:func:`dumps` for a value that may be huge (a big job's answer), in parts of BIG_PART
    elements. One C-level encode of 200 MB would hold the GIL, and so stall the reactor thread,
    for its whole length even when it runs on another thread; between parts, the reactor gets
    its turn. Same JSON text, except that a lone surrogate escapes only its own part."""
    if isinstance(value, list) and len(value) > BIG_PART:
        parts = (dumps(value[i : i + BIG_PART])[1:-1] for i in range(0, len(value), BIG_PART))
        return "[" + ",".join(parts) + "]"
    if isinstance(value, dict) and len(value) > BIG_PART and all(type(k) is str for k in value):
        items = list(value.items())
        parts = (dumps(dict(items[i : i + BIG_PART]))[1:-1] for i in range(0, len(items), BIG_PART))
        return "{" + ",".join(parts) + "}"
    return dumps(value)


def format_error(code: str, message: str) -> str:
    return f"ERR {code} {message}"


def format_greeting(role: str, max_line: int, **extra: Any) -> str:
    info = {"server": f"clusterd/{__version__}", "role": role, "max_line": max_line, **extra}
    return f"HELLO clusterd {PROTOCOL_VERSION} {dumps(info)}"


def parse_greeting(text: str) -> tuple[int, dict[str, Any]]:
    """Return (protocol version, info) from a server's HELLO line."""
    parts = text.split(" ", 3)
    if len(parts) < 3 or parts[0] != "HELLO" or parts[1] != "clusterd":
        raise WireError(ErrorCode.BAD_REQUEST, f"not a clusterd server greeting: {text[:80]!r}")
    try:
        version = int(parts[2])
    except ValueError:
        raise WireError(
            ErrorCode.BAD_REQUEST, "the greeting's protocol version is not a number."
        ) from None
    info = parse_json_object(parts[3], "the greeting") if len(parts) == 4 else {}
    return version, info


def _short(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(": line")[0]


def is_finite_number(x: Any) -> bool:
    return type(x) in (int, float) and (type(x) is int or math.isfinite(x))


@dataclass(frozen=True)
class Reply:
    """One reply line, parsed: ``kind`` is OK, ERR, RESULT, FAILED, CANCELLED or PROGRESS."""

    kind: str
    job: str | None = None
    code: str | None = None
    text: str = ""
    value: Any = None

    @property
    def final(self) -> bool:
        """True unless this is a PROGRESS line (which more lines follow)."""
        return self.kind != "PROGRESS"


def parse_reply(line: str) -> Reply:
    """Parse a server reply; the client library and the blocking helper share this."""
    kind, _, rest = line.partition(" ")
    if kind == "OK":
        return Reply("OK", text=rest)
    if kind == "ERR":
        code, _, message = rest.partition(" ")
        return Reply("ERR", code=code, text=message)
    if kind in ("RESULT", "PROGRESS"):
        job, _, payload = rest.partition(" ")
        # Results are the task's, of any depth; the request depth limit is the server's guard.
        return Reply(kind, job=job, value=parse_json(payload, f"the {kind} payload", 100_000))
    if kind == "FAILED":
        job, _, rest = rest.partition(" ")
        code, _, payload = rest.partition(" ")
        return Reply(
            "FAILED", job=job, code=code, value=parse_json(payload or "{}", "FAILED", 100_000)
        )
    if kind == "CANCELLED":
        return Reply("CANCELLED", job=rest.strip())
    raise WireError(ErrorCode.BAD_REQUEST, f"unexpected reply from server: {line[:80]!r}")


class ReplyReader:
    """Turns reply lines into :class:`Reply` objects, reassembling a streamed answer
    (``RESULT <job> @``, ``+<piece>`` lines, ``.``) into one RESULT. ``feed`` returns None
    while a streamed answer is still arriving."""

    def __init__(self) -> None:
        self._job: str | None = None
        self._joiner: Joiner | None = None

    def feed(self, line: str) -> Reply | None:
        if self._joiner is not None:
            if line == END:
                value, job = self._joiner.value(), self._job
                self._joiner = self._job = None
                return Reply("RESULT", job=job, value=value)
            if not line.startswith(PIECE):
                raise WireError(ErrorCode.BAD_REQUEST, f"expected a piece line, got {line[:80]!r}")
            try:
                self._joiner.add(parse_json(line[1:], "a RESULT piece", 100_000))
            except ValueError as e:
                raise WireError(ErrorCode.BAD_REQUEST, str(e)) from None
            return None
        kind, _, rest = line.partition(" ")
        job, _, payload = rest.partition(" ")
        if kind == "RESULT" and payload.strip() == STREAM_MARK:
            self._job, self._joiner = job, Joiner()
            return None
        return parse_reply(line)


def refusal_line(error: BaseException) -> str:
    """The ``ERR`` line for a record that could not be made durable: the request's own code
    for a refused upload, JOURNAL_ERROR for a journal that failed."""
    if isinstance(error, WireError):
        return format_error(error.code, error.message)
    return format_error(ErrorCode.JOURNAL_ERROR, f"{error} (nothing of this request is kept).")
