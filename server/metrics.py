"""``/metrics``: Prometheus metrics of the whole system, read from the database at scrape time.

Counts come from the shared database, not from process memory, so any of several server
processes gives the same, complete answer: jobs per site and state, tasks per state, pilots per
site and state as the factories reported them, open alarms, and failed jobs of the last hour by
error code. Per-process metrics are added where things happen: request counters
(``REQUESTS``, labelled with the pilot-protocol or API method), request latency histograms per
endpoint (``observe_request``, the application's log function), the dispatch latency of
getJob, HTTP errors by status code, requests refused by the rate limit, and the watcher's and
data service's actions.
"""
from __future__ import annotations

import datetime as dt
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
REQUESTS = Counter("panda_requests", "HTTP requests handled by this process",
                   ["kind", "method"], registry=REGISTRY)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_SECONDS = Histogram("panda_request_duration_seconds",
                            "time to answer a request, per endpoint", ["kind", "endpoint"],
                            buckets=LATENCY_BUCKETS, registry=REGISTRY)
DISPATCH_SECONDS = Histogram("panda_dispatch_duration_seconds",
                             "getJob: time from the request to the pilot's job (or none)",
                             ["outcome"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
HTTP_ERRORS = Counter("panda_http_errors", "replies with an HTTP error status",
                      ["kind", "code"], registry=REGISTRY)
WATCHER_ACTIONS = Counter("panda_watcher_actions", "jobs the watcher failed, by error code",
                          ["action", "code"], registry=REGISTRY)
DATASERVICE_ACTIONS = Counter("panda_dataservice_actions",
                              "what the data service did with the jobs it handled",
                              ["action"], registry=REGISTRY)
RATE_LIMITED = Counter("panda_rate_limited", "requests refused with 429 by the per-client rate "
                       "limit (server/ratelimit.py), by kind of call", ["kind"], registry=REGISTRY)
RATE_LIMIT_CLIENTS = Gauge("panda_rate_limit_clients", "clients the rate limit holds a bucket "
                           "for in this process, by kind of call", ["kind"], registry=REGISTRY)
#: how far back the failed-jobs-by-code gauge looks
RECENT_ERRORS_S = 3600
_access = logging.getLogger("tornado.access")


def observe_request(handler) -> None:
    """The application's ``log_function``: latency and errors per endpoint, then Tornado's
    access log line as before. The endpoint is the handler (and the API method), never the
    raw path: the label set stays bounded."""
    status = handler.get_status()
    seconds = handler.request.request_time()
    kind = getattr(handler, "metrics_kind", "http")
    endpoint = getattr(handler, "endpoint", None) or type(handler).__name__
    REQUEST_SECONDS.labels(kind, endpoint).observe(seconds)
    if status >= 400:
        HTTP_ERRORS.labels(kind, str(status)).inc()
    log = _access.info if status < 400 else _access.warning if status < 500 else _access.error
    log("%d %s %.2fms", status, handler._request_summary(), 1000.0 * seconds)


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
        yield from self.monitor_metrics()

    def monitor_metrics(self):
        from .monitor.alarms import Alarms, SEVERITIES
        from .monitor.errorsview import recent_error_counts
        alarms = GaugeMetricFamily("panda_alarms", "open alarms per state and severity",
                                   labels=["state", "severity"])
        counts = Alarms(self.tb).open_counts()
        for state in ("active", "acknowledged"):
            for severity in SEVERITIES:
                alarms.add_metric([state, severity], counts.get((state, severity), 0))
        yield alarms
        errors = GaugeMetricFamily("panda_job_errors_recent",
                                   f"jobs failed in the last {RECENT_ERRORS_S} s, by error "
                                   "component and code", labels=["component", "code"])
        since = self.tb.clock() - dt.timedelta(seconds=RECENT_ERRORS_S)
        for (component, code), n in sorted(recent_error_counts(self.tb, since).items()):
            errors.add_metric([component, str(code)], n)
        yield errors


def render(tb) -> bytes:
    """The text exposition of the process counters plus the database state."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(tb))
    return generate_latest(REGISTRY) + generate_latest(registry)
