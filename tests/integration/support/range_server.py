"""A static file server for the reference-input tests: ``python range_server.py DIR``
serves DIR with twisted.web's static.File (which answers Range requests with 206) on a
loopback port it prints as ``PORT <n>``. Requests under /flaky/ fail with 500 the first time
each path is asked for, then are served: a worker's failed read is retried."""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web import pages, resource, server, static


class Flaky(resource.Resource):
    """Fails each child path's first request with 500, then serves the file."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = static.File(root)
        self.seen: set[bytes] = set()

    def getChild(self, name: bytes, request: server.Request) -> resource.Resource:  # noqa: N802
        if name not in self.seen:
            self.seen.add(name)
            return pages.errorPage(500, "flaky", "the first try fails")
        return self.root.getChild(name, request)


def main() -> None:
    root = static.File(sys.argv[1])
    root.putChild(b"flaky", Flaky(sys.argv[1]))
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    print(f"PORT {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
