"""The live dashboard in a real browser: Debian's chromium (installed by .ci/run) driven by
Playwright loads ``/`` of a real twistd server with ``--http`` and one worker, and watches a
running sleep job's progress bar move over SSE, without reloading, until the job is done."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import SUPPORT, TEST_TASKS
from playwright.sync_api import sync_playwright

from clusterd.launch import LocalCluster

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    """A server with --http on a loopback port and one two-slot worker; yields the base URL."""
    cluster = LocalCluster(
        tmp_path,
        server_args=[*TEST_TASKS, "--http", "tcp:0:interface=127.0.0.1"],
        env={"PYTHONPATH": SUPPORT},
    )
    try:
        cluster.start_server()
        line = cluster.wait_log("server", r"clusterd http listening on [0-9.]+:\d+")
        cluster.start_worker("w1", slots=2, extra=TEST_TASKS)
        cluster.wait_workers()
        yield "http://" + line.rsplit(" ", 1)[1]
    finally:
        cluster.stop()


def test_dashboard_shows_a_running_jobs_progress_bar_move_to_done(
    server: str, tmp_path: Path
) -> None:
    """The page, once live, shows the worker and a submitted 12-sub-task sleep job whose bar
    grows through intermediate values to done, redrawn from the snapshot stream."""
    shot = Path(os.environ.get("DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(server + "/")
            page.wait_for_selector("#worker-w1", timeout=30_000)
            assert page.text_content("#status") == "live"
            body = {"task": "sleep", "input": [0.5] * 12, "options": {"chunks": 12}}
            job_id = requests.post(server + "/api/v1/jobs", json=body, timeout=30).json()["id"]
            row = f"#job-{job_id}"
            page.wait_for_selector(row, timeout=30_000)
            seen: list[int] = []
            deadline = time.monotonic() + 60
            while page.get_attribute(row, "data-state") != "done":
                assert time.monotonic() < deadline, f"job never shown done; saw {seen}"
                seen.append(int(page.get_attribute(row, "data-done") or 0))
                if 0 < seen[-1] < 12 and seen[-1] >= 6:
                    page.screenshot(path=str(shot))
                page.wait_for_timeout(100)
            assert page.get_attribute(row, "data-done") == "12"
            assert any(0 < n < 12 for n in seen), f"the bar never showed progress: {seen}"
            assert sorted(seen) == seen, "the bar went backwards"
            width = page.eval_on_selector(row + " .fill", "e => e.style.width")
            assert width == "100%"
            assert page.locator("#taskstream rect").count() >= 12
            if not shot.exists():
                page.screenshot(path=str(shot))
            assert shot.stat().st_size > 0
        finally:
            browser.close()
