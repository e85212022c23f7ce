"""Prometheus metrics for one server, with ``prometheus-client``'s registry and exposition.

Counting costs nothing per sub-task: :class:`SchedulerCollector` reads the scheduler's own
counters (``Scheduler.stats()``, kept as things change, O(1)) when Prometheus scrapes, so
nothing is incremented twice. The histograms are observed once per job at its end (job
duration, and dispatch latency: how long the job waited for its first sub-task to be sent)
and once per journal commit on the writer thread (how long the transaction and its sync
took), never once per sub-task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from clusterd.core.jobs import Job

__all__ = ["Metrics", "MetricsResource", "SchedulerCollector"]

# counter in Scheduler.stats() -> (metric name without _total, help)
COUNTERS = {
    "jobs_submitted": ("clusterd_jobs_submitted", "Jobs accepted."),
    "jobs_done": ("clusterd_jobs_done", "Jobs that ended done."),
    "jobs_failed": ("clusterd_jobs_failed", "Jobs that ended failed."),
    "jobs_cancelled": ("clusterd_jobs_cancelled", "Jobs that ended cancelled."),
    "subtasks_dispatched": ("clusterd_subtasks_dispatched", "Sub-tasks sent to workers."),
    "subtasks_completed": ("clusterd_subtasks_completed", "Sub-task results recorded."),
    "subtasks_retried": ("clusterd_subtasks_retried", "Sub-tasks retried after a failure."),
    "subtasks_requeued": ("clusterd_subtasks_lost", "Sub-tasks requeued: worker lost or stall."),
    "subtasks_timed_out": ("clusterd_subtasks_timed_out", "Sub-task attempts that timed out."),
    "results_duplicate": ("clusterd_results_duplicate", "Results for an answered sub-task."),
    "results_late": ("clusterd_results_late", "Results no longer expected."),
    "workers_lost": ("clusterd_workers_lost", "Workers that went away or were dropped."),
}
GAUGES = {
    "subtasks_queued": ("clusterd_queue_depth", "Sub-tasks queued over all jobs."),
    "jobs_active": ("clusterd_jobs_active", "Jobs not ended."),
    "workers": ("clusterd_workers_connected", "Connected workers."),
    "slots_busy": ("clusterd_slots_busy", "Sub-tasks running (busy slots)."),
}
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class SchedulerCollector:
    """A custom Collector: the scheduler's counters as Prometheus metrics, read at scrape."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        """One O(1) ``stats()`` call per scrape."""
        stats = self.core.stats()
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        for key, (name, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        slots, busy = stats.get("slots", 0), stats.get("slots_busy", 0)
        yield GaugeMetricFamily(
            "clusterd_slots_free", "Worker slots free.", value=max(0, slots - busy)
        )
        yield GaugeMetricFamily(
            "clusterd_journal_ok", "1 while the journal writes.", value=int(stats["journal_ok"])
        )


class Metrics:
    """One server's registry: the collector and the three histograms."""

    def __init__(self, core: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(SchedulerCollector(core))
        self.job_seconds = Histogram(
            "clusterd_job_duration_seconds",
            "Seconds from a job's acceptance to its end, per job.",
            buckets=SECONDS,
            registry=self.registry,
        )
        self.dispatch_seconds = Histogram(
            "clusterd_dispatch_latency_seconds",
            "Seconds from a job's acceptance to its first sub-task sent, per job.",
            buckets=SECONDS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "clusterd_journal_commit_seconds",
            "Seconds one journal commit (a batch of records: transaction and sync) took.",
            buckets=SECONDS,
            registry=self.registry,
        )
        core.end_observers.append(self.job_ended)

    def job_ended(self, job: Job) -> None:
        """At a job's end: its duration and its dispatch latency (once per job)."""
        if job.finished is not None:
            self.job_seconds.observe(max(0.0, job.finished - job.submitted))
        if job.first_sent is not None:
            self.dispatch_seconds.observe(max(0.0, job.first_sent - job.submitted))

    def committed(self, seconds: float) -> None:
        """One commit took ``seconds`` (on the journal's writer thread: Histogram is
        thread-safe)."""
        self.commit_seconds.observe(seconds)

    def journal_opener(self, opener: Callable[[], Any]) -> Callable[[], Any]:
        """``opener`` (ServerService's), observing the commits of the journal it opens."""

        def open_journal() -> Any:
            journal = opener()
            if hasattr(journal, "commit_observer"):  # a group-commit journal (SQLite)
                journal.commit_observer = self.committed
            return journal

        return open_journal

    def exposition(self) -> bytes:
        """The Prometheus text format, by the library."""
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """``/metrics``: rendered on the reactor (the collector reads the scheduler, which only the
    reactor thread may touch; one scrape is O(metrics))."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """The exposition, with the library's content type."""
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()
