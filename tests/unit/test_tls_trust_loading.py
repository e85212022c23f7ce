"""Issue 10 item 13 (unit level): trust loading reads every certificate, and a worker whose
TLS handshake fails says why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tlsutil import CA  # noqa: E402

from clusterd.tls import (  # noqa: E402
    client_endpoint,
    load_certificates,
    mutual_tls_server_endpoint,
    tls_failure_reason,
)
from clusterd.worker.protocol import WorkerFactory  # noqa: E402


@pytest.fixture
def cas(tmp_path):
    return CA(tmp_path / "a", "ca-a"), CA(tmp_path / "b", "ca-b"), CA(tmp_path / "c", "ca-c")


def _cn(x509) -> str:
    return x509.to_cryptography().subject.rfc4514_string().removeprefix("CN=")


def _subjects(certs) -> set[str]:
    return {_cn(c.original) for c in certs}


def test_bundle_file_yields_every_certificate(tmp_path, cas):
    """A bundle file of two CAs gives both, not only the first."""
    a, b, _ = cas
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(a.cert_path.read_bytes() + b"\n" + b.cert_path.read_bytes())
    assert _subjects(load_certificates(str(bundle))) == {"ca-a", "ca-b"}


def test_directory_reads_pem_crt_and_der_cer_files_and_skips_others(tmp_path, cas):
    """A trust directory reads *.pem, *.crt and (DER) *.cer files, each file whole, skips keys
    and other files, and counts a certificate present twice once."""
    a, b, c = cas
    roots = tmp_path / "roots"
    roots.mkdir()
    (roots / "a.crt").write_bytes(a.cert_path.read_bytes())
    (roots / "dup.PEM").write_bytes(a.cert_path.read_bytes() + b.cert_path.read_bytes())
    (roots / "c.cer").write_bytes(c.cert.public_bytes(serialization.Encoding.DER))
    (roots / "server.key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    (roots / "notes.txt").write_text("ignored")
    certs = load_certificates(str(roots))
    assert len(certs) == 3
    assert _subjects(certs) == {"ca-a", "ca-b", "ca-c"}


def test_trust_path_without_certificates_is_an_error(tmp_path, cas):
    """An empty (or *.txt only) directory or a missing path is an error naming it, never a
    silent 'trust nothing'."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ca.txt").write_bytes(cas[0].cert_path.read_bytes())
    with pytest.raises(ValueError, match=f"trust directory {empty} holds no certificate"):
        load_certificates(str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        load_certificates(str(tmp_path / "missing"))


def test_mtls_endpoint_trusts_every_ca_of_its_bundle(tmp_path, cas):
    """mtls: with a two-CA caCerts bundle requires a client certificate and trusts both CAs."""
    a, b, _ = cas
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(a.cert_path.read_bytes() + b.cert_path.read_bytes())
    crt, key = a.issue("server", server=True)
    ep = mutual_tls_server_endpoint(
        MemoryReactorClock(), "0", str(key), str(crt), str(bundle), "127.0.0.1"
    )
    options = ep._sslContextFactory
    assert options.verify and options.requireCertificate
    trusted = {_cn(x) for x in options.trustRoot._caCerts}
    assert trusted == {"ca-a", "ca-b"}


def test_client_endpoint_rejects_an_empty_trust_directory(tmp_path):
    """A tls: string whose trustRoots holds no certificate fails at once, naming it."""
    empty = tmp_path / "ca"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no certificate"):
        client_endpoint(MemoryReactorClock(), f"tls:example.com:7421:trustRoots={empty}")
    assert client_endpoint(MemoryReactorClock(), "tcp:127.0.0.1:7420") is not None


class _Pool:
    def run(self, task, value):  # pragma: no cover - never asked here
        raise AssertionError("no sub-tasks in this test")


def test_worker_logs_why_its_tls_handshake_failed():
    """A connection lost to a TLS error before registering is logged with OpenSSL's reason,
    at the 1st, 2nd and 4th repeat of the same cause, not at every one."""
    factory = WorkerFactory(_Pool(), "w1", ["sum"], 1, clock=Clock())
    verify = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
    assert tls_failure_reason(verify) == "certificate verify failed"
    assert tls_failure_reason(Failure(ConnectionDone())) is None
    with capturedLogs() as events:
        for _ in range(5):
            proto = factory.buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.connectionLost(verify)
    errors = [e for e in events if e["log_level"] is LogLevel.error]
    assert [e["n"] for e in errors] == [1, 2, 4]
    assert all(e["reason"] == "certificate verify failed" for e in errors)
    assert "TLS handshake with {peer} failed" in errors[0]["log_format"]


def test_worker_with_an_empty_trust_directory_stops_with_a_clear_message(tmp_path):
    """twistd clusterd-worker --connect tls:...:trustRoots=<no certificates> exits naming the
    directory, instead of retrying forever in silence."""
    from clusterd.worker.tap import Options, makeService

    empty = tmp_path / "ca"
    empty.mkdir()
    (empty / "ca.txt").write_text("not read")
    options = Options()
    options.parseOptions(["--connect", f"tls:127.0.0.1:7421:trustRoots={empty}", "--slots", "1"])
    with pytest.raises(SystemExit, match=f"trust directory {empty} holds no certificate"):
        makeService(options, MemoryReactorClock())
