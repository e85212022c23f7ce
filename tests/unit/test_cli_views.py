"""The CLI for people: tables rendered to text, human times, endpoint strings, usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from clusterd.client import views
from clusterd.client.blocking import endpoint_string, parse_address
from clusterd.options import load_tasks

CLI = str(Path(sys.executable).with_name("clusterd"))

JOBS = [
    {"id": "j12", "task": "primes", "state": "running", "done": 3, "total": 32},
    {"id": "j11", "task": "sum", "state": "done", "done": 2, "total": 2},
]
WORKERS = [
    {"name": "w-long-name", "address": "127.0.0.1:5555", "tasks": ["sum"], "slots": 4,
     "busy": 2, "prefetched": 1, "done": 40, "failed": 0, "draining": False,
     "connected": 1000.0},
]  # fmt: skip


def test_human_durations_and_ages():
    """Durations and ages read as people say them, from milliseconds to days."""
    assert views.duration(0.25) == "250 ms"
    assert views.duration(42) == "42 s"
    assert views.duration(200) == "3 min 20 s"
    assert views.duration(120) == "2 min"
    assert views.duration(2 * 3600 + 5 * 60 + 7) == "2 h 5 min"
    assert views.duration(3 * 86400 + 4 * 3600) == "3 d 4 h"
    assert views.ago(997.0, now=1000.0) == "3 s ago"
    assert views.ago(1000.0, now=1000.2) == "just now"
    assert views.ago(None) == "-"


def test_plain_tables_are_aligned_without_escapes_or_boxes():
    """Off a terminal a table is plain aligned columns: no escape codes, no box drawing, no
    trailing blanks."""
    text = views.render(views.jobs_table(JOBS, terminal=False), terminal=False)
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATE", "PROGRESS"]
    assert lines[1].split() == ["j12", "primes", "running", "3/32", "9%"]
    assert lines[2].split() == ["j11", "sum", "done", "2/2", "100%"]
    assert lines[0].index("TASK") == lines[1].index("primes") == lines[2].index("sum")
    assert "\x1b" not in text and not any(c in text for c in "─│┃━")
    assert all(line == line.rstrip() for line in lines)


def test_terminal_tables_have_colour_and_a_rule():
    """On a terminal a table gets bold headers, coloured states and a header rule."""
    text = views.render(views.jobs_table(JOBS, terminal=True), terminal=True, width=80)
    assert "\x1b[" in text and "─" in text and "j12" in text


def test_workers_and_stats_tables_show_human_times():
    """WORKERS shows slot use and when each connected; STATS shows uptime as a duration."""
    text = views.render(views.workers_table(WORKERS, False, now=1003.0), False)
    row = text.splitlines()[1].split()
    assert row[:4] == ["w-long-name", "127.0.0.1:5555", "2/4", "1"]
    assert "3 s ago" in text and "ready" in text
    stats = views.render(views.stats_table({"jobs_done": 3, "journal": True, "uptime": 200}), False)
    assert stats.splitlines()[1:] == [
        "jobs_done           3",
        "journal           yes",
        "uptime     3 min 20 s",
    ]


def test_top_view_renders_at_a_fixed_width():
    """The top screen (summary, workers, jobs) renders into a fixed-width console."""
    stats = {"uptime": 65, "workers": 1, "slots": 4, "slots_busy": 2, "jobs_active": 1}
    text = views.render(views.top_view(WORKERS, JOBS, stats, False, now=1003.0), False)
    assert text.startswith("up 1 min 5 s  workers 1  slots 2/4 busy")
    assert "Workers" in text and "Jobs (newest first)" in text and "j12" in text


def test_bare_host_port_is_a_tcp_endpoint_for_every_client():
    """A bare HOST:PORT (or HOST) means tcp:HOST:PORT; Twisted's own strings pass unchanged."""
    assert endpoint_string("127.0.0.1:7420") == "tcp:127.0.0.1:7420"
    assert endpoint_string("example.org") == "tcp:example.org:7420"
    for s in ("tcp:127.0.0.1:7420", "unix:/tmp/s", "tls:h:1:trustRoots=d", "tcp:host=h:port=1"):
        assert endpoint_string(s) == s
    from clusterd.tls import client_endpoint

    ep = client_endpoint(MemoryReactorClock(), endpoint_string("127.0.0.1:7420"))
    assert (ep._host, ep._port) == ("127.0.0.1", 7420)
    assert parse_address("127.0.0.1:7420")[1] == ("127.0.0.1", 7420)


