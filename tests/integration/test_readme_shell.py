"""The README's "Usage" shell lines run as written: its twistd server and worker commands, its
``nc`` conversation, and every ``clusterd`` command line, against the cluster those commands
start. Only the port (to a free one), the shared directory ``/shared`` (to a temporary one) and
the example job id (to the one printed) are changed; its ``pip install .`` is this test run's
own install."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterd.launch import OutputWatch

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent


def usage_section() -> str:
    """The README's "## Usage" section, up to the next heading."""
    text = README.read_text()
    return text.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]


def blocks(section: str, lang: str) -> list[str]:
    """The fenced blocks of ``section`` in language ``lang`` ("" for unlabelled), read fence by
    fence so that a block's closing fence never opens another."""
    found, current, open_lang = [], [], None
    for line in section.splitlines():
        if line.startswith("```"):
            if open_lang is None:
                open_lang, current = line[3:].strip(), []
            else:
                if open_lang == lang:
                    found.append("\n".join(current) + "\n")
                open_lang = None
        elif open_lang is not None:
            current.append(line)
    return found


def command_lines(block: str) -> list[str]:
    """A shell block's commands, comments stripped (a ``#`` after two spaces starts one)."""
    out = []
    for line in block.splitlines():
        line = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay_nc(port: int, transcript: str) -> None:
    """Send the transcript's typed lines (those after a server line) and compare every reply."""
    lines = transcript.splitlines()
    assert lines[0].startswith("$ nc 127.0.0.1 7420")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rwb")
        for line in lines[1:]:
            if line.split(" ", 1)[0] in ("HELLO", "RESULT", "OK", "ERR"):
                got = f.readline().decode().rstrip("\n")
                assert got == line, (got, line)
            else:
                f.write(line.encode() + b"\n")
                f.flush()


def test_the_usage_section_runs_as_written(tmp_path):
    """Every line of the README's Usage section works: the server and worker start, the nc
    conversation gets the replies shown, and each clusterd command exits 0 with its output."""
    section = usage_section()
    start, clis = (command_lines(b) for b in blocks(section, "sh")[:2])
    assert start[0] == "pip install ." and len(start) == 3
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env["CLUSTERD_SERVER"] = f"tcp:127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "corpus.txt").write_text("to be or not to be\n" * 500)

    def spawn(name: str, line: str, pattern: str) -> None:
        proc = subprocess.Popen(
            line.replace("7420", str(port)).replace("/shared", str(shared)),
            shell=True,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        watch = OutputWatch(proc, tmp_path / f"{name}.log", name, {"ready": re.compile(pattern)})
        watch.wait("ready", 1, time.monotonic() + 60, f"the README's {name} to start")

    try:
        spawn("server", start[1], r"clusterd listening on")
        spawn("worker", start[2], r"registered with server .* as ")
        replay_nc(port, blocks(section, "")[0])
        run_cli_lines(clis, tmp_path, env, port)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def run_cli_lines(lines: list[str], cwd: Path, env: dict[str, str], port: int) -> None:
    """Run each clusterd line; the files they name exist (``200MB.txt`` is 3 MB here, still
    over the 1 MiB that makes the CLI stream it), the job id of ``submit`` replaces ``j4``."""
    words = "the quick brown fox jumps over the lazy dog\n"
    (cwd / "big.txt").write_text(words * 1000)
    (cwd / "200MB.txt").write_text(words * 70_000)
    outputs: dict[str, str] = {}
    job = "j4"
    for line in lines:
        line = line.replace("127.0.0.1:7420", f"127.0.0.1:{port}").replace("j4", job)
        line = line.replace("/shared", str(cwd / "shared"))
        if line == "clusterd top":
            outputs[line] = interrupt_top(line, cwd, env)
            continue
        run = subprocess.run(
            line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, (line, run.stdout, run.stderr)
        outputs[line] = run.stdout
        if line.startswith("clusterd submit"):
            job = run.stdout.strip()
            assert re.fullmatch(r"j\d+", job)
    by_start = {k.split("  ")[0]: v for k, v in outputs.items()}
    assert by_start['clusterd run primes \'{"start":0,"stop":1000000}\' --chunks 32'].strip() == (
        "78498"
    )
    assert '"the":2000' in by_start["clusterd run wordcount --file big.txt --chunks 64"]
    assert '"the":140000' in by_start["clusterd run wordcount --file 200MB.txt"]
    by_ref = next(v for k, v in outputs.items() if "--input-ref" in k)
    assert '"to":1000' in by_ref and '"be":1000' in by_ref
    assert by_start["echo '[5,3,9,1]' | clusterd run sort"].strip() == "[1,3,5,9]"
    watched = next(v for k, v in outputs.items() if k.startswith("clusterd watch"))
    assert "[1,1,1,1]" in watched
    workers = next(v for k, v in outputs.items() if k.startswith("clusterd -s"))
    assert "0/2" in workers and "ready" in workers  # the README worker: --slots 2, idle


def interrupt_top(line: str, cwd: Path, env: dict[str, str]) -> str:
    """``clusterd top`` runs until Ctrl-C: wait for its first screen, send SIGINT, expect 0."""
    proc = subprocess.Popen(
        shlex.split(line), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    watch = OutputWatch(proc, cwd / "top.log", "top", {"screen": re.compile(r"(?i)workers")})
    try:
        watch.wait("screen", 1, time.monotonic() + 60, "clusterd top's first screen")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0
    return (cwd / "top.log").read_text()
