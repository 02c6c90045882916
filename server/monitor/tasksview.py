"""Tasks: the task list (facets, progress) and the task page (state counts, datasets, and
walltime / CPU efficiency / memory histograms of its ended jobs, binned in SQL)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Float, Integer, String, cast, func, literal, or_, select, union_all

from panda_core.states import FINAL_TASK_STATES, TaskState

from .. import db
from .params import Args, Terms, Window, read_window, split_terms, value_condition
from .selection import JOB_TABLES
from .sqlfn import seconds_between

TASK_FILTERS = {"status": "status", "username": "owner", "taskname": "name",
                "jeditaskid": "task_id", "gshare": "share", "site": "site"}
TASK_FACETS = ("status", "owner", "share", "site")
ACTIVE_TASK_STATES = tuple(s.value for s in TaskState if s not in FINAL_TASK_STATES)
#: ended jobs of a task the histograms read at most (the most recent)
HISTOGRAM_JOBS = 10000


@dataclass
class TaskSelection:
    terms: dict[str, Terms]
    filters: dict[str, str]
    window: Window
    limit: int
    display_limit: int

    def conditions(self) -> list:
        t = db.tasks
        conds = [value_condition(t.c[TASK_FILTERS[k]], terms, k == "jeditaskid")
                 for k, terms in self.terms.items()]
        if self.window.bounded:
            conds.append(or_(self.window.condition(t.c.modified),
                             t.c.status.in_(ACTIVE_TASK_STATES)))
        return conds


def read_task_selection(args: Args, now: dt.datetime) -> TaskSelection:
    filters = {}
    for key in TASK_FILTERS:
        value = args.text(key)
        if key == "username":
            value = value or args.text("produsername")
        if value is not None:
            filters[key] = value
    terms = {k: split_terms(k, v, k == "jeditaskid") for k, v in filters.items()}
    window = read_window(args, now, 24 * 7, "jeditaskid" in filters)
    return TaskSelection(terms, filters, window, args.integer("limit", 5000, 1, 100000),
                         args.integer("display_limit", 300, 1, 5000))


def task_list(tb, sel: TaskSelection) -> dict:
    t = db.tasks
    capped = (select(t.c.task_id, t.c.status, t.c.owner, t.c.share, t.c.site, t.c.modified)
              .where(*sel.conditions()).order_by(t.c.modified.desc()).limit(sel.limit)
              .cte("sel"))
    parts = [select(literal("_total", String), cast(literal(None), String),
                    func.count()).select_from(capped)]
    parts += [select(literal(f, String), cast(capped.c[f], String), func.count())
              .group_by(capped.c[f]) for f in TASK_FACETS]
    facets: dict[str, list[dict]] = {f: [] for f in TASK_FACETS}
    total = 0
    with db.read(tb.engine) as conn:
        for facet, value, n in conn.execute(union_all(*parts)):
            if facet == "_total":
                total = n
            else:
                facets[facet].append({"value": value, "count": n})
        tasks = [dict(r._mapping) for r in conn.execute(
            select(t.c.task_id, t.c.name, t.c.status, t.c.owner, t.c.share, t.c.site,
                   t.c.priority, t.c.created, t.c.modified).where(*sel.conditions())
            .order_by(t.c.modified.desc(), t.c.task_id.desc()).limit(sel.display_limit))]
    counts = job_counts(tb, [x["task_id"] for x in tasks])
    for task in tasks:
        task["jobs"] = counts.get(task["task_id"], {})
        task.update(progress(task["jobs"]))
    for values in facets.values():
        values.sort(key=lambda v: (-v["count"], str(v["value"])))
    return {"facets": facets, "tasks": tasks, "in_selection": total,
            "capped": total >= sel.limit}


def job_counts(tb, task_ids: list[int]) -> dict[int, dict[str, int]]:
    """task -> state -> jobs (live and archived), one GROUP BY per table."""
    out: dict[int, dict[str, int]] = {}
    if not task_ids:
        return out
    with db.read(tb.engine) as conn:
        for t in JOB_TABLES:
            for tid, status, n in conn.execute(
                    select(t.c.task_id, t.c.status, func.count())
                    .where(t.c.task_id.in_(task_ids)).group_by(t.c.task_id, t.c.status)):
                row = out.setdefault(tid, {})
                row[status] = row.get(status, 0) + n
    return out


def progress(counts: dict[str, int]) -> dict:
    total = sum(counts.values())
    return {"n_jobs": total,
            "finished_pct": round(100.0 * counts.get("finished", 0) / total, 1) if total else 0,
            "failed_pct": round(100.0 * counts.get("failed", 0) / total, 1) if total else 0}


def datasets(tb, task_id: int) -> list[dict]:
    """The task's datasets: files per dataset, type and status (live and archived jobs)."""
    out: dict[tuple[str, str], dict] = {}
    with db.read(tb.engine) as conn:
        rows = [r for table in (db.files, db.files_archive) for r in conn.execute(
            select(table.c.dataset, table.c.type, table.c.status, func.count(),
                   func.sum(table.c.fsize))
            .where(table.c.task_id == task_id)
            .group_by(table.c.dataset, table.c.type, table.c.status))]
        for name, ftype, status, n, size in rows:
            row = out.setdefault((name, ftype), {"dataset": name, "type": ftype, "files": 0,
                                                 "bytes": 0, "states": {}})
            row["files"] += n
            row["bytes"] += int(size or 0)
            row["states"][status] = n
    return sorted(out.values(), key=lambda r: ({"input": 0, "output": 1}.get(r["type"], 2),
                                               r["dataset"]))


