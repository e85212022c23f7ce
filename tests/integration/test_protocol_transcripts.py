"""Every transcript of docs/PROTOCOL.md §7 ("Transcripts you can replay"), replayed against real
twistd processes started with the flags its setup block gives (free ports for the doc's, scratch
directories under tmp_path for /tmp/cd*), and every reply compared with the doc after the
normalisation written down in transcripts.py. One case per ``### `` section, in doc order;
sections without their own setup share the main cluster, so job ids match the doc exactly."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from transcripts import Case, Proc, normalise, option, section7, setup_commands, without

from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration

INTRO, CASES = section7()
SUPPORT = Path(__file__).parent / "support"
TIMEOUT = 30.0  # bound on every read and every wait
_DOC_PATH = re.compile(r"/tmp/cd\d*")
_TIMED = re.compile(r"^\s*\d+\.\d ([WC])([<>]) (.*)$")


class Conn:
    """A loopback socket speaking lines, with a bounded read."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""
        self.hello = self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def read_to_end(self) -> list[str]:
        while chunk := self.sock.recv(65536):
            self.buf += chunk
        return self.buf.decode("utf-8", "replace").splitlines()

    def close(self) -> None:
        self.sock.close()


class Env:
    """The processes of every setup block, and the doc → local substitutions (ports, paths)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.main: LocalCluster | None = None
        self.own: list[LocalCluster] = []  # the current section's own cluster
        self.helpers: list[subprocess.Popen[str]] = []
        self.subst: dict[str, str] = {}

    def local(self, text: str) -> str:
        """``text`` with the doc's ports and scratch directories replaced by this run's."""
        for doc, here in self.subst.items():
            text = re.sub(rf"(?<![\w.]){re.escape(doc)}(?![\w])", here, text)
        return text

    def cluster_for(self, case: Case) -> LocalCluster:
        """The cluster a case runs on: its own (the previous own one stopped first), or the
        main one of §7's opening block."""
        if case.setup:
            self.stop_own()
            cluster = self.build(case.setup, case.title)
            self.own.append(cluster)
            return cluster
        if self.main is None:
            self.main = self.build(INTRO, "main")
        return self.main

    def build(self, blocks: list[str], name: str) -> LocalCluster:
        """Run a setup: its shell lines, a web server for ``twistd web``, then the server and
        workers with the doc's flags. An unknown line fails the case."""
        workdir = self.root / re.sub(r"\W+", "-", name)
        workdir.mkdir()
        procs: list[Proc] = []
        for block in blocks:
            more, shell = setup_commands(block)
            procs += more
            for line in shell:
                workdir = self.shell(line, workdir)
        cluster: LocalCluster | None = None
        for p in procs:
            cluster = self.start(p, cluster, workdir)
        assert cluster is not None, f"setup of {name!r} starts no clusterd-server"
        if cluster.workers:
            cluster.wait_workers()
        return cluster

    def shell(self, line: str, workdir: Path) -> Path:
        m = re.fullmatch(r"mkdir -p (/tmp/cd\d*) && cd \1", line)
        if m:
            here = self.root / Path(m.group(1)).name
            here.mkdir(exist_ok=True)
            self.subst[m.group(1)] = str(here)
            return here
        if re.match(r"(printf|seq) .*> \S+(\s+#.*)?$", line):
            subprocess.run(["bash", "-c", self.local(line)], cwd=workdir, check=True, timeout=10)
        elif not re.fullmatch(r"sleep \d+", line):  # readiness is waited for, not slept
            pytest.fail(f"setup line the harness cannot run: {line}")
        return workdir

    def start(self, p: Proc, cluster: LocalCluster | None, workdir: Path) -> LocalCluster | None:
        if p.plugin == "web":  # twisted.web static files on a free port instead of the doc's
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(SUPPORT / "range_server.py"),
                    self.local(option(p.args, "--path")),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.helpers.append(proc)
            port = proc.stdout.readline().split()[1]
            self.subst[option(p.args, "--listen").split(":")[1]] = port
        elif p.plugin == "clusterd-server":
            listen = option(p.args, "--listen")
            cluster = LocalCluster(workdir, server_args=without(p.args, "--listen"))
            cluster.start_server(listen=re.sub(r"^tcp:\d+", "tcp:{port}", listen))
            self.subst[listen.split(":")[1]] = str(cluster.port)
        elif p.plugin == "clusterd-worker" and cluster is not None:
            extra = [self.local(a) for a in without(p.args, "--connect", "--slots", "--name")]
            cluster.start_worker(
                option(p.args, "--name"), int(option(p.args, "--slots", "1")), extra
            )
        else:
            pytest.fail(f"setup the harness cannot start: {p}")
        return cluster

    def stop_own(self) -> None:
        while self.own:
            self.own.pop().stop()

    def close(self) -> None:
        self.stop_own()
        if self.main is not None:
            self.main.stop()
        for proc in self.helpers:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The clusters of every case, kept for the whole module so cases share them in order."""
    e = Env(tmp_path_factory.mktemp("transcripts"))
    yield e
    e.close()


def check(got: str, want: str, where: str) -> None:
    """One reply line against the doc's, after normalisation."""
    assert normalise(got) == normalise(want), f"{where}\n got: {got}\nwant: {want}"


