"""The data behind the plots page that no other view already aggregates: queue times
(activated -> running) and time spent per state of recent jobs, and share usage against the
shares' targets."""
from __future__ import annotations

from sqlalchemy import func, select

from .. import db
from ..shares import RUNNING_STATES, ShareStore, targets
from .plots import bins
from .selection import JobSelection

#: recent started jobs whose state histories the queue-time plots read
HISTORY_JOBS = 2000


def state_durations(tb, sel: JobSelection) -> dict:
    """Seconds from activated to running, and spent in each state, of the selection's
    ``HISTORY_JOBS`` most recently modified started jobs (their history rows, by index)."""
    picked = sel.capped(lambda t: [t.c.modification_time, t.c.panda_id], limit=HISTORY_JOBS,
                        where=lambda t: [t.c.start_time.is_not(None)])
    with db.read(tb.engine) as conn:
        ids = [r.panda_id for r in conn.execute(picked)]
        # live and archived jobs: their history is in the tier their row is in
        found = [r for t in (db.job_history, db.job_history_archive) for r in conn.execute(
            select(t.c.panda_id, t.c.row_id, t.c.new_status, t.c.time)
            .where(t.c.panda_id.in_(ids)))] if ids else []
    rows = [(pid, status, when) for pid, _row, status, when in sorted(found, key=lambda r: r[:2])]
    per_state: dict[str, list[float]] = {}
    queue: list[float] = []
    last: dict[int, tuple[str, object]] = {}
    activated: dict[int, object] = {}
    for pid, status, when in rows:
        prev = last.get(pid)
        if prev is not None:
            per_state.setdefault(prev[0], []).append((when - prev[1]).total_seconds())
        last[pid] = (status, when)
        if status == "activated":
            activated.setdefault(pid, when)
        elif status == "running" and pid in activated:
            queue.append((when - activated.pop(pid)).total_seconds())
    return {"jobs": len(ids), "queue_s": queue, "per_state": per_state}


def duration_histograms(data: dict) -> dict:
    out = {"queue": bins(data["queue_s"])}
    for state, values in sorted(data["per_state"].items()):
        out[state] = bins(values)
    return out


def share_usage(tb) -> list[dict]:
    """Per share: the target fraction and the fraction of running cores (all sites)."""
    j = db.jobs.c
    with db.read(tb.engine) as conn:
        used = {share: int(cores or 0) for share, cores in conn.execute(
            select(j.share, func.sum(j.cores)).where(j.status.in_(RUNNING_STATES))
            .group_by(j.share))}
    total = sum(used.values())
    tgt = targets(ShareStore(tb).load())
    names = list(tgt) + sorted(set(used) - set(tgt))
    return [{"share": n, "target_pct": round(100.0 * tgt.get(n, 0.0), 1),
             "used_pct": round(100.0 * used.get(n, 0) / total, 1) if total else 0.0,
             "running_cores": used.get(n, 0)} for n in names]
