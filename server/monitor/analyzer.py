"""The job status analyzer: for jobs waiting in ``defined``, ``assigned`` or ``activated``, why.

Waiting jobs are grouped in SQL by what decides where and whether they can run (state, site,
cores, memory, wall time, share, label, required pilot version); each group is then explained
from the sites, the pilots the factories reported, the factories' own reasons, the inputs'
replicas and the shares: no site online, inputs not placed, no pilot matched (naming the
limit), share or quota exhausted.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from .. import db
from ..brokerage import JobNeeds, input_endpoint, site_fits
from ..shares import ShareChooser, ShareStore, targets

WAITING_STATES = ("defined", "assigned", "activated")
PILOT_WINDOW_H = 3
MAX_GROUPS = 200


def waiting_groups(tb, site: str | None = None, limit: int = MAX_GROUPS) -> list[dict]:
    j = db.jobs.c
    keys = (j.status, j.site, j.cores, j.memory_mb, j.walltime_s, j.share,
            j.prod_source_label, j.pilot_version)
    q = (select(*keys, func.count().label("jobs"), func.min(j.state_changed).label("since"),
                func.min(j.panda_id).label("example"))
         .where(j.status.in_(WAITING_STATES)).group_by(*keys)
         .order_by(func.count().desc()).limit(limit))
    if site is not None:
        q = q.where(j.site == site)
    with db.read(tb.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


class Context:
    """What the explanations read, once per analysis."""

    def __init__(self, tb):
        self.tb = tb
        self.now = tb.clock()
        self.sites = {s["name"]: s for s in tb.sites.all()}
        p = db.pilots.c
        since = self.now - dt.timedelta(hours=PILOT_WINDOW_H)
        self.pilots: dict[str, dict[str, int]] = {}
        with db.read(tb.engine) as conn:
            for s, state, n in conn.execute(select(p.site, p.state, func.count())
                                            .where(p.updated >= since)
                                            .group_by(p.site, p.state)):
                self.pilots.setdefault(s, {})[state] = n
            self.factories = conn.execute(select(db.factories)).all()
        self._shares: dict[str, tuple] = {}
        self._grid: tuple[dict[str, int], list] | None = None

    def factory_reasons(self, site: str) -> list[str]:
        out = []
        for f in self.factories:
            st = (f.site_status or {}).get(site) or {}
            if st and not st.get("submitting", True):
                out.append(f"factory {f.name} does not submit: {st.get('reason') or 'no reason'}")
        return out

    def share_state(self, site: str):
        """(order, grid-wide cores per share, activated jobs per share at ``site``, targets):
        the order is by grid-wide usage, so that is the usage an explanation quotes."""
        if site not in self._shares:
            chooser = ShareChooser(self.tb, ttl_s=0)
            if self._grid is None:
                self._grid = (chooser.grid_running(), ShareStore(self.tb).load())
            grid, tree = self._grid
            order, _, waiting = chooser.ranking(site, tree, grid)
            self._shares[site] = (order, grid, waiting, targets(tree))
        return self._shares[site]


def _fits(group: dict, cfg: dict) -> str | None:
    return site_fits(JobNeeds(group["cores"], group["memory_mb"], group["walltime_s"], 0,
                              group["prod_source_label"]), cfg)


def _missing_inputs(tb, panda_id: int, site_cfg: dict | None) -> tuple[int, str | None]:
    endpoint = input_endpoint(site_cfg or {}) if site_cfg else None
    f = db.files.c
    with db.read(tb.engine) as conn:
        inputs = conn.execute(select(f.scope, f.lfn).where(f.panda_id == panda_id,
                                                          f.type == "input")).all()
    if not inputs or endpoint is None:
        return 0, endpoint
    placed = tb.data.replica_endpoints(inputs[0].scope, [i.lfn for i in inputs])
    return sum(1 for i in inputs if endpoint not in placed.get(i.lfn, set())), endpoint


def explain(ctx: Context, g: dict) -> list[str]:
    """Why the jobs of group ``g`` wait, most decisive reason first."""
    tb, site = ctx.tb, g["site"]
    row = ctx.sites.get(site) if site else None
    if g["status"] == "defined":
        return ["created but never brokered: the submission stopped before assigning them"]
    if site is None:
        online = [s for s in ctx.sites.values() if s["status"] == "online"]
        if not online:
            return ["no site online"]
        misfit = [f"{s['name']}: {_fits(g, s['config'])}" for s in online
                  if _fits(g, s["config"])]
        if len(misfit) == len(online):
            return ["no online site fits: " + "; ".join(misfit[:5])]
        return ["not brokered yet (a site fits: brokerage runs at submission)"]
    if row is None:
        return [f"site {site} is not configured"]
    reasons = []
    if g["status"] == "assigned":
        missing, endpoint = _missing_inputs(tb, g["example"], row["config"])
        if missing:
            reasons.append(f"inputs not placed: {missing} input file(s) of job {g['example']} "
                           f"have no replica at {endpoint} (the data service copies them)")
        return reasons or ["waiting for the data service to activate them"]
    # activated: why no pilot took them
    if row["status"] != "online" and not (row["status"] == "test"
                                          and g["prod_source_label"] in ("test", "ptest")):
        reasons.append(f"site {site} is {row['status']}: pilots get no jobs of label "
                       f"{g['prod_source_label']}")
    reasons += ctx.factory_reasons(site)
    pilots = ctx.pilots.get(site, {})
    if not pilots:
        reasons.append(f"no pilot reported at {site} in the last {PILOT_WINDOW_H} h")
    misfit = _fits(g, row["config"])
    if misfit:
        reasons.append(f"no pilot matches: the job {misfit}")
    pilot_wall = ((row["config"].get("pilots") or {}).get("walltime_s"))
    if pilot_wall and g["walltime_s"] > pilot_wall:
        reasons.append(f"no pilot matches: the job needs {g['walltime_s']} s wall time, pilots "
                       f"at {site} run {pilot_wall} s")
    if g["pilot_version"]:
        reasons.append(f"no pilot matches unless it runs pilot version {g['pilot_version']}")
    max_running = (row["config"].get("pilots") or {}).get("max_running")
    busy = pilots.get("running", 0)
    if max_running and busy >= max_running:
        reasons.append(f"quota: {busy} pilots run at {site}, its max_running is {max_running}")
    order, running, waiting, tgt = ctx.share_state(site)
    share = g["share"]
    total = sum(running.values())
    if total and order and share in order and order.index(share) > 0 and share in tgt:
        used = 100.0 * running.get(share, 0) / total
        if used >= 100.0 * tgt[share]:
            reasons.append(f"share {share} is at {used:.0f}% of the running cores of the grid, "
                           f"its target is {100 * tgt[share]:.0f}%: shares below target go first")
    return reasons or [f"waiting for a pilot ({sum(pilots.values())} reported at {site} in "
                       f"the last {PILOT_WINDOW_H} h)"]


def analyze(tb, site: str | None = None) -> list[dict]:
    ctx = Context(tb)
    out = []
    for g in waiting_groups(tb, site):
        g["waiting_s"] = (ctx.now - g["since"]).total_seconds() if g["since"] else None
        g["reasons"] = explain(ctx, g)
        out.append(g)
    return out
