# twistd imports this file while scanning for plugins: it must import nothing but the ServiceMaker.
from twisted.application.service import ServiceMaker

clusterdServer = ServiceMaker(
    "clusterd server",
    "clusterd.server.tap",
    "Run a clusterd server: accepts workers and client jobs.",
    "clusterd-server",
)
