"""LocalCluster: a server and workers as real ``twistd`` processes on this machine.

Used by the quick-start demo, the integration tests and the benchmarks, so all three exercise
exactly what a user runs. Processes log to files in a work directory; the server listens on a
port the OS picks (``tcp:0``) and we read it from its log line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterd.client.blocking import BlockingClient
from clusterd.client.errors import ClusterError

__all__ = ["LocalCluster", "twistd_path", "wait_for"]

_LISTENING = re.compile(r"clusterd listening on ([0-9.]+):(\d+)")


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


class LocalCluster:
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

    # -- processes -----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        try:
            # cwd is the work dir so a source checkout's twisted/plugins never shadows the install.
            return subprocess.Popen(
                [twistd_path(), "-n", "--pidfile=", *args],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        finally:
            log.close()

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_server(self, port: int = 0, listen: str | None = None) -> int:
        """Start the server; ``listen`` is an endpoint string with ``{port}`` in it (default
        ``tcp:{port}:interface=127.0.0.1``). Returns the port bound."""
        template = listen or self.listen_template or "tcp:{port}:interface=127.0.0.1"
        self.listen_template = template
        self.server = self._spawn(
            "server",
            ["clusterd-server", "--listen", template.format(port=port), *self.server_args],
        )

        def bound() -> int | None:
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_text('server')[-2000:]}")
            m = _LISTENING.search(self.log_text("server"))
            return int(m.group(2)) if m else None

        self.port = wait_for(bound, self.start_timeout, "the server to listen")
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
        )

    def wait_workers(self, names: list[str] | None = None, timeout: float | None = None) -> None:
        """Wait until the named workers (default: all started) are registered."""
        want = set(names if names is not None else self.workers)

        def registered() -> bool:
            for name in want:
                proc = self.workers.get(name)
                if proc is not None and proc.poll() is not None:
                    log = self.log_text(f"worker-{name}")[-2000:]
                    raise RuntimeError(f"worker {name} exited early:\n{log}")
            try:
                with self.client(timeout=5) as c:
                    return want <= {w["name"] for w in c.workers()}
            except (OSError, ClusterError):
                return False  # the server is not (yet, or again) accepting connections

        wait_for(registered, timeout or self.start_timeout, f"workers {sorted(want)} to register")

    def client(self, timeout: float | None = None) -> BlockingClient:
        """A client of the server; ``timeout`` bounds every read, and without it connecting
        and the greeting still get BlockingClient's default bound (never a hang)."""
        if timeout is None:
            return BlockingClient(self.address, secret=self.client_secret)
        return BlockingClient(self.address, timeout=timeout, secret=self.client_secret)

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def kill_server(self, sig: int = signal.SIGKILL) -> None:
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
        self.workers.clear()
        self.server = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
