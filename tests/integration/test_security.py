"""Authentication, TLS, mutual TLS, limits and hostile input against real processes."""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SUPPORT, TEST_TASKS
from tlsutil import CA

from clusterd.client.blocking import BlockingClient
from clusterd.client.errors import ClusterError, RequestRefused
from clusterd.core.auth import proof
from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("clusterd"))
CLIENT_SECRET = b"client-secret-0123456789abcdef"
WORKER_SECRET = b"worker-secret-0123456789abcdef"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw(port: int) -> tuple[socket.socket, object, dict]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = s.makefile("rwb")
    hello = f.readline().decode()
    info = json.loads(hello.split(" ", 3)[3])
    return s, f, info


def _ask(f, line: str) -> str:
    f.write(line.encode() + b"\n")
    f.flush()
    return f.readline().decode().rstrip("\n")


@pytest.fixture
def secured(tmp_path: Path):
    """A server requiring client and worker secrets, with two workers holding the right one."""
    (tmp_path / "client.secret").write_bytes(CLIENT_SECRET + b"\n")
    (tmp_path / "worker.secret").write_bytes(WORKER_SECRET + b"\n")
    c = LocalCluster(
        tmp_path / "run",
        server_args=[
            *TEST_TASKS,
            "--client-secret-file",
            str(tmp_path / "client.secret"),
            "--worker-secret-file",
            str(tmp_path / "worker.secret"),
            "--auth-timeout",
            "2",
        ],
        env={"PYTHONPATH": SUPPORT},
        client_secret=CLIENT_SECRET,
    )
    (tmp_path / "run").mkdir()
    c.start_server()
    for name in ("w1", "w2"):
        c.start_worker(name, extra=[*TEST_TASKS, "--secret-file", str(tmp_path / "worker.secret")])
    c.wait_workers()
    yield c
    c.stop()


def test_authenticated_cluster_runs_jobs_and_refuses_strangers(secured, tmp_path):
    """With secrets set, authenticated workers and clients run jobs; an unauthenticated
    connection may only AUTH, PING, HELP or QUIT, a wrong proof is refused slowly, and the
    secret itself never crosses the wire."""
    with secured.client(timeout=60) as c:
        assert c.run("sum", list(range(100)), 4) == 4950
    s, f, info = _raw(secured.port)
    with s:
        assert set(info["auth"]) == {"client", "worker"} and len(info["nonce"]) == 32
        assert _ask(f, "PING") == "OK PONG"
        assert _ask(f, "RUN sum [1]").startswith("ERR NOAUTH ")
        assert _ask(f, 'REGISTER {"name":"x","tasks":["sum"],"slots":1}').startswith("ERR NOAUTH ")
        assert _ask(f, "AUTH client " + "0" * 64).startswith("ERR AUTH_FAILED ")
        # The client secret does not make a worker: roles are bound into the proof.
        wrong_role = proof(CLIENT_SECRET, info["nonce"], "worker")
        assert _ask(f, f"AUTH worker {wrong_role}").startswith("ERR AUTH_FAILED ")
        assert _ask(f, "AUTH client " + proof(CLIENT_SECRET, info["nonce"], "client")) == (
            "OK AUTHENTICATED client"
        )
        assert _ask(f, "RUN sum [1,2]").startswith("RESULT ")
    log = secured.log_text("server")
    assert "failed AUTH as client" in log
    assert CLIENT_SECRET.decode() not in log and WORKER_SECRET.decode() not in log
    with pytest.raises(ClusterError, match="requires a client secret"):
        BlockingClient(secured.address, timeout=30)  # no secret: refused before any request


def test_wrong_worker_secret_never_registers(secured, tmp_path):
    """A worker with the wrong secret is refused and never appears in WORKERS."""
    bad = tmp_path / "bad.secret"
    bad.write_bytes(b"not-the-worker-secret-at-all")
    secured.start_worker("intruder", extra=[*TEST_TASKS, "--secret-file", str(bad)])
    secured.wait_log("worker-intruder", "server refused", 30)
    with secured.client(timeout=30) as c:
        assert "intruder" not in {w["name"] for w in c.workers()}
    assert "failed AUTH as worker" in secured.log_text("server")


