"""Issue 10 item 12: ``--listen`` binds loopback unless told otherwise, and an exposed server
without both secrets needs an explicit ``--insecure``."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python import usage

from clusterd.endpoints import loopback_default
from clusterd.launch import twistd_path
from clusterd.server.tap import Options, makeService

CLIENT = "c" * 32
WORKER = "w" * 32


class _Reactor(MemoryReactorClock):
    """A memory reactor with the thread pool makeService asks for (never used here)."""

    def getThreadPool(self):
        return None


@pytest.fixture
def no_secret_env(monkeypatch):
    monkeypatch.delenv("CLUSTERD_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("CLUSTERD_WORKER_SECRET", raising=False)
    return monkeypatch


def _options(*argv: str) -> Options:
    o = Options()
    o.parseOptions(["--journal", "none", *argv])
    return o


def _bound_interfaces(options: Options) -> list[tuple[int, str]]:
    reactor = _Reactor()
    service = makeService(options, reactor)
    service.startService()
    try:
        ports = [(port, interface) for port, _f, _b, interface in reactor.tcpServers]
        ports += [(port, interface) for port, _f, _ctx, _b, interface in reactor.sslServers]
        return ports
    finally:
        service.stopService()


def test_tcp_without_interface_binds_loopback(no_secret_env):
    """``--listen tcp:7420`` binds 127.0.0.1, not every interface as Twisted's default would."""
    options = _options("--listen", "tcp:7420")
    assert options["listen"] == ["tcp:7420:interface=127.0.0.1"]
    assert _bound_interfaces(options) == [(7420, "127.0.0.1")]


def test_default_listen_binds_loopback(no_secret_env):
    """With no ``--listen`` at all the server binds tcp 7420 on 127.0.0.1."""
    assert _bound_interfaces(_options()) == [(7420, "127.0.0.1")]


def test_ssl_mtls_and_tcp6_without_interface_get_loopback():
    """``ssl:``, ``mtls:`` and ``tcp6:`` strings without ``interface=`` get a loopback one too."""
    assert loopback_default("ssl:7421:privateKey=k.pem").description.endswith(
        ":interface=127.0.0.1"
    )
    assert loopback_default("mtls:7421:privateKey=k:caCerts=c").description.endswith(
        ":interface=127.0.0.1"
    )
    six = loopback_default("tcp6:7420")
    assert six.description == "tcp6:7420:interface=\\:\\:1" and not six.exposed


@pytest.mark.parametrize(
    "listen",
    ["tcp:7420:interface=0.0.0.0", "tcp:7420:interface=10.1.2.3", "tcp6:7420:interface=\\:\\:"],
)
def test_exposed_interface_without_secrets_is_refused(no_secret_env, listen):
    """A non-loopback interface with no client or worker secret is a usage error naming both."""
    with pytest.raises(usage.UsageError) as e:
        _options("--listen", listen)
    assert "refusing to listen" in str(e.value)
    assert "client and a worker secret" in str(e.value)
    assert "--insecure" in str(e.value)


def test_exposed_interface_with_one_secret_is_refused(no_secret_env, tmp_path):
    """One secret is not enough: the open role could still be taken by anyone."""
    secret = tmp_path / "client.secret"
    secret.write_text(CLIENT)
    with pytest.raises(usage.UsageError, match="without a worker secret"):
        _options("--listen", "tcp:7420:interface=0.0.0.0", "--client-secret-file", str(secret))


def test_exposed_interface_with_both_secrets_binds_it(no_secret_env):
    """With both secrets the server listens on the interface it was given."""
    no_secret_env.setenv("CLUSTERD_CLIENT_SECRET", CLIENT)
    no_secret_env.setenv("CLUSTERD_WORKER_SECRET", WORKER)
    options = _options("--listen", "tcp:7420:interface=0.0.0.0")
    assert _bound_interfaces(options) == [(7420, "0.0.0.0")]


def test_insecure_allows_exposure_and_logs_it_loudly(no_secret_env):
    """``--insecure`` lets an open server listen on 0.0.0.0 and says so at critical level."""
    options = _options("--listen", "tcp:7420:interface=0.0.0.0", "--insecure")
    with capturedLogs() as events:
        assert _bound_interfaces(options) == [(7420, "0.0.0.0")]
    loud = [e for e in events if e["log_level"] is LogLevel.critical]
    assert len(loud) == 1
    assert "INSECURE" in loud[0]["log_format"] and loud[0]["roles"] == "client and worker"


