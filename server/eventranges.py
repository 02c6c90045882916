"""Event ranges: jobs that process a file by ranges of events, fetched as they go.

A task with ``events_per_job`` splits each input file into jobs of that many events; with
``events_per_range`` each job's events are further cut into ranges stored in ``event_ranges``.
The pilot of such a job asks for ranges with PanDA's ``getEventRanges`` and reports them with
``updateEventRanges`` (field names as PanDA's server and pilot 3 use them; docs/protocol.md).

Ranges belong to a job's serial (all its attempts), not to one PandaID: when an attempt fails,
its unfinished ranges return to ``ready`` the next time an attempt of the same serial asks, and
a range reported ``failed`` is handed out again until the task's ``max_attempts``. Every change
of a range is guarded by the attempt that holds it, so a late report of a dead attempt changes
nothing.

An event-service task (``event_service:`` in the task file) keeps its ranges in one pool
(serial ``POOL_SERIAL``) that all its consumer jobs draw from, as PanDA's jobset does. A range
held by a consumer that ended, or that gave no sign of life (heartbeat, range report) for the
task's ``range_timeout_s``, goes back to ``ready``; the next ask of any consumer (or the
watcher's pass, ``reclaim_expired``) does it. A finished range names the output its pilot
stored (``zipFile``); once no range is left to run, the report that finished the last one
creates the merge job over those outputs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import datetime as dt

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import Connection

from panda_core.replicas import BadFileName, check_name
from panda_core.states import FINAL_JOB_STATES, PILOT_OWNED_STATES, JobState
from panda_core.wire import range_output_lfn

from . import db
from .auth import Identity
from .jobcreator import ES_CONSUMER, ES_MERGE, TaskSpec, make_consumer_job, make_merge_job
from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

MAX_RANGES_PER_CALL = 1000
MAX_UPDATES_PER_CALL = 10000
#: what a pilot may report for a range -> the range's new status
REPORTED = {"running": "running", "finished": "finished", "done": "finished",
            "failed": "failed", "fatal": "fatal", "cancelled": "cancelled",
            "discarded": "cancelled", "corrupted": "failed"}
HELD = ("sent", "running")
#: the serial of an event-service task's pool of ranges (jobs' serials start at 1)
POOL_SERIAL = 0
DEFAULT_RANGE_TIMEOUT_S = 3600
_FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)
_OWNED = frozenset(str(s) for s in PILOT_OWNED_STATES)


class EventRangeError(Exception):
    """A request the protocol refuses; ``status_code`` is PanDA's StatusCode."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


@dataclass
class EventWindow:
    """The events of one input file a job processes: ``first`` .. ``first + count - 1``."""
    first: int
    count: int


# ---------------------------------------------------------------------- job creation
def split_events(files: list[dict], events_per_file: int, events_per_job: int
                 ) -> list[tuple[list[dict], EventWindow]]:
    """One job per ``events_per_job`` events of each file (the last of a file may hold fewer)."""
    out = []
    for f in files:
        n = int(f.get("n_events") or events_per_file)
        for first in range(0, n, events_per_job):
            out.append(([f], EventWindow(first, min(events_per_job, n - first))))
    return out


def create_ranges(tb: TaskBuffer, conn: Connection, *, task_id: int, serial: int,
                  file: dict, window: EventWindow, events_per_range: int) -> int:
    """Store the ranges of one job (of all its attempts); returns how many."""
    now = tb.clock()
    rows = []
    for start in range(window.first, window.first + window.count, events_per_range):
        last = min(start + events_per_range, window.first + window.count) - 1
        rows.append({"task_id": task_id, "serial": serial, "panda_id": None,
                     "scope": file["scope"], "lfn": file["lfn"], "guid": file["guid"],
                     "start_event": start, "last_event": last, "status": "ready", "attempt": 0,
                     "cpu_consumption_time": None, "modified": now})
    if rows:
        conn.execute(insert(db.event_ranges), rows)
    return len(rows)


