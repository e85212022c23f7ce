"""The benchmark suite (bench/run.py) runs end to end at smoke sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ["W1", "W1b", "W2", "W3", "W4", "W4r", "B1", "M1", "S1", "Scale"]


@pytest.mark.integration
def test_bench_smoke(tmp_path):
    """A smoke run of every workload on clusterd, sequential and multiprocessing exits 0, prints
    a table row for each workload and writes JSON lines for each; it needs neither Ray nor Dask."""
    out = tmp_path / "r.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--smoke",
            "--systems",
            "clusterd,sequential,multiprocessing",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout.split("Results:", 1)[1]
    rows = [line.split() for line in table.splitlines() if line.strip()]
    for workload in WORKLOADS:
        assert any(r[0] == workload and "clusterd" in r for r in rows), (workload, table)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for workload in WORKLOADS:
        mine = [r for r in records if r["workload"] == workload]
        assert mine, workload
        for r in mine:
            assert {"system", "metric", "value", "unit", "run", "timestamp", "cpus"} <= set(r)
            assert r["smoke"] is True
    assert {r["system"] for r in records} == {"clusterd", "sequential", "multiprocessing"}
