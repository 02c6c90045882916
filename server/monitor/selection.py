"""Which jobs a view is about: the job filters of the query string and the time window, as
SQL over the live and the archived job table, capped.

The rules (BigPanDA's, docs/monitor.md): a default time window on ``modification_time``; jobs
in an active state are shown whatever the window; a query scoped by an id (PandaID, task, batch
id) has no time limit; at most ``limit`` jobs, the most recently modified, are aggregated, and
the page says so when the cap is hit. The live table has indexes for the window
(``ix_jobs_modified``) and the active states (``ix_jobs_status_modified``).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, case, false, or_, select, union_all
from sqlalchemy.sql import Select

from panda_core.states import FINAL_JOB_STATES, LIVE_JOB_STATES, JobState

from .. import db
from .params import Args, ParamError, Terms, Window, read_window, split_terms, value_condition

ACTIVE_STATES = LIVE_JOB_STATES
FINAL_STATES = tuple(str(s) for s in JobState if s in FINAL_JOB_STATES)
ALL_STATES = tuple(str(s) for s in JobState)
JOB_TABLES = (db.jobs, db.jobs_archive)
#: memory per core above which a job is a high-memory one (PanDA's resource types)
HIMEM_MB_PER_CORE = 2000


def resource_type(t):
    """PanDA's resource type from cores and memory: SCORE, MCORE, and their _HIMEM."""
    multi = t.c.cores > 1
    himem = t.c.memory_mb > HIMEM_MB_PER_CORE * t.c.cores
    return case((and_(multi, himem), "MCORE_HIMEM"), (multi, "MCORE"),
                (himem, "SCORE_HIMEM"), else_="SCORE")


@dataclass(frozen=True)
class JobField:
    """A job attribute the URL can select on, under BigPanDA's name."""
    name: str
    column: str | None            # a job table column, or None for ``expression``
    numeric: bool = False
    facet: bool = True            # counted in the job list's attribute summary
    scoped: bool = False          # selecting on it lifts the time window
    label: str = ""
    expression: Callable | None = None
    error: bool = False           # an error code: its facet leaves out 0 (no error)

    def expr(self, t):
        return self.expression(t) if self.expression is not None else t.c[self.column]


JOB_FIELDS: tuple[JobField, ...] = (
    JobField("pandaid", "panda_id", numeric=True, facet=False, scoped=True, label="PandaID"),
    JobField("jeditaskid", "task_id", numeric=True, scoped=True, label="task"),
    JobField("batchid", "batch_id", facet=False, scoped=True, label="batch id"),
    JobField("jobstatus", "status", label="state"),
    JobField("computingsite", "site", label="site"),
    JobField("produsername", "owner", label="user"),
    JobField("prodsourcelabel", "prod_source_label", label="label"),
    JobField("workinggroup", "working_group", label="working group"),
    JobField("gshare", "share", label="global share"),
    JobField("resourcetype", None, label="resource type", expression=resource_type),
    JobField("corecount", "cores", numeric=True, label="cores"),
    JobField("attemptnr", "attempt_nr", numeric=True, label="attempt"),
    JobField("transformation", "transformation", label="transformation"),
    JobField("modificationhost", "node", facet=False, label="worker node"),
    JobField("cpumodel", "wn_cpu_model", label="CPU model"),
    JobField("wncores", "wn_cores", numeric=True, label="node cores"),
    JobField("pilotversion", "wn_pilot_version", label="pilot version"),
    JobField("piloterrorcode", "pilot_error_code", numeric=True, label="pilot error",
             error=True),
    JobField("exeerrorcode", "exe_error_code", numeric=True, label="payload error", error=True),
    JobField("jobdispatchererrorcode", "dispatcher_error_code", numeric=True,
             label="dispatcher error", error=True),
    JobField("ddmerrorcode", "ddm_error_code", numeric=True, label="data service error",
             error=True),
    JobField("taskbuffererrorcode", "task_buffer_error_code", numeric=True,
             label="task buffer error", error=True),
    JobField("transexitcode", "trans_exit_code", numeric=True, label="payload exit code",
             error=True),
)
FIELDS_BY_NAME = {f.name: f for f in JOB_FIELDS}
#: other names BigPanDA accepts for the same fields
ALIASES = {"taskid": "jeditaskid", "user": "produsername", "username": "produsername",
           "site": "computingsite", "jobtype": "prodsourcelabel"}
FACETS = tuple(f for f in JOB_FIELDS if f.facet)

DEFAULT_LIMIT = 20000
MAX_LIMIT = 200000