# ---------------------------------------------------------------------- ids
def range_id(task_id: int, panda_id: int, row_id: int, start: int, attempt: int) -> str:
    """PanDA's shape ``<taskID>-<PandaID>-<file/range key>-<first event>-<attempt>``."""
    return f"{task_id}-{panda_id}-{row_id}-{start}-{attempt}"


def parse_range_id(text: Any) -> tuple[int, int, int]:
    """(task_id, panda_id, row_id) of an eventRangeID, or EventRangeError."""
    parts = str(text).split("-")
    if (len(parts) != 5 or not all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts)):
        raise EventRangeError(30, f"malformed eventRangeID {str(text)[:80]!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


# ---------------------------------------------------------------------- the protocol
class EventRangeService:
    def __init__(self, tb: TaskBuffer):
        self.tb = tb

    def _job(self, conn: Connection, panda_id: int) -> dict:
        j = db.jobs.c
        row = conn.execute(select(j.panda_id, j.task_id, j.serial, j.status, j.site,
                                  j.max_attempts, j.event_service)
                           .where(j.panda_id == panda_id)).first()
        if row is None:
            raise EventRangeError(30, f"no job {panda_id}")
        return dict(row._mapping)

    def get(self, panda_id: int, n_ranges: int, identity: Identity | None,
            task_id: int | None = None) -> list[dict]:
        """Hand up to ``n_ranges`` ready ranges of this job to its pilot."""
        n_ranges = max(1, min(n_ranges, MAX_RANGES_PER_CALL))
        r = db.event_ranges.c
        with self.tb.engine.begin() as conn:
            job = self._job(conn, panda_id)
            if identity is not None and not identity.may_act_for_site(job["site"]):
                raise EventRangeError(70, f"{identity.subject} may not act for {job['site']}")
            if task_id is not None and task_id != job["task_id"]:
                raise EventRangeError(30, f"job {panda_id} is not of task {task_id}")
            if job["status"] not in _OWNED:
                return []                        # a job no pilot holds gets nothing
            pool = job["event_service"] == ES_CONSUMER
            if pool:
                self._reclaim_pool(conn, job["task_id"], self._range_timeout(conn, job["task_id"]))
            else:
                self._reclaim(conn, job)
            serial = POOL_SERIAL if pool else job["serial"]
            q = (select(r.row_id, r.start_event, r.last_event, r.lfn, r.guid, r.scope,
                        r.attempt)
                 .where(r.task_id == job["task_id"], r.serial == serial,
                        r.status == "ready")
                 .order_by(r.start_event, r.row_id).limit(n_ranges))
            if self.tb.skip_locked:
                q = q.with_for_update(skip_locked=True)
            now = self.tb.clock()
            out = []
            for row in conn.execute(q).all():
                res = conn.execute(update(db.event_ranges).where(
                    r.row_id == row.row_id, r.status == "ready").values(
                    status="sent", panda_id=panda_id, attempt=row.attempt + 1, modified=now))
                if res.rowcount != 1:
                    continue
                out.append({"eventRangeID": range_id(job["task_id"], panda_id, row.row_id,
                                                     row.start_event, row.attempt + 1),
                            "startEvent": row.start_event, "lastEvent": row.last_event,
                            "LFN": row.lfn, "GUID": row.guid, "scope": row.scope})
            if pool:
                self._touch(conn, panda_id, now)
        return out

    def pending(self, panda_id: int) -> int:
        """Ranges of an event-service job's pool that other live jobs hold: they may come back
        (their holder dies), so a consumer told "none ready" may ask again later."""
        r = db.event_ranges.c
        with db.read(self.tb.engine) as conn:
            job = self._job(conn, panda_id)
            if job["event_service"] != ES_CONSUMER:
                return 0
            return int(conn.execute(select(func.count()).select_from(db.event_ranges).where(
                r.task_id == job["task_id"], r.serial == POOL_SERIAL, r.status.in_(HELD),
                r.panda_id != panda_id)).scalar() or 0)

    def _touch(self, conn: Connection, panda_id: int, now: dt.datetime) -> None:
        """A consumer's range traffic is a sign of life: its lease on its ranges goes on."""
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id == panda_id)
                     .values(heartbeat_time=now))

    def _task_scope(self, conn: Connection, task_id: int) -> str:
        params = conn.execute(select(db.tasks.c.params).where(db.tasks.c.task_id == task_id)
                              ).scalar()
        if isinstance(params, str):
            params = json.loads(params)
        return str((params or {}).get("scope") or TaskSpec.scope)

    def _range_timeout(self, conn: Connection, task_id: int) -> float:
        params = conn.execute(select(db.tasks.c.params).where(db.tasks.c.task_id == task_id)
                              ).scalar()
        if isinstance(params, str):
            params = json.loads(params)
        es = (params or {}).get("event_service") or {}
        try:
            return float(es.get("range_timeout_s") or DEFAULT_RANGE_TIMEOUT_S)
        except (TypeError, ValueError, AttributeError):
            return float(DEFAULT_RANGE_TIMEOUT_S)

    def _reclaim_pool(self, conn: Connection, task_id: int, timeout_s: float) -> int:
        """Ranges of the task's pool whose holder ended, or gave no sign of life for
        ``timeout_s``, go back to ready. Returns how many."""
        r, j = db.event_ranges.c, db.jobs.c
        held = conn.execute(select(r.panda_id).distinct().where(
            r.task_id == task_id, r.serial == POOL_SERIAL, r.status.in_(HELD))).scalars().all()
        if not held:
            return 0
        now = self.tb.clock()
        cutoff = now - dt.timedelta(seconds=timeout_s)
        alive = {row.panda_id for row in conn.execute(
            select(j.panda_id, j.status, func.coalesce(j.heartbeat_time, j.state_changed)
                   .label("sign")).where(j.panda_id.in_(held)))
            if row.status not in _FINAL and row.sign is not None and row.sign >= cutoff}
        dead = [p for p in held if p not in alive]
        if not dead:
            return 0
        res = conn.execute(update(db.event_ranges).where(
            r.task_id == task_id, r.serial == POOL_SERIAL, r.status.in_(HELD),
            r.panda_id.in_(dead)).values(status="ready", panda_id=None, modified=now))
        log.info("task %s: %d event range(s) of ended or silent job(s) %s back to ready",
                 task_id, res.rowcount, dead)
        return res.rowcount

    def reclaim_expired(self) -> int:
        """The watcher's pass: the pools of tasks with a live consumer (found through the
        jobs' status index, not a scan of every range), their ranges of ended or silent holders
        back to ready. A pool whose consumers all ended needs no pass: nobody would take them
        (a dead consumer's retry is created while its pool has ranges left, and is live)."""
        j = db.jobs.c
        live = sorted(str(s) for s in JobState if str(s) not in _FINAL)
        with db.read(self.tb.engine) as conn:
            tasks = conn.execute(select(j.task_id).distinct().where(
                j.status.in_(live), j.event_service == ES_CONSUMER)).scalars().all()
        n = 0
        for task_id in tasks:
            with self.tb.engine.begin() as conn:
                n += self._reclaim_pool(conn, task_id, self._range_timeout(conn, task_id))
        return n

    def _reclaim(self, conn: Connection, job: dict) -> None:
        """Ranges held by a dead attempt of this serial go back to ready."""
        r = db.event_ranges.c
        held = conn.execute(select(r.panda_id).distinct().where(
            r.task_id == job["task_id"], r.serial == job["serial"], r.status.in_(HELD),
            r.panda_id != job["panda_id"])).scalars().all()
        if not held:
            return
        final = {str(s) for s in FINAL_JOB_STATES}
        live = {p for p, st in conn.execute(select(db.jobs.c.panda_id, db.jobs.c.status).where(
            db.jobs.c.panda_id.in_(held))) if st not in final}
        dead = [p for p in held if p not in live]
        if dead:
            conn.execute(update(db.event_ranges).where(
                r.task_id == job["task_id"], r.serial == job["serial"], r.status.in_(HELD),
                r.panda_id.in_(dead)).values(status="ready", panda_id=None,
                                             modified=self.tb.clock()))
            log.info("event ranges of dead job(s) %s returned to ready", dead)

    def update(self, updates: list[dict], identity: Identity | None) -> list[bool]:
        """Apply range reports; each answer says whether that report was taken."""
        if len(updates) > MAX_UPDATES_PER_CALL:
            raise EventRangeError(30, f"at most {MAX_UPDATES_PER_CALL} event ranges per call")
        r = db.event_ranges.c
        results = []
        with self.tb.engine.begin() as conn:
            jobs: dict[int, dict] = {}
            for u in updates:
                if not isinstance(u, dict):
                    raise EventRangeError(30, "each event range update must be an object")
                task_id, panda_id, row_id = parse_range_id(u.get("eventRangeID"))
                status = REPORTED.get(str(u.get("eventStatus", "")).lower())
                if status is None:
                    raise EventRangeError(30, f"eventStatus {u.get('eventStatus')!r} is not one "
                                              f"of {', '.join(sorted(REPORTED))}")
                if panda_id not in jobs:
                    jobs[panda_id] = self._job(conn, panda_id)
                job = jobs[panda_id]
                if identity is not None and not identity.may_act_for_site(job["site"]):
                    raise EventRangeError(70, f"{identity.subject} may not act for {job['site']}")
                if job["status"] not in _OWNED:
                    results.append(False)        # a dead attempt's late report
                    continue
                values: dict[str, Any] = {"status": status, "modified": self.tb.clock()}
                if job["event_service"] == ES_CONSUMER:
                    if status == "finished":
                        values.update(self._range_output(conn, job, u))
                    elif status == "cancelled":   # not processed: back to the pool
                        values.update(status="ready", panda_id=None)
                cpu = u.get("cpuConsumptionTime")
                if cpu not in (None, "", "NULL"):
                    try:
                        values["cpu_consumption_time"] = float(cpu)
                    except (TypeError, ValueError):
                        raise EventRangeError(30, f"cpuConsumptionTime {cpu!r} is not a "
                                                  "number") from None
                if status == "failed":
                    attempt = conn.execute(select(r.attempt).where(r.row_id == row_id)).scalar()
                    if attempt is not None and attempt < job["max_attempts"]:
                        values.update(status="ready", panda_id=None)   # try it again
                elif status == "fatal":
                    values["status"] = "failed"
                res = conn.execute(update(db.event_ranges).where(and_(
                    r.row_id == row_id, r.task_id == task_id, r.panda_id == panda_id,
                    r.status.in_(HELD))).values(**values))
                results.append(res.rowcount == 1)
                if res.rowcount == 1 and values.get("out_lfn") and values.get("out_endpoint"):
                    self.tb.data._add_replica(conn, u["_scope"], values["out_lfn"],
                                              values["out_endpoint"], None)
            consumers = {(j["task_id"], j["panda_id"]) for j in jobs.values()
                         if j["event_service"] == ES_CONSUMER and j["status"] in _OWNED}
            for task_id, panda_id in consumers:
                self._touch(conn, panda_id, self.tb.clock())
        # after the commit: a report's own check inside its transaction would not see another
        # report finishing the other last range at the same moment (READ COMMITTED), and
        # neither would make the merge job; after both commits, the later check sees both
        for task_id in {t for t, _ in consumers}:
            site = next((jb["site"] for jb in jobs.values() if jb["task_id"] == task_id), None)
            try:
                with self.tb.engine.begin() as conn:
                    create_merge_if_done(self.tb, conn, task_id, site)
            except Exception:  # the reports are taken; the task's settling creates it later
                log.exception("task %s: merge job not created now", task_id)
        return results

    def _range_output(self, conn: Connection, job: dict, u: dict) -> dict[str, Any]:
        """The out_* values of a finished event-service range from its ``zipFile`` (PanDA's
        name): the lfn must be the one ``range_output_lfn`` gives for this range and the scope
        the task's, so a pilot names no file but its own; the replica is at its site's output
        storage element."""
        out = u.get("_output")
        if not isinstance(out, dict):
            raise EventRangeError(30, f"finished event-service range {u['eventRangeID']} needs "
                                      "its output (zipFile with lfn, fsize, adler32)")
        expected = range_output_lfn(str(u["eventRangeID"]))
        if out.get("lfn") != expected:
            raise EventRangeError(30, f"the output of range {u['eventRangeID']} must be named "
                                      f"{expected!r}, not {str(out.get('lfn'))[:80]!r}")
        try:
            fsize = int(out.get("fsize"))
        except (TypeError, ValueError):
            raise EventRangeError(30, "zipFile fsize must be an integer") from None
        if not 0 <= fsize < 2 ** 62:
            raise EventRangeError(30, "zipFile fsize is out of range")
        adler = str(out.get("adler32") or "").lower()
        if not (len(adler) == 8 and all(c in "0123456789abcdef" for c in adler)):
            raise EventRangeError(30, "zipFile adler32 must be 8 hex digits")
        task_scope = self._task_scope(conn, job["task_id"])
        scope = str(out.get("scope") or task_scope)
        try:
            check_name(scope, "scope")
        except BadFileName as exc:
            raise EventRangeError(30, f"zipFile {exc}") from None
        if scope != task_scope:
            raise EventRangeError(30, f"zipFile scope {scope!r} is not the task's ({task_scope!r})")
        u["_scope"] = scope
        endpoint = None
        try:
            site = self.tb.sites.get_cached(job["site"])
            endpoint = ((site.get("config") or {}).get("storage") or {}).get("output", {}).get(
                "name")
        except Exception:  # an unknown site: the output is recorded without a replica
            log.warning("job %s: site %r unknown, range output has no replica", job["panda_id"],
                        job["site"])
        return {"out_lfn": expected, "out_fsize": fsize, "out_checksum": f"ad:{adler}",
                "out_endpoint": endpoint}

    def summary(self, task_id: int) -> dict[str, int]:
        """Ranges of a task per status."""
        r = db.event_ranges.c
        with db.read(self.tb.engine) as conn:
            return {s: n for s, n in conn.execute(select(r.status, func.count()).where(
                r.task_id == task_id).group_by(r.status))}


