"""A pool child: reads JSON requests on stdin, runs the named task, writes JSON replies.

Run as ``python -m clusterd.worker.child [--tasks MODULE]...``. One request at a time:
``{"id": N, "task": NAME, "input": ...}`` in (or ``{"id": N, "task": NAME, "bytes": n}``, then
n raw bytes of UTF-8 text and ``\n``: a text chunk, decoded here once), ``{"id": N, "ok": true, "result": ...}`` or
``{"id": N, "ok": false, "type": ..., "message": ..., "traceback": ...}`` out (plus
``"retry": false`` when the task lists the exception in ``no_retry``). Task code that prints would corrupt
the reply stream, so the real stdout is kept on a private descriptor and fd 1 goes to stderr,
which the worker logs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, BinaryIO

from clusterd.core import jsoncodec


def _run(registry: Any, msg: Any) -> tuple[dict[str, Any], bytes] | None:
    """Run one request; the reply and its JSON line, encoded once."""
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
        result = task.run(msg.get("input"))
        out = {"id": ticket, "ok": True, "result": result, "t": time.perf_counter() - start}
        # Refuses NaN and unencodable results here, per task, as json.dumps does.
        return out, jsoncodec.dumpb(out)
    except Exception as e:
        out = {"id": ticket, "ok": False, "type": type(e).__name__, "message": str(e)}
        out["traceback"] = _format(e)
        if task is not None and isinstance(e, task.no_retry):
            out["retry"] = False
        return out, jsoncodec.dumpb(out)


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
            done = [r[1] for r in (_run(registry, m) for m in msg) if r is not None]
            if not done:
                continue
            line = b"[" + b",".join(done) + b"]"
        else:
            one = _run(registry, msg)
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
