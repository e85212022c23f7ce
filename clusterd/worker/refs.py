"""A worker's readers for inputs by reference (docs/PROTOCOL.md, "Inputs by reference").

A file path is read by the pool child itself (:func:`read_file`: open, ``pread`` the range and
the few bytes alignment needs, decode once), so the bytes never cross a pipe. An http(s) URL is
fetched by the worker process with treq (:func:`fetch_range`: ``Range: bytes=s-e`` requests,
each answer checked to be a ``206`` with the ``Content-Range`` asked for and the size the job
named) and the decoded input handed to the child. Both drive the one alignment rule of
:func:`clusterd.core.refs.align`. Whatever cannot be read raises
:class:`~clusterd.core.refs.RefError`, which fails the attempt (retried elsewhere).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from clusterd.core.refs import RefError, RefRange, align, decode_records, is_url, read_aligned

__all__ = ["read_file", "fetch_range", "http_read", "permitted", "ref_root"]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")
HTTP_TIMEOUT = 60.0  # seconds for one range request, headers to last byte


def ref_root(value: str) -> str:
    """A ``--ref-root`` as it is compared: a directory made absolute and resolved, or a URL
    prefix that ends its host part with ``/`` (so ``http://a.example`` does not admit
    ``http://a.example.evil``)."""
    if is_url(value):
        rest = value.partition("://")[2]
        return value if "/" in rest else value + "/"
    return os.path.realpath(value)


def permitted(ref: str, roots: tuple[str, ...]) -> str:
    """The reference to read: a file path resolved (symbolic links followed), checked to lie
    under one of ``roots`` (``--ref-root``); a URL checked to start with one of them. Raises
    RefError otherwise, and always when the worker was given no root: a client cannot make
    this worker read its other files (its own secret file among them) or fetch from hosts its
    operator did not list."""
    if not roots:
        raise RefError(
            "this worker reads no inputs by reference; its operator allows them with "
            "--ref-root DIR or --ref-root URL-PREFIX"
        )
    if is_url(ref):
        if not any(is_url(r) and ref.startswith(r) for r in roots):
            raise RefError(f"{ref} is not under a --ref-root of this worker")
        return ref
    real = os.path.realpath(ref)
    if not any(
        not is_url(r) and (real == r or real.startswith(r.rstrip("/") + "/")) for r in roots
    ):
        raise RefError(f"{ref} is not under a --ref-root of this worker")
    return real


def read_file(rng: RefRange) -> Any:
    """The task input of ``rng`` from a file the worker can see: its records, aligned and
    decoded. Raises RefError if the file is missing, unreadable, or not the named size."""
    try:
        fd = os.open(rng.ref, os.O_RDONLY)
    except OSError as e:
        raise RefError(f"cannot open {rng.ref}: {e.strerror}") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != rng.size:
            raise RefError(f"{rng.ref} has {actual} bytes; the job names {rng.size}")
        data = read_aligned(rng, lambda offset, n: os.pread(fd, n, offset))
    except OSError as e:
        raise RefError(f"cannot read {rng.ref}: {e.strerror}") from None
    finally:
        os.close(fd)
    return decode_records(data, rng.format)


def _check_range(url: str, headers: Any, offset: int, n: int, size: int) -> None:
    """A 206's Content-Range must be exactly the bytes asked for, of a resource of ``size``."""
    raw = headers.getRawHeaders(b"content-range") or [b""]
    m = _CONTENT_RANGE.match(raw[0].decode("latin-1").strip())
    if m is None:
        raise RefError(f"{url}: the 206 answer has no usable Content-Range ({raw[0]!r})")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if total != "*" and int(total) != size:
        raise RefError(f"{url} has {total} bytes; the job names {size}")
    if (first, last) != (offset, offset + n - 1):
        raise RefError(f"{url}: asked bytes {offset}-{offset + n - 1}, got {first}-{last}")


@inlineCallbacks
def http_read(
    url: str, offset: int, n: int, size: int, request: Callable[..., Deferred[Any]]
) -> Generator[Deferred[Any], Any, bytes]:
    """Bytes ``[offset, offset+n)`` of ``url`` by one range request; reads at most ``n``
    bytes of the body. Raises RefError unless the answer is a 206 for exactly that range."""
    import treq

    headers = {b"Range": [f"bytes={offset}-{offset + n - 1}".encode("ascii")]}
    try:
        resp = yield request("GET", url, headers=headers, timeout=HTTP_TIMEOUT)
    except Exception as e:
        raise RefError(f"cannot fetch {url}: {e}") from None
    if resp.code != 206:
        resp.deliverBody(_Discard())
        what = "a whole answer (200) to a range request" if resp.code == 200 else "an error"
        raise RefError(
            f"{url}: HTTP {resp.code}, {what}; a 206 for bytes {offset}-{offset + n - 1}"
        )
    _check_range(url, resp.headers, offset, n, size)
    parts: list[bytes] = []
    got = [0]

    def collect(data: bytes) -> None:
        got[0] += len(data)
        if got[0] > n:
            raise RefError(f"{url}: the answer is longer than the {n} bytes asked")
        parts.append(data)

    try:
        yield treq.collect(resp, collect)
    except RefError:
        raise
    except Exception as e:
        raise RefError(f"{url}: the answer broke off after {got[0]} of {n} bytes: {e}") from None
    return b"".join(parts)


class _Discard:
    """A body protocol that drops an unwanted answer's body, so its connection is freed."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


@inlineCallbacks
def fetch_range(
    rng: RefRange, request: Callable[..., Deferred[Any]] | None = None
) -> Generator[Deferred[Any], Any, Any]:
    """The task input of ``rng`` from an http(s) URL: the range's records, aligned (a few
    small read-ahead requests at most) and decoded. ``request``: treq's, by default."""
    if request is None:
        import treq

        request = treq.request
    gen = align(rng.start, rng.end, rng.size, rng.format)
    try:
        want = next(gen)
        while True:
            data = yield http_read(rng.ref, want[0], want[1], rng.size, request)
            want = gen.send(data)
    except StopIteration as stop:
        return decode_records(stop.value, rng.format)
