"""LocalCluster: a server and workers as real ``twistd`` processes on this machine.

Used by the quick-start demo, the integration tests and the benchmarks, so all three exercise
exactly what a user runs. Each process's output comes through a pipe to a reader thread
(:class:`OutputWatch`) that appends it to the process's log file in the work directory and wakes
whoever waits for a readiness line: the server's ``clusterd listening on HOST:PORT`` (the port the
OS picked for ``tcp:0``), a worker's ``registered with server``. Waiting is on those events with a
deadline, never a sleep-and-reread of the log; and a restarted process is judged by its own lines
only, never by the previous run's lines still in the appended log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterd.client.blocking import BlockingClient

__all__ = ["LocalCluster", "OutputWatch", "twistd_path", "wait_for"]

_LISTENING = re.compile(r"clusterd listening on ([0-9.]+):(\d+)")
_REGISTERED = re.compile(r"registered with server .* as ")


def twistd_path() -> str:
    """The ``twistd`` beside this interpreter (``python -m twisted`` is ``twist``, not twistd)."""
    candidate = Path(sys.executable).with_name("twistd")
    return str(candidate) if candidate.exists() else (shutil.which("twistd") or "twistd")


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class OutputWatch:
    """Reads one process's output on a thread of its own: appends every line to ``log_path``
    and keeps the matches of the patterns somebody waits for, waking them (a Condition).

    Why a thread and a pipe rather than rereading the log file: the waiter wakes on the line
    itself, sees only this process's lines (a restart appends to the same log), and learns at
    once when the process has exited (end of its output)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        name: str,
        patterns: dict[str, re.Pattern[str]] | None = None,
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.name = name
        self.cond = threading.Condition()
        # Watched from the first line on: a readiness line may come before anybody waits.
        self.patterns: dict[str, re.Pattern[str]] = dict(patterns or {})
        self.matches: dict[str, list[re.Match[str]]] = {k: [] for k in self.patterns}
        self.ended = False
        # Opened before the thread starts, so the log exists as soon as the process does.
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed by the reader thread at the end
        # Where this process's lines begin in the log (earlier runs' lines come before).
        self.start = self.log.tell()
        self.thread = threading.Thread(target=self._read, name=f"watch-{name}", daemon=True)
        self.thread.start()

    def watch(self, key: str, pattern: re.Pattern[str]) -> None:
        """Start counting lines that match ``pattern`` under ``key`` (from now on)."""
        with self.cond:
            if key not in self.patterns:
                self.patterns[key] = pattern
                self.matches[key] = []

    def count(self, key: str) -> int:
        """How many lines matching the pattern watched under ``key`` have been seen."""
        with self.cond:
            return len(self.matches.get(key, ()))

    def _read(self) -> None:
        """Copy the output in blocks as it comes (cheap for a chatty server: one write and one
        regular-expression scan per block, in C), matching whole lines only."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        partial = b""
        with self.log as log:
            while True:
                block = os.read(fd, 1 << 16)
                if not block:
                    break
                partial += block
                cut = partial.rfind(b"\n") + 1
                whole, partial = partial[:cut], partial[cut:]
                with self.cond:
                    log.write(block)
                    log.flush()
                    if whole:
                        self._match(whole.decode("utf-8", "replace"))
            if partial:
                with self.cond:
                    self._match(partial.decode("utf-8", "replace"))
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def _match(self, text: str) -> None:
        """Record the watched patterns' matches in ``text`` (whole lines; under ``cond``)."""
        hit = False
        for key, pattern in self.patterns.items():
            found = list(pattern.finditer(text))
            if found:
                self.matches[key].extend(found)
                hit = True
        if hit:
            self.cond.notify_all()

    def wait(self, key: str, count: int, deadline: float, what: str) -> re.Match[str]:
        """The ``count``-th line matching ``key``, once it has come; TimeoutError past
        ``deadline`` (a ``time.monotonic()``), RuntimeError if the process ends first."""
        with self.cond:
            while len(self.matches[key]) < count:
                if self.ended:
                    raise RuntimeError(f"{self.name} exited early:\n{self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what}")
                self.cond.wait(left)
            return self.matches[key][count - 1]

    def wait_line(self, pattern: str, deadline: float, what: str) -> str:
        """The first line of this process matching ``pattern``, seen already or still to come.
        Unlike :meth:`wait`, a process that has ended is not an error while its lines match."""
        rx = re.compile(pattern)
        with self.cond:
            self.watch(pattern, rx)
            if not self.matches[pattern]:
                earlier = rx.search(self._own_text())
                if earlier is not None:
                    return earlier.group(0)
            while not self.matches[pattern]:
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    raise TimeoutError(f"timed out waiting for {what}:\n{self._tail()}")
                self.cond.wait(left)
            return self.matches[pattern][0].group(0)

    def _own_text(self) -> str:
        """This process's lines so far (the log's part since it started; see ``start``)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")

    def _tail(self) -> str:
        return self._own_text()[-2000:]

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the reader thread to finish (the process's output
        ended)."""
        self.thread.join(timeout)


