# twistd and serverFromString import this while scanning: keep it to the plugin declaration.
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _MutualTLS:
    """``mtls:PORT:privateKey=K:certKey=C:caCerts=CA``: TLS that requires a client certificate
    signed by CA (see clusterd/tls.py and SECURITY.md)."""

    prefix = "mtls"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from clusterd.tls import mutual_tls_server_endpoint

        return mutual_tls_server_endpoint(reactor, *args, **kwargs)


clusterdMutualTLS = _MutualTLS()