class Replay:
    """Replays a case's transcript blocks on its cluster."""

    def __init__(self, env: Env, cluster: LocalCluster, title: str) -> None:
        self.env, self.cluster, self.title = env, cluster, title
        self.conns: dict[str, Conn] = {}
        self.cur: Conn | None = None
        self.later = False  # a "… later" comment: the next request waits for the doc's state
        self.last_status: dict | None = None  # the doc's last STATUS reply, once matched
        self.stopped = False  # the workers are SIGSTOPped across a restart

    def connect(self, name: str) -> Conn:
        conn = self.conns[name] = Conn(self.cluster.port)
        return conn

    def run(self, blocks: list[str]) -> None:
        try:
            for n, block in enumerate(blocks):
                lines = [self.env.local(x) for x in block.splitlines()]
                if lines and all(_TIMED.match(x) or x.startswith("#") for x in lines):
                    self.timed(lines, n)
                else:
                    self.plain(lines, n)
                self.close_all()
        finally:
            self.close_all()
            if self.stopped:  # a restart that failed half-way: the next case needs the workers
                self.resume()

    def resume(self) -> None:
        for proc in self.cluster.workers.values():
            proc.send_signal(signal.SIGCONT)
        self.stopped = False
        self.cluster.wait_workers(timeout=TIMEOUT)

    def close_all(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.cur = None

    def plain(self, lines: list[str], n: int) -> None:
        """A block of ``> `` requests, replies, ``$`` commands and ``#`` comments."""
        self.cur = None
        i = 0
        while i < len(lines):
            line, where = lines[i], f"{self.title} block {n} line {i + 1}: {lines[i]}"
            i += 1
            if line.startswith("$ "):
                i = self.command(line[2:], lines, i, where)
            elif line.startswith("#"):
                self.comment(line)
            elif line.startswith("> "):
                self.request(line[2:], lines[i] if i < len(lines) else None)
            else:
                if self.cur is None:
                    self.cur = self.connect(f"block{n}")
                check(self.cur.readline(), line, where)
                if line.startswith('OK {"id":'):
                    self.last_status = json.loads(line[3:])

    def request(self, text: str, following: str | None) -> None:
        if self.cur is None:
            self.cur = self.connect("default")
        if self.later:
            self.later = False
            self.settle(text, following)
        self.cur.send(text.replace("<TAB>", "\t").encode() + b"\n")

    def command(self, cmd: str, lines: list[str], i: int, where: str) -> int:
        """``$ nc``, ``$ printf … | nc -N``, or a server restart; returns the next line."""
        if re.fullmatch(r"nc 127\.0\.0\.1 \d+", cmd):
            self.cur = self.connect(f"nc{i}")
            if i < len(lines) and lines[i].startswith("HELLO "):
                check(self.cur.hello, lines[i], where)
                i += 1
            return i
        m = re.fullmatch(r"(printf .*?) \| nc -N (?:-q \d+ )?127\.0\.0\.1 \d+(?:\s+#.*)?", cmd)
        if m:
            data = subprocess.run(["bash", "-c", m.group(1)], capture_output=True, timeout=10)
            end = next((j for j in range(i, len(lines)) if lines[j].startswith("$ ")), len(lines))
            conn = self.connect(f"printf{i}")
            conn.send(data.stdout)
            conn.sock.shutdown(socket.SHUT_WR)
            got = [conn.hello, *conn.read_to_end()]
            assert len(got) == end - i, f"{where}\n got: {got}\nwant: {lines[i:end]}"
            for g, w in zip(got, lines[i:end], strict=True):
                check(g, w, where)
            return end
        if cmd.startswith("kill -9 <server pid>; "):
            self.restart(cmd.split("; ", 1)[1], where)
            return i
        pytest.fail(f"{where}: a command the harness cannot run")

    def restart(self, twistd: str, where: str) -> None:
        """SIGKILL the server and start it again with the same flags in the same directory.
        The workers are stopped (SIGSTOP) meanwhile, so the doc's "before the workers had
        reconnected" holds whatever the machine's speed; "reconnected" resumes them."""
        procs, _ = setup_commands(twistd)
        flags = without(procs[0].args, "--listen")
        assert flags == self.cluster.server_args, f"{where}: a restart with other flags"
        self.close_all()
        self.wait_durable()
        for proc in self.cluster.workers.values():
            proc.send_signal(signal.SIGSTOP)
        self.stopped = True
        self.cluster.kill_server()
        self.cluster.start_server(port=self.cluster.port)

    def wait_durable(self) -> None:
        """Wait (bounded) until the journal holds the results the last STATUS showed. Nobody
        waits for a sub-task result's record (RELIABILITY.md, group commit), so a SIGKILL right
        after a STATUS could lose one a loaded machine had not written yet; the doc's kill came
        0.6 s later, when it had been. A client cannot see this, so the journal file is read."""
        status = self.last_status
        journal = option(self.cluster.server_args, "--journal", "clusterd-journal.sqlite")
        if status is None or journal == "none":
            return
        uri = f"file:{self.cluster.workdir / journal}?mode=ro"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with closing(sqlite3.connect(uri, uri=True, timeout=TIMEOUT)) as db:
                query = "SELECT COUNT(*) FROM results WHERE job = ?"
                if db.execute(query, (status["id"],)).fetchone()[0] >= status["done"]:
                    return
            time.sleep(0.02)  # a poll interval, bounded by the deadline
        pytest.fail(f"{self.title}: {status['id']}'s results never became durable")

    def comment(self, line: str) -> None:
        m = re.match(r"# connection (\w+)( receives)?", line)
        if m:
            name = m.group(1)
            self.cur = self.conns.get(name) or self.connect(name)
        m = re.match(r"# (\w+)\.log: (.*)$", line)
        if m:  # a line the server logged: wait for it
            self.cluster.wait_log("server", re.escape(m.group(2)), timeout=TIMEOUT)
        if "the workers reconnected" in line:
            self.resume()
        if re.search(r"\blater\b", line) and "before the workers" not in line:
            self.later = True

    def settle(self, request: str, reply: str | None) -> None:
        """Wait (bounded) for the state the doc saw "later": for a STATUS, until a STATUS on
        another connection gives the doc's reply; otherwise until the newest job has nothing
        queued (whatever could start has started)."""
        m = re.fullmatch(r"STATUS (j\d+)", request)
        probe = Conn(self.cluster.port)
        try:
            job = m.group(1) if m else None
            if job is None:
                probe.send(b'JOBS {"limit":1}\n')
                job = json.loads(probe.readline()[3:])[0]["id"]
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                probe.send(f"STATUS {job}\n".encode())
                got = probe.readline()
                if m and reply is not None and normalise(got) == normalise(reply):
                    return
                if not m and json.loads(got[3:])["queued"] == 0:
                    return
                time.sleep(0.02)  # a poll interval, bounded by the deadline
            pytest.fail(f"{self.title}: {request} never reached the doc's state; last: {got}")
        finally:
            probe.close()

    def timed(self, lines: list[str], n: int) -> None:
        """A "Being a worker by hand" block: W is one fake worker connection, each C> a fresh
        client connection; lines are checked in order and content, not by their time column."""
        worker: Conn | None = None
        client: Conn | None = None
        for i, line in enumerate(lines):
            m = _TIMED.match(line)
            if not m:
                continue
            who, way, text = m.groups()
            where = f"{self.title} block {n} line {i + 1}: {line}"
            if who == "W" and worker is None:
                worker = self.connect("W")
                check(worker.hello, text, where)
            elif who == "W" and way == ">":
                worker.send(text.encode() + b"\n")
            elif who == "W":
                check(worker.readline(), text, where)
            elif way == ">":
                client = self.connect(f"C{i}")
                client.send(text.encode() + b"\n")
            else:
                check(client.readline(), text, where)


@pytest.mark.parametrize("case", CASES, ids=[c.title for c in CASES])
def test_transcript_replays(case: Case, env: Env) -> None:
    """A PROTOCOL.md §7 section's transcripts give the doc's replies on a cluster set up as it says."""
    assert case.blocks, f"{case.title!r} has a setup but no transcript"
    cluster = env.cluster_for(case)
    Replay(env, cluster, case.title).run(case.blocks)


def test_a_new_section_is_a_case_and_an_unknown_setup_fails(tmp_path: Path) -> None:
    """Every ``### `` section with a fenced block is a case, and a setup the harness cannot
    start fails the case instead of skipping it."""
    doc = "\n## 7. T\n```sh\nmkdir -p /tmp/cd && cd /tmp/cd\n```\n### New\n```sh\nfrob --x\n```\n"
    doc += "```\n> PING\nOK PONG\n```\n### Prose only\ntext\n## 8. N\n"
    intro, cases = section7(doc)
    assert [c.title for c in cases] == ["New"] and len(intro) == 1
    assert cases[0].setup == ["frob --x\n"] and cases[0].blocks == ["> PING\nOK PONG\n"]
    with pytest.raises(pytest.fail.Exception, match="cannot run: frob --x"):
        Env(tmp_path).build(cases[0].setup, "New")
    odd = "twistd -n --pidfile= clusterd-gateway --listen tcp:7490\n"
    with pytest.raises(pytest.fail.Exception, match="cannot start"):
        Env(tmp_path).build([odd], "Odd")
