"""Parsing and formatting of clusterd's line protocol, with its stable error codes.

Everything here is pure: a protocol hands a framed line in and gets a request (or a
:class:`WireError`) out, and formats replies with the helpers below. The verbs, replies and codes
are documented in ``docs/PROTOCOL.md``; change both together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clusterd import PROTOCOL_VERSION, __version__
from clusterd.core.errors import ErrorCode, WireError
from clusterd.core.jsontext import (
    DEFAULT_MAX_JSON_DEPTH,
    _decode_prefix_fast,
    check_depth,
    dumps,
    is_finite_number,
    parse_json,
    parse_json_object,
    parse_json_objects,
)
from clusterd.core.refs import REF_MARK, check_ref_options
from clusterd.core.replies import (
    Reply,
    ReplyReader,
    format_error,
    parse_reply,
    refusal_line,
)
from clusterd.core.streaming import STREAM_MARK

# JSON helpers (jsontext) and reply lines (replies) are re-exported: their old import path.
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
    "check_depth",
    "is_finite_number",
    "DEFAULT_MAX_JSON_DEPTH",
    "dumps",
    "dumps_big",
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
    "RUN": "RUN <task> <input-json|@|&> [<options-json>]  submit a job and wait for its result; @: the input follows as +<json> or $<n> piece lines ended by a . line; &: the input is the file or URL named by the ref option",
    "SUBMIT": "SUBMIT <task> <input-json|@|&> [<options-json>]  submit a job; replies OK <job-id> once it is recorded",
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

JOB_OPTIONS = {"chunks", "timeout", "attempts", "key", "size", "ref", "format"}
MAX_ATTEMPTS = 100
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class Request:
    """One request line: an upper-cased verb and the rest of the line, unparsed."""

    verb: str
    rest: str


@dataclass(frozen=True)
class JobRequest:
    """A parsed RUN or SUBMIT: the task, its input (or ``@`` for a streamed one) and its options."""

    task: str
    input: Any
    options: dict[str, Any] = field(default_factory=dict)
    input_json: str | None = None  # the input exactly as sent, for the journal
    streamed: bool = False  # the input is "@": it follows as piece lines
    by_ref: bool = False  # the input is "&": the "ref" option names it (core/refs.py)

    @property
    def chunks(self) -> int | None:
        """The ``chunks`` option, or None when the request leaves the split to the task."""
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
    by_ref = payload[0] == REF_MARK and (len(payload) == 1 or payload[1].isspace())
    if streamed or by_ref:
        value, end = None, 1
    else:
        value, end = _decode_prefix_fast(payload, "the job input", max_depth)
    options_text = payload[end:].strip()
    options: dict[str, Any] = {}
    if options_text:
        options = parse_json_object(options_text, "the job options", max_depth)
    _check_options(options, streamed or by_ref, verb, task)
    check_ref_options(options, by_ref)
    if by_ref:
        return JobRequest(task, None, options, None, False, True)
    return JobRequest(task, value, options, None if streamed else payload[:end], streamed)


def _check_options(options: dict[str, Any], streamed: bool, verb: str, task: str) -> None:
    """Refuse unknown job options and values out of range (docs/PROTOCOL.md, "Job options")."""
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
            "option 'size' must be a non-negative integer: the input's length.",
        )
    if size is not None and not streamed:
        raise WireError(
            ErrorCode.BAD_REQUEST,
            f"option 'size' is only for a streamed input ({verb} {task} @ ...) "
            f"or one named by reference ({verb} {task} & ...).",
        )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def format_greeting(role: str, max_line: int, **extra: Any) -> str:
    """The HELLO line that opens a connection, naming the server, the peer's role and the line
    limit."""
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
