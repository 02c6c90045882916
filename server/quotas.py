"""Quotas per user and per group (a task's working group): jobs running at once and jobs
submitted per day.

- **At submission** (:meth:`Quotas.check_submit`): a task whose jobs would take its owner (or its
  working group) past the jobs-per-day quota is refused with the numbers ("alice: 180 jobs
  submitted in the last 24 h + 40 in this task > 200 per day"); so is a submission while the
  owner already has ``max_running`` jobs running or more.
- **At dispatch** (:class:`QuotaPolicy`, a ``panda_job_priorities`` plugin): the waiting jobs of a
  user or group at or over its running quota get a priority far below everyone else's, so they
  are dispatched only when nobody else's job fits: the user yields to others, nothing is lost.

A quota row names a user (a token subject) or a group; the user ``*`` is the default for users
without a row of their own. A limit left empty is no limit. Usage is in the API
(``quota/usage``) and in ``panda quota``.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update

from . import db
from .jobcreator import LimitExceeded
from .policies import hookimpl

log = logging.getLogger(__name__)

RUNNING_STATES = ("sent", "starting", "running")
WAITING_STATES = ("assigned", "activated")
KINDS = ("user", "group")
DEFAULT_USER = "*"
#: how far below everyone else the waiting jobs of an over-quota user go
YIELD_PRIORITY = 1_000_000


class QuotaExceeded(LimitExceeded):
    """A submission over a quota; the message has the numbers."""


@dataclass
class Quota:
    kind: str
    name: str
    max_running: int | None = None
    max_per_day: int | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "max_running": self.max_running,
                "max_per_day": self.max_per_day}


class Quotas:
    def __init__(self, tb):
        self.tb = tb

    # -- the quota table -------------------------------------------------------------------
    def set(self, kind: str, name: str, max_running: int | None,
            max_per_day: int | None) -> Quota:
        if kind not in KINDS:
            raise ValueError(f"quota kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise ValueError("quota name: a user (token subject), a group, or '*'")
        for label, value in (("max_running", max_running), ("max_per_day", max_per_day)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= 10**9):
                raise ValueError(f"{label}: a whole number from 0 to 1000000000, or empty")
        q = db.quotas.c
        values = {"max_running": max_running, "max_per_day": max_per_day,
                  "updated": self.tb.clock()}
        with self.tb.engine.begin() as conn:
            if not conn.execute(update(db.quotas).where(q.kind == kind, q.name == name)
                                .values(**values)).rowcount:
                conn.execute(insert(db.quotas).values(kind=kind, name=name, **values))
        log.info("quota of %s %s: running %s, per day %s", kind, name, max_running, max_per_day)
        return Quota(kind, name, max_running, max_per_day)

    def remove(self, kind: str, name: str) -> bool:
        q = db.quotas.c
        with self.tb.engine.begin() as conn:
            return bool(conn.execute(delete(db.quotas).where(q.kind == kind, q.name == name))
                        .rowcount)

    def all(self) -> list[Quota]:
        with db.read(self.tb.engine) as conn:
            return [Quota(r.kind, r.name, r.max_running, r.max_per_day) for r in
                    conn.execute(select(db.quotas).order_by(db.quotas.c.kind, db.quotas.c.name))]

    def quota_of(self, kind: str, name: str | None) -> Quota | None:
        if name is None:
            return None
        by_key = {(x.kind, x.name): x for x in self.all()}
        found = by_key.get((kind, name))
        if found is None and kind == "user":
            found = by_key.get(("user", DEFAULT_USER))
        return found

    # -- usage -----------------------------------------------------------------------------
    def counts(self, kind: str, name: str) -> dict[str, int]:
        """Jobs running now and jobs submitted in the last 24 h (live and archived)."""
        since = self.tb.clock() - dt.timedelta(days=1)
        out = {"running": 0, "submitted_24h": 0}
        with db.read(self.tb.engine) as conn:
            for table in (db.jobs, db.jobs_archive):
                col = table.c.owner if kind == "user" else table.c.working_group
                if table is db.jobs:
                    out["running"] = conn.execute(select(func.count()).where(
                        col == name, table.c.status.in_(RUNNING_STATES))).scalar_one()
                out["submitted_24h"] += conn.execute(select(func.count()).where(
                    col == name, table.c.creation_time >= since,
                    table.c.parent_id.is_(None))).scalar_one()
        return out

    def usage(self, user: str, group: str | None = None) -> dict:
        out = {}
        for kind, name in (("user", user), ("group", group)):
            if name is None:
                continue
            quota = self.quota_of(kind, name)
            out[kind] = {"name": name, **self.counts(kind, name),
                         "max_running": quota.max_running if quota else None,
                         "max_per_day": quota.max_per_day if quota else None}
        return out

    def check_submit(self, owner: str, group: str | None, new_jobs: int) -> None:
        """Raise QuotaExceeded if these ``new_jobs`` go past the owner's or the group's quota."""
        for kind, name in (("user", owner), ("group", group)):
            quota = self.quota_of(kind, name)
            if quota is None or (quota.max_per_day is None and quota.max_running is None):
                continue
            used = self.counts(kind, name)
            who = f"{kind} {name}"
            if quota.max_per_day is not None and \
                    used["submitted_24h"] + new_jobs > quota.max_per_day:
                raise QuotaExceeded(
                    f"quota: {who} submitted {used['submitted_24h']} jobs in the last 24 h; "
                    f"{new_jobs} more would pass the quota of {quota.max_per_day} per day")
            if quota.max_running is not None and used["running"] >= quota.max_running:
                raise QuotaExceeded(
                    f"quota: {who} has {used['running']} jobs running, the quota is "
                    f"{quota.max_running}: submit when some have ended")


class QuotaPolicy:
    """The dispatch side: over-quota users' and groups' waiting jobs yield to everyone else's
    (registered on the server's plugin manager; the lowest priority answer wins)."""

    def __init__(self, tb, refresh_s: float = 30.0):
        self.tb = tb
        self.refresh_s = refresh_s
        self._next = 0.0
        self._users: dict[str, int] = {}     # user -> max_running
        self._default: int | None = None
        self._groups_over: set[str] = set()

    def _refresh(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.refresh_s
        quotas = Quotas(self.tb).all()
        self._users = {q.name: q.max_running for q in quotas
                       if q.kind == "user" and q.max_running is not None and q.name != "*"}
        self._default = next((q.max_running for q in quotas
                              if q.kind == "user" and q.name == DEFAULT_USER), None)
        groups = {q.name: q.max_running for q in quotas
                  if q.kind == "group" and q.max_running is not None}
        over = set()
        if groups:
            j = db.jobs.c
            with db.read(self.tb.engine) as conn:
                running = dict(conn.execute(
                    select(j.working_group, func.count()).where(
                        j.working_group.in_(sorted(groups)), j.status.in_(RUNNING_STATES))
                    .group_by(j.working_group)).all())
            over = {g for g, limit in groups.items() if running.get(g, 0) >= limit}
        self._groups_over = over

    def over_quota(self, owner: str, group: str | None, user_running: int) -> bool:
        self._refresh()
        limit = self._users.get(owner, self._default)
        return (limit is not None and user_running >= limit) or \
            (group is not None and group in self._groups_over)

    @hookimpl
    def panda_job_priorities(self, jobs, now, user_running):
        self._refresh()
        if not (self._users or self._default is not None or self._groups_over):
            return None                               # no quota: abstain for every job
        return [int(job["priority"]) - YIELD_PRIORITY
                if self.over_quota(job["owner"], job.get("working_group"),
                                   user_running.get(job["owner"], 0)) else None
                for job in jobs]
