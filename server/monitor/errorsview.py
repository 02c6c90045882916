"""The error summary: failed jobs by component and code, by site, user and task, with failure %
and CPU hours lost, the latest occurrence, and errors over time.

Three statements, each over the capped selection as a CTE: the codes (one GROUP BY per error
component, UNION ALL), the ended jobs per site/user/task and state, and the time histogram.
"CPU hours lost" is cores x wall time of the failed jobs.
"""
from __future__ import annotations

from sqlalchemy import Float, String, cast, func, literal, select, union_all

from .. import db
from .errorcatalog import COMPONENTS, describe
from .selection import JobSelection
from .sqlfn import EPOCH, bucket, bucket_start, bucket_width, seconds_between

DEFAULT_ERROR_LIMIT = 100000


def _lost_s(t, dialect: str):
    """Core-seconds a job used: cores x (end - start), 0 when it never started."""
    wall = seconds_between(t.c.start_time, func.coalesce(t.c.end_time, t.c.modification_time),
                           dialect)
    return func.coalesce(cast(wall, Float), 0.0) * t.c.cores


def _failed(tb, sel: JobSelection, extra_cols=()):
    def cols(t):
        out = [t.c.panda_id, t.c.modification_time, t.c.site, t.c.owner, t.c.task_id,
               _lost_s(t, tb.dialect).label("lost_s")]
        for comp in COMPONENTS:
            out += [t.c[comp.code_column], t.c[comp.diag_column]]
        return out + [c(t) for c in extra_cols]
    return sel.capped(cols, where=lambda t: [t.c.status == "failed"]).cte("failed")


def by_code(tb, sel: JobSelection) -> list[dict]:
    """Per (component, code) of the failed jobs: count, CPU hours lost, a sample diagnostic,
    the latest occurrence and its PandaID, and the description."""
    failed = _failed(tb, sel)
    parts = []
    for comp in COMPONENTS:
        code = failed.c[comp.code_column]
        parts.append(select(literal(comp.name, String).label("component"), code.label("code"),
                            func.count().label("count"),
                            func.sum(failed.c.lost_s).label("lost_s"),
                            func.max(failed.c[comp.diag_column]).label("sample_diag"),
                            func.max(failed.c.modification_time).label("latest"),
                            func.max(failed.c.panda_id).label("example_panda_id"))
                     .where(code.is_not(None), code != 0).group_by(code))
    with db.read(tb.engine) as conn:
        out = [dict(r._mapping) for r in conn.execute(union_all(*parts))]
    for row in out:
        row["cpu_hours_lost"] = round((row.pop("lost_s") or 0.0) / 3600.0, 3)
        row["description"] = describe(row["component"], row["code"])
        row["param"] = next(c.param for c in COMPONENTS if c.name == row["component"])
    out.sort(key=lambda r: (-r["count"], r["component"], r["code"]))
    return out


GROUPINGS = {"site": "site", "user": "owner", "task": "task_id"}


def by_group(tb, sel: JobSelection) -> dict[str, list[dict]]:
    """Per site, user and task: failed, finished, failure % = failed / (failed + finished),
    and CPU hours lost by the failed jobs."""
    def cols(t):
        return [t.c.modification_time, t.c.status, t.c.site, t.c.owner, t.c.task_id,
                _lost_s(t, tb.dialect).label("lost_s")]
    ended = sel.capped(cols, where=lambda t: [t.c.status.in_(("failed", "finished"))]
                       ).cte("ended")
    parts = []
    for name, col in GROUPINGS.items():
        c = ended.c[col]
        parts.append(select(literal(name, String).label("grouping"),
                            cast(c, String).label("value"), ended.c.status,
                            func.count().label("n"), func.sum(ended.c.lost_s).label("lost_s"))
                     .group_by(c, ended.c.status))
    acc: dict[str, dict[str, dict]] = {name: {} for name in GROUPINGS}
    with db.read(tb.engine) as conn:
        for grouping, value, status, n, lost in conn.execute(union_all(*parts)):
            row = acc[grouping].setdefault(value, {"value": value, "failed": 0, "finished": 0,
                                                   "cpu_hours_lost": 0.0})
            row[status] = n
            if status == "failed":
                row["cpu_hours_lost"] = round((lost or 0.0) / 3600.0, 3)
    out: dict[str, list[dict]] = {}
    for name, rows in acc.items():
        for row in rows.values():
            done = row["failed"] + row["finished"]
            row["failure_pct"] = round(100.0 * row["failed"] / done, 1) if done else None
        out[name] = sorted(rows.values(), key=lambda r: (-r["failed"], str(r["value"])))
    return out


def over_time(tb, sel: JobSelection, top: int = 8) -> dict:
    """Failed jobs per time bucket and component:code (the ``top`` codes; the rest as
    "other"): for the stacked-bar plot."""
    now = sel.now
    since = sel.window.since
    width = bucket_width(((sel.window.until or now) - since).total_seconds()) if since \
        else 86400
    failed = _failed(tb, sel, extra_cols=[
        lambda t: bucket(t.c.modification_time, width, tb.dialect).label("bucket")])
    parts = []
    for comp in COMPONENTS:
        code = failed.c[comp.code_column]
        parts.append(select(failed.c.bucket, literal(comp.name, String).label("component"),
                            code.label("code"), func.count().label("n"))
                     .where(code.is_not(None), code != 0).group_by(failed.c.bucket, code))
    with db.read(tb.engine) as conn:
        found = [tuple(r) for r in conn.execute(union_all(*parts))]
    totals: dict[str, int] = {}
    for _, comp, code, n in found:
        totals[f"{comp}:{code}"] = totals.get(f"{comp}:{code}", 0) + n
    keep = [k for k, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    series: dict[str, dict[int, int]] = {k: {} for k in keep}
    for b, comp, code, n in found:
        name = f"{comp}:{code}" if f"{comp}:{code}" in series else "other"
        series.setdefault(name, {})
        series[name][b] = series[name].get(b, 0) + n
    buckets = sorted({b for b, *_ in found})
    if since is not None:          # the whole window, empty buckets too
        first = int((since - EPOCH).total_seconds()) // width
        last = int(((sel.window.until or now) - EPOCH).total_seconds()) // width
        buckets = sorted(set(range(first, last + 1)) | set(buckets))
    return {"width_s": width, "buckets": [bucket_start(b, width) for b in buckets],
            "series": {name: [vals.get(b, 0) for b in buckets] for name, vals in series.items()}}


def recent_error_counts(tb, since) -> dict[tuple[str, int], int]:
    """(component, code) -> live jobs failed since ``since`` (the ``(status, state_changed)``
    index): the ``panda_job_errors_recent`` gauge."""
    j = db.jobs
    parts = [select(literal(c.name, String), j.c[c.code_column], func.count())
             .where(j.c.status == "failed", j.c.state_changed >= since,
                    j.c[c.code_column] != 0).group_by(j.c[c.code_column]) for c in COMPONENTS]
    with db.read(tb.engine) as conn:
        return {(comp, code): n for comp, code, n in conn.execute(union_all(*parts))}