def create_merge_if_done(tb: TaskBuffer, conn: Connection, task_id: int,
                         site_hint: str | None) -> int | None:
    """Create the task's merge job when no range of its pool is left to run and it has none.

    Called after a range report's commit, and where a task settles (``continue_pool``: a
    report whose check was lost, a server killed in between, still gets its merge job). The
    task row is locked, and the pool counted again under the lock, so two callers at once
    make one merge job."""
    r, j = db.event_ranges.c, db.jobs.c
    if pool_left(conn, task_id):      # the common case, without taking the task's lock
        return None
    q = select(db.tasks.c.params, db.tasks.c.owner, db.tasks.c.status, db.tasks.c.share) \
        .where(db.tasks.c.task_id == task_id)
    if tb.skip_locked:
        q = q.with_for_update()
    task = conn.execute(q).first()
    if task is None or task.status in ("aborted", "broken"):
        return None
    if pool_left(conn, task_id):      # again under the lock: another report may have won
        return None
    for table in (db.jobs, db.jobs_archive):
        if conn.execute(select(table.c.panda_id).where(
                table.c.task_id == task_id, table.c.event_service == ES_MERGE).limit(1)
                ).first() is not None:
            return None
    done = conn.execute(select(r.out_lfn, r.out_fsize, r.out_checksum, r.out_endpoint,
                               r.scope, r.lfn, r.start_event).where(
        r.task_id == task_id, r.serial == POOL_SERIAL, r.status == "finished",
        r.out_lfn.is_not(None)).order_by(r.lfn, r.start_event)).all()
    if not done:
        log.warning("task %s: no event range finished: no merge job", task_id)
        return None
    params = json.loads(task.params) if isinstance(task.params, str) else task.params
    spec = TaskSpec.from_dict(params)
    spec.share = task.share
    out_scope = spec.scope
    inputs = [{"scope": out_scope, "lfn": d.out_lfn, "dataset": f"{spec.name}.es_ranges",
               "guid": None, "fsize": d.out_fsize, "checksum": d.out_checksum} for d in done]
    serial = int(conn.execute(select(func.max(j.serial)).where(j.task_id == task_id))
                 .scalar() or 0)
    serial = max(serial, int(conn.execute(select(func.max(db.jobs_archive.c.serial)).where(
        db.jobs_archive.c.task_id == task_id)).scalar() or 0)) + 1
    site = spec.site or site_hint
    job, files = make_merge_job(spec, task_id, task.owner, serial, inputs, site=site)
    panda_id = tb.jobs.insert(conn, job, files, "event-service")
    target = JobState.ASSIGNED
    if site:
        try:
            cfg = tb.sites.get_cached(site).get("config") or {}
            se = ((cfg.get("storage") or {}).get("input") or {}).get("name")
        except Exception:
            se = None
        if se and all(d.out_endpoint == se for d in done):
            target = JobState.ACTIVATED
    tb.states.change(conn, panda_id, str(target), actor="event-service",
                     expected=[str(JobState.DEFINED)])
    log.info("task %s: every event range is done: merge job %s over %d range output(s)",
             task_id, panda_id, len(done))
    return panda_id


