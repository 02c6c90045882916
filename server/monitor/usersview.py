"""Users: per user in the window, their jobs, success rate and the sites they ran at; one
GROUP BY over the capped selection."""
from __future__ import annotations

from sqlalchemy import String, cast, func, literal, select, union_all

from .. import db
from .selection import JobSelection


def users(tb, sel: JobSelection) -> tuple[list[dict], int]:
    picked = sel.capped(lambda t: [t.c.modification_time, t.c.owner, t.c.status, t.c.site]
                        ).cte("sel")
    parts = [select(literal("_total", String), cast(literal(None), String),
                    cast(literal(None), String), func.count()).select_from(picked),
             select(literal("state", String), picked.c.owner, picked.c.status, func.count())
             .group_by(picked.c.owner, picked.c.status),
             select(literal("site", String), picked.c.owner, cast(picked.c.site, String),
                    func.count()).group_by(picked.c.owner, picked.c.site)]
    acc: dict[str, dict] = {}
    total = 0
    with db.read(tb.engine) as conn:
        for kind, owner, value, n in conn.execute(union_all(*parts)):
            if kind == "_total":
                total = n
                continue
            row = acc.setdefault(owner, {"user": owner, "jobs": 0, "states": {}, "sites": {}})
            if kind == "state":
                row["states"][value] = n
                row["jobs"] += n
            else:
                row["sites"][value or "(no site)"] = n
    out = []
    for row in acc.values():
        fin, fail = row["states"].get("finished", 0), row["states"].get("failed", 0)
        row["success_pct"] = round(100.0 * fin / (fin + fail), 1) if fin + fail else None
        out.append(row)
    out.sort(key=lambda r: (-r["jobs"], r["user"]))
    return out, total