def event_ranges(tb, task_id: int) -> dict[str, dict[str, int]]:
    """The task's event ranges per state, with their events (one GROUP BY on the ranges'
    task index); empty for a task not split into ranges."""
    r = db.event_ranges.c
    with db.read(tb.engine) as conn:
        return {status: {"ranges": int(n), "events": int(events or 0)}
                for status, n, events in conn.execute(
                    select(r.status, func.count(), func.sum(r.last_event - r.start_event + 1))
                    .where(r.task_id == task_id).group_by(r.status))}


METRICS = {
    "walltime_s": ("wall time (s)", lambda t, d: seconds_between(t.c.start_time, t.c.end_time, d)),
    "cpu_efficiency": ("CPU efficiency", lambda t, d: t.c.cpu_consumption_time / func.nullif(
        seconds_between(t.c.start_time, t.c.end_time, d) * t.c.cores, 0)),
    "max_rss_mb": ("max RSS/PSS (MB)", lambda t, d: t.c.max_rss / 1024.0),
}


def histograms(tb, task_id: int, n_bins: int = 20) -> dict[str, dict]:
    """Per metric and final state (finished, failed): bin edges and counts over the task's
    latest ``HISTOGRAM_JOBS`` ended jobs; min/max and the binning are SQL aggregates."""
    def cols(t):
        return [t.c.panda_id, t.c.status] + [
            cast(expr(t, tb.dialect), Float).label(name) for name, (_, expr) in METRICS.items()]
    parts = [select(*cols(t)).where(t.c.task_id == task_id,
                                    t.c.status.in_(("finished", "failed")))
             .order_by(t.c.panda_id.desc()).limit(HISTOGRAM_JOBS) for t in JOB_TABLES]
    ended = union_all(*[select(p.subquery()) for p in parts]).cte("ended")
    out: dict[str, dict] = {}
    with db.read(tb.engine) as conn:
        bounds = conn.execute(select(*[x for name in METRICS for x in (
            func.min(ended.c[name]), func.max(ended.c[name]))])).first()
        for i, (name, (label, _)) in enumerate(METRICS.items()):
            lo, hi = bounds[2 * i], bounds[2 * i + 1]
            if lo is None:
                out[name] = {"label": label, "edges": [], "finished": [], "failed": []}
                continue
            lo, hi = float(lo), float(hi)
            width = (hi - lo) / n_bins if hi > lo else 1.0
            col = ended.c[name]
            idx = cast(func.floor((col - lo) / width), Integer)
            counts = {"finished": [0] * n_bins, "failed": [0] * n_bins}
            for b, status, n in conn.execute(select(idx, ended.c.status, func.count())
                                             .where(col.is_not(None))
                                             .group_by(idx, ended.c.status)):
                counts[status][min(max(int(b), 0), n_bins - 1)] += n
            out[name] = {"label": label, "edges": [lo + k * width for k in range(n_bins + 1)],
                         **counts}
    return out