def pool_left(conn: Connection, task_id: int) -> bool:
    """Has an event-service task's pool ranges no job processed (ready, or held)?"""
    r = db.event_ranges.c
    return conn.execute(select(r.row_id).where(
        r.task_id == task_id, r.serial == POOL_SERIAL,
        r.status.in_(("ready",) + HELD)).limit(1)).first() is not None


def continue_pool(tb: TaskBuffer, conn: Connection, task_id: int) -> int | None:
    """Every job of an event-service task has ended but its pool still has ranges ready (the
    consumers ran out of wall time): a new consumer takes them, as JEDI adds jobs to a jobset.
    Only after progress (the latest consumer finished events), so a consumer that cannot do a
    single range in its wall time does not beget another forever. The caller holds the task's
    row lock (``Tasks.refresh_status``). Returns the new PandaID, or None."""
    r, j = db.event_ranges.c, db.jobs.c
    latest = conn.execute(select(db.jobs).where(
        j.task_id == task_id, j.event_service == ES_CONSUMER)
        .order_by(j.panda_id.desc()).limit(1)).first()
    if latest is None:                  # not an event-service task (or its jobs are archived)
        return None
    if conn.execute(select(r.row_id).where(r.task_id == task_id, r.serial == POOL_SERIAL,
                                           r.status == "ready").limit(1)).first() is None:
        # nothing left to process: the merge job, should the last report's check be lost
        return create_merge_if_done(tb, conn, task_id, latest.site)
    if latest.status != "finished" or not (latest.n_events or 0) > 0:
        return None
    task = conn.execute(select(db.tasks.c.params, db.tasks.c.owner, db.tasks.c.share)
                        .where(db.tasks.c.task_id == task_id)).first()
    params = json.loads(task.params) if isinstance(task.params, str) else task.params
    spec = TaskSpec.from_dict(params)
    spec.share = task.share
    inputs = [dict(f._mapping) for f in conn.execute(select(db.files).where(
        db.files.c.panda_id == latest.panda_id, db.files.c.type == "input"))]
    serial = max(int(conn.execute(select(func.max(t.c.serial)).where(t.c.task_id == task_id))
                     .scalar() or 0) for t in (db.jobs, db.jobs_archive)) + 1
    values, new_files = make_consumer_job(spec, task_id, task.owner, serial, inputs,
                                          site=latest.site)
    panda_id = tb.jobs.insert(conn, values, new_files, "event-service")
    tb.states.change(conn, panda_id, str(JobState.ACTIVATED) if latest.site else
                     str(JobState.ASSIGNED), actor="event-service",
                     expected=[str(JobState.DEFINED)])
    log.info("task %s: its consumers ended with ranges still ready: new consumer %s", task_id,
             panda_id)
    return panda_id


