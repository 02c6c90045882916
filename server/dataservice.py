"""The data service: brings inputs to the site a job was brokered to, and outputs to their
task's destination (aggregation to a T1).

**Dispatch.** Brokerage may send a job where its inputs are not; such a job waits in
``assigned``. Each pass (``DataService.process``) looks at the waiting jobs, copies every missing
input from a storage element that holds it to the site's input storage element through a data
mover (``server/datamovers/``: the first configured mover that handles both URLs), which verifies
size and checksum at the destination, registers the new replica and moves the job to
``activated``. A copy that fails for a reason that may pass (destination full or unreachable, a
hung source killed at the deadline) is retried with backoff within the pass and on later passes;
once a job has waited ``give_up_s`` it fails with the last reason.

**Aggregation.** A task may name a ``destination_se``: its jobs finish into ``transferring``
(``taskbuffer.pilots``) and each pass copies their outputs and log from the site's output
storage element to the destination, registers the replicas there and then ends them
``finished``.

A file that no storage element holds, or whose every copy is missing or corrupt, fails the job
(``ddm_error_code`` 100, PanDA's EC_Setupper, or 200, EC_Adder, for outputs) with a diag naming
the file and what was tried. Copies go to a temporary name and are renamed into place only once
verified. Several server processes may run passes at once: renames are atomic, the replica insert
tolerates a concurrent twin, and activation is a guarded state change.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from panda_core.replicas import BadFileName, replica_url
from panda_core.retry import RetryPolicy
from panda_core.states import JobState

from . import db
from .brokerage import input_endpoint, output_endpoint
from .datamovers import DataMover, FileRef, SourceError, TransferFailed, load_mover
from .metrics import DATASERVICE_ACTIONS
from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

EC_SETUPPER = 100          # PanDA's ddmErrorCode for "inputs could not be prepared"
EC_ADDER = 200             # PanDA's ddmErrorCode for "outputs could not be placed"
ACTOR = "dataservice"

__all__ = ["DataService", "DataReport", "storage_urls", "load_mover", "FileRef", "SourceError",
           "TransferFailed", "EC_SETUPPER", "EC_ADDER"]


@dataclass
class DataReport:
    activated: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)      # panda_id -> diag
    waiting: dict[int, str] = field(default_factory=dict)     # panda_id -> why it still waits
    aggregated: list[int] = field(default_factory=list)       # outputs placed, job finished
    copied: int = 0


class DataService:
    """One pass at a time over the jobs that wait for data; see the module's docstring.

    ``movers``: in order of preference (one mover, or a list); ``timeout_s``: the deadline of one
    copy; ``retry``: attempts within a pass for a copy that may pass; ``give_up_s``: how long a
    job may wait for its data before it fails."""

    def __init__(self, tb: TaskBuffer, mover: DataMover | list[DataMover] | None = None,
                 batch: int = 200, timeout_s: float = 600.0, retry: RetryPolicy | None = None,
                 give_up_s: float = 12 * 3600.0, sleep=time.sleep):
        self.tb = tb
        if mover is None:
            from .datamovers.local import LocalMover
            mover = LocalMover()
        self.movers = list(mover) if isinstance(mover, (list, tuple)) else [mover]
        self.batch = batch
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(attempts=3, backoff_s=1.0, max_backoff_s=10.0)
        self.give_up_s = give_up_s
        self._sleep = sleep

    @property
    def mover(self) -> DataMover:
        return self.movers[0]

    def mover_for(self, src_url: str, dst_url: str) -> DataMover | None:
        return next((m for m in self.movers if m.can_copy(src_url, dst_url)), None)

    def process(self) -> DataReport:
        """One pass over the assigned jobs, then over the jobs whose outputs move on."""
        report = DataReport()
        sites = {s["name"]: s["config"] for s in self.tb.sites.all()}
        urls = storage_urls(sites.values())
        j = db.jobs.c
        with db.read(self.tb.engine) as conn:
            jobs = [dict(r._mapping) for r in conn.execute(
                select(j.panda_id, j.site, j.state_changed)
                .where(j.status == str(JobState.ASSIGNED), j.site.is_not(None))
                .order_by(j.current_priority.desc(), j.panda_id).limit(self.batch))]
            moving = [dict(r._mapping) for r in conn.execute(
                select(j.panda_id, j.site, j.state_changed, j.destination_se)
                .where(j.status == str(JobState.TRANSFERRING), j.destination_se.is_not(None))
                .order_by(j.panda_id).limit(self.batch))]
        for job in jobs:
            self._one(job, sites.get(job["site"]), urls, report)
        for job in moving:
            self._aggregate(job, sites.get(job["site"]), urls, report)
        for action, n in (("activated", len(report.activated)), ("failed", len(report.failed)),
                          ("waiting", len(report.waiting)), ("copied", report.copied),
                          ("aggregated", len(report.aggregated))):
            if n:
                DATASERVICE_ACTIONS.labels(action).inc(n)
        if report.activated or report.failed or report.aggregated:
            log.info("data service: %d activated, %d outputs placed, %d failed, %d waiting, "
                     "%d file(s) copied", len(report.activated), len(report.aggregated),
                     len(report.failed), len(report.waiting), report.copied)
        return report

    # -- inputs to the job's site --------------------------------------------------------------
    def _one(self, job: dict, config: dict | None, urls: dict[str, str],
             report: DataReport) -> None:
        panda_id = job["panda_id"]
        if config is None:
            return self._fail(panda_id, "its site is not known to this server", report)
        dest = input_endpoint(config)
        if not dest or dest not in urls:
            return self._fail(panda_id, f"site {config.get('name')} has no input storage "
                                        "element with a URL", report)
        with db.read(self.tb.engine) as conn:
            inputs = [dict(r._mapping) for r in conn.execute(select(db.files).where(
                db.files.c.panda_id == panda_id, db.files.c.type == "input"))]
        if not self._place_all(job, inputs, dest, urls, report, "input", EC_SETUPPER,
                               str(JobState.ASSIGNED), site=config.get("name")):
            return
        with self.tb.engine.begin() as conn:
            if self.tb.states.change(conn, panda_id, str(JobState.ACTIVATED), actor=ACTOR,
                                     expected=[str(JobState.ASSIGNED)]):
                report.activated.append(panda_id)

    # -- outputs to the task's destination -----------------------------------------------------
    def _aggregate(self, job: dict, config: dict | None, urls: dict[str, str],
                   report: DataReport) -> None:
        panda_id, dest = job["panda_id"], job["destination_se"]
        if dest not in urls:
            return self._fail(panda_id, f"destination storage element {dest} has no URL in any "
                                        "site config", report, code=EC_ADDER,
                              expected=str(JobState.TRANSFERRING))
        with db.read(self.tb.engine) as conn:
            outs = [dict(r._mapping) for r in conn.execute(select(db.files).where(
                db.files.c.panda_id == panda_id, db.files.c.type.in_(("output", "log"))))]
        if not self._place_all(job, outs, dest, urls, report, "output", EC_ADDER,
                               str(JobState.TRANSFERRING)):
            return
        with self.tb.engine.begin() as conn:
            done = self.tb.states.change(conn, panda_id, str(JobState.FINISHED), actor=ACTOR,
                                         expected=[str(JobState.TRANSFERRING)])
            task_id = conn.execute(select(db.jobs.c.task_id).where(
                db.jobs.c.panda_id == panda_id)).scalar()
        if done:
            report.aggregated.append(panda_id)
            self.tb.tasks.after_job_end(task_id)

    def _place_all(self, job: dict, files: list[dict], dest: str, urls: dict[str, str],
                   report: DataReport, what: str, code: int, expected: str,
                   site: str | None = None) -> bool:
        """Place every file at ``dest``; True when all are there. Otherwise the job waits
        (recorded in the report) or, past the give-up time or on a lasting failure, fails."""
        panda_id = job["panda_id"]
        for f in files:
            outcome = self._place(f, dest, urls)
            if outcome is None:
                continue
            kind, why = outcome
            name = f"{what} {f['scope']}:{f['lfn']}"
            if kind == "copied":
                report.copied += 1
            elif kind == "waiting":
                if self._overdue(job):
                    self._fail(panda_id, f"{name} could not be brought to {dest} within "
                                         f"{self.give_up_s:g} s: {why}", report, code=code,
                               expected=expected)
                    return False
                report.waiting[panda_id] = why
                if site is not None:
                    log.warning("job %s waits: %s", panda_id, why,
                                extra={"panda_id": panda_id, "site": site})
                return False
            else:
                self._fail(panda_id, f"{name} cannot be brought to {dest}: {why}", report,
                           code=code, expected=expected)
                return False
        return True

    # -- one file ------------------------------------------------------------------------------
    def _place(self, f: dict, dest: str, urls: dict[str, str]) -> tuple[str, str] | None:
        """Make sure file ``f`` has a verified replica at ``dest``: None if it had one already,
        ("copied", ""), ("waiting", why: may pass) or ("failed", why: it will not)."""
        where = self.tb.data.replica_endpoints(f["scope"], [f["lfn"]])
        held = where.get(f["lfn"], set())
        if dest in held:
            return None
        ref = FileRef(f["scope"], f["lfn"], f["fsize"], f["checksum"])
        try:
            dst_url = replica_url(urls[dest], f["scope"], f["lfn"])
        except BadFileName as exc:
            return "failed", str(exc)
        tried: list[str] = []             # sources that cannot be used
        transient: list[str] = []         # sources that failed in a way that may pass
        unreadable: list[str] = []
        for se in sorted(se for se in held if se in urls):
            src_url = replica_url(urls[se], f["scope"], f["lfn"])
            mover = self.mover_for(src_url, dst_url)
            if mover is None:
                unreadable.append(se)
                continue
            try:
                self._copy_with_retries(mover, src_url, dst_url, ref)
            except SourceError as exc:
                tried.append(f"{se}: {exc}")
                continue
            except TransferFailed as exc:
                transient.append(f"{se}: {exc}")
                continue                  # another source may do better
            self._register(f["scope"], f["lfn"], dest, dst_url)
            return "copied", ""
        if transient:
            return "waiting", "; ".join(transient + tried)
        if tried:
            return "failed", "; ".join(tried)
        if unreadable:
            return "failed", (f"registered only at {', '.join(sorted(unreadable))}, and no "
                              f"configured data mover copies from there to {dest}")
        return "failed", ("no storage element holds it" if not held else
                          f"registered only at {', '.join(sorted(held))}, which no site "
                          "config gives a URL for")

    def _copy_with_retries(self, mover: DataMover, src_url: str, dst_url: str,
                           ref: FileRef) -> None:
        waits = list(self.retry.waits())
        for attempt in range(len(waits) + 1):
            try:
                return mover.copy(src_url, dst_url, ref, self.timeout_s)
            except TransferFailed as exc:
                if attempt == len(waits):
                    raise
                log.info("copy %s -> %s failed (%s); retrying in %.1f s", src_url, dst_url, exc,
                         waits[attempt])
                self._sleep(waits[attempt])

    def _overdue(self, job: dict) -> bool:
        since = job.get("state_changed")
        if since is None:
            return False
        return (self.tb.clock() - since) > dt.timedelta(seconds=self.give_up_s)

    def _register(self, scope: str, lfn: str, endpoint: str, surl: str) -> None:
        try:
            self.tb.data.add_replica(scope, lfn, endpoint, surl)
        except IntegrityError:
            pass                         # another server process registered it first

    def _fail(self, panda_id: int, diag: str, report: DataReport, code: int = EC_SETUPPER,
              expected: str = str(JobState.ASSIGNED)) -> None:
        with self.tb.engine.begin() as conn:
            ok = self.tb.jobs.fail(conn, panda_id, [expected], actor=ACTOR, retry=False,
                                  ddm_error_code=code, ddm_error_diag=diag[:4000])
        if ok:
            report.failed[panda_id] = diag
            log.warning("job %s failed: %s", panda_id, diag, extra={"panda_id": panda_id})


def storage_urls(configs) -> dict[str, str]:
    """Storage element name -> root URL, from every site's input and output storage."""
    out: dict[str, str] = {}
    for cfg in configs:
        for role in ("input", "output"):
            se = (cfg.get("storage") or {}).get(role) or {}
            if se.get("name") and se.get("url"):
                out.setdefault(se["name"], se["url"])
    return out
