"""Issue 10 item 14: clients never wait forever for a server that accepts and never speaks, and
``clusterd ... | head -1`` stops quietly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import result_of
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from clusterd.client import blocking
from clusterd.client.api import DEFAULT_TIMEOUT, connect
from clusterd.client.blocking import BlockingClient
from clusterd.client.cli import DEFAULT_TIMEOUT as CLI_DEFAULT
from clusterd.client.cli import build_parser
from clusterd.client.errors import ClusterError, ServerTimeout

CLI = str(Path(sys.executable).with_name("clusterd"))
GREETING = b'HELLO clusterd 1 {"max_line": 1048576}\n'


def _connecting(timeout: float | None = 5.0, **kw):
    reactor = MemoryReactorClock()
    d = connect(reactor, "tcp:127.0.0.1:7420", timeout=timeout, **kw)
    _host, _port, factory, _t, _b = reactor.tcpClients[0]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return reactor, d, proto, transport


def test_connect_times_out_without_a_greeting():
    """connect() fails with ServerTimeout naming the greeting, and aborts the connection, when
    the server accepts and never speaks."""
    reactor, d, proto, transport = _connecting(timeout=5.0)
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.2)
    with pytest.raises(ServerTimeout, match="after 5 s waiting for the server's greeting"):
        result_of(d)
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert reactor.getDelayedCalls() == []


def test_connect_times_out_waiting_for_auth_answer():
    """A server that greets, asks for AUTH and never answers it times out too, and the lost
    connection afterwards does not fail the already-answered request again."""
    reactor, d, proto, transport = _connecting(timeout=3.0, secret=b"s" * 32)
    proto.dataReceived(b'HELLO clusterd 1 {"auth": ["client"], "nonce": "00"}\n')
    assert transport.value().startswith(b"AUTH client ")
    reactor.advance(3.0)
    with pytest.raises(ServerTimeout, match="AUTH"):
        result_of(d)
    proto.connectionLost(Failure(ConnectionDone()))  # must not raise AlreadyCalledError
    assert reactor.getDelayedCalls() == []


def test_connect_within_the_timeout_leaves_no_timer():
    """A prompt greeting gives a Client and cancels the timeout's timer."""
    reactor, d, proto, _transport = _connecting()
    proto.dataReceived(GREETING)
    assert result_of(d).server_info == {"max_line": 1048576}
    assert reactor.getDelayedCalls() == []


def test_default_timeouts():
    """The Deferred client, BlockingClient and the CLI all default to the same bound."""
    assert DEFAULT_TIMEOUT == blocking.DEFAULT_TIMEOUT == CLI_DEFAULT == 10.0
    assert build_parser().parse_args(["ping"]).connect_timeout == 10.0
    args = build_parser().parse_args(["--timeout", "2", "run", "--timeout", "7", "sum", "[1]"])
    assert (args.connect_timeout, args.timeout) == (2.0, 7.0)


@pytest.fixture
def mute_server() -> Iterator[int]:
    """A TCP port that accepts connections (in its backlog) and never says anything."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def _serve(replies: dict[bytes, bytes]) -> tuple[int, socket.socket]:
    """A fake server on a thread: greets each connection, answers request lines found in
    ``replies`` and ignores the rest (never answers them)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.settimeout(30)

    def run() -> None:
        try:
            conn, _ = s.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            conn.sendall(GREETING)
            f = conn.makefile("rb")
            try:
                for line in f:
                    answer = replies.get(line.strip())
                    if answer is not None:
                        conn.sendall(answer)
            except OSError:
                pass

    threading.Thread(target=run, daemon=True).start()
    return s.getsockname()[1], s


def test_blocking_client_times_out_on_a_mute_server(mute_server):
    """BlockingClient raises ServerTimeout (a ClusterError) within its timeout."""
    started = time.monotonic()
    with pytest.raises(ClusterError, match="did not greet"):
        BlockingClient(f"tcp:127.0.0.1:{mute_server}", timeout=0.5)
    assert time.monotonic() - started < 5


def test_blocking_client_default_timeout_is_bounded(mute_server, monkeypatch):
    """Without a timeout argument, BlockingClient still bounds connect and greeting by
    DEFAULT_TIMEOUT (it used to wait forever)."""
    monkeypatch.setattr(blocking, "DEFAULT_TIMEOUT", 0.3)
    with pytest.raises(ServerTimeout):
        BlockingClient(f"tcp:127.0.0.1:{mute_server}")


def test_blocking_client_default_waits_for_slow_replies():
    """With the default timeout, requests after the greeting may take as long as their job."""
    port, s = _serve({})
    with s, BlockingClient(f"tcp:127.0.0.1:{port}") as client:
        assert client.sock.gettimeout() is None
    port, s = _serve({})
    with s, BlockingClient(f"tcp:127.0.0.1:{port}", timeout=4) as client:
        assert client.sock.gettimeout() == 4  # an explicit timeout still bounds every read


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_cli_ping_against_a_mute_server_exits_3(mute_server):
    """``clusterd --timeout 1 ping`` against a port that never speaks exits 3 with a clear
    message instead of hanging."""
    started = time.monotonic()
    done = _cli("--timeout", "1", "--server", f"tcp:127.0.0.1:{mute_server}", "ping")
    assert done.returncode == 3
    assert f"cannot connect to tcp:127.0.0.1:{mute_server}: timed out after 1 s" in done.stderr
    assert "greeting" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


def test_cli_ping_without_pong_exits_3():
    """A server that greets but never answers PING makes ``clusterd ping`` exit 3."""
    port, s = _serve({})
    with s:
        done = _cli("--timeout", "1", "--server", f"tcp:127.0.0.1:{port}", "ping")
    assert done.returncode == 3
    assert "no answer to PING" in done.stderr


def test_cli_broken_pipe_exits_quietly():
    """``clusterd jobs | head -1``: the reader goes away mid-output; the CLI stops with 141
    and prints no traceback."""
    jobs = [{"id": f"j{i}", "state": "done", "pad": "x" * 200} for i in range(2000)]
    port, s = _serve({b"JOBS": b"OK " + json.dumps(jobs).encode() + b"\n"})
    with s:
        proc = subprocess.Popen(
            [CLI, "--server", f"tcp:127.0.0.1:{port}", "jobs", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout.readline().strip() == b"["
        proc.stdout.close()  # like head -1 exiting
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == 141, err
    assert err == ""
