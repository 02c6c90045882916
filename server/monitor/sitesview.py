"""Sites: the list (status, resources, active jobs) and a site's page (its config, its status
with the reasons the factories and the alarms give, its pilots and recent errors)."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from .. import db
from .selection import ACTIVE_STATES

RECENT_PILOTS = 50


def active_counts(tb, site: str | None = None) -> dict[str, dict[str, int]]:
    """site -> state -> jobs in an active state (an index-only read of the active entries)."""
    j = db.jobs.c
    q = select(j.site, j.status, func.count()).where(j.status.in_(ACTIVE_STATES))
    if site is not None:
        q = q.where(j.site == site)
    out: dict[str, dict[str, int]] = {}
    with db.read(tb.engine) as conn:
        for name, status, n in conn.execute(q.group_by(j.site, j.status)):
            out.setdefault(name or "(no site)", {})[status] = n
    return out


def site_list(tb) -> list[dict]:
    counts = active_counts(tb)
    out = []
    for s in tb.sites.all():
        cfg = s["config"] or {}
        res = cfg.get("resources") or {}
        out.append({"name": s["name"], "status": s["status"],
                    "status_reason": s.get("status_reason"), "region": cfg.get("region"),
                    "backend": (cfg.get("scheduler") or {}).get("backend"),
                    "cores": res.get("cores"), "memory_mb": res.get("memory_mb"),
                    "max_walltime_s": res.get("max_walltime_s"), "updated": s["updated"],
                    "jobs": counts.get(s["name"], {})})
    return out


def flatten(config, prefix: str = "") -> list[tuple[str, object]]:
    """A nested config as (dotted key, value) rows."""
    if isinstance(config, dict):
        rows = []
        for key in sorted(config):
            rows += flatten(config[key], f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, config)]


def factory_views(tb, site: str) -> list[dict]:
    """How each factory sees ``site``: submitting or not, and why."""
    with db.read(tb.engine) as conn:
        facs = conn.execute(select(db.factories)).all()
    out = []
    for f in facs:
        st = (f.site_status or {}).get(site)
        if st is not None:
            out.append({"factory": f.name, "last_seen": f.last_seen,
                        "submitting": st.get("submitting", True), "reason": st.get("reason"),
                        "consecutive_failures": st.get("consecutive_failures")})
    return out


def recent_pilots(tb, site: str, limit: int = RECENT_PILOTS) -> list[dict]:
    p = db.pilots.c
    with db.read(tb.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(db.pilots).where(p.site == site).order_by(p.updated.desc()).limit(limit))]


def site_page(tb, name: str) -> dict:
    site = tb.sites.get(name)            # NotFound: a 404
    return {"site": {"name": site["name"], "status": site["status"],
                     "status_reason": site.get("status_reason"),
                     "configured_status": site["configured_status"],
                     "updated": site["updated"]},
            "config": [{"key": k, "value": v} for k, v in flatten(site["config"])],
            "factories": factory_views(tb, name), "pilots": recent_pilots(tb, name),
            "jobs": active_counts(tb, name).get(name, {})}


WORKER_NODE_ROWS = 200


def worker_nodes(tb, since: dt.datetime, limit: int = WORKER_NODE_ROWS) -> list[dict]:
    """The worker nodes the pilots described (panda_core.workernode), per site, CPU model, cores
    and pilot version: jobs modified since ``since``, how many nodes, mean load and the least
    free disk; the largest groups first, at most ``limit`` of them."""
    j = db.jobs.c
    jobs = func.count().label("jobs")
    query = (select(j.site, j.wn_cpu_model, j.wn_cores, j.wn_pilot_version, jobs,
                    func.count(func.distinct(j.node)), func.avg(j.wn_load1),
                    func.min(j.wn_disk_free_mb))
             .where(j.modification_time >= since, j.wn_cpu_model.is_not(None))
             .group_by(j.site, j.wn_cpu_model, j.wn_cores, j.wn_pilot_version)
             .order_by(jobs.desc(), j.site).limit(limit))
    with db.read(tb.engine) as conn:
        return [{"site": site, "cpu_model": cpu, "cores": cores, "pilot_version": version,
                 "jobs": n, "nodes": nodes,
                 "load1": None if load is None else round(float(load), 2),
                 "min_disk_free_mb": None if disk is None else int(disk)}
                for site, cpu, cores, version, n, nodes, load, disk in conn.execute(query)]


def factory_submissions(tb, since: dt.datetime) -> list[dict]:
    """What each factory submitted: pilots per factory, site and state updated since."""
    p = db.pilots.c
    with db.read(tb.engine) as conn:
        return [{"factory": f, "site": s, "state": st, "pilots": n} for f, s, st, n in
                conn.execute(select(p.factory, p.site, p.state, func.count())
                             .where(p.updated >= since)
                             .group_by(p.factory, p.site, p.state)
                             .order_by(p.factory, p.site, p.state))]
