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
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Connection

from panda_core.states import FINAL_JOB_STATES, PILOT_OWNED_STATES

from . import db
from .auth import Identity
from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

MAX_RANGES_PER_CALL = 1000
MAX_UPDATES_PER_CALL = 10000
#: what a pilot may report for a range -> the range's new status
REPORTED = {"running": "running", "finished": "finished", "done": "finished",
            "failed": "failed", "fatal": "fatal", "cancelled": "cancelled",
            "discarded": "cancelled", "corrupted": "failed"}
HELD = ("sent", "running")


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
        row = conn.execute(select(db.jobs.c.panda_id, db.jobs.c.task_id, db.jobs.c.serial,
                                  db.jobs.c.status, db.jobs.c.site, db.jobs.c.max_attempts)
                           .where(db.jobs.c.panda_id == panda_id)).first()
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
            if job["status"] not in {str(s) for s in PILOT_OWNED_STATES}:
                return []                        # a job no pilot holds gets nothing
            self._reclaim(conn, job)
            q = (select(r.row_id, r.start_event, r.last_event, r.lfn, r.guid, r.scope,
                        r.attempt)
                 .where(r.task_id == job["task_id"], r.serial == job["serial"],
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
        return out

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
                if job["status"] not in {str(s) for s in PILOT_OWNED_STATES}:
                    results.append(False)        # a dead attempt's late report
                    continue
                values: dict[str, Any] = {"status": status, "modified": self.tb.clock()}
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
        return results

    def summary(self, task_id: int) -> dict[str, int]:
        """Ranges of a task per status."""
        from sqlalchemy import func
        r = db.event_ranges.c
        with db.read(self.tb.engine) as conn:
            return {s: n for s, n in conn.execute(select(r.status, func.count()).where(
                r.task_id == task_id).group_by(r.status))}


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
            flat.extend(item["eventRanges"])            # version 1: grouped by zip file
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
    ranges = EventRangeService(tb).get(panda_id, _form_int(form, "nRanges", 1) or 1, identity,
                                       task_id=task_id)
    return {"StatusCode": 0, "eventRanges": ranges}


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
