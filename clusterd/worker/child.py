"""A pool child: reads JSON requests on stdin, runs the named task, writes JSON replies.

Run as ``python -m clusterd.worker.child [--tasks MODULE]...``. One request at a time:
``{"id": N, "task": NAME, "input": ...}`` in, ``{"id": N, "ok": true, "result": ...}`` or
``{"id": N, "ok": false, "type": ..., "message": ...}`` out. Task code that prints would corrupt
the reply stream, so the real stdout is kept on a private descriptor and fd 1 goes to stderr,
which the worker logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, BinaryIO


def serve(registry: Any, requests: BinaryIO, replies: BinaryIO) -> None:
    for raw in requests:
        try:
            msg = json.loads(raw)
            ticket = msg["id"]
        except (ValueError, KeyError, TypeError):
            continue
        try:
            task = registry.get(msg.get("task"))
            if task is None:
                raise LookupError(f"this worker has no task named {msg.get('task')!r}")
            out = {"id": ticket, "ok": True, "result": task.run(msg.get("input"))}
            data = json.dumps(out, separators=(",", ":"), allow_nan=False)
        except Exception as e:
            data = json.dumps(
                {"id": ticket, "ok": False, "type": type(e).__name__, "message": str(e)},
                separators=(",", ":"),
            )
        replies.write(data.encode("utf-8") + b"\n")
        replies.flush()


def main(argv: list[str] | None = None) -> None:
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