class LocalCluster:
    """A server and workers as ``twistd`` processes in a work directory (a temporary one by
    default, removed by :meth:`stop`); use as a context manager. Every start waits for the
    process's readiness line (see :class:`OutputWatch`) within ``start_timeout``."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        server_args: list[str] | None = None,
        start_timeout: float = 30.0,
        env: dict[str, str] | None = None,
        client_secret: bytes | None = None,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="clusterd-"))
        self.server_args = list(server_args or [])
        self.start_timeout = start_timeout
        self.env = {**os.environ, **(env or {})}
        self.client_secret = client_secret
        self.listen_template: str | None = None
        self.client_address: str | None = None  # "{port}" template, e.g. a tls: string
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.port: int | None = None
        self.watches: dict[str, OutputWatch] = {}  # by log name: the newest process's reader
        self._registrations_seen: dict[str, int] = {}  # per worker, when the server started

    # -- processes -----------------------------------------------------------------------------

    def _spawn(
        self, name: str, args: list[str], patterns: dict[str, re.Pattern[str]]
    ) -> subprocess.Popen[bytes]:
        # cwd is the work dir so a source checkout's twisted/plugins never shadows the install.
        proc = subprocess.Popen(
            [twistd_path(), "-n", "--pidfile=", *args],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        self.watches[name] = OutputWatch(proc, self.workdir / f"{name}.log", name, patterns)
        return proc

    def wait_log(self, name: str, pattern: str, timeout: float = 30.0) -> str:
        """Wait until the current process ``name`` (``server``, ``worker-NAME``) has printed a
        line matching the regular expression ``pattern``; returns the matched text. Lines of an
        earlier run of the same name do not count."""
        deadline = time.monotonic() + timeout
        return self.watches[name].wait_line(pattern, deadline, f"{pattern!r} from {name}")

    def log_text(self, name: str) -> str:
        """The whole log of process ``name`` (``server``, ``worker-<name>``), or "" if it has none
        yet."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_server(self, port: int = 0, listen: str | None = None) -> int:
        """Start the server; ``listen`` is an endpoint string with ``{port}`` in it (default
        ``tcp:{port}:interface=127.0.0.1``). Returns the port bound."""
        template = listen or self.listen_template or "tcp:{port}:interface=127.0.0.1"
        self.listen_template = template
        # Registrations counted from here on are with this server.
        self._registrations_seen = {
            n: self.watches[f"worker-{n}"].count("registered") for n in self.workers
        }
        self.server = self._spawn(
            "server",
            ["clusterd-server", "--listen", template.format(port=port), *self.server_args],
            {"listening": _LISTENING},
        )
        watch = self.watches["server"]
        deadline = time.monotonic() + self.start_timeout
        m = watch.wait("listening", 1, deadline, "the server to listen")
        self.port = int(m.group(2))
        return self.port

    @property
    def address(self) -> str:
        """Where clients and workers connect (``client_address`` when set, e.g. for TLS)."""
        template = self.client_address or "tcp:127.0.0.1:{port}"
        return template.format(port=self.port)

    def start_worker(
        self,
        name: str,
        slots: int = 1,
        extra: list[str] | None = None,
        connect: str | None = None,
    ) -> None:
        """Start worker ``name`` with ``slots`` slots, connected to the server (or ``connect``);
        :meth:`wait_workers` waits for its registration."""
        self._registrations_seen[name] = 0
        self.workers[name] = self._spawn(
            f"worker-{name}",
            [
                "clusterd-worker",
                "--connect",
                connect or self.address,
                "--slots",
                str(slots),
                "--name",
                name,
                "--max-reconnect-delay",
                "2",
                *(extra or []),
            ],
            {"registered": _REGISTERED},
        )

    def wait_workers(self, names: list[str] | None = None, timeout: float | None = None) -> None:
        """Wait until the named workers (default: all started) are registered: each has logged
        a registration since the current server started, and the server lists them all. A
        worker the server has dropped since is waited for until it registers again."""
        want = sorted(names if names is not None else self.workers)
        deadline = time.monotonic() + (timeout or self.start_timeout)
        what = f"workers {want} to register"
        needed = {n: self._registrations_seen.get(n, 0) + 1 for n in want}
        while True:
            for n in want:
                self._worker_watch(n).wait("registered", needed[n], deadline, what)
            with self.client(timeout=5) as c:
                missing = set(want) - {w["name"] for w in c.workers()}
            if not missing:
                return
            for n in missing:  # dropped after registering: its next registration
                needed[n] = self._worker_watch(n).count("registered") + 1

    def _worker_watch(self, name: str) -> OutputWatch:
        return self.watches[f"worker-{name}"]

    def client(self, timeout: float | None = None) -> BlockingClient:
        """A client of the server; ``timeout`` bounds every read, and without it connecting
        and the greeting still get BlockingClient's default bound (never a hang)."""
        if timeout is None:
            return BlockingClient(self.address, secret=self.client_secret)
        return BlockingClient(self.address, timeout=timeout, secret=self.client_secret)

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send worker ``name`` the signal ``sig`` (default SIGKILL) and wait for it to exit."""
        proc = self.workers.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def kill_server(self, sig: int = signal.SIGKILL) -> None:
        """Send the server the signal ``sig`` (default SIGKILL), if it runs, and wait for it to
        exit."""
        if self.server is not None:
            self.server.send_signal(sig)
            self.server.wait(timeout=30)

    # -- lifetime ------------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM everything, wait, then SIGKILL what is left."""
        procs = list(self.workers.values()) + ([self.server] if self.server else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for w in self.watches.values():
            w.join(max(0.1, deadline - time.monotonic()))
        self.workers.clear()
        self.server = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
