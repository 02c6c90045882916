"""The monitor's periodic work: the operations history snapshot, the job duration alarms and
the alarm notifications.

Who runs it: the server's first process (``panda server``, like the archiver), from a Tornado
periodic callback in its thread pool (``watcher.start_periodic``). Why there and not in the
watcher's pass of every process: a snapshot is one per interval for the whole system and a
notification goes out once; the unique snapshot time and the claimed notifications keep it
right even when several hosts run a first process each.

Job duration alarms: jobs too long in a state (per-state limits, :class:`DurationLimits`),
counted per site from the ``(status, state_changed)`` index; one alarm per state and site,
cleared when no job is over the limit any more. For the waiting states the alarm's message
says why they wait (``analyzer``).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from .. import db
from . import analyzer, history
from .alarms import Alarms
from .notify import Notifier, NotifyConfig, notify_pending

#: hours a job may stay in a state before it is an alarm (0: no alarm for that state)
DEFAULT_LIMITS_H = {"defined": 2, "assigned": 48, "activated": 24, "sent": 2, "starting": 6,
                    "running": 72, "holding": 12, "transferring": 24}
DURATION = "duration"


@dataclass
class DurationLimits:
    hours: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LIMITS_H))

    @classmethod
    def parse(cls, items: list[str]) -> "DurationLimits":
        """``STATE=HOURS`` items over the defaults (``--duration-limit running=48``)."""
        limits = cls()
        for item in items:
            state, sep, hours = item.partition("=")
            if not sep or state not in DEFAULT_LIMITS_H:
                raise ValueError(f"duration limit {item!r}: want STATE=HOURS with STATE one of "
                                 f"{', '.join(DEFAULT_LIMITS_H)}")
            try:
                limits.hours[state] = float(hours)
            except ValueError:
                raise ValueError(f"duration limit {item!r}: HOURS must be a number") from None
            if limits.hours[state] < 0:
                raise ValueError(f"duration limit {item!r}: HOURS must be >= 0")
        return limits


def too_long(tb, limits: DurationLimits) -> list[dict]:
    """Per (state, site): jobs in the state for longer than its limit, and the oldest."""
    j = db.jobs.c
    now = tb.clock()
    out = []
    with db.read(tb.engine) as conn:
        for state, hours in limits.hours.items():
            if hours <= 0:
                continue
            cutoff = now - dt.timedelta(hours=hours)
            for site, n, oldest in conn.execute(
                    select(j.site, func.count(), func.min(j.state_changed)).where(
                        j.status == state, j.state_changed < cutoff).group_by(j.site)):
                out.append({"state": state, "site": site, "jobs": n, "oldest": oldest,
                            "limit_h": hours,
                            "age_h": round((now - oldest).total_seconds() / 3600.0, 1)})
    return out


def check_durations(tb, limits: DurationLimits, alarms: Alarms) -> tuple[int, int]:
    """Raise the duration alarms found, clear the ones gone; (open, cleared)."""
    found = too_long(tb, limits)
    waiting = [f for f in found if f["state"] in analyzer.WAITING_STATES]
    why: dict[tuple[str, str | None], list[str]] = {}
    if waiting:
        ctx = analyzer.Context(tb)
        for g in analyzer.waiting_groups(tb):
            why.setdefault((g["status"], g["site"]), []).extend(analyzer.explain(ctx, g))
    current = {}
    for f in found:
        site = f["site"] or "(no site)"
        reasons = sorted(set(why.get((f["state"], f["site"]), [])))
        message = (f"{f['jobs']} job(s) at {site} have been {f['state']} for more than "
                   f"{f['limit_h']:g} h (the oldest {f['age_h']:g} h).")
        if reasons:
            message += " Why: " + "; ".join(reasons[:5])
        current[f"{DURATION}:{f['state']}:{site}"] = {
            "title": f"{f['jobs']} job(s) {f['state']} too long at {site}",
            "severity": "critical" if f["age_h"] >= 2 * f["limit_h"] else "warning",
            "message": message, "site": f["site"], "raised_by": "monitor"}
    return alarms.reconcile(DURATION, current)


@dataclass
class OpsConfig:
    interval_s: float = 60.0
    snapshot_interval_s: float = history.DEFAULT_INTERVAL_S
    limits: DurationLimits = field(default_factory=DurationLimits)
    notify: NotifyConfig = field(default_factory=NotifyConfig)


def ops_tasks(tb, config: OpsConfig) -> list[tuple[str, Callable[[], Any]]]:
    """The (name, blocking callable) list for ``watcher.start_periodic``."""
    alarms = Alarms(tb)
    notifier = Notifier(config.notify)
    return [("ops-history", lambda: history.take_snapshot(tb, config.snapshot_interval_s)),
            ("duration-alarms", lambda: check_durations(tb, config.limits, alarms)),
            ("alarm-notify", lambda: notify_pending(alarms, notifier))]
