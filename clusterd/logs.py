"""The log observer twistd uses for the server and the worker: ``--log-level`` and ``--log-format``.

How it is installed, and why this way: twistd builds its log observer in ``AppLogger.start``,
after the plugin's options are parsed and its service made, from twistd's own ``--logger``
option (a dotted name of a factory called with no arguments) if given, else from the
application's ``ILogObserver`` component, else from ``--logfile``. The plugin's options cannot
reach the application, but they are parsed as a sub-command of twistd's options, before those
finish: so :func:`use_for_twistd` fills twistd's ``logger`` option with ``clusterd.logs.observer``
(unless the user gave ``--logger`` or ``--syslog``, which then win), and twistd itself imports
and installs it through ``globalLogBeginner.beginLoggingTo``, from the very first event (the
"twistd starting up" line is already JSON). The observer writes where twistd would have: the
``--logfile`` file, else stdout with ``-n``, else ``twistd.log``.

Text is twistd's own format. JSON is one object per line (no record separator, so ``json.loads``
of each line works), with every field of the event as a key (``job_id``, ``worker``, ``peer``...
as the log calls pass them), Twisted's ``log_*`` keys (so ``eventFromJSON`` reads it back), and
``level`` and ``text`` (the formatted message) for people grepping. Below ``--log-level`` events
are dropped before they are formatted, so the per-connection debug line costs nothing at the
default ``info``.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    eventAsJSON,
    formatEvent,
    textFileLogObserver,
)

__all__ = ["observer", "make_observer", "json_line", "use_for_twistd"]

# What use_for_twistd chose, for observer(), which twistd calls with no arguments.
_chosen: dict[str, Any] = {}


def use_for_twistd(options: Any) -> bool:
    """Have twistd log through :func:`observer` with ``options``' level and format; True if
    so. Does nothing outside twistd (no ``parent``) or when twistd's own ``--logger`` or
    ``--syslog`` was given."""
    parent = getattr(options, "parent", None)
    if parent is None or not hasattr(parent, "get"):
        return False
    if parent.get("logger") or parent.get("syslog"):
        return False
    _chosen.clear()
    _chosen.update(
        level=options["log-level"],
        format=options["log-format"],
        logfile=parent.get("logfile"),
        nodaemon=bool(parent.get("nodaemon")),
    )
    parent["logger"] = "clusterd.logs.observer"
    return True


def observer() -> ILogObserver:
    """The observer twistd installs (its ``--logger`` factory), as :func:`use_for_twistd` chose."""
    return make_observer(
        _out_file(_chosen.get("logfile"), _chosen.get("nodaemon", True)),
        _chosen.get("format", "text"),
        _chosen.get("level", "info"),
        batch=True,
    )


def make_observer(out: IO[str], fmt: str, level: str, batch: bool = False) -> ILogObserver:
    """Events at ``level`` or above, written to ``out`` as ``fmt`` (``text`` or ``json``);
    ``batch``: text lines are written in batches on the reactor (server/fastlog.py)."""
    if fmt == "json":
        inner: ILogObserver = FileLogObserver(out, json_line)
    else:
        from clusterd.server.fastlog import speed_up_text_logs

        inner = textFileLogObserver(out)
        speed_up_text_logs(LogPublisher(inner), batch=batch)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(inner, [predicate])


def json_line(event: dict[str, Any]) -> str:
    """One event as one line of JSON: its fields, ``level`` and ``text``."""
    fields = dict(event)
    level = event.get("log_level")
    fields["level"] = level.name if level is not None else None
    fields["text"] = formatEvent(event)
    return eventAsJSON(fields) + "\n"


def _out_file(logfile: str | None, nodaemon: bool) -> IO[str]:
    """Where twistd's own observer would write (``UnixAppLogger._getLogObserver``)."""
    if logfile == "-" or (not logfile and nodaemon):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile or "twistd.log")  # type: ignore[return-value]