def test_unauthenticated_connection_times_out(secured):
    """A connection that never authenticates is closed after --auth-timeout (slowloris)."""
    s, f, _ = _raw(secured.port)
    with s:
        line = f.readline().decode()
        assert line.startswith("ERR AUTH_TIMEOUT ")
        assert f.readline() == b""


def test_cli_with_secret_file_and_without(secured, tmp_path):
    """The clusterd command authenticates with --secret-file; without it, it fails (exit 3)."""
    env = {"PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [CLI, "--server", secured.address, "--secret-file", str(tmp_path / "client.secret"),
         "run", "sum", "[1,2,3]"],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "6"
    refused = subprocess.run(
        [CLI, "--server", secured.address, "ping"],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert refused.returncode == 3
    assert "requires a client secret" in refused.stderr


def _tls_cluster(tmp_path: Path, listen: str, client_cert: bool) -> tuple[LocalCluster, CA]:
    ca = CA(tmp_path / "pki", "clusterd-ca")
    server_crt, server_key = ca.issue("server", server=True)
    client = f"tls:127.0.0.1:{{port}}:trustRoots={ca.roots}"
    if client_cert:
        crt, key = ca.issue("worker", server=False)
        client += f":certificate={crt}:privateKey={key}"
    c = LocalCluster(tmp_path / "run", env={"PYTHONPATH": SUPPORT})
    (tmp_path / "run").mkdir()
    c.client_address = client
    c.start_server(
        listen=listen.format(key=server_key, crt=server_crt, ca=ca.cert_path, port="{port}")
    )
    return c, ca


def test_job_over_tls(tmp_path):
    """With ssl: on the server and tls: on workers and client, a real job runs encrypted."""
    c, _ = _tls_cluster(
        tmp_path, "ssl:{port}:privateKey={key}:certKey={crt}:interface=127.0.0.1", False
    )
    try:
        for name in ("w1", "w2"):
            c.start_worker(name)
        c.wait_workers()
        with c.client(timeout=60) as client:
            assert client.run("primes", {"start": 0, "stop": 20000}, 8) == 2262
        plain = socket.create_connection(("127.0.0.1", c.port), timeout=10)
        with plain:
            plain.sendall(b"PING\n")
            assert not plain.recv(100).startswith(b"OK")  # no plaintext protocol on a TLS port
    finally:
        c.stop()


def test_job_over_mutual_tls_and_uncertified_workers_refused(tmp_path):
    """With mtls: the server runs jobs for workers whose certificate its CA signed, and refuses
    a worker with no certificate and one whose certificate another CA signed."""
    c, ca = _tls_cluster(
        tmp_path,
        "mtls:{port}:privateKey={key}:certKey={crt}:caCerts={ca}:interface=127.0.0.1",
        True,
    )
    try:
        c.start_worker("good")
        c.wait_workers(["good"])
        with c.client(timeout=60) as client:
            assert client.run("sum", [1, 2, 3, 4], 2) == 10
        c.start_worker("nocert", connect=f"tls:127.0.0.1:{c.port}:trustRoots={ca.roots}")
        rogue = CA(tmp_path / "rogue", "rogue-ca")
        crt, key = rogue.issue("rogue-worker", server=False)
        c.start_worker(
            "rogue",
            connect=f"tls:127.0.0.1:{c.port}:trustRoots={ca.roots}:certificate={crt}:privateKey={key}",
        )
        for name in ("nocert", "rogue"):
            c.wait_log(f"worker-{name}", "Stopping factory", 30)
            assert "registered with server" not in c.log_text(f"worker-{name}")
        with c.client(timeout=30) as client:
            assert {w["name"] for w in client.workers()} == {"good"}
        with pytest.raises(ClusterError):
            BlockingClient(f"tls:127.0.0.1:{c.port}:trustRoots={ca.roots}", timeout=10).ping()
    finally:
        c.stop()


def test_hostile_input_never_hurts_the_server_or_other_jobs(tmp_path):
    """Thousands of malformed and random lines over many connections, while a real job runs:
    the server stays up, its memory stays bounded, and the job's answer is right."""
    c = LocalCluster(tmp_path, server_args=["--max-line", "65536"], env={"PYTHONPATH": SUPPORT})
    try:
        c.start_server()
        for name in ("w1", "w2"):
            c.start_worker(name)
        c.wait_workers()
        rng = random.Random(1234)
        numbers = list(range(8000))
        with c.client(timeout=120) as client:
            job = client.submit("sum", numbers, 200)
            rss_before = _rss_kib(c.server.pid)
            samples = [
                b"\xff\xfe\x00garbage",
                b"RUN sum [" * 50,
                b"RUN sum " + b"[" * 5000 + b"]" * 5000,
                b'{"not":"a verb"}',
                b"DONE {}",
                b'REGISTER {"name":"x"}',
                b"AUTH worker zz",
                b"SUBMIT sum [1] " + b'{"chunks":' + b"9" * 50 + b"}",
                b"x" * 70000,
                b"\r\n\r\n\n",
                b"WAIT " + b"j" * 500,
                bytes(rng.getrandbits(8) for _ in range(300)),
            ]
            sent = 0
            for round_ in range(40):
                conns = [
                    socket.create_connection(("127.0.0.1", c.port), timeout=30) for _ in range(8)
                ]
                for s in conns:
                    payload = b"\n".join(rng.choice(samples) for _ in range(12)) + b"\n"
                    cut = rng.randrange(len(payload))
                    s.sendall(payload[:cut])
                    s.sendall(payload[cut:])
                    sent += 12
                for s in conns:
                    if round_ % 2:
                        s.shutdown(socket.SHUT_WR)
                        s.settimeout(30)
                        while s.recv(65536):
                            pass
                    s.close()
            assert sent >= 3000
            assert client.ping() == "PONG"
            assert client.wait(job) == sum(numbers)
            rss_after = _rss_kib(c.server.pid)
        assert c.server.poll() is None
        assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    finally:
        c.stop()


def test_no_code_from_the_wire(tmp_path):
    """Names a peer sends are looked up in the installed registry only: a module path is not
    imported, and the package never unpickles, evals or execs anything."""
    c = LocalCluster(tmp_path, env={"PYTHONPATH": SUPPORT})
    try:
        c.start_server()
        c.start_worker("w1")
        c.wait_workers()
        with c.client(timeout=30) as client:
            for name in ("os.system", "__import__", "builtins.eval", "antigravity", "../etc"):
                with pytest.raises(RequestRefused) as e:
                    client.run(name, "id", 1)
                assert e.value.code == "UNKNOWN_TASK"
    finally:
        c.stop()
    import clusterd

    root = Path(clusterd.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import pickle", "pickle.loads", "eval(", "exec(", "__import__("):
            assert banned not in text, f"{banned} in {path}"
    assert os.path.exists(root / "tasks" / "registry.py")


def _closed_after(sock: socket.socket, start: float, limit: float) -> float:
    """Read ``sock`` until the server closes it (EOF or reset); seconds since ``start``."""
    sock.settimeout(max(0.1, limit - (time.monotonic() - start)))
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError, OSError) as e:
        if isinstance(e, socket.timeout):
            raise AssertionError(f"still open after {limit}s") from None
    return time.monotonic() - start


@pytest.mark.parametrize("with_secret", [False, True])
def test_tls_peers_that_never_handshake_or_never_auth_are_closed_in_bounded_time(
    tmp_path, with_secret
):
    """On an mtls: listener with --auth-timeout 2, raw TCP sockets that never send a ClientHello
    (with or without secrets), sockets past --max-connections, and (with a secret) TLS peers
    that finish the handshake but never AUTH are all closed by the server within the auth
    timeout plus the 5 s close grace; then a valid client is admitted again."""
    ca = CA(tmp_path / "pki", "clusterd-ca")
    server_crt, server_key = ca.issue("server", server=True)
    crt, key = ca.issue("client", server=False)
    args = ["--auth-timeout", "2", "--max-connections", "8"]
    if with_secret:
        (tmp_path / "client.secret").write_bytes(CLIENT_SECRET)
        (tmp_path / "worker.secret").write_bytes(WORKER_SECRET)
        args += ["--client-secret-file", str(tmp_path / "client.secret")]
        args += ["--worker-secret-file", str(tmp_path / "worker.secret")]
    c = LocalCluster(
        tmp_path / "run",
        server_args=args,
        env={"PYTHONPATH": SUPPORT},
        client_secret=CLIENT_SECRET if with_secret else None,
    )
    (tmp_path / "run").mkdir()
    c.client_address = (
        f"tls:127.0.0.1:{{port}}:trustRoots={ca.roots}:certificate={crt}:privateKey={key}"
    )
    c.start_server(
        listen=f"mtls:{{port}}:privateKey={server_key}:certKey={server_crt}"
        f":caCerts={ca.cert_path}:interface=127.0.0.1"
    )
    socks: list[socket.socket] = []
    try:
        with c.client(timeout=30) as client:
            assert client.ping() == "PONG"
        start = time.monotonic()
        if with_secret:
            context = ssl.create_default_context(cafile=str(ca.cert_path))
            context.load_cert_chain(str(crt), str(key))
            for _ in range(2):  # handshake done, greeting read, never AUTH
                raw = socket.create_connection(("127.0.0.1", c.port), timeout=10)
                tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
                assert tls.recv(4096).startswith(b"HELLO ")
                socks.append(tls)
        while len(socks) < 12:  # no ClientHello ever; the last few are past the limit
            socks.append(socket.create_connection(("127.0.0.1", c.port), timeout=10))
        limit = 2 + 5 + 5  # auth timeout + close grace + slack for a busy machine
        closed = [_closed_after(s, start, limit) for s in socks]
        assert max(closed) < limit, closed
        with c.client(timeout=30) as client:
            assert client.ping() == "PONG"  # every place was given back
    finally:
        for s in socks:
            s.close()
        c.stop()


def test_a_client_flooding_pipelined_requests_does_not_slow_ping(tmp_path):
    """One connection pipelines JOBS and SUBMIT lines without reading a reply: the server stops
    reading it at its backlog, its memory stays bounded, and PING on another connection stays
    fast throughout (bounded: the flood stops when the server stops reading, or after 20 s)."""
    c = LocalCluster(tmp_path, env={"PYTHONPATH": SUPPORT})
    try:
        c.start_server()
        with c.client(timeout=30) as client:
            for n in range(300):  # no worker: they stay queued, and JOBS replies are ~7 KB
                client.submit("sum", [n], 1)
            rss_before = _rss_kib(c.server.pid)
            flood = socket.create_connection(("127.0.0.1", c.port), timeout=2)
            stop = threading.Event()
            sent = [0]

            def flooder() -> None:
                lines = (b"JOBS\n" * 500 + b"SUBMIT sum [1]\n" * 100) * 2
                deadline = time.monotonic() + 20
                try:
                    while not stop.is_set() and time.monotonic() < deadline:
                        flood.sendall(lines)
                        sent[0] += 1200
                except OSError:
                    pass  # the server stopped reading: sendall timed out

            thread = threading.Thread(target=flooder, daemon=True)
            thread.start()
            times = []
            for _ in range(100):
                t0 = time.perf_counter()
                assert client.ping() == "PONG"
                times.append(time.perf_counter() - t0)
                time.sleep(0.02)
            stop.set()
            thread.join(30)
            rss_after = _rss_kib(c.server.pid)
            flood.close()
            assert client.ping() == "PONG"
        times.sort()
        assert sent[0] >= 1200
        assert times[len(times) // 2] < 0.05 and times[-1] < 1.0, times
        assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)
    finally:
        c.stop()


def test_unauthenticated_megabytes_without_newlines_hold_no_memory(secured):
    """Ten unauthenticated connections each sending 15 MiB with no newline: the server's RSS
    stays within 32 MiB of where it started, each gets one ERR LINE_TOO_LONG, and RSS is no
    higher once they have closed."""
    rss_before = _rss_kib(secured.server.pid)
    blob = b"x" * (1 << 20)
    conns = [_raw(secured.port) for _ in range(10)]
    peak = rss_before
    for s, _f, _info in conns:
        for _ in range(15):
            s.sendall(blob)
        peak = max(peak, _rss_kib(secured.server.pid))
    for s, f, _info in conns:
        s.sendall(b"\n")
        assert f.readline().startswith(b"ERR LINE_TOO_LONG ")
    peak = max(peak, _rss_kib(secured.server.pid))
    for s, f, _info in conns:
        f.close()
        s.close()
    with secured.client(timeout=30) as c:
        assert c.ping() == "PONG"
    rss_after = _rss_kib(secured.server.pid)
    assert peak - rss_before < 32 * 1024, (rss_before, peak)
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)
