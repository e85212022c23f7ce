"""At the default log level a CLI connection writes no line (issue 12 item 6)."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from clusterd import logs
from clusterd.core.auth import proof
from clusterd.core.scheduler import Scheduler
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.testing import LineConn

SECRETS = {"client": b"c" * 32, "worker": b"w" * 32}


def test_a_client_connection_logs_nothing_at_info():
    """Connecting, authenticating and asking STATS logs only debug events, so the default
    --log-level info writes nothing for it; debug shows the connection and the AUTH."""
    clock = Clock()
    core = Scheduler(Registry(TASKS), clock)
    factory = ServerFactory(core, settings=ConnectionSettings(secrets=SECRETS), clock=clock)
    with capturedLogs() as events:
        conn = LineConn(factory, "10.0.0.9", 4321)
        nonce = conn.proto.auth.nonce
        assert conn.ask(f"AUTH client {proof(SECRETS['client'], nonce, 'client')}") == [
            "OK AUTHENTICATED client"
        ]
        assert conn.ask("STATS")[0].startswith("OK {")
        conn.lose()
    mine = [e for e in events if "10.0.0.9" in str(e.get("peer", ""))]
    assert mine and all(e["log_level"] == LogLevel.debug for e in mine)
    for level, expected in (("info", 0), ("debug", len(mine))):
        out = io.StringIO()
        observer = logs.make_observer(out, "text", level)
        for event in mine:
            observer(dict(event))
        assert out.getvalue().count("10.0.0.9") == expected
