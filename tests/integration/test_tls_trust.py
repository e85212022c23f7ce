"""Issue 10 item 13: every certificate of a bundle or of a trust directory is trusted, a worker
or client that cannot verify the server says why, and SECURITY.md's recipe works as written."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tlsutil import CA

from clusterd.client.blocking import BlockingClient
from clusterd.client.errors import ClusterError
from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("clusterd"))
REPO = Path(__file__).resolve().parents[2]


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "--timeout", "20", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _registered(c: LocalCluster, name: str) -> None:
    c.wait_log(f"worker-{name}", "registered with server", 30)


def test_mtls_bundle_trusts_every_ca_in_it(tmp_path):
    """An mtls: caCerts bundle of two CAs admits workers and clients certified by either one
    (it used to trust only the bundle's first certificate)."""
    old, new = CA(tmp_path / "old", "old-ca"), CA(tmp_path / "new", "new-ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.cert_path.read_bytes() + new.cert_path.read_bytes())
    server_crt, server_key = old.issue("server", server=True)
    c = LocalCluster(tmp_path / "run")
    (tmp_path / "run").mkdir()
    try:
        c.start_server(
            listen=f"mtls:{{port}}:privateKey={server_key}:certKey={server_crt}:caCerts={bundle}"
        )
        for name, ca in (("by-old", old), ("by-new", new)):
            crt, key = ca.issue(name, server=False)
            c.start_worker(
                name,
                connect=f"tls:127.0.0.1:{c.port}:trustRoots={old.roots}"
                f":certificate={crt}:privateKey={key}",
            )
        for name in ("by-old", "by-new"):
            _registered(c, name)
        crt, key = new.issue("client", server=False)
        address = (
            f"tls:127.0.0.1:{c.port}:trustRoots={old.roots}:certificate={crt}:privateKey={key}"
        )
        with BlockingClient(address, timeout=20) as client:
            assert {w["name"] for w in client.workers()} == {"by-old", "by-new"}
            assert client.run("sum", [1, 2, 3, 4], 2) == 10
    finally:
        c.stop()


def test_trust_directory_of_crt_files_and_bundle_file(tmp_path):
    """trustRoots naming a directory of .crt files (the server's CA second of two), or a bundle
    file, lets a worker, the blocking client and the CLI verify the server."""
    other, real = CA(tmp_path / "other", "other-ca"), CA(tmp_path / "real", "real-ca")
    roots = tmp_path / "roots"
    roots.mkdir()
    shutil.copy(other.cert_path, roots / "a-other.crt")
    shutil.copy(real.cert_path, roots / "b-real.crt")
    (roots / "README").write_text("not a certificate: skipped\n")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(other.cert_path.read_bytes() + real.cert_path.read_bytes())
    server_crt, server_key = real.issue("server", server=True)
    c = LocalCluster(tmp_path / "run")
    (tmp_path / "run").mkdir()
    try:
        c.start_server(listen=f"ssl:{{port}}:privateKey={server_key}:certKey={server_crt}")
        c.start_worker("dir", connect=f"tls:127.0.0.1:{c.port}:trustRoots={roots}")
        c.start_worker("bundle", connect=f"tls:127.0.0.1:{c.port}:trustRoots={bundle}")
        _registered(c, "dir")
        _registered(c, "bundle")
        for trust in (roots, bundle):
            with BlockingClient(f"tls:127.0.0.1:{c.port}:trustRoots={trust}", timeout=20) as cl:
                assert cl.ping() == "PONG"
            done = _cli(tmp_path, "--server", f"tls:127.0.0.1:{c.port}:trustRoots={trust}", "ping")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "PONG"
    finally:
        c.stop()


def test_worker_and_client_that_cannot_verify_the_server_say_why(tmp_path):
    """A worker whose trust roots do not cover the server's certificate logs the failed
    handshake and OpenSSL's reason; the CLI prints it and exits 3; BlockingClient raises it."""
    server_ca, stranger = CA(tmp_path / "srv", "server-ca"), CA(tmp_path / "str", "stranger-ca")
    server_crt, server_key = server_ca.issue("server", server=True)
    c = LocalCluster(tmp_path / "run")
    (tmp_path / "run").mkdir()
    try:
        c.start_server(listen=f"ssl:{{port}}:privateKey={server_key}:certKey={server_crt}")
        wrong = f"tls:127.0.0.1:{c.port}:trustRoots={stranger.roots}"
        c.start_worker("lost", connect=wrong)
        c.wait_log("worker-lost", "TLS handshake with 127.0.0.1:", 30)
        log = c.log_text("worker-lost")
        assert re.search(
            r"TLS handshake with 127\.0\.0\.1:\d+ failed: certificate verify failed", log
        )
        assert "registered with server" not in log
        done = _cli(tmp_path, "--server", wrong, "ping")
        assert done.returncode == 3
        assert "TLS handshake failed: certificate verify failed" in done.stderr
        assert "Traceback" not in done.stderr
        with pytest.raises(ClusterError, match="TLS handshake with .* failed: certificate verify"):
            BlockingClient(wrong, timeout=20)
        empty = tmp_path / "empty-roots"
        empty.mkdir()
        (empty / "ca.txt").write_bytes(server_ca.cert_path.read_bytes())  # wrong suffix
        done = _cli(tmp_path, "--server", f"tls:127.0.0.1:{c.port}:trustRoots={empty}", "ping")
        assert done.returncode == 3
        assert f"trust directory {empty} holds no certificate" in done.stderr
    finally:
        c.stop()


def _blocks(text: str, heading: str) -> list[str]:
    """The ```sh blocks of one section of a Markdown file, continuation lines joined."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [b.replace("\\\n", " ") for b in blocks]


def _command_lines(block: str) -> list[list[str]]:
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _local(arg: str, port: int | str) -> str:
    """A SECURITY.md endpoint made runnable here: the OS's port, loopback for the host."""
    return (
        arg.replace("server.example", "127.0.0.1")
        .replace("interface=0.0.0.0", "interface=127.0.0.1")
        .replace("7421", str(port))
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_security_md_tls_recipe_works_as_written(tmp_path):
    """SECURITY.md's OpenSSL recipe (``cp ca.crt ca/``) and its ssl:/tls: and mtls: commands,
    run as written with only the port and host name changed, register workers and answer ping."""
    recipe, encrypted, mutual = _blocks((REPO / "SECURITY.md").read_text(), "\n## TLS\n")[:3]
    made = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", recipe],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "ca" / "ca.crt").exists()
    for n, block in enumerate((encrypted, mutual)):
        server, worker, client = _command_lines(block)
        s_args = server[server.index("clusterd-server") + 1 :]
        listen = s_args.pop(s_args.index("--listen") + 1)
        s_args.remove("--listen")
        (tmp_path / "server.log").unlink(missing_ok=True)  # the port is read from it
        c = LocalCluster(tmp_path, server_args=s_args)
        try:
            c.start_server(listen=_local(listen, "{port}"))
            w_args = worker[worker.index("clusterd-worker") + 1 :]
            connect = _local(w_args.pop(w_args.index("--connect") + 1), c.port)
            w_args.remove("--connect")
            c.start_worker(f"doc{n}", connect=connect, extra=w_args)
            _registered(c, f"doc{n}")
            assert client[0] == "clusterd"
            done = _cli(tmp_path, *[_local(a, c.port) for a in client[1:]])
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "PONG"
        finally:
            c.stop()
