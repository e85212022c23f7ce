"""``--log-level`` and ``--log-format`` (clusterd/logs.py), and how twistd installs them."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger

from clusterd import logs


def test_the_level_filter_drops_events_below_it():
    """At info a debug event is dropped; at error a warning is too; errors always pass."""
    out = io.StringIO()
    log = Logger(namespace="t", observer=logs.make_observer(out, "text", "info"))
    log.debug("connection from {peer}", peer="1.2.3.4")
    log.info("job {job_id} done", job_id="j1")
    assert "connection from" not in out.getvalue() and "job j1 done" in out.getvalue()
    out = io.StringIO()
    log = Logger(namespace="t", observer=logs.make_observer(out, "text", "error"))
    log.warn("w")
    log.error("e {n}", n=1)
    assert out.getvalue().count("\n") == 1 and "e 1" in out.getvalue()


def test_debug_level_shows_debug_events():
    """--log-level debug lets the per-connection line through."""
    out = io.StringIO()
    Logger(observer=logs.make_observer(out, "text", "debug")).debug("connection from {p}", p=1)
    assert "connection from 1" in out.getvalue()


def test_a_json_line_has_the_ids_as_fields():
    """--log-format json: one JSON object per line, each id the log call passed a key."""
    out = io.StringIO()
    log = Logger(namespace="clusterd.x", observer=logs.make_observer(out, "json", "info"))
    log.info(
        "job {job_id} sub-task {subtask} failed on {worker}", job_id="j7", subtask=3, worker="w1"
    )
    log.info("second")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    event = json.loads(lines[0])
    assert (event["job_id"], event["subtask"], event["worker"]) == ("j7", 3, "w1")
    assert event["level"] == "info" and event["log_namespace"] == "clusterd.x"
    assert event["text"] == "job j7 sub-task 3 failed on w1"
    assert json.loads(lines[1])["text"] == "second"


def test_a_json_line_survives_unserializable_fields_and_failures():
    """An object field or a traceback still makes one valid JSON line."""
    out = io.StringIO()
    log = Logger(observer=logs.make_observer(out, "json", "info"))
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("boom {thing}", thing=object())
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["level"] == "critical" and "boom" in event["text"]


class _Twistd(dict):
    """The parts of twistd's ServerOptions that use_for_twistd reads."""


@pytest.mark.parametrize(
    ("parent", "installed"),
    [({"logger": None}, True), ({"logger": "my.factory"}, False), ({"syslog": True}, False)],
)
def test_the_observer_goes_in_twistds_logger_option_unless_the_user_chose(parent, installed):
    """use_for_twistd fills twistd's --logger, but a user's --logger or --syslog wins."""
    from clusterd.server.tap import Options

    options = Options()
    options.parent = _Twistd(parent, nodaemon=True)
    options.parseOptions(["--log-format", "json", "--log-level", "warn"])
    assert (options.parent.get("logger") == "clusterd.logs.observer") is installed


def test_twistd_itself_resolves_the_logger_to_our_observer():
    """Parsed by twistd's own ServerOptions, the plugin's options make twistd log through
    clusterd.logs.observer with the chosen format and level."""
    from twisted.scripts.twistd import ServerOptions

    config = ServerOptions()
    config.parseOptions(["-n", "clusterd-server", "--log-format", "json"])
    assert config["logger"] is logs.observer
    assert logs._chosen["format"] == "json" and logs._chosen["level"] == "info"
