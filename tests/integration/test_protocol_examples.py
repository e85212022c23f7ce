"""The transcripts of docs/PROTOCOL.md outside §7: the greeting example and the authentication
transcript (§1), and the worker protocol examples (§5, its opening example and Batches), replayed
on real twistd processes and compared after the normalisation of transcripts.py (the nonce, and a
proof the doc elides with "…", are this run's; a heartbeat PING may come anywhere)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from crashkit import LineConn
from transcripts import PROTOCOL, fenced_after, normalise

from clusterd.core.auth import proof
from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration


def test_greeting_example_is_what_a_default_server_sends(tmp_path: Path) -> None:
    """§1's greeting example is the line a server with default options sends first."""
    template, example = fenced_after("### Greeting").splitlines()
    assert template == "HELLO clusterd <protocol-version> <json>"
    with LocalCluster(tmp_path) as cluster:
        cluster.start_server()
        conn = LineConn(cluster.port, timeout=30)
        try:
            assert conn.hello == example
        finally:
            conn.close()


def test_auth_transcript_replays(tmp_path: Path) -> None:
    """§1's AUTH transcript gives the doc's replies on a server with both secrets and a worker."""
    text = fenced_after("A transcript (the secret here is")
    secret = re.search(r"the secret here is `([^`]+)`", PROTOCOL.read_text())
    client = secret.group(1).encode()
    (tmp_path / "client.secret").write_bytes(client)
    (tmp_path / "worker.secret").write_bytes(b"worker-secret-0123456789abcdef")
    for name in ("client.secret", "worker.secret"):
        (tmp_path / name).chmod(0o600)
    args = ["--client-secret-file", "client.secret", "--worker-secret-file", "worker.secret"]
    with LocalCluster(tmp_path, server_args=args, client_secret=client) as cluster:
        cluster.start_server()
        cluster.start_worker("w1", extra=["--secret-file", str(tmp_path / "worker.secret")])
        cluster.wait_workers()
        conn = LineConn(cluster.port, timeout=30)
        try:
            nonce = re.search(r'"nonce":"([0-9a-f]+)"', conn.hello).group(1)
            for line in text.splitlines():
                if line.startswith("> "):
                    request = line[2:]
                    if request.endswith("…"):  # the doc elides the proof: make this run's
                        role = request.split()[1]
                        request = f"AUTH {role} {proof(client, nonce, role)}"
                    conn.send(request)
                elif line.startswith("< HELLO "):
                    assert normalise(conn.hello) == normalise(line[2:])
                else:
                    got = conn.readline()
                    assert normalise(got) == normalise(line[2:]), f"{got!r} != {line!r}"
        finally:
            conn.close()


class ServerLines:
    """The lines a fake worker receives, matched in the doc's order except heartbeats: a
    ``PING`` is sent on the server's clock, so it may come before or after the lines around it
    in the doc (the doc's interleaving of the two directions is one of several)."""

    def __init__(self, conn: LineConn) -> None:
        self.conn, self.pings, self.ahead = conn, 0, []

    def expect(self, want: str) -> None:
        if want == "PING":
            while not self.pings:
                line = self.conn.readline()
                self.pings += line == "PING"
                if line != "PING":
                    self.ahead.append(line)
            self.pings -= 1
            return
        while True:
            got = self.ahead.pop(0) if self.ahead else self.conn.readline()
            if got != "PING":
                break
            self.pings += 1
        assert normalise(got) == normalise(want), f"{got!r} != {want!r}"


# The client side each worker example implies (the doc shows only the worker's connection): the
# job its DO lines carry, as the server's third job (two earlier ones cancelled first).
WORKER_EXAMPLES = {
    "## 5. The worker protocol": 'SUBMIT sum [1,2,3,4] {"chunks":2}',
    "### Batches": 'SUBMIT sum [1,2,3,4] {"chunks":2}',
}


@pytest.mark.parametrize("marker", list(WORKER_EXAMPLES))
def test_worker_protocol_example_replays(tmp_path: Path, marker: str) -> None:
    """A §5 worker example gives the doc's server lines to a fake worker sending its W: lines."""
    lines = [(x[:1], x[3:]) for x in fenced_after(marker).splitlines()]
    with LocalCluster(tmp_path) as cluster:
        cluster.start_server()
        client = LineConn(cluster.port, timeout=30)
        for _ in range(2):
            client.send("SUBMIT sum [0]")
            job = client.readline().split()[1]
            client.send(f"CANCEL {job}")
            assert client.readline() == f"OK {job} cancelled"
        worker = LineConn(cluster.port, timeout=30)
        server = ServerLines(worker)
        try:
            if lines[0][0] == "S":  # the greeting
                assert worker.hello == lines.pop(0)[1]
            for who, text in lines:
                if who == "W":
                    worker.send(text)
                    continue
                if text.startswith("CANCEL "):  # what the client did to cause it
                    client.send("CANCEL j3")
                    assert client.readline() == "OK j3 cancelled"
                server.expect(text)
                if text.startswith("OK REGISTERED"):
                    client.send(WORKER_EXAMPLES[marker])
                    assert client.readline() == "OK j3"
        finally:
            worker.close()
            client.close()
