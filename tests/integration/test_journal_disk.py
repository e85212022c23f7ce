"""The journal's disk fails: a small tmpfs that fills up, and an ext4 image that goes read-only.

A server must never show an id or a final line it cannot keep: after a restart with a working
disk, every ``OK jN`` and every ``RESULT`` a client saw is still there with the same answer,
refusals are ``JOURNAL_ERROR``, ids are never reused, and a read-only journal stops the server
from starting. Real mounts (the tests run as root here and in CI); a test skips, saying why, only
when the kernel refuses the mount itself. Bounded: fixed job counts, every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from crashkit import Expected, Ledger, wait_ready

from clusterd.client.api import job_line
from clusterd.client.errors import ClusterError, JobCancelled, JobFailed, RequestRefused
from clusterd.launch import LocalCluster, twistd_path, wait_for

pytestmark = pytest.mark.integration


def _sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def _unmount(path: Path) -> None:
    if _sh("umount", str(path)).returncode != 0:
        _sh("umount", "-l", str(path))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the journal, unmounted at the end whatever happened."""
    mnt = tmp_path / "jdisk"
    mnt.mkdir()
    proc = _sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    if proc.returncode != 0:
        pytest.skip(f"the kernel refused to mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        _unmount(mnt)


@pytest.fixture
def ext4_image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 48 MiB ext4 image loop-mounted with errors=remount-ro: (mount point, image)."""
    img, mnt = tmp_path / "journal.ext4", tmp_path / "jdisk"
    mnt.mkdir()
    with open(img, "wb") as fh:
        fh.truncate(48 << 20)
    made = _sh("mkfs.ext4", "-q", "-F", str(img))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 is not usable here: {made.stderr.strip()}")
    proc = _sh("mount", "-o", "loop,errors=remount-ro", str(img), str(mnt))
    if proc.returncode != 0:
        pytest.skip(f"the kernel refused to loop-mount an ext4 image: {proc.stderr.strip()}")
    try:
        yield mnt, img
    finally:
        _unmount(mnt)


def _make_read_only(mnt: Path) -> str:
    """Turn the mounted file system read-only under the running server; returns how.

    ``mount -o remount,ro`` is refused (EBUSY) while a file on it is open for writing, as the
    server's journal is; then the ext4 error path is used (sysfs ``trigger_fs_error``), which
    with ``errors=remount-ro`` makes the file system read-only at once, as a failing disk does.
    """
    if _sh("mount", "-o", "remount,ro", str(mnt)).returncode == 0:
        return "mount -o remount,ro"
    dev = _sh("findmnt", "-no", "SOURCE", str(mnt)).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(dev).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"remount,ro refused (file open for writing) and no {trigger} on this kernel")
    trigger.write_text("clusterd test: journal disk goes read-only\n")
    wait_for(
        lambda: (
            "ro" in _sh("findmnt", "-no", "OPTIONS", str(mnt)).stdout.split(",")
            or "emergency_ro" in _sh("findmnt", "-no", "OPTIONS", str(mnt)).stdout
        ),
        10,
        "the file system to turn read-only",
    )
    return "ext4 trigger_fs_error (errors=remount-ro)"


def _remount_writable(mnt: Path, img: Path, how: str) -> None:
    """Make the journal's file system writable again (after an ext4 error: unmount, fsck,
    mount), as an operator would before restarting the server."""
    if how.startswith("mount"):
        proc = _sh("mount", "-o", "remount,rw", str(mnt))
    else:
        _unmount(mnt)
        _sh("e2fsck", "-fy", str(img))  # exit 1 means "errors corrected"
        proc = _sh("mount", "-o", "loop,errors=remount-ro", str(img), str(mnt))
    assert proc.returncode == 0, f"cannot make the journal disk writable again: {proc.stderr}"


def _outcome(proc: subprocess.Popen[str], timeout: float) -> tuple[str, bool]:
    """Read a starting server's output until it exits or says it listens (then kill it):
    (its output, whether it started listening). Bounded by ``timeout``."""
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.daemon = True
    reader.start()
    deadline = time.monotonic() + timeout
    started = False
    while proc.poll() is None and time.monotonic() < deadline:
        if any("clusterd listening" in line for line in list(lines)):
            started = True
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        started = True  # listening, or still running after the timeout: it did not refuse
    proc.wait(timeout=30)
    reader.join(timeout=5)
    return "".join(lines), started


def _wait_all(cluster: LocalCluster, ledger: Ledger, deadline_s: float = 60.0) -> None:
    """WAIT every id the ledger holds; each must end with exactly its answer."""
    deadline = time.monotonic() + deadline_s
    with cluster.client(timeout=deadline_s) as c:
        for job, exp in sorted(ledger.shown.items(), key=lambda kv: int(kv[0][1:])):
            if time.monotonic() > deadline:
                ledger.problems.append(f"WAIT {job} ({exp.label}): not checked, time is up")
                continue
            try:
                value = c.wait(job)
            except (RequestRefused, JobFailed, JobCancelled) as e:
                ledger.problems.append(f"WAIT {job} ({exp.label}): {type(e).__name__} {e}")
                continue
            if not exp.matches(value):
                ledger.problems.append(
                    f"WAIT {job} ({exp.label}): wrong answer {exp.describe(value)}, "
                    f"expected {exp.describe(exp.answer)}"
                )


def _report(ledger: Ledger, log: str) -> str:
    lines = [line for line in log.splitlines() if "connection from" not in line]
    tail = "\n".join(lines[-25:])
    return (
        f"{len(ledger.problems)} problems:\n  "
        + "\n  ".join(ledger.problems)
        + "\nevents:\n  "
        + "\n  ".join(ledger.events[-50:])
        + f"\nserver log tail:\n{tail}"
    )


def test_full_journal_disk_never_shows_an_id_it_cannot_keep(tmp_path, small_tmpfs):
    """On a journal disk that fills up (2 MiB tmpfs), every ``OK jN`` shown survives a restart
    with more space and finishes with its exact answer, every refusal is ``JOURNAL_ERROR``, the
    log names the disk being full, and another client's later jobs never reuse a shown id."""
    journal = small_tmpfs / "journal.sqlite"
    cluster = LocalCluster(tmp_path / "run", server_args=["--journal", str(journal)])
    (tmp_path / "run").mkdir()
    ledger = Ledger()
    refused: dict[str, int] = {}
    try:
        cluster.start_server()
        with cluster.client(timeout=30) as c:
            for k in range(20):  # ~200 KB of input each: 4 MB into a 2 MiB disk
                values = list(range(1_000_000 + k * 28_000, 1_000_000 + (k + 1) * 28_000))
                exp = Expected(f"first-{k}", "sum", sum(values))
                try:
                    job = c.submit("sum", values, 4)
                except RequestRefused as e:
                    refused[e.code or "?"] = refused.get(e.code or "?", 0) + 1
                    ledger.note(f"{exp.label} refused: {e.code} {e}")
                    if e.code != "JOURNAL_ERROR":
                        ledger.problems.append(
                            f"{exp.label} refused with {e.code}, not JOURNAL_ERROR"
                        )
                    continue
                except (ClusterError, OSError) as e:
                    ledger.note(f"{exp.label}: connection ended ({e}); the server stopped")
                    refused["stopped"] = 1
                    break
                ledger.show(job, exp, "OK")
        log = cluster.log_text("server")
        if not re.search(r"No space left on device|disk is full|ENOSPC", log, re.I):
            ledger.problems.append(
                "the server log never says the journal's disk is full "
                "('No space left on device' / 'database or disk is full')"
            )
        if not refused:
            ledger.problems.append("all 20 SUBMITs were answered OK on a 2 MiB journal disk")
        cluster.kill_server(signal.SIGKILL)
        grown = _sh("mount", "-o", "remount,size=64m", str(small_tmpfs))
        assert grown.returncode == 0, f"cannot grow the tmpfs: {grown.stderr}"
        cluster.start_server(cluster.port or 0)
        wait_ready(cluster)
        cluster.start_worker("w1", slots=2)
        cluster.wait_workers(["w1"])
        with cluster.client(timeout=30) as c:  # another client, after the restart
            for k in range(5):
                values = list(range(k, k + 100))
                job = c.submit("sum", values)
                ledger.show(job, Expected(f"second-{k}", "sum", sum(values)), "OK")
        _wait_all(cluster, ledger)
        log = cluster.log_text("server")
    finally:
        cluster.kill_server(signal.SIGKILL)
        cluster.stop()
    assert not ledger.problems, f"refusals {refused}; " + _report(ledger, log)


