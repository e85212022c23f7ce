"""Helpers for the crash, disk and load tests: expected answers computed with plain Python, a
ledger of every job id a client was shown, a raw line connection, an in-process worker with as
many slots as a test asks for, and a readiness wait for a restarted server.

Why an in-process worker: a real 64-slot ``twistd clusterd-worker`` forks 64 pool processes,
seconds of CPU on a 2-core machine, while what the server sees of a worker is its ``REGISTER``
line and its answers. This one speaks the worker protocol over a real socket (``REGISTER`` at
the moment the test chooses, so a registration can land a few milliseconds after a submit) and
answers each ``DO`` with the built-in task's own ``run``, after a delay the test sets.
"""

from __future__ import annotations

import json
import queue
import random
import select
import socket
import string
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from clusterd.launch import LocalCluster
from clusterd.tasks.builtins import TASKS

__all__ = [
    "Expected",
    "Ledger",
    "LineConn",
    "SlotWorker",
    "expected_wordcount",
    "primes_below",
    "wait_ready",
    "words_text",
]

_RUN = {t.name: t.run for t in TASKS}
BUILTIN_TASKS = sorted(_RUN)


# -- expected answers (plain Python, never the server's code) ---------------------------------


def primes_below(start: int, stop: int) -> int:
    """How many primes lie in [start, stop): a sieve, independent of the task's trial division."""
    if stop <= 2:
        return 0
    sieve = bytearray([1]) * stop
    sieve[0:2] = b"\x00\x00"
    for p in range(2, int(stop**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytearray(len(range(p * p, stop, p)))
    return sum(sieve[max(start, 0) :])


def words_text(rng: random.Random, n_words: int) -> str:
    """Lower-case ASCII words from a small vocabulary, separated by spaces and newlines."""
    letters = string.ascii_lowercase
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(500)]
    out = []
    for i in range(n_words):
        out.append(rng.choice(vocab))
        out.append("\n" if i % 13 == 12 else " ")
    return "".join(out)


def expected_wordcount(text: str) -> list[tuple[str, int]]:
    """The wordcount answer as an ordered list of pairs: most frequent first, ties by word."""
    return sorted(Counter(text.split()).items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass(frozen=True)
class Expected:
    """What one submitted job must answer. ``label`` names the submission (the same label
    for a retry of the same job with the same key)."""

    label: str
    task: str
    answer: Any

    def matches(self, value: Any) -> bool:
        if self.task == "wordcount":
            # Same counts in the same order: most frequent first, ties alphabetically.
            return isinstance(value, dict) and list(value.items()) == list(self.answer)
        return value == self.answer

    def describe(self, value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class Ledger:
    """Every job id a client was shown (``OK jN`` to a SUBMIT, or a RESULT), with what that job
    must answer. An id shown for two different submissions is a reuse: recorded as a problem."""

    shown: dict[str, Expected] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def show(self, job: str, expected: Expected, how: str) -> None:
        with self.lock:
            self.events.append(f"{how} {job} for {expected.label}")
            prior = self.shown.get(job)
            if prior is None:
                self.shown[job] = expected
            elif prior.label != expected.label:
                self.problems.append(
                    f"id {job} reused: shown first for {prior.label} ({prior.task}), "
                    f"then for {expected.label} ({expected.task}) via {how}"
                )

    def result(self, job: str, expected: Expected, value: Any) -> None:
        """A RESULT line was shown: its id is recorded, and its value must already be right."""
        self.show(job, expected, "RESULT")
        if not expected.matches(value):
            with self.lock:
                self.problems.append(
                    f"RESULT {job} for {expected.label}: wrong answer {expected.describe(value)}"
                )

    def note(self, text: str) -> None:
        with self.lock:
            self.events.append(text)


# -- a raw line connection ----------------------------------------------------------------------


class LineConn:
    """A plain socket speaking lines, for requests the bundled client would not send (a job
    line written before the test does something else, pipelined floods)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.hello = self.readline()

    def send(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        self.sock.sendall(data if data.endswith(b"\n") else data + b"\n")

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- an in-process worker -----------------------------------------------------------------------


class SlotWorker:
    """A worker on one socket, run by a thread: connects and reads the greeting at once,
    sends ``REGISTER`` (``slots`` as asked, every built-in task) when :meth:`register` is called,
    and answers each ``DO`` with the built-in task's result ``delay`` seconds after it arrived.
    It ends when the server closes the connection or :meth:`close` is called."""

    def __init__(self, port: int, name: str, slots: int, delay: float = 0.0) -> None:
        self.name, self.slots, self.delay = name, slots, delay
        self.conn = LineConn(port, timeout=10)
        self.conn.sock.settimeout(None)
        self.answered = 0
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._out: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=f"slotworker-{name}", daemon=True)

    def register(self) -> None:
        """Send REGISTER now (the caller times it) and start serving."""
        msg = {"name": self.name, "tasks": BUILTIN_TASKS, "slots": self.slots, "protocol": 1}
        try:
            self.conn.send("REGISTER " + json.dumps(msg, separators=(",", ":")))
        except OSError:
            return  # the server is already gone: nothing to serve
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.conn.close()

    def _serve(self) -> None:
        pending: list[tuple[float, dict[str, Any]]] = []
        sock = self.conn.sock
        buf = self.conn.buf
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    _, msg = pending.pop(0)
                    result = _RUN[msg["task"]](msg["input"])
                    line = "DONE " + json.dumps({"id": msg["id"], "result": result})
                    sock.sendall(line.encode() + b"\n")
                    self.answered += 1
                wait = max(0.0, pending[0][0] - now) if pending else 0.2
                ready, _, _ = select.select([sock], [], [], min(wait, 0.2))
                if not ready:
                    continue
                chunk = sock.recv(1 << 22)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    raw, _, buf = buf.partition(b"\n")
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("OK REGISTERED"):
                        self.registered.set()
                    elif line.startswith("DO "):
                        msg = json.loads(line[3:])
                        pending.append((time.monotonic() + self.delay, msg))
                    elif line.startswith("CANCEL "):
                        gone = json.loads(line[7:])["id"]
                        pending = [p for p in pending if p[1]["id"] != gone]
                    elif line == "PING":
                        sock.sendall(b"OK PONG\n")
        except (OSError, ValueError):
            return  # the server went away (SIGKILL): that is what these tests do


# -- readiness ----------------------------------------------------------------------------------


def wait_ready(cluster: LocalCluster, timeout: float = 30.0) -> None:
    """Check that the (re)started server answers PING. ``LocalCluster.start_server`` has already
    waited for this process's own "listening" line (an earlier run's line in the appended log
    does not count), so one PING, bounded by ``timeout``, is enough: no polling."""
    if cluster.server is None or cluster.server.poll() is not None:
        raise RuntimeError(f"server exited:\n{cluster.log_text('server')[-3000:]}")
    with cluster.client(timeout=timeout) as c:
        assert c.ping() == "PONG"
