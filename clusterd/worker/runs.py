"""Starting one ``DO``'s run in the pool, and what a failed run answers.

The input is the ``DO``'s own ``input``, or the range its ``ref`` names: a file range the pool
child reads itself (the bytes never cross the pipe), a URL range this process fetches first
with treq (clusterd/worker/refs.py), both only under the worker's ``--ref-root``. Kept apart from
the protocol (worker/protocol.py), which frames lines and answers, so each stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from clusterd.core.refs import RefError, RefRange, is_url
from clusterd.core.streaming import piece_lines
from clusterd.core.wire import dumps
from clusterd.worker.pool import ChildDied, PoolService
from clusterd.worker.refs import fetch_range, permitted

__all__ = ["start", "failure_fields", "result_lines"]


def start(
    pool: Any,
    msg: dict[str, Any],
    ref_roots: tuple[str, ...],
    on_part: Callable[[bytes], None] | None = None,
) -> Deferred[Any]:
    """Run the ``DO`` ``msg`` in ``pool``; ``on_part`` receives a generator run's parts as
    they are produced. A reference the worker may not or cannot read fails the run with
    RefError (answered as a failed attempt, retried elsewhere)."""
    task = str(msg.get("task"))
    kw: dict[str, Any] = {} if on_part is None else {"on_part": on_part}
    if "ref" not in msg:
        return pool.run(task, msg.get("input"), **kw)
    try:
        rng = RefRange.from_wire(msg["ref"])
        rng = replace(rng, ref=permitted(rng.ref, ref_roots))
    except RefError as e:
        return fail(e)
    if not is_url(rng.ref):
        return pool.run(task, rng, **kw)
    return fetch_range(rng).addCallback(lambda value: pool.run(task, value, **kw))


def failure_fields(f: Failure) -> tuple[str, str, str, bool]:
    """An ``ERROR``'s type, message, traceback and whether a retry is worth it, for a run that
    failed with ``f``: the task's own exception, its child's death, or anything else."""
    if f.check(PoolService.TaskError):
        return f.value.type, f.value.message, f.value.traceback, f.value.retry
    if f.check(ChildDied):
        return "ChildDied", str(f.value), "", True
    return type(f.value).__name__, str(f.value), "", True


def result_lines(value: Any, max_line: int) -> list[str] | None:
    """The ``+<piece>`` lines of a result too long for one line, each within ``max_line``;
    None when it cannot be cut that way (a number, or one element longer than a line)."""
    pieces = piece_lines(value, dumps(value), max_line, dumps)
    try:
        return None if pieces is None else list(pieces)
    except ValueError:
        return None