def test_read_only_journal_disk_never_returns_a_result_that_was_not_durable(tmp_path, ext4_image):
    """When the journal's file system turns read-only mid-run, no RUN returns a RESULT that is
    not durable (each is still there with its answer after a restart on a writable disk), the
    server refuses to start on the read-only journal with a message that says so, and ids are
    never reused afterwards."""
    mnt, img = ext4_image
    journal = mnt / "journal.sqlite"
    cluster = LocalCluster(tmp_path / "run", server_args=["--journal", str(journal)])
    (tmp_path / "run").mkdir()
    ledger = Ledger()
    results = [0]
    attempts_after = [0]
    flipped = threading.Event()
    stop = threading.Event()
    go_on = threading.Event()  # cleared: the RUNs pause between requests
    go_on.set()
    paused = threading.Event()  # the RUN thread waits between two requests
    log = ""

    def runs() -> None:
        """RUN small distinct sums back to back until told to stop, the server goes away, or
        60 attempts."""
        try:
            with cluster.client(timeout=30) as c:
                for k in range(60):
                    if not go_on.is_set():
                        paused.set()
                        go_on.wait(30)
                    if stop.is_set():
                        return
                    values = list(range(k * 1000, k * 1000 + 1000))
                    exp = Expected(f"run-{k}", "sum", sum(values))
                    try:
                        reply = c.request(job_line("RUN", "sum", values, 4))
                    except RequestRefused as e:
                        ledger.note(f"{exp.label} refused: {e.code}")
                        if e.code != "JOURNAL_ERROR":
                            ledger.problems.append(f"{exp.label} refused with {e.code}")
                    except JobFailed as e:
                        ledger.note(f"{exp.label} FAILED {e.code}")
                        if e.code != "JOURNAL_ERROR":
                            ledger.problems.append(f"{exp.label} FAILED {e.code}: {e}")
                    else:
                        assert reply.job is not None
                        ledger.result(reply.job, exp, reply.value)
                        results[0] += 1
                    if flipped.is_set():
                        attempts_after[0] += 1
        except (ClusterError, OSError) as e:
            ledger.note(f"RUN connection ended: {e}")

    try:
        cluster.start_server()
        cluster.start_worker("w1", slots=2)
        cluster.wait_workers(["w1"])
        runner = threading.Thread(target=runs, daemon=True)
        runner.start()
        wait_for(lambda: results[0] >= 5 or not runner.is_alive(), 30, "5 RESULTs")
        # The flip comes between two RUNs, after sync(2): the kernel's own fault path (ext4
        # abort via trigger_fs_error) can lose a write whose fdatasync had just returned, which
        # no program can guard against (a plain append + fdatasync loop loses its last write in
        # about 1 run in 5 here); a disk's failure between requests is what this test is about.
        go_on.clear()
        assert paused.wait(30) or not runner.is_alive(), "the RUNs did not pause"
        os.sync()
        how = _make_read_only(mnt)
        flipped.set()
        go_on.set()
        ledger.note(f"journal disk made read-only by {how}")
        wait_for(lambda: attempts_after[0] >= 10 or not runner.is_alive(), 30, "10 RUNs after it")
        stop.set()
        runner.join(timeout=40)
        log = cluster.log_text("server")
        if not re.search(r"read-only|readonly|EROFS", log, re.I):
            ledger.problems.append(
                "the server log never says the journal's file system is read-only"
            )
        cluster.kill_server(signal.SIGKILL)

        # A server on the read-only journal must refuse to start, saying why.
        proc = subprocess.Popen(
            [twistd_path(), "-n", "--pidfile=", "clusterd-server", "--journal", str(journal)]
            + ["--listen", "tcp:0:interface=127.0.0.1"],
            cwd=tmp_path / "run",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out, started = _outcome(proc, 20.0)
        if started:
            ledger.problems.append(
                f"a server on the read-only journal started listening instead of refusing: "
                f"{out[-600:]!r}"
            )
        else:
            if proc.returncode == 0:
                ledger.problems.append("a server on the read-only journal exited 0")
            if not re.search(r"read-only|readonly|EROFS", out, re.I):
                ledger.problems.append(
                    f"a server on the read-only journal gave no clear reason: {out[-600:]!r}"
                )

        _remount_writable(mnt, img, how)
        cluster.start_server(cluster.port or 0)
        wait_ready(cluster)
        cluster.wait_workers(["w1"], timeout=30)
        with cluster.client(timeout=30) as c:  # new jobs must not reuse an id shown before
            for k in range(5):
                values = list(range(7, 7 + 10 * (k + 1)))
                job = c.submit("sum", values)
                ledger.show(job, Expected(f"after-{k}", "sum", sum(values)), "OK")
        _wait_all(cluster, ledger)
        log = cluster.log_text("server")
    finally:
        stop.set()
        cluster.kill_server(signal.SIGKILL)
        cluster.stop()
    assert results[0] >= 5, "fewer than 5 RESULTs before the disk turned read-only"
    assert not ledger.problems, _report(ledger, log)
