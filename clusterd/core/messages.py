"""The worker link's messages: DO, DONE and ERROR bodies, their line sizes, and batching.

Shared by the server's worker session and the worker, so both sides agree byte for byte on how
a message is measured against a peer's ``max_line`` and how a batch of them is grouped into
``VERB [obj,obj,...]`` lines (docs/PROTOCOL.md §5). Pure: imports only ``jsontext`` and ``streaming``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from clusterd.core.jsontext import dumps
from clusterd.core.streaming import text_input

__all__ = [
    "byte_size",
    "line_size",
    "do_body",
    "done_body",
    "error_body",
    "batch_lines",
    "answer_ticket",
    "is_answer",
    "do_bytes_header",
    "do_header_size",
]

# A worker's DONE/ERROR that cannot be parsed: its ticket id, if the line starts as workers write
# it ({"id":N,...}), so that attempt can be failed instead of left hanging.
_TICKET_PREFIX = re.compile(rb"\s*(?:DONE|ERROR)\s+\{\s*\"id\"\s*:\s*(\d{1,18})\s*[,}]", re.I)
_ANSWER = re.compile(rb"\s*(?:DONE|ERROR)\b", re.I)


def byte_size(text: str) -> int:
    """The bytes ``text`` takes on the wire (UTF-8, lone surrogates escaped)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "backslashreplace"))


def line_size(verb: str, size: int, batch: bool) -> int:
    """The bytes of a line carrying one body of ``size`` bytes: ``VERB body``, or
    ``VERB [body]`` to a peer that takes batches."""
    return size + len(verb) + (3 if batch else 1)


def do_body(ticket: int, sub: Any) -> str:
    """The JSON object of a ``DO`` line for sub-task ``sub`` under ``ticket``; an input by
    reference goes as ``"ref"`` (the range to read) instead of ``"input"``; a text chunk held
    as bytes goes as a JSON string, to a worker that takes no binary DO."""
    body = {"id": ticket, "job": sub.job, "index": sub.index, "task": sub.task}
    body["attempt"] = sub.attempt
    ref = getattr(sub, "ref", None)
    if ref is not None:
        body["ref"] = ref.wire()
    else:
        body["input"] = text_input(sub.input)
    return dumps(body)


def do_bytes_header(ticket: int, sub: Any) -> bytes:
    """The header line of a binary ``DO``, with its ``\n``: the sub-task's fields and
    ``"bytes": n``, last, where the input would be; the input's n raw bytes and a ``\n`` follow."""
    head = {"id": ticket, "job": sub.job, "index": sub.index, "task": sub.task}
    head["attempt"] = sub.attempt
    head["bytes"] = len(sub.input)
    return b"DO " + dumps(head).encode("utf-8") + b"\n"


_DO_BYTES = re.compile(rb'DO \{.*"bytes":(\d{1,15})\}\r?')


def do_header_size(line: bytes) -> int | None:
    """The raw bytes that follow a binary ``DO`` header line, None for any other line (the
    worker's framer asks this of the lines that hold ``"bytes":``)."""
    m = _DO_BYTES.fullmatch(line) if line[:4] == b"DO {" else None
    return None if m is None else int(m.group(1))


def done_body(done: dict[str, Any]) -> str:
    """The JSON object of a ``DONE`` line (id, job, result or stream, and t)."""
    return dumps(done)


def error_fields(msg: dict[str, Any]) -> tuple[str, str, str, bool]:
    """What an ``ERROR`` object (or a pool child's failed reply) reports: its type, message,
    traceback (``""`` when absent or not a string) and whether a retry is worth it (only
    ``"retry": false`` says no)."""
    tb = msg.get("traceback")
    return (
        str(msg.get("type", "Error")),
        str(msg.get("message", "")),
        tb if isinstance(tb, str) else "",
        msg.get("retry") is not False,
    )


def error_body(
    ticket: Any,
    job: Any,
    kind: str,
    message: str,
    room: int,
    traceback: str = "",
    retry: bool = True,
) -> tuple[str, int]:
    """An ``ERROR`` object and its size in bytes, within ``room`` bytes if it can be: a long
    traceback loses its head first (its last frames say where it raised), then a long message
    (a task's huge exception text) is shortened, each with a note that it was, since a line
    the server cannot take would leave the sub-task unanswered. ``traceback`` and
    ``"retry": false`` are sent only when set, so an old server reads the same object."""
    extra: dict[str, Any] = {} if retry else {"retry": False}
    body, size = _error_json(ticket, job, kind[:200], message, traceback, extra)
    for _ in range(20):
        if size <= room or not traceback:
            break
        tb_size = byte_size(dumps(traceback))  # escapes make it longer than its characters
        keep = max(0, len(traceback) * max(0, room - (size - tb_size)) // tb_size - 40)
        traceback = "(shortened) … " + traceback[len(traceback) - keep :] if keep else ""
        body, size = _error_json(ticket, job, kind[:200], message, traceback, extra)
    text = message
    for _ in range(20):
        if size <= room or not message:
            break
        # Keep the share of the message that fits, less room for the note and escapes.
        message = message[: max(0, len(message) * room // size - 40)]
        text = message + " … (shortened)" if message else ""
        body, size = _error_json(ticket, job, kind[:200], text, traceback, extra)
    return body, size


def _error_json(
    ticket: Any, job: Any, kind: str, message: str, traceback: str, extra: dict[str, Any]
) -> tuple[str, int]:
    obj: dict[str, Any] = {"id": ticket, "job": job, "type": kind, "message": message}
    if traceback:
        obj["traceback"] = traceback
    obj.update(extra)
    body = dumps(obj)
    return body, byte_size(body)


def batch_lines(items: Iterable[tuple[str, str, int]], max_line: int) -> list[str]:
    """Group ``(verb, body, size)`` messages, in order, into ``VERB [body,body,...]`` lines:
    consecutive messages of one verb share a line while it stays within ``max_line`` bytes."""
    lines: list[str] = []
    group: list[str] = []
    group_verb = ""
    used = 0
    for verb, body, size in items:
        if group and (verb != group_verb or used + 1 + size > max_line):
            lines.append(group_verb + " [" + ",".join(group) + "]")
            group = []
        if not group:
            group_verb, used = verb, len(verb) + 2  # "VERB [" ... "]", less the first comma
        group.append(body)
        used += 1 + size
    if group:
        lines.append(group_verb + " [" + ",".join(group) + "]")
    return lines


def answer_ticket(line: bytes) -> int | None:
    """The ticket of a DONE/ERROR line that could not be parsed, if it starts as workers write
    it (``DONE {"id":N,...``); None otherwise."""
    match = _TICKET_PREFIX.match(line)
    return None if match is None else int(match.group(1))


def is_answer(line: bytes) -> bool:
    """Whether a line (parsed or not) is a DONE or ERROR."""
    return _ANSWER.match(line) is not None