@pytest.mark.parametrize("address", ["nosuch:thing", "tcp:127.0.0.1", "tcp:h:port"])
def test_bad_server_address_is_a_usage_error(address):
    """A --server the clients cannot read exits 2 with one line naming it, before connecting."""
    done = subprocess.run(
        [CLI, "--server", address, "ping"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"bad server address {address!r}" in done.stderr


def test_tasks_module_error_says_what_was_tried():
    """A --tasks module that cannot be imported is one line naming it and sys.path."""
    with pytest.raises(SystemExit) as info:
        load_tasks(["no_such_tasks_module_xyz"])
    message = str(info.value.code)
    assert "\n" not in message
    assert "--tasks no_such_tasks_module_xyz" in message and "sys.path:" in message
    assert sys.path[1] in message


def test_job_progress_bar_shows_subtasks_and_eta_on_a_terminal_only():
    """The job bar (rich Progress) shows sub-tasks done of total on a terminal; nothing when
    disabled."""
    import io

    from rich.console import Console

    from clusterd.client.cli_input import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out, True, Console(file=out, force_terminal=True, width=120))
    bar.update("j7", {"done": 3, "total": 8})
    bar.update("j7", {"done": 8, "total": 8})
    bar.close()
    import re

    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "j7" in shown and "3/8 sub-tasks" in shown and "8/8 sub-tasks" in shown
    silent = io.StringIO()
    quiet = ProgressBar(silent, False)
    quiet.update("j7", {"done": 1, "total": 2})
    quiet.close()
    assert silent.getvalue() == ""


def test_bad_tls_address_syntax_is_a_usage_error():
    """A tls: address without HOST:PORT is exit 2; its trust directory is read only when
    connecting."""
    done = subprocess.run(
        [CLI, "--server", "tls:127.0.0.1", "ping"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "bad server address" in done.stderr


def test_twistd_says_what_tasks_failed_in_one_line_without_the_usage_text(tmp_path):
    """twistd with a --tasks module that cannot be imported exits 1 with one line on stderr,
    not its usage text."""
    from clusterd.launch import twistd_path

    done = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "clusterd-server", "--tasks", "no_such_mod_q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--tasks no_such_mod_q" in lines[0], done.stderr
    assert "Usage:" not in done.stdout + done.stderr


class _FollowClient:
    """A client whose WAIT/WATCH never answer, so only Ctrl-C can end the command."""

    def wait(self, job):
        from twisted.internet.defer import Deferred

        return Deferred()

    watch = lambda self, job, on_progress: self.wait(job)  # noqa: E731


class _InlineReactor:
    def callFromThread(self, f, *a):
        f(*a)


@pytest.mark.parametrize("command", ["watch", "wait"])
def test_ctrl_c_during_watch_or_wait_says_the_job_goes_on_and_exits_130(command, capsys):
    """Ctrl-C during `watch`/`wait` leaves the job running, says how to cancel it, exits 130."""
    import argparse
    import os
    import signal

    from twisted.internet.defer import Deferred

    from clusterd.client import cli

    before = signal.getsignal(signal.SIGINT)
    try:
        args = argparse.Namespace(command=command, job="j7")
        d = Deferred.fromCoroutine(cli._follow(_FollowClient(), args, _InlineReactor()))
        assert not d.called
        os.kill(os.getpid(), signal.SIGINT)
        assert d.result == 130
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert "job j7 goes on on the server" in err and "clusterd cancel j7" in err
