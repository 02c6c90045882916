"""``/metrics``: Prometheus metrics of the whole system, read from the database at scrape time.

Counts come from the shared database, not from process memory, so any of several server
processes gives the same, complete answer: jobs per site and state, tasks per state, pilots per
site and state as the factories reported them. Per-process request counters are added by the
handlers (``REQUESTS``), labelled with the pilot-protocol or API method.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
REQUESTS = Counter("panda_requests", "HTTP requests handled by this process",
                   ["kind", "method"], registry=REGISTRY)


class DatabaseCollector:
    """Reads the live state from the task buffer on each scrape."""

    def __init__(self, tb):
        self.tb = tb

    def collect(self):
        jobs = GaugeMetricFamily("panda_jobs", "live jobs per site and state",
                                 labels=["site", "state"])
        for site, counts in self.tb.jobs.site_load().items():
            for state, n in counts.items():
                jobs.add_metric([site, state], n)
        yield jobs
        tasks = GaugeMetricFamily("panda_tasks", "tasks per state", labels=["state"])
        for state, n in self.tb.tasks.state_counts().items():
            tasks.add_metric([state], n)
        yield tasks
        pilots = GaugeMetricFamily("panda_pilots", "pilots reported by factories",
                                   labels=["site", "state"])
        for site, counts in self.tb.pilots.summary()["sites"].items():
            for state, n in counts.items():
                pilots.add_metric([site, state], n)
        yield pilots


def render(tb) -> bytes:
    """The text exposition of the process counters plus the database state."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(tb))
    return generate_latest(REGISTRY) + generate_latest(registry)