def parse_updates(form: dict) -> list[dict]:
    """``eventRanges`` (a JSON string: pilot 3's version 1 is [{"zipFile", "eventRanges": [..]}],
    version 0 a flat list), or the single ``eventRangeID``/``eventStatus`` of updateEventRange."""
    raw = form.get("eventRanges")
    if raw in (None, ""):
        if form.get("eventRangeID"):
            return [{"eventRangeID": form["eventRangeID"],
                     "eventStatus": form.get("eventStatus", ""),
                     "cpuConsumptionTime": form.get("cpuConsumptionTime")}]
        raise EventRangeError(80, "eventRanges is missing")
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise EventRangeError(30, "eventRanges must be a JSON list") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise EventRangeError(30, "eventRanges must be a JSON list")
    flat: list[dict] = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("eventRanges"), list):
            for sub in item["eventRanges"]:             # version 1: grouped by zip file
                if isinstance(sub, dict) and item.get("zipFile") is not None:
                    sub = {**sub, "_output": item["zipFile"]}
                flat.append(sub)
        else:
            flat.append(item)
    return flat


# ---------------------------------------------------------------------- form adapters
def _form_int(form: dict, key: str, default: int | None = None) -> int | None:
    value = form.get(key)
    if value in (None, "", "NULL", "None"):
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        raise EventRangeError(30, f"{key} must be an integer, got {str(value)[:40]!r}") from None
    if not -2 ** 62 < number < 2 ** 62:          # would overflow a BIGINT column
        raise EventRangeError(30, f"{key} is out of range")
    return number