def test_unix_and_unknown_endpoint_types(no_secret_env):
    """unix: sockets need no secret; an endpoint type whose interface clusterd cannot see
    (``systemd:``) is treated as exposed."""
    assert _options("--listen", "unix:/tmp/clusterd-test.sock")["listen"] == [
        "unix:/tmp/clusterd-test.sock"
    ]
    with pytest.raises(usage.UsageError, match="interface unknown"):
        _options("--listen", "systemd:domain=INET:index=0")


def test_twistd_refuses_an_open_exposed_server(tmp_path, no_secret_env):
    """A real ``twistd clusterd-server --listen tcp:0:interface=0.0.0.0`` with no secrets exits
    non-zero with the refusal on stderr, and binds nothing."""
    proc = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "clusterd-server", "--journal", "none",
         "--listen", "tcp:0:interface=0.0.0.0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "refusing to listen on tcp:0:interface=0.0.0.0" in proc.stderr + proc.stdout
    assert "clusterd listening" not in proc.stdout


REPO = Path(__file__).resolve().parents[2]


def _json_command(path: Path, pattern: str) -> list[str]:
    match = re.search(pattern, path.read_text(), re.MULTILINE)
    assert match, f"no {pattern!r} in {path}"
    return json.loads(match.group(1))


def test_container_commands_start_with_the_secrets_they_are_given(no_secret_env):
    """The Dockerfile's and compose.yaml's server commands (0.0.0.0 inside a container) start
    when given the two secrets through the environment, as deploy/ documents, and are refused
    without them."""
    commands = [
        _json_command(REPO / "deploy" / "Dockerfile", r"^CMD (\[.*\])$"),
        _json_command(
            REPO / "deploy" / "compose.yaml", r"^    command: (\[\"clusterd-server\".*\])$"
        ),
    ]
    # The image holds deploy/*.toml at /etc/clusterd/ (the Dockerfile installs them there).
    commands = [[a.replace("/etc/clusterd/", f"{REPO}/deploy/") for a in c] for c in commands]
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    assert "CLUSTERD_CLIENT_SECRET: ${CLUSTERD_CLIENT_SECRET:?" in compose
    assert "CLUSTERD_WORKER_SECRET: ${CLUSTERD_WORKER_SECRET:?" in compose
    assert compose.count("CLUSTERD_SECRET: ${CLUSTERD_WORKER_SECRET:?") == 1  # shared by workers
    for argv in commands:
        assert argv[0] == "clusterd-server"
        with pytest.raises(usage.UsageError, match="refusing to listen"):
            _options(*argv[1:])
    no_secret_env.setenv("CLUSTERD_CLIENT_SECRET", CLIENT)
    no_secret_env.setenv("CLUSTERD_WORKER_SECRET", WORKER)
    for argv in commands:
        assert _options(*argv[1:])["listen"] == ["tcp:7420:interface=0.0.0.0"]


def test_systemd_server_unit_starts_with_its_credentials(no_secret_env, tmp_path):
    """clusterd-server.service's ExecStart, with %d pointing at its two credentials, parses and
    listens on 0.0.0.0; the worker unit passes the worker secret too."""
    unit = (REPO / "deploy" / "clusterd-server.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1)
    for name, secret in (("client.secret", CLIENT), ("worker.secret", WORKER)):
        assert f"LoadCredential={name}:/etc/clusterd/{name}" in unit
        (tmp_path / name).write_text(secret)
    exec_start = exec_start.replace("/etc/clusterd/server.toml", f"{REPO}/deploy/server.toml")
    argv = shlex.split(exec_start.replace("%d", str(tmp_path)).replace("$CLUSTERD_SERVER_ARGS", ""))
    argv = argv[argv.index("clusterd-server") + 1 :]
    options = _options(*argv)
    assert options["listen"] == ["tcp:7420:interface=0.0.0.0"]
    assert set(options.secrets) == {"client", "worker"}
    worker = (REPO / "deploy" / "clusterd-worker@.service").read_text()
    assert "LoadCredential=worker.secret:/etc/clusterd/worker.secret" in worker
    assert '--secret-file "%d/worker.secret"' in worker
