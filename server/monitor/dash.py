"""The dashboard: jobs per site and state (active ones whatever the window, ended ones in it),
failure % per site, sites grouped by region, and the pilots the factories reported in the last
3 hours. One GROUP BY per job table, one over the pilots. Without job filters (the overview as
it opens) the active jobs come from the job counters (``taskbuffer.counts``) instead: counting
two million queued jobs through an index took hundreds of milliseconds per view."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from .. import db
from .selection import ACTIVE_STATES, ALL_STATES, FINAL_STATES, JobSelection

PILOT_HOURS = 3


def site_state_counts(tb, sel: JobSelection) -> dict[str, dict[str, int]]:
    """site -> state -> jobs of the selection."""
    if not sel.terms and sel.state_not_updated_h is None and sel.window.bounded \
            and sel.window.until is None:
        return _counted_active_plus_ended(tb, sel)
    return grouped_site_state_counts(tb, sel)


def grouped_site_state_counts(tb, sel: JobSelection) -> dict[str, dict[str, int]]:
    """site -> state -> jobs of the selection, counted from the job tables."""
    out: dict[str, dict[str, int]] = {}
    with db.read(tb.engine) as conn:
        for t in sel.tables():
            for conds in sel.branches(t):
                q = (select(t.c.site, t.c.status, func.count()).where(*conds)
                     .group_by(t.c.site, t.c.status))
                for site, status, n in conn.execute(q):
                    row = out.setdefault(site or "(no site)", {})
                    row[status] = row.get(status, 0) + n
    return out


def _counted_active_plus_ended(tb, sel: JobSelection) -> dict[str, dict[str, int]]:
    """The unfiltered selection: active jobs from the counters, ended ones of the window from
    ``ix_jobs_status_modified`` (live) and ``ix_jobs_archive_modified``."""
    out: dict[str, dict[str, int]] = {}
    active = set(ACTIVE_STATES)
    for site, states in tb.counts.site_load(include_unsited=True).items():
        for status, n in states.items():
            if status in active:
                row = out.setdefault(site or "(no site)", {})
                row[status] = row.get(status, 0) + n
    with db.read(tb.engine) as conn:
        for t in sel.tables():
            q = (select(t.c.site, t.c.status, func.count())
                 .where(t.c.status.in_(FINAL_STATES), t.c.modification_time >= sel.window.since)
                 .group_by(t.c.site, t.c.status))
            for site, status, n in conn.execute(q):
                row = out.setdefault(site or "(no site)", {})
                row[status] = row.get(status, 0) + n
    return out


def pilot_counts(tb, since: dt.datetime) -> dict[str, dict[str, int]]:
    """site -> pilot state -> pilots reported since ``since``."""
    p = db.pilots.c
    out: dict[str, dict[str, int]] = {}
    with db.read(tb.engine) as conn:
        for site, state, n in conn.execute(select(p.site, p.state, func.count())
                                           .where(p.updated >= since)
                                           .group_by(p.site, p.state)):
            out.setdefault(site, {})[state] = n
    return out


def site_rows(tb) -> dict[str, dict]:
    """name -> {status, region, backend} of the configured sites."""
    with db.read(tb.engine) as conn:
        rows = conn.execute(select(db.sites.c.name, db.sites.c.status, db.sites.c.config)).all()
    return {name: {"status": status, "region": (cfg or {}).get("region") or "",
                   "backend": ((cfg or {}).get("scheduler") or {}).get("backend")}
            for name, status, cfg in rows}


def dashboard(tb, sel: JobSelection, region: str | None = None) -> dict:
    counts = site_state_counts(tb, sel)
    pilots = pilot_counts(tb, sel.now - dt.timedelta(hours=PILOT_HOURS))
    sites = site_rows(tb)
    rows = []
    for name in sorted(set(counts) | set(sites) | set(pilots)):
        info = sites.get(name, {"status": None, "region": "", "backend": None})
        if region is not None and info["region"] != region:
            continue
        states = counts.get(name, {})
        failed, finished = states.get("failed", 0), states.get("finished", 0)
        rows.append({"site": name, "region": info["region"], "site_status": info["status"],
                     "states": {s: states.get(s, 0) for s in ALL_STATES},
                     "total": sum(states.values()),
                     "failure_pct": round(100.0 * failed / (failed + finished), 1)
                     if failed + finished else None,
                     "pilots": pilots.get(name, {}),
                     "pilots_total": sum(pilots.get(name, {}).values())})
    rows.sort(key=lambda r: (r["region"], r["site"]))
    totals = {s: sum(r["states"][s] for r in rows) for s in ALL_STATES}
    regions: dict[str, dict[str, int]] = {}
    for r in rows:
        reg = regions.setdefault(r["region"] or "(none)", {s: 0 for s in ALL_STATES})
        for s in ALL_STATES:
            reg[s] += r["states"][s]
    return {"states": list(ALL_STATES), "sites": rows, "totals": totals, "regions": regions,
            "pilot_hours": PILOT_HOURS}
