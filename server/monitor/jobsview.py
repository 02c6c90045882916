"""The job list: the attribute summary (facets), the error summary box and the job table.

Facets are one statement: the capped selection as a CTE, one GROUP BY per attribute over it,
joined by UNION ALL. The table is keyset-paginated (``before=`` the last row's sort key), so a
script walks any selection page by page without OFFSET scans.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import String, and_, cast, func, literal, or_, select, union_all

from .. import db
from .errorcatalog import job_errors
from .params import Args, ParamError
from .selection import FACETS, JobSelection

SORTS = {"time-descending": ("modification_time", True), "time-ascending":
         ("modification_time", False), "pandaid-descending": ("panda_id", True),
         "pandaid-ascending": ("panda_id", False)}
#: the job table's columns (JSON ``fields=`` may ask for any job column)
ROW_COLUMNS = ("panda_id", "task_id", "attempt_nr", "status", "site", "owner",
               "working_group", "prod_source_label", "share", "current_priority", "cores",
               "creation_time", "start_time", "end_time", "modification_time", "state_changed",
               "pilot_error_code", "pilot_error_diag", "exe_error_code", "exe_error_diag",
               "dispatcher_error_code", "dispatcher_error_diag", "ddm_error_code",
               "ddm_error_diag", "task_buffer_error_code", "task_buffer_error_diag",
               "trans_exit_code", "transformation")
JOB_COLUMNS = tuple(c.name for c in db.jobs.columns)
MAX_DISPLAY = 5000


@dataclass
class Page:
    """Which rows of the selection to show: sort, page size and the keyset cursor."""
    sortby: str
    display_limit: int
    before: tuple | None
    fields: tuple[str, ...]


def read_page(args: Args, default_display: int = 100) -> Page:
    sortby = args.choice("sortby", SORTS, "time-descending")
    display = args.integer("display_limit", default_display, lo=1, hi=MAX_DISPLAY)
    before = None
    raw = args.text("before")
    if raw is not None:
        before = parse_cursor(raw, SORTS[sortby][0])
    fields = ROW_COLUMNS
    wanted = args.text("fields")
    if wanted is not None:
        fields = tuple(f.strip() for f in wanted.split(",") if f.strip())
        bad = [f for f in fields if f not in JOB_COLUMNS]
        if bad or not fields:
            raise ParamError(f"fields: unknown job column(s) {', '.join(bad) or '(none)'}; "
                             f"columns: {', '.join(JOB_COLUMNS)}")
    return Page(sortby, display, before, fields)


def parse_cursor(raw: str, key: str) -> tuple:
    try:
        if key == "panda_id":
            return (int(raw),)
        when, _, pid = raw.rpartition(",")
        return (dt.datetime.fromisoformat(when), int(pid))
    except ValueError:
        raise ParamError(f"before: not a position of this sort order: {raw[:60]!r} "
                         "(take it from the reply's 'next')") from None


def cursor_of(row: dict, key: str) -> str:
    if key == "panda_id":
        return str(row["panda_id"])
    return f"{row['modification_time'].isoformat()},{row['panda_id']}"


# ---------------------------------------------------------------------- facets
#: attributes with many values: one GROUP BY each; the others share one GROUP BY over all of
#: them (their combinations are few), summed per attribute after
WIDE_FACETS = frozenset({"computingsite", "produsername", "jeditaskid", "transformation",
                         "cpumodel", "pilotversion"})


def facets(tb, sel: JobSelection, fields=FACETS) -> tuple[dict[str, list[dict]], int]:
    """Counts per value of each attribute over the capped selection; and its size."""
    def cols(t):
        return [t.c.modification_time] + [f.expr(t).label(f.name) for f in fields]
    picked = sel.capped(cols).cte("sel")
    parts = [select(literal("_total", String).label("facet"),
                    cast(literal(None), String).label("value"), func.count().label("n"))
             .select_from(picked)]
    for f in fields:
        if f.name in WIDE_FACETS:
            col = picked.c[f.name]
            parts.append(select(literal(f.name, String).label("facet"),
                                cast(col, String).label("value"), func.count().label("n"))
                         .group_by(col))
    narrow = [f for f in fields if f.name not in WIDE_FACETS]
    counts: dict[str, dict] = {f.name: {} for f in fields}
    total = 0
    with db.read(tb.engine) as conn:
        for facet, value, n in conn.execute(union_all(*parts)):
            if facet == "_total":
                total = n
            else:
                counts[facet][value] = n
        if narrow:
            keys = [picked.c[f.name] for f in narrow]
            for row in conn.execute(select(*keys, func.count()).group_by(*keys)):
                for f, value in zip(narrow, row[:-1]):
                    if f.error and not value:
                        continue
                    value = None if value is None else str(value)
                    counts[f.name][value] = counts[f.name].get(value, 0) + row[-1]
    out = {name: sorted(({"value": v, "count": n} for v, n in values.items()),
                        key=lambda v: (-v["count"], str(v["value"])))
           for name, values in counts.items()}
    return out, total


# ---------------------------------------------------------------------- the table
def rows(tb, sel: JobSelection, page: Page) -> tuple[list[dict], str | None]:
    """One page of the selection in ``page.sortby`` order; and the cursor of the next."""
    key, desc = SORTS[page.sortby]
    wanted = tuple(dict.fromkeys(("panda_id", "modification_time") + page.fields))
    parts = []
    for t in sel.tables():
        for conds in sel.branches(t):
            if page.before is not None:
                conds = conds + [_after(t, key, desc, page.before)]
            order = [t.c[key].desc() if desc else t.c[key].asc()]
            if key != "panda_id":
                order.append(t.c.panda_id.desc() if desc else t.c.panda_id.asc())
            q = (select(*[t.c[c] for c in wanted]).where(*conds).order_by(*order)
                 .limit(page.display_limit + 1))
            parts.append(select(q.subquery()))
    if not parts:
        return [], None
    if len(parts) == 1:
        stmt = parts[0]
        u = stmt.selected_columns
    else:
        sub = union_all(*parts).subquery()
        u = sub.c
        stmt = select(sub)
    order = [u[key].desc() if desc else u[key].asc()]
    if key != "panda_id":
        order.append(u["panda_id"].desc() if desc else u["panda_id"].asc())
    stmt = stmt.order_by(*order).limit(page.display_limit + 1)
    with db.read(tb.engine) as conn:
        found = [dict(r._mapping) for r in conn.execute(stmt)]
    more = len(found) > page.display_limit
    found = found[:page.display_limit]
    return found, cursor_of(found[-1], key) if more and found else None


def _after(t, key: str, desc: bool, before: tuple):
    if key == "panda_id":
        return t.c.panda_id < before[0] if desc else t.c.panda_id > before[0]
    when, pid = before
    col = t.c.modification_time
    if desc:
        return or_(col < when, and_(col == when, t.c.panda_id < pid))
    return or_(col > when, and_(col == when, t.c.panda_id > pid))


def decorate(job: dict, now: dt.datetime) -> dict:
    """What the table shows besides the columns: time to start, duration, the error text."""
    created, started, ended = (job.get("creation_time"), job.get("start_time"),
                               job.get("end_time"))
    job["time_to_start_s"] = (started - created).total_seconds() if started and created \
        else None
    job["duration_s"] = ((ended or now) - started).total_seconds() if started else None
    if any(k.endswith("_error_code") for k in job):
        errors = job_errors(job)
        job["error"] = "; ".join(f"{e['component']}:{e['code']} {e['diag'] or e['description']}"
                                 for e in errors) or None
    return job
