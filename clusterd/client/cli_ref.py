"""``clusterd run|submit TASK --input-ref PATH|URL``: a job whose input the workers read where it
lives (docs/PROTOCOL.md, "Inputs by reference"). The command learns the input's size (``stat``
for a path, a ``HEAD`` request with treq for a URL) and sends ``SUBMIT TASK & {...}``; the
bytes never pass through the client or the server.
"""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

from clusterd.client.cli_input import UsageError

__all__ = ["ref_size", "submit_ref"]


def _path_size(path: str) -> tuple[str, int]:
    """The absolute path (the workers resolve none of ours) and its size; UsageError if it is
    not a readable regular file."""
    full = os.path.abspath(path)
    try:
        st = os.stat(full)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file")
    return full, st.st_size


async def _url_size(url: str) -> int:
    """The length a HEAD request announces (Content-Length); UsageError without one."""
    import treq

    try:
        resp = await treq.head(url, timeout=30)
    except Exception as e:
        raise UsageError(f"cannot reach {url}: {e}") from None
    lengths = resp.headers.getRawHeaders(b"content-length") or []
    if resp.code != 200 or len(lengths) != 1 or not lengths[0].isdigit():
        raise UsageError(f"{url}: HEAD answered {resp.code} without a Content-Length")
    return int(lengths[0])


async def ref_size(ref: str) -> tuple[str, int]:
    """The reference as sent (a path made absolute) and its size in bytes."""
    if ref.startswith(("http://", "https://")):
        return ref, await _url_size(ref)
    return _path_size(ref)


async def submit_ref(client: Any, args: argparse.Namespace, options: dict[str, Any]) -> str:
    """Submit ``args.task`` with the input ``args.input_ref`` names; the job id."""
    if args.input is not None or args.file is not None:
        raise UsageError("give the input as an argument, with --file or with --input-ref: one")
    ref, size = await ref_size(args.input_ref)
    return await client.submit_ref(args.task, ref, size, args.chunks, format=args.format, **options)