@dataclass
class JobSelection:
    """The job filters and window of one request."""
    filters: dict[str, str]                         # field name -> the value as written
    terms: dict[str, Terms]
    window: Window
    limit: int
    now: dt.datetime
    state_not_updated_h: int | None = None          # statenotupdated=N: stuck for N hours

    @property
    def scoped(self) -> bool:
        return any(FIELDS_BY_NAME[k].scoped for k in self.filters)

    def filter_conditions(self, t) -> list:
        """The filters' WHERE conditions on job table ``t`` (no window)."""
        conds = [value_condition(FIELDS_BY_NAME[k].expr(t), terms, FIELDS_BY_NAME[k].numeric)
                 for k, terms in self.terms.items()]
        if self.state_not_updated_h is not None:
            conds.append(t.c.state_changed < self.now - dt.timedelta(
                hours=self.state_not_updated_h))
        return conds

    def branches(self, t) -> list[list]:
        """The selection on job table ``t`` as disjoint condition lists whose union it is:
        the jobs in the window (``ix_jobs_modified``, read in order), and on the live table
        the active jobs outside it (``ix_jobs_status_modified``). Two index ranges instead
        of one OR, which would need a bitmap recheck and a sort of the whole window."""
        conds = self.filter_conditions(t)
        if not self.window.bounded:
            return [conds]
        mtime = t.c.modification_time
        out = [conds + [self.window.condition(mtime)]]
        if t is db.jobs:
            outside = mtime < self.window.since if self.window.until is None else \
                or_(mtime < self.window.since, mtime >= self.window.until)
            out.append(conds + [t.c.status.in_(ACTIVE_STATES), outside])
        return out

    def states(self) -> tuple[str, ...] | None:
        """The job states the filters allow (None: any), to skip a table that holds none."""
        terms = self.terms.get("jobstatus")
        if terms is None:
            return None
        return tuple(s for s in ALL_STATES if _state_matches(s, terms))

    def tables(self) -> tuple:
        """The job tables worth reading: the archive holds final jobs only."""
        states = self.states()
        if states is not None and not set(states) & set(FINAL_STATES):
            return (db.jobs,)
        if states is not None and not states:
            return ()
        return JOB_TABLES

    def capped(self, columns: Callable[[object], list], limit: int | None = None,
               where: Callable[[object], list] | None = None) -> Select:
        """The selected jobs, the ``limit`` most recently modified, as one SELECT of the
        ``columns(table)`` over both tables (a UNION ALL, each part index-ordered)."""
        limit = limit or self.limit
        parts = []
        for t in self.tables():
            for conds in self.branches(t):
                q = (select(*columns(t)).where(*conds, *(where(t) if where else ()))
                     .order_by(t.c.modification_time.desc()).limit(limit))
                parts.append(select(q.subquery()))    # SQLite: no LIMIT inside a UNION member
        if not parts:
            empty = select(*columns(db.jobs)).where(false())
            return empty
        if len(parts) == 1:
            return parts[0]
        both = union_all(*parts).subquery()
        return select(both).order_by(both.c.modification_time.desc()).limit(limit)

    def describe(self) -> str:
        """The selection in words, for the page's banner."""
        words = [f"{FIELDS_BY_NAME[k].label or k} {v}" for k, v in self.filters.items()]
        if self.state_not_updated_h is not None:
            words.append(f"state not changed for {self.state_not_updated_h} h")
        return ", ".join(words) or "all jobs"

    def summary(self) -> dict:
        """The selection for the JSON replies."""
        return {"filters": dict(self.filters), "window": self.window.label,
                "since": self.window.since, "until": self.window.until, "limit": self.limit,
                "active_jobs_unwindowed": self.window.bounded}


def _state_matches(state: str, terms: Terms) -> bool:
    import fnmatch

    def hit(term: str) -> bool:
        return fnmatch.fnmatchcase(state, term.lower()) if "*" in term else state == term
    ok = any(hit(t) for t in terms.include) if terms.include else True
    return ok and not any(hit(t) for t in terms.exclude)


def read_job_selection(args: Args, now: dt.datetime, default_hours: int = 12,
                       default_limit: int = DEFAULT_LIMIT,
                       fixed: dict[str, str] | None = None) -> JobSelection:
    """The job filters of ``args`` (BigPanDA names and aliases), plus ``fixed`` ones a view
    sets itself (a user page's user)."""
    filters: dict[str, str] = {}
    args.used.update(FIELDS_BY_NAME, ALIASES)       # known to the view, given or not
    for key in list(args.raw):
        name = ALIASES.get(key, key)
        if name in FIELDS_BY_NAME:
            value = args.text(key)
            if name in filters:
                raise ParamError(f"parameter {name!r} is given twice (as {key!r})")
            filters[name] = value
    filters.update(fixed or {})
    terms = {k: split_terms(k, v, FIELDS_BY_NAME[k].numeric) for k, v in filters.items()}
    if "jobstatus" in terms:
        for term in terms["jobstatus"].include + terms["jobstatus"].exclude:
            if "*" not in term and term not in ALL_STATES:
                raise ParamError(f"jobstatus: unknown state {term[:40]!r} (states: "
                                 f"{', '.join(ALL_STATES)})")
    scoped = any(FIELDS_BY_NAME[k].scoped for k in filters)
    window = read_window(args, now, default_hours, scoped)
    limit = args.integer("limit", default_limit, lo=1, hi=MAX_LIMIT)
    stuck = args.integer("statenotupdated", lo=1, hi=24 * 400)
    return JobSelection(filters, terms, window, limit, now, stuck)
