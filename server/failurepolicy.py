"""The failure policy: learn from failures that were the site's, not the payload's.

- **Which failures are the site's** (:func:`site_failure`): stage-in/out and storage errors, lost
  heartbeats and pilots that never reported, node problems (local disk, credentials, signals
  the pilot did not send, a batch wall time that ran out). A payload's own errors (its exit
  code, memory, looping, its own wall time) are not: retrying it elsewhere would fail the same.
- **A retry is re-brokered** (:class:`Rebrokerage`): the retry of a job whose task did not pin
  a site is created without one (``defined``); each pass brokers it like a new job, excluding
  every site an earlier attempt failed at for the site's reasons (``jobs.excluded_sites``), and
  sends it ``activated`` (its inputs are at the new site) or ``assigned`` (the data service
  moves them). With no site left it fails with the reason.
- **Sites that fail too often are set to test** (:class:`SiteHealth`, in the spirit of
  HammerCloud's exclusion): when, in the last ``window_s``, a site ended at least ``min_jobs``
  jobs and the share that failed for the site's reasons reaches ``threshold``, its status
  becomes ``test`` (``sites.auto_status``, with the reason: shown by ``panda sites``, the API and
  the monitor). Brokerage then sends it test jobs only; the policy submits ``test_jobs`` of them
  (a task of the ``test`` label), and when ``test_successes`` of them finished the site is set
  back to its configured status. A test job that fails for the site's reasons starts a new round.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, case, func, or_, select, update

from panda_core.errorcodes import DispatcherCode, ErrorCode
from panda_core.states import JobState

from . import db
from .brokerage import Brokerage, JobNeeds, TaskPlan, input_endpoint

if TYPE_CHECKING:                      # the task buffer imports this module's classification
    from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

ACTOR = "failurepolicy"
#: jobs.task_buffer_error_code of a retry for which no site is left
NO_SITE_LEFT = 301

SITE_PILOT_CODES = frozenset({
    ErrorCode.NO_LOCAL_SPACE, ErrorCode.STAGEIN_FAILED, ErrorCode.NO_PROXY,
    ErrorCode.STAGEOUT_FAILED, ErrorCode.LOCAL_FILE_SIZE_MISMATCH, ErrorCode.MD5_MISMATCH_OUT,
    ErrorCode.MD5_MISMATCH_IN, ErrorCode.STAGEIN_TIMEOUT, ErrorCode.STAGEOUT_TIMEOUT,
    ErrorCode.ADLER32_MISMATCH_IN, ErrorCode.ADLER32_MISMATCH_OUT, ErrorCode.SIGTERM,
    ErrorCode.SIGQUIT, ErrorCode.SIGBUS, ErrorCode.SIGINT, ErrorCode.SIGKILL,
    ErrorCode.BATCH_WALLTIME, ErrorCode.NO_HEARTBEAT_REACHED, ErrorCode.MISSING_INPUT,
    ErrorCode.DISK_SPACE_LOW, ErrorCode.RECOVERED_LOST, ErrorCode.KILL_SIGNAL,
    ErrorCode.COMMUNICATION_FAILURE, ErrorCode.NO_REMOTE_SPACE, ErrorCode.STAGEIN_AUTH_FAILURE,
    ErrorCode.STAGEOUT_AUTH_FAILURE})
SITE_DISPATCHER_CODES = frozenset({
    DispatcherCode.LOST_HEARTBEAT, DispatcherCode.RECOVERY_FAILED, DispatcherCode.NO_REPLY,
    DispatcherCode.HOLDING_TIMEOUT, DispatcherCode.TRANSFERRING_TIMEOUT})


def site_failure(job: dict) -> str | None:
    """Why this failed job's failure was its site's, or None if it was the payload's (or no
    failure the site answers for)."""
    pilot = int(job.get("pilot_error_code") or 0)
    if pilot in SITE_PILOT_CODES:
        return f"pilot error {pilot}"
    disp = int(job.get("dispatcher_error_code") or 0)
    if disp in SITE_DISPATCHER_CODES:
        return f"dispatcher error {disp}"
    return None


def excluded_after(job: dict) -> list[str]:
    """The sites the retry of this failed job must avoid."""
    try:
        excluded = list(json.loads(job.get("excluded_sites") or "[]"))
    except (TypeError, ValueError):
        excluded = []
    if job.get("site") and site_failure(job) and job["site"] not in excluded:
        excluded.append(job["site"])
    return excluded


class Rebrokerage:
    """Brokers the retries that were created without a site (see the module's docstring).

    A pass reads the waiting retries ``batch`` at a time (highest priority first, at most
    ``per_pass``), and places them the way a task's submission places its jobs: the sites are
    filtered and weighed once per job shape (``Brokerage.plan``; the hooks see the shape, as
    for a task) and each retry goes to the plan's next site outside its own excluded sites
    (``TaskPlan.site_for(exclude=)``). A batch costs O(sites per shape + retries) and a few
    statements for its inputs and replicas, where asking every hook for every (retry, site)
    made a pass over 1,000 sites cost seconds per hundred retries. Each batch commits in one
    transaction.
    """

    def __init__(self, tb: TaskBuffer, brokerage: Brokerage, batch: int = 500,
                 per_pass: int = 5000):
        if batch < 1 or per_pass < 1:
            raise ValueError("batch and per_pass must be at least 1")
        self.tb = tb
        self.brokerage = brokerage
        self.batch = batch
        self.per_pass = per_pass

    def process(self) -> dict[int, str | None]:
        """One pass; PandaID -> the site chosen (None: failed, no site left)."""
        out: dict[int, str | None] = {}
        seen: set[int] = set()
        sites: list[dict] | None = None
        load: dict = {}
        plans: dict[tuple, TaskPlan] = {}
        j = db.jobs.c
        while len(seen) < self.per_pass:
            with db.read(self.tb.engine) as conn:
                jobs = [dict(r._mapping) for r in conn.execute(
                    select(db.jobs).where(j.status == str(JobState.DEFINED), j.site.is_(None),
                                          j.parent_id.is_not(None))
                    .order_by(j.current_priority.desc(), j.panda_id)
                    .limit(min(self.batch, self.per_pass - len(seen))))]
            # a retry another process changed under us may still be listed: never twice
            jobs = [job for job in jobs if job["panda_id"] not in seen]
            if not jobs:
                break
            seen.update(job["panda_id"] for job in jobs)
            if sites is None:
                sites = self.tb.sites.all()
                load = self.tb.jobs.site_load()
            out.update(self._batch(jobs, sites, load, plans))
        return out

    def _batch(self, jobs: list[dict], sites: list[dict], load: dict,
               plans: dict[tuple, TaskPlan]) -> dict[int, str | None]:
        inputs: dict[int, list[tuple[str, str]]] = {job["panda_id"]: [] for job in jobs}
        with db.read(self.tb.engine) as conn:
            f = db.files.c
            for r in conn.execute(select(f.panda_id, f.scope, f.lfn).where(
                    f.panda_id.in_(list(inputs)), f.type == "input").order_by(f.row_id)):
                inputs[r.panda_id].append((r.scope, r.lfn))
        by_scope: dict[str, set[str]] = {}
        for files in inputs.values():
            for scope, lfn in files:
                by_scope.setdefault(scope, set()).add(lfn)
        replicas = {(scope, lfn): ses for scope, lfns in by_scope.items()
                    for lfn, ses in self.tb.data.replica_endpoints(scope, sorted(lfns)).items()}
        configs = {s["name"]: s["config"] for s in sites}
        out: dict[int, str | None] = {}
        with self.tb.engine.begin() as conn:
            for job in jobs:
                pid = job["panda_id"]
                needs = JobNeeds(cores=job["cores"], memory_mb=job["memory_mb"],
                                 walltime_s=job["walltime_s"], disk_mb=job["disk_mb"],
                                 prod_source_label=job["prod_source_label"])
                key = (needs.cores, needs.memory_mb, needs.walltime_s, needs.disk_mb,
                       needs.prod_source_label)
                plan = plans.get(key)
                if plan is None:
                    plan = plans[key] = self.brokerage.plan(needs, sites, load)
                excluded = set(excluded_after(job))      # its site is None: the list as stored
                locality = {lfn: replicas.get((scope, lfn), set())
                            for scope, lfn in inputs[pid]}
                lfns = [lfn for _, lfn in inputs[pid]]
                try:
                    site = plan.site_for(lfns, locality, exclude=excluded)
                except LookupError:
                    why = (f"no site left for the retry: excluded after site failures: "
                           f"{', '.join(sorted(excluded)) or 'none'}; "
                           + ("; ".join(plan.rejected[:5]) or "no other site known"))
                    if self.tb.jobs.fail(conn, pid, [str(JobState.DEFINED)], actor=ACTOR,
                                         retry=False, task_buffer_error_code=NO_SITE_LEFT,
                                         task_buffer_error_diag=why[:4000]):
                        out[pid] = None
                        log.warning("job %s: %s", pid, why, extra={"panda_id": pid})
                    continue
                se = input_endpoint(configs[site])
                here = all(se in locality.get(lfn, ()) for lfn in lfns)
                # the status guard (still defined) makes the site and the state change one
                if self.tb.states.change(conn, pid, str(JobState.ACTIVATED if here else
                                                         JobState.ASSIGNED),
                                         actor=ACTOR, expected=[str(JobState.DEFINED)],
                                         site=site):
                    out[pid] = site
                    log.info("job %s (retry of %s) brokered to %s%s", pid, job["parent_id"],
                             site, f", avoiding {', '.join(sorted(excluded))}"
                             if excluded else "")
        return out


@dataclass
class HealthLimits:
    window_s: float = 3600.0      # failures counted over this past window
    min_jobs: int = 5             # at least this many ended jobs before a site is judged
    threshold: float = 0.5        # share of those that failed for the site's reasons
    test_jobs: int = 2            # test jobs sent to a site set to test
    test_successes: int = 2       # finished test jobs that bring it back


class SiteHealth:
    """Sets failing sites to ``test`` and brings them back (see the module's docstring)."""

    def __init__(self, tb: TaskBuffer, submitter, limits: HealthLimits | None = None):
        self.tb = tb
        self.submitter = submitter          # server.submission.TaskSubmitter
        self.limits = limits or HealthLimits()

    def check(self) -> dict[str, str]:
        """One pass; site -> what changed ("test: <reason>" or "online")."""
        changes: dict[str, str] = {}
        now = self.tb.clock()
        since = now - dt.timedelta(seconds=self.limits.window_s)
        j = db.jobs.c
        ended = j.status.in_((str(JobState.FINISHED), str(JobState.FAILED)))
        site_bad = and_(j.status == str(JobState.FAILED), or_(
            j.pilot_error_code.in_(sorted(int(c) for c in SITE_PILOT_CODES)),
            j.dispatcher_error_code.in_(sorted(int(c) for c in SITE_DISPATCHER_CODES))))
        with db.read(self.tb.engine) as conn:
            rows = conn.execute(select(db.sites.c.name, db.sites.c.status, db.sites.c.auto_status,
                                       db.sites.c.auto_changed)).all()
            # counted in the database (the (status, state_changed) index bounds the window):
            # a busy grid ends tens of thousands of jobs an hour
            totals = {site: (n, bad) for site, n, bad in conn.execute(
                select(j.site, func.count(), func.sum(case((site_bad, 1), else_=0)))
                .where(ended, j.state_changed >= since, j.site.is_not(None))
                .group_by(j.site))}
            testing = [r.name for r in rows if r.auto_status == "test"]
            tests: dict[str, list] = {}
            if testing:
                for r in conn.execute(select(j.site, j.status, j.pilot_error_code,
                                             j.dispatcher_error_code, j.state_changed)
                                      .where(ended, j.state_changed >= since,
                                             j.site.in_(testing),
                                             j.prod_source_label.in_(("test", "ptest")))):
                    tests.setdefault(r.site, []).append(r)
        for row in rows:
            if row.auto_status == "test":
                changes.update(self._judge_test_site(row, tests.get(row.name, []), now))
            elif row.status == "online":
                n, bad = totals.get(row.name, (0, 0))
                bad = int(bad or 0)
                if n >= self.limits.min_jobs and bad / n >= self.limits.threshold:
                    with db.read(self.tb.engine) as conn:
                        codes = sorted({site_failure(r._mapping) for r in conn.execute(
                            select(j.pilot_error_code, j.dispatcher_error_code).where(
                                site_bad, j.site == row.name, j.state_changed >= since)
                            .limit(50))})
                    reason = (f"{bad} of {n} jobs ended in the last "
                              f"{self.limits.window_s / 3600:g} h failed for site reasons "
                              f"({', '.join(codes[:4])})")
                    self._set(row.name, "test", reason, now)
                    self._send_test_jobs(row.name)
                    changes[row.name] = f"test: {reason}"
        return changes

    def _judge_test_site(self, row, jobs: list, now) -> dict[str, str]:
        tests = [r for r in jobs
                 if row.auto_changed is not None and r.state_changed >= row.auto_changed]
        good = sum(1 for r in tests if r.status == str(JobState.FINISHED))
        if good >= self.limits.test_successes:
            self._set(row.name, None, None, now)
            log.warning("site %s: %d test jobs finished: back to its configured status",
                        row.name, good, extra={"site": row.name})
            return {row.name: "online"}
        if any(r.status == str(JobState.FAILED) and site_failure(r._mapping) for r in tests):
            self._set(row.name, "test", "a test job failed for site reasons: testing again", now)
            self._send_test_jobs(row.name)
            return {row.name: "test: a test job failed"}
        return {}

    def _set(self, site: str, status: str | None, reason: str | None, now) -> None:
        with self.tb.engine.begin() as conn:
            conn.execute(update(db.sites).where(db.sites.c.name == site).values(
                auto_status=status, auto_reason=reason, auto_changed=now))
        self.tb.sites.forget(site)
        if status:
            log.warning("site %s set to %s: %s", site, status, reason, extra={"site": site})

    def _send_test_jobs(self, site: str) -> None:
        params = {"name": f"sitetest.{site}.{int(self.tb.clock().timestamp())}",
                  "scope": "panda.test", "transformation": "/bin/sh",
                  "job_parameters": "-c 'hostname; echo site test ok'",
                  "n_jobs": self.limits.test_jobs,
                  "site": site, "prod_source_label": "test", "max_attempts": 1,
                  "resources": {"cores": 1, "memory_mb": 100, "walltime_s": 600}}
        try:
            self.submitter.submit(params, owner=ACTOR)
        except Exception:  # noqa: BLE001 - a site that cannot take test jobs stays in test
            log.exception("site %s: could not submit its test jobs", site)

