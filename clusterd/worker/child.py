"""A pool child: reads JSON requests on stdin, runs the named task, writes JSON replies.

Run as ``python -m clusterd.worker.child [--tasks MODULE]...``. One request at a time:
``{"id": N, "task": NAME, "input": ...}`` in (or ``{"id": N, "task": NAME, "bytes": n}``, then
n raw bytes of UTF-8 text and ``\n``: a text chunk, decoded here once), ``{"id": N, "ok": true, "result": ...}`` or
``{"id": N, "ok": false, "type": ..., "message": ..., "traceback": ...}`` out (plus
``"retry": false`` when the task lists the exception in ``no_retry``). Task code that prints would corrupt
the reply stream, so the real stdout is kept on a private descriptor and fd 1 goes to stderr,
which the worker logs.

A task whose ``run`` returns a generator, in a request marked ``"parts": true``, streams its
result: each part it yields is written at once as a line ``+<id> <part as JSON>``
(:func:`_write_parts`), and its reply says ``"parts": K`` instead of carrying a result, so
neither the child nor the worker ever holds the whole result. Unmarked (a server that does not
take parts), the parts are made into one result (merged or concatenated) here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import types
from typing import Any, BinaryIO

from clusterd.core import jsoncodec
from clusterd.core.refs import RefError, RefRange


def _run(registry: Any, msg: Any, replies: Any = None) -> tuple[dict[str, Any], bytes] | None:
    """Run one request; the reply and its JSON line, encoded once. A generator's parts go to
    ``replies`` as they are produced."""
    if not isinstance(msg, dict) or "id" not in msg:
        return None
    ticket = msg["id"]
    task = None
    try:
        task = registry.get(msg.get("task"))
        if task is None:
            raise LookupError(f"this worker has no task named {msg.get('task')!r}")
        if "bad" in msg:
            raise UnicodeError(msg["bad"])
        start = time.perf_counter()
        result = task.run(_input(msg))
        if isinstance(result, types.GeneratorType) and not (
            replies is not None and msg.get("parts") is True
        ):
            result = task.whole(result)  # one value, for a server that takes no parts
        if isinstance(result, types.GeneratorType):
            out = {"id": ticket, "ok": True, "parts": _write_parts(result, ticket, task, replies)}
            out["t"] = time.perf_counter() - start
            return out, jsoncodec.dumpb(out)
        out = {"id": ticket, "ok": True, "result": result, "t": time.perf_counter() - start}
        # Refuses NaN and unencodable results here, per task, as json.dumps does.
        return out, jsoncodec.dumpb(out)
    except Exception as e:
        out = {"id": ticket, "ok": False, "type": type(e).__name__, "message": str(e)}
        if not isinstance(e, RefError):  # an unreadable input: the message says it all
            out["traceback"] = _format(e)
        if task is not None and isinstance(e, task.no_retry):
            out["retry"] = False
        return out, jsoncodec.dumpb(out)


def _input(msg: dict[str, Any]) -> Any:
    """The run's input: the message's ``input``, or the records of the file range its
    ``ref`` names, read here so the bytes never cross the pipe (clusterd/worker/refs.py)."""
    if "ref" not in msg:
        return msg.get("input")
    from clusterd.worker.refs import read_file

    return read_file(RefRange.from_wire(msg["ref"]))


def _write_parts(parts: Any, ticket: Any, task: Any, replies: BinaryIO) -> int:
    """Write each part a generator yields as ``+<id> <json>`` the moment it is produced; how
    many. A merge task's run must yield at least one part (a merge has no empty value); another
    task's empty generator is the empty concatenation, one ``[]`` part."""
    head = b"+" + jsoncodec.dumpb(ticket) + b" "
    n = 0
    for part in parts:
        replies.write(head + jsoncodec.dumpb(part) + b"\n")  # refuses NaN, as a result does
        replies.flush()
        n += 1
    if n == 0:
        if task.merge is not None:
            raise ValueError(f"task {task.name!r} merges parts but its run yielded none")
        replies.write(head + b"[]\n")
        n = 1
    return n


# A traceback is for a person to read: its last frames say where the task raised, so a deep
# recursion's is cut to its tail (the worker shortens it again to fit the server's line).
TRACEBACK_CHARS = 16_000


def _format(e: BaseException) -> str:
    """``e``'s formatted traceback without this module's own frame, at most TRACEBACK_CHARS."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
    if len(text) > TRACEBACK_CHARS:
        text = "(shortened) … " + text[-TRACEBACK_CHARS:]
    return text


def _read_bytes(msg: Any, requests: BinaryIO) -> None:
    """A request with ``"bytes": n`` is followed by n raw bytes of UTF-8 text and ``\n``: they
    are read, decoded once, and become its input (task code gets a ``str``, as ever)."""
    n = msg.get("bytes") if isinstance(msg, dict) else None
    if type(n) is not int or n < 0:
        return
    data = requests.read(n)
    requests.read(1)  # the "\n" after the bytes
    try:
        msg["input"] = data.decode("utf-8")
    except UnicodeDecodeError as e:
        msg["input"] = None
        msg["bad"] = f"the input is not valid UTF-8 ({e.reason})"


def serve(registry: Any, requests: BinaryIO, replies: BinaryIO) -> None:
    """One request, or a JSON array of them (a batch), per line; one reply line for each line."""
    for raw in requests:
        try:
            msg = jsoncodec.loads(raw, allow_nan=True)
        except ValueError:
            continue
        _read_bytes(msg, requests)
        if isinstance(msg, list):
            done = [r[1] for r in (_run(registry, m, replies) for m in msg) if r is not None]
            if not done:
                continue
            line = b"[" + b",".join(done) + b"]"
        else:
            one = _run(registry, msg, replies)
            if one is None:
                continue
            line = one[1]
        replies.write(line + b"\n")
        replies.flush()


def main(argv: list[str] | None = None) -> None:
    """A pool child's entry point: load the tasks, then answer requests from stdin on a private copy
    of stdout until stdin ends."""
    parser = argparse.ArgumentParser(prog="clusterd.worker.child")
    parser.add_argument("--tasks", action="append", default=[])
    args = parser.parse_args(argv)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from clusterd.tasks import load_registry

    registry = load_registry(args.tasks)
    try:
        serve(registry, sys.stdin.buffer, replies)
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
