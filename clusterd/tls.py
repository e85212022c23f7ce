"""Mutual TLS for the server: the ``mtls:`` endpoint, whose peers must present a certificate
signed by a given CA.

Twisted's ``ssl:`` server endpoint string cannot demand client certificates, so clusterd adds
its own prefix through an endpoint-parser plugin (``twisted/plugins/clusterd_endpoints.py``),
which keeps ``--listen`` uniform:

    --listen mtls:7421:privateKey=server.key:certKey=server.crt:caCerts=ca.crt[:interface=ADDR]
"""

from __future__ import annotations

from typing import Any

__all__ = ["mutual_tls_server_endpoint"]


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def mutual_tls_server_endpoint(
    reactor: Any,
    port: str,
    privateKey: str,
    certKey: str | None = None,
    caCerts: str | None = None,
    interface: str = "",
    backlog: str = "50",
) -> Any:
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.ssl import Certificate, PrivateCertificate

    if not caCerts:
        raise ValueError("mtls: needs caCerts=<CA certificate file> to check peers against")
    private = PrivateCertificate.loadPEM(_read(privateKey) + b"\n" + _read(certKey or privateKey))
    authority = Certificate.loadPEM(_read(caCerts))
    # options(ca) sets verify=True and requireCertificate=True: no certificate, no connection.
    options = private.options(authority)
    return SSL4ServerEndpoint(reactor, int(port), options, int(backlog), interface)