def protocol_get(tb: TaskBuffer, form: dict, identity: Identity | None) -> dict:
    """``getEventRanges``: pandaID (required), jobsetID, taskID/jediTaskID, nRanges."""
    panda_id = _form_int(form, "pandaID")
    if panda_id is None:
        raise EventRangeError(80, "pandaID is missing")
    task_id = _form_int(form, "jediTaskID", _form_int(form, "taskID"))
    service = EventRangeService(tb)
    ranges = service.get(panda_id, _form_int(form, "nRanges", 1) or 1, identity, task_id=task_id)
    reply: dict[str, Any] = {"StatusCode": 0, "eventRanges": ranges}
    if not ranges:     # our extra key: ranges other consumers hold, which may come back
        reply["eventRangesPending"] = service.pending(panda_id)
    return reply


def protocol_update(tb: TaskBuffer, form: dict, identity: Identity | None) -> dict:
    """``updateEventRanges`` (and the older single ``updateEventRange``)."""
    updates = parse_updates(form)
    service = EventRangeService(tb)
    returns = service.update(updates, identity)
    command: dict[str, str] = {}
    owned = {str(s) for s in PILOT_OWNED_STATES}
    for pid in {parse_range_id(u.get("eventRangeID"))[1] for u in updates}:
        job = tb.jobs.get(pid, include_archive=False)
        if job is None or job["status"] not in owned:
            command[str(pid)] = "tobekilled"
        elif job.get("command"):
            command[str(pid)] = job["command"]
    return {"StatusCode": 0, "Returns": returns, "Command": command}
