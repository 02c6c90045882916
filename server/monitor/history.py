"""The operations history: periodic snapshots of jobs per site and state, plotted over days
and weeks.

A snapshot at time T (a multiple of the interval, so every process and host agrees on it) holds,
per site: for each active state, how many jobs are in it; for each final state, how many jobs
reached it in (T - interval, T]. A unique (time, site, status) makes a second writer of the
same snapshot a no-op. Who takes them: the server's first process, from its periodic
operations pass (``operations.py``; docs/monitor.md).
"""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import Float, and_, cast, func, insert, select
from sqlalchemy.exc import IntegrityError

from .. import db
from .selection import ACTIVE_STATES, FINAL_STATES
from .sqlfn import EPOCH, bucket, bucket_start, bucket_width

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 900


def snapshot_time(now: dt.datetime, interval_s: float) -> dt.datetime:
    step = int(interval_s)
    secs = int((now - EPOCH).total_seconds()) // step * step
    return EPOCH + dt.timedelta(seconds=secs)


def take_snapshot(tb, interval_s: float = DEFAULT_INTERVAL_S) -> int:
    """Record the snapshot of the current interval unless it is there; rows written."""
    at = snapshot_time(tb.clock(), interval_s)
    s = db.ops_snapshots.c
    with db.read(tb.engine) as conn:
        if conn.execute(select(s.row_id).where(s.time == at).limit(1)).first() is not None:
            return 0
    j = db.jobs.c
    rows: list[dict] = []
    with db.read(tb.engine) as conn:
        for site, status, n in conn.execute(
                select(j.site, j.status, func.count()).where(j.status.in_(ACTIVE_STATES))
                .group_by(j.site, j.status)):
            rows.append({"time": at, "site": site or "", "status": status, "n_jobs": n})
        start = at - dt.timedelta(seconds=interval_s)
        for site, status, n in conn.execute(
                select(j.site, j.status, func.count()).where(
                    j.status.in_(FINAL_STATES), j.state_changed > start, j.state_changed <= at)
                .group_by(j.site, j.status)):
            rows.append({"time": at, "site": site or "", "status": status, "n_jobs": n})
    if not rows:
        rows = [{"time": at, "site": "", "status": "none", "n_jobs": 0}]   # "taken, empty"
    try:
        with tb.engine.begin() as conn:
            conn.execute(insert(db.ops_snapshots), rows)
    except IntegrityError:
        return 0            # another process took it first
    log.debug("operations snapshot %s: %d row(s)", at, len(rows))
    return len(rows)


def series(tb, since: dt.datetime, until: dt.datetime, status: str, by: str = "site",
           sites: list[str] | None = None, top: int = 10) -> dict:
    """The history of ``status`` per site (``by="site"``) or in total, bucketed to at most
    60 points: active states averaged over each bucket's snapshots, final states summed."""
    s = db.ops_snapshots.c
    width = bucket_width((until - since).total_seconds())
    b = bucket(s.time, width, tb.dialect)
    value = cast(func.sum(s.n_jobs), Float)
    group = [b] + ([s.site] if by == "site" else [])
    conds = [s.time >= since, s.time < until, s.status == status]
    if sites:
        conds.append(s.site.in_(sites))
    with db.read(tb.engine) as conn:
        found = conn.execute(select(*group, value)
                             .where(and_(*conds)).group_by(*group)).all()
        snaps = dict(conn.execute(select(b, func.count(func.distinct(s.time))).where(
            s.time >= since, s.time < until).group_by(b)).all())
    taken = sorted(snaps)
    per: dict[str, dict[int, float]] = {}
    for row in found:
        name = row[1] if by == "site" else status
        # an active state's level: the bucket's average over its snapshots (none: 0 jobs)
        n = float(row[-1] or 0) / (1 if status in FINAL_STATES else snaps.get(row[0], 1))
        per.setdefault(name or "(no site)", {})[row[0]] = n
    ranked = sorted(per, key=lambda k: -sum(per[k].values()))[:top]
    return {"width_s": width, "times": [bucket_start(x, width) for x in taken],
            "series": {k: [round(per[k].get(x, 0.0), 1) for x in taken] for k in ranked}}


def table(tb, since: dt.datetime, until: dt.datetime, limit: int = 2000) -> list[dict]:
    """The snapshots' rows summed over sites per time and state (the history table)."""
    s = db.ops_snapshots.c
    with db.read(tb.engine) as conn:
        return [{"time": t, "status": st, "jobs": n} for t, st, n in conn.execute(
            select(s.time, s.status, func.sum(s.n_jobs)).where(
                s.time >= since, s.time < until, s.status != "none")
            .group_by(s.time, s.status).order_by(s.time.desc(), s.status).limit(limit))]
