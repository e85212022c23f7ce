"""Load: one client pipelines 20,000 SUBMITs and 1,000 JOBS without reading a reply while
another connection times PING; the server must stay responsive and its memory bounded.

These are liveness bounds far above normal figures (PING takes well under a millisecond on an
idle server), not benchmarks: bench/flood.py measures the same scenario. Bounded: the flood
lasts 5 s, each PING waits at most 10 s (20 s in the JOBS test, so the memory
the replies take is seen), and the server is killed if it grows by 1.5 GB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clusterd.launch import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from flood import FloodResult, flood_once, hold_jobs  # noqa: E402  (bench/flood.py holds the scenario)

pytestmark = pytest.mark.integration

PING_P99_MS = 250.0  # a PING's round trip, 99th percentile, while the flood is read
PING_MAX_MS = 2000.0  # no single PING may wait longer than this
RSS_GROWTH_MB = 200.0  # the server's resident memory, peak over its start


def _flood(
    tmp_path: Path, submits: int, jobs: int, hold: int, ping_timeout: float = 10.0
) -> FloodResult:
    cluster = LocalCluster(tmp_path / "run")
    (tmp_path / "run").mkdir()
    try:
        cluster.start_server()
        assert cluster.server is not None and cluster.port is not None
        if hold:
            hold_jobs(cluster.port, hold)
        return flood_once(
            cluster.port,
            cluster.server.pid,
            submits=submits,
            jobs=jobs,
            seconds=5.0,
            settle=1.0,
            ping_timeout=ping_timeout,
            kill=cluster.server.kill,
        )
    finally:
        cluster.kill_server()  # no graceful stop needed, and a stuck server would take 15 s
        cluster.stop()


def _check(res: FloodResult) -> None:
    figures = (
        f"PING p50 {res.ping_p50_ms:.1f} ms, p99 {res.ping_p99_ms:.1f} ms, max "
        f"{res.ping_max_ms:.0f} ms over {res.pings} pings"
        f"{' (the last one timed out)' if res.ping_timed_out else ''}; RSS "
        f"{res.rss_before_mb:.0f} MB before, {res.rss_peak_mb:.0f} MB peak, "
        f"{res.rss_after_mb:.0f} MB after; flood bytes taken in {res.flood_bytes}/"
        f"{res.flood_total_bytes}{'; server killed at +1.5 GB' if res.aborted else ''}"
    )
    growth = res.rss_peak_mb - res.rss_before_mb
    broken = [
        f"PING p99 over {PING_P99_MS:.0f} ms" * (res.ping_p99_ms >= PING_P99_MS),
        f"a PING waited over {PING_MAX_MS:.0f} ms" * (res.ping_max_ms >= PING_MAX_MS),
        "fewer than 5 PINGs answered" * (res.pings < 5),
        f"server RSS grew {growth:.0f} MB (bound {RSS_GROWTH_MB:.0f})" * (growth >= RSS_GROWTH_MB),
    ]
    broken = [b for b in broken if b]
    assert not broken, "; ".join(broken) + f". Figures: {figures}"


def test_pipelined_submit_flood_without_reading_keeps_ping_fast_and_memory_bounded(tmp_path):
    """While one connection floods 20,000 SUBMITs and 1,000 JOBS and never reads, PING on
    another connection keeps a p99 under 250 ms (none over 2 s) and the server's RSS grows by
    less than 200 MB."""
    _check(_flood(tmp_path, submits=20_000, jobs=1_000, hold=0))


def test_pipelined_jobs_flood_over_held_jobs_keeps_ping_fast_and_memory_bounded(tmp_path):
    """With 5,000 jobs held, one connection floods 1,000 JOBS and never reads: PING on another
    connection keeps a p99 under 250 ms (none over 2 s) and the server's RSS grows by less than
    200 MB (the replies are not all built in memory)."""
    _check(_flood(tmp_path, submits=0, jobs=1_000, hold=5_000, ping_timeout=20.0))
