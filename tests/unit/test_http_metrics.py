"""/metrics: prometheus-client's exposition of the scheduler's counters, gauges and the
per-job and per-commit histograms, parsed with the library's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock

from clusterd.core.journal import MemoryJournal
from clusterd.core.scheduler import Scheduler
from clusterd.server.http.metrics import Metrics
from clusterd.server.http.site import build_site
from clusterd.server.limits import ConnectionSettings
from clusterd.tasks.builtins import TASKS
from clusterd.tasks.registry import Registry
from clusterd.testing import add_worker, result_of


def scrape(stub: StubTreq) -> dict[str, float]:
    """Every sample of /metrics by name (and le for buckets), parsed by prometheus_client."""
    d = stub.get("http://127.0.0.1/metrics")
    stub.flush()
    response = result_of(d)
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    text = result_of(stub.content(response)).decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else "")
            out[key] = s.value
    return out


def test_metrics_move_as_a_job_runs() -> None:
    """Submitted, dispatched, queue depth, busy/free slots and workers move while a job runs;
    done, completed and the job-duration and dispatch-latency histograms once it ends."""
    clock = Clock()
    core = Scheduler(Registry(TASKS), clock, journal=MemoryJournal())
    metrics = Metrics(core)
    stub = StubTreq(build_site(core, ConnectionSettings(), metrics).resource)
    before = scrape(stub)
    assert before["clusterd_jobs_submitted_total"] == 0
    assert before["clusterd_job_duration_seconds_count"] == 0
    job = core.submit("sum", list(range(10)), 5)
    clock.advance(1)
    assert scrape(stub)["clusterd_queue_depth"] == 5
    worker = add_worker(core, "w1", slots=2)
    clock.advance(0)
    running = scrape(stub)
    assert running["clusterd_jobs_submitted_total"] == 1
    assert running["clusterd_workers_connected"] == 1
    assert running["clusterd_slots_busy"] == 2 and running["clusterd_slots_free"] == 0
    assert running["clusterd_subtasks_dispatched_total"] >= 2
    assert running["clusterd_queue_depth"] < 5
    clock.advance(2)
    worker.answer_all()
    assert job.state == "done"
    after = scrape(stub)
    assert after["clusterd_jobs_done_total"] == 1
    assert after["clusterd_subtasks_completed_total"] == 5
    assert after["clusterd_queue_depth"] == 0 and after["clusterd_slots_free"] == 2
    assert after["clusterd_job_duration_seconds_count"] == 1
    assert after["clusterd_job_duration_seconds_sum"] == 3.0
    assert after["clusterd_dispatch_latency_seconds_sum"] == 1.0
    assert after["clusterd_job_duration_seconds_bucket{le=2.5}"] == 0
    assert after["clusterd_job_duration_seconds_bucket{le=5.0}"] == 1


def test_journal_commits_are_observed_per_batch() -> None:
    """A group-commit journal's writer reports each commit's seconds to the histogram."""
    core = Scheduler(Registry(TASKS), Clock(), journal=MemoryJournal())
    metrics = Metrics(core)

    class Journal:
        commit_observer: Any = None

    journal = metrics.journal_opener(Journal)()
    journal.commit_observer(0.002)
    journal.commit_observer(0.5)
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(metrics.exposition().decode())
        for s in f.samples
    }
    assert samples["clusterd_journal_commit_seconds_count"] == 2
    assert samples["clusterd_journal_commit_seconds_sum"] == 0.502
