"""The transcripts of docs/PROTOCOL.md outside §7 that a server can answer: the greeting example
(§1, Greeting) and the authentication transcript (§1, Authentication), replayed on real twistd
processes and compared after the normalisation of transcripts.py (the nonce, and a proof the
doc elides with "…", are this run's)."""

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
