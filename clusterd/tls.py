"""TLS for clusterd: the server's ``mtls:`` endpoint, the worker's and client's ``tls:``
endpoint, and the certificate loading both share.

Twisted's ``ssl:`` server endpoint string cannot demand client certificates, so clusterd adds
its own prefix through an endpoint-parser plugin (``twisted/plugins/clusterd_endpoints.py``),
which keeps ``--listen`` uniform:

    --listen mtls:7421:privateKey=server.key:certKey=server.crt:caCerts=ca.crt[:interface=ADDR]

Trust is loaded here rather than by Twisted because Twisted's ``tls:`` client parser reads only
``*.pem`` files of a ``trustRoots`` directory, silently (a ``ca.crt`` copied there is ignored,
and the worker then never registers and says nothing), and ``Certificate.loadPEM`` keeps only
the first certificate of a bundle. Here every certificate in a bundle file, or in every
``*.pem``/``*.crt``/``*.cer`` file of a directory, is trusted, and a trust path that holds no
certificate at all is an error at start rather than a silent "trust nothing".
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CERT_SUFFIXES",
    "client_endpoint",
    "load_certificates",
    "mutual_tls_server_endpoint",
    "tls_failure_reason",
    "trust_root",
]

CERT_SUFFIXES = (".pem", ".crt", ".cer")


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _certificates_in(data: bytes, path: str) -> list[Any]:
    """Every certificate in one file: all PEM blocks, or one DER certificate (``.cer``)."""
    from cryptography import x509

    if b"-----BEGIN" in data:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            return []  # a key or a CSR that happens to sit in the directory
        try:
            return list(x509.load_pem_x509_certificates(data))
        except ValueError as e:
            raise ValueError(f"cannot read the certificates in {path}: {e}") from None
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise ValueError(f"{path} holds no PEM or DER certificate: {e}") from None


def load_certificates(path: str) -> list[Any]:
    """Every certificate (``twisted.internet.ssl.Certificate``) in ``path``: a bundle file, or
    a directory whose ``*.pem``, ``*.crt`` and ``*.cer`` files are read (other files are
    skipped, like keys beside them). Raises ValueError, naming the path, when there is none."""
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate

    if os.path.isdir(path):
        files = [
            os.path.join(path, name)
            for name in sorted(os.listdir(path))
            if name.lower().endswith(CERT_SUFFIXES) and os.path.isfile(os.path.join(path, name))
        ]
    elif os.path.exists(path):
        files = [path]
    else:
        raise ValueError(f"trust path {path} does not exist")
    found: dict[bytes, Any] = {}
    for name in files:
        try:
            data = _read(name)
        except OSError as e:
            raise ValueError(f"cannot read {name}: {e.strerror}") from None
        for cert in _certificates_in(data, name):
            found.setdefault(cert.fingerprint(_sha256()), cert)
    if not found:
        what = "directory" if os.path.isdir(path) else "file"
        raise ValueError(
            f"trust {what} {path} holds no certificate"
            + (" (read: *.pem, *.crt, *.cer)" if what == "directory" else "")
        )
    return [Certificate(crypto.X509.from_cryptography(c)) for c in found.values()]


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def trust_root(path: str) -> Any:
    """A Twisted trust root (``IOpenSSLTrustRoot``) trusting every certificate in ``path``."""
    from twisted.internet.ssl import trustRootFromCertificates

    return trustRootFromCertificates(load_certificates(path))


def mutual_tls_server_endpoint(
    reactor: Any,
    port: str,
    privateKey: str,
    certKey: str | None = None,
    caCerts: str | None = None,
    interface: str = "",
    backlog: str = "50",
) -> Any:
    """``mtls:``: TLS whose peers must present a certificate signed by one of the CAs in
    ``caCerts`` (a bundle file or a directory: every certificate in it is trusted)."""
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.ssl import PrivateCertificate

    if not caCerts:
        raise ValueError("mtls: needs caCerts=<CA certificate file> to check peers against")
    private = PrivateCertificate.loadPEM(_read(privateKey) + b"\n" + _read(certKey or privateKey))
    # options(*cas) sets a trust root, hence verify=True and requireCertificate=True: no
    # certificate, no connection.
    options = private.options(*load_certificates(caCerts))
    return SSL4ServerEndpoint(reactor, int(port), options, int(backlog), interface)


def _private_certificate(certificate: str | None, private_key: str | None) -> Any:
    from twisted.internet.ssl import Certificate, KeyPair, PrivateCertificate

    if certificate is None:
        return None
    data = _read(certificate)
    if private_key is None:
        return PrivateCertificate.loadPEM(data)
    return PrivateCertificate.fromCertificateAndKeyPair(
        Certificate.loadPEM(data), KeyPair.load(_read(private_key), 1)
    )


def _tls_client_endpoint(
    reactor: Any,
    host: str,
    port: str,
    timeout: str = "30",
    bindAddress: str | None = None,
    certificate: str | None = None,
    privateKey: str | None = None,
    trustRoots: str | None = None,
    endpoint: str | None = None,
) -> Any:
    """Twisted's ``tls:`` client endpoint (same arguments, host name checked against the
    certificate), with ``trustRoots`` read by :func:`trust_root`."""
    from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
    from twisted.internet.ssl import optionsForClientTLS

    options = optionsForClientTLS(
        host,
        trustRoot=None if trustRoots is None else trust_root(trustRoots),
        clientCertificate=_private_certificate(certificate, privateKey),
    )
    if endpoint is not None:
        inner = clientFromString(reactor, endpoint)
    else:
        inner = HostnameEndpoint(
            reactor,
            host.encode("idna"),
            int(port),
            int(timeout),
            None if bindAddress is None else (bindAddress, 0),
        )
    return wrapClientTLS(options, inner)


def client_endpoint(reactor: Any, description: str) -> Any:
    """A client endpoint from an endpoint string, as ``clientFromString`` builds it, except
    that ``tls:`` strings load their ``trustRoots`` with :func:`trust_root` (every certificate
    of every ``*.pem``/``*.crt``/``*.cer`` file, or of a bundle file). Raises ValueError on a
    bad string or trust path, naming it."""
    from twisted.internet.endpoints import _parse, clientFromString

    args, kwargs = _parse(description)
    if args and str(args[0]).lower() == "tls":
        try:
            return _tls_client_endpoint(reactor, *args[1:], **kwargs)
        except TypeError as e:
            raise ValueError(f"bad tls: endpoint {description!r}: {e}") from None
    return clientFromString(reactor, description)


def tls_failure_reason(reason: Any) -> str | None:
    """Why a TLS handshake failed, in OpenSSL's words ("certificate verify failed"), when the
    failure (a Failure or exception) is a TLS error; None for any other."""
    from OpenSSL import SSL

    exc = getattr(reason, "value", reason)
    if not isinstance(exc, SSL.Error):
        return None
    texts = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            texts.append(str(entry[-1]))
    return "; ".join(t for t in texts if t) or str(exc) or type(exc).__name__
