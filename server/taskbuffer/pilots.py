"""What pilots and their factories report: a pilot's updateJob applied to its job, and the
factories' lists of the pilots they submitted."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from panda_core.states import FINAL_JOB_STATES, PILOT_OWNED_STATES, IllegalTransition, JobState

from .. import db
from ..transient import retrying
from .base import Conflict, Store, is_retryable
from .data import Data
from .jobs import Jobs
from .states import JobStates
from .tasks import NOT_MADE_RUNNING, Tasks

log = logging.getLogger(__name__)

_FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)
_PILOT_OWNED = frozenset(str(s) for s in PILOT_OWNED_STATES)
_SELECT_OUTPUTS = select(db.files.c.row_id, db.files.c.type, db.files.c.scope, db.files.c.lfn,
                         db.files.c.dataset, db.files.c.guid).where(
    db.files.c.panda_id == bindparam("pid"), db.files.c.type.in_(("output", "log")))
# the job a pilot updates, with its task's status (to skip the task update when it runs)
_SELECT_PILOT_ROW = select(
    db.jobs.c.panda_id, db.jobs.c.status, db.jobs.c.attempt_nr, db.jobs.c.command,
    db.jobs.c.task_id, db.jobs.c.site, db.jobs.c.destination_se, db.jobs.c.share,
    db.jobs.c.cores, db.tasks.c.status.label("task_status"),
    db.jobs.c.pilot_owner, db.jobs.c.pilot_id, db.jobs.c.node, db.jobs.c.pilot_nonce
).select_from(db.jobs.outerjoin(db.tasks, db.tasks.c.task_id == db.jobs.c.task_id)).where(
    db.jobs.c.panda_id == bindparam("pid"))
_PILOT_ROW_KEYS = frozenset(c.name for c in _SELECT_PILOT_ROW.selected_columns)
# a final update's read: the same columns with the job's output and log files joined
_SELECT_PILOT_ROW_OUTPUTS = select(
    *_SELECT_PILOT_ROW.selected_columns, db.files.c.row_id, db.files.c.type, db.files.c.scope,
    db.files.c.lfn, db.files.c.dataset, db.files.c.guid
).select_from(db.jobs.outerjoin(db.tasks, db.tasks.c.task_id == db.jobs.c.task_id).outerjoin(
    db.files, and_(db.files.c.panda_id == db.jobs.c.panda_id,
                   db.files.c.type.in_(("output", "log"))))).where(
    db.jobs.c.panda_id == bindparam("pid"))


class Pilots:
    def __init__(self, store: Store, states: JobStates, tasks: Tasks, data: Data, jobs: Jobs):
        self.store = store
        self.states = states
        self.tasks = tasks
        self.data = data
        self.jobs = jobs

    # ------------------------------------------------------------------ updateJob
    def update(self, panda_id: int, state: str, fields: dict, *, actor: str | None,
               **kw: Any) -> str:
        """Apply a pilot's updateJob (see :meth:`_update`); a transaction the database chose
        as a deadlock victim is retried, since it was rolled back whole."""
        for attempt in range(1, 4):
            try:
                return self._update(panda_id, state, dict(fields), actor=actor, **kw)
            except DBAPIError as exc:
                if attempt == 3 or not is_retryable(exc):
                    raise
                log.warning("job %s: %s; retrying the update", panda_id, exc.orig)
        raise AssertionError("unreachable")

    def _update(self, panda_id: int, state: str, fields: dict, *, actor: str | None,
                attempt_nr: int | None = None, stored_files: dict[str, dict] | None = None,
                output_endpoint: str | None = None, output_url: str | None = None,
                check: Callable[[dict], Any] | None = None) -> str:
        """Apply a pilot's updateJob; returns the command for the pilot ("NULL", "tobekilled").

        A heartbeat for a job the pilot no longer owns (unknown, other attempt, already final)
        gets "tobekilled". A final state is applied via ``holding``: outputs are registered,
        then the job finishes (or fails if an expected output is missing). ``check``: called
        with the job's row ({panda_id, status, site, ...}) before anything changes; it raises
        to refuse the update and returns the output storage element, with ``name`` and ``url``
        (the dispatcher's authorization, without a read of its own). With the storage
        element's URL known, a stored file counts only at the SURL the server computes for it.
        """
        store = self.store
        if store.dialect == "postgresql" and state not in _FINAL:
            # a heartbeat or progress report is one guarded statement after the read: in
            # autocommit it needs no BEGIN/COMMIT round trips (the read takes no lock in the
            # transaction either, READ COMMITTED); the rare first "running" that also marks
            # the task running keeps one transaction for both writes (below)
            with store.autocommit.connect() as conn:
                row = conn.execute(_SELECT_PILOT_ROW, {"pid": panda_id}).first()
                if row is None:
                    return "tobekilled"
                if check is not None:
                    check(dict(row._mapping))
                if attempt_nr is not None and attempt_nr != row.attempt_nr:
                    return "tobekilled"
                if row.status not in _PILOT_OWNED:
                    return "tobekilled" if row.status in _FINAL else "NULL"
                if not (state == str(JobState.RUNNING) and state != row.status
                        and row.task_status not in NOT_MADE_RUNNING):
                    now = store.clock()
                    return self._progress(conn, panda_id, row, state,
                                          {**fields, "heartbeat_time": now}, actor, now)
            check = None      # checked above; the transaction below re-reads the row
        final = state in (str(JobState.FINISHED), str(JobState.FAILED))
        with store.engine.begin() as conn:
            outs = None
            if final:
                # the job's row and its output and log files in one read (one row per file)
                rows = conn.execute(_SELECT_PILOT_ROW_OUTPUTS, {"pid": panda_id}).all()
                row = rows[0] if rows else None
                outs = [r for r in rows if r.row_id is not None]
            else:
                row = conn.execute(_SELECT_PILOT_ROW, {"pid": panda_id}).first()
            if row is None:
                return "tobekilled"
            if check is not None:
                target = check({k: v for k, v in row._mapping.items() if k in _PILOT_ROW_KEYS})
                if target is not None:
                    output_endpoint, output_url = target.name, target.url
            if attempt_nr is not None and attempt_nr != row.attempt_nr:
                return "tobekilled"
            if row.status not in _PILOT_OWNED:
                return "tobekilled" if row.status in _FINAL else "NULL"
            now = store.clock()
            fields = {**fields, "heartbeat_time": now}
            if final:
                state = self._finish(conn, panda_id, row.status, state, fields, actor,
                                     stored_files or {}, output_endpoint, outs,
                                     row.destination_se, output_url)
                if state == str(JobState.TRANSFERRING):
                    return "NULL"        # not ended: the data service moves its outputs on
                ended_task = row.task_id
            else:
                return self._progress(conn, panda_id, row, state, fields, actor, now)
        # the task's status is checked after the job's transaction committed, in a short one
        # of its own: the task row lock is then held for microseconds, not across the final
        # update's commit, and the last job to end sees every other one ended
        try:
            retrying(self.tasks.after_job_end, ended_task)
        except DBAPIError:
            # the job's end is committed and must stand (a retried request would be told
            # "tobekilled"); the watcher settles a task whose jobs all ended
            log.warning("task %s: status not updated after job %s ended (the watcher repairs "
                        "it)", ended_task, panda_id, exc_info=True)
        return "NULL"

    def _progress(self, conn: Connection, panda_id: int, row, state: str, fields: dict,
                  actor: str | None, now: dt.datetime) -> str:
        """A non-final pilot update (starting, running, holding, transferring, heartbeat)."""
        if state == str(JobState.RUNNING) and row.status in ("sent", "starting"):
            fields.setdefault("start_time", now)
        if state == row.status:
            conn.execute(update(db.jobs).where(db.jobs.c.panda_id == panda_id)
                         .values(modification_time=now, **fields))
        else:
            try:
                self.states.change(conn, panda_id, state, actor=actor, expected=[row.status],
                                   **fields)
            except IllegalTransition:
                raise Conflict(f"job {panda_id} is {row.status}; cannot go to {state}") from None
            if state == str(JobState.RUNNING) and row.task_status not in NOT_MADE_RUNNING:
                self.tasks.mark_running(conn, row.task_id)
        return row.command or "NULL"

    def _finish(self, conn: Connection, panda_id: int, old: str, state: str, fields: dict,
                actor: str | None, stored: dict[str, dict], endpoint: str | None,
                outs: list | None = None, destination_se: str | None = None,
                se_url: str | None = None) -> str:
        """Register the stored outputs, then end the job via ``holding`` (both steps recorded);
        a job whose task aggregates its outputs elsewhere goes to ``transferring`` instead of
        ``finished`` (the data service ends it). Returns the state the job went to."""
        now = self.store.clock()
        fields.setdefault("end_time", now)
        if outs is None:      # the caller may have read them with the job's row
            outs = conn.execute(_SELECT_OUTPUTS, {"pid": panda_id}).all()
        problems: list[str] = []
        missing = self.data.register_stored(conn, outs, stored, endpoint, now, se_url=se_url,
                                            problems=problems)
        if state == str(JobState.FINISHED) and missing:
            state = str(JobState.FAILED)
            fields["pilot_error_code"] = 1165
            fields["pilot_error_diag"] = ("missing output file(s): " + ",".join(missing)
                                          + "".join(f"; {p}" for p in problems))[:1000]
        if state == str(JobState.FINISHED) and destination_se and destination_se != endpoint:
            state = str(JobState.TRANSFERRING)
            fields.pop("end_time", None)
        if not self.states.change(conn, panda_id, state, actor=actor, expected=[old],
                                  via=[str(JobState.HOLDING)], command=None, **fields):
            raise Conflict(f"job {panda_id} changed state while its final update was applied")
        if state == str(JobState.FAILED):
            self.jobs.retry(conn, panda_id, actor)
        return state

    # ------------------------------------------------------------------ factories
    def report(self, factory: str, pilots: list[dict], actor: str | None,
               site_status: dict | None = None, actor_is_admin: bool = False) -> int:
        """A factory's pilots (batch id, site, state, ...) and, optionally, how it sees each
        site; returns how many pilots were reported. PermissionError when ``factory`` is
        another identity's (an admin may report for any)."""
        now = self.store.clock()
        fac = {"last_seen": now, "actor": actor}
        if site_status is not None:
            fac["site_status"] = site_status
        with self.store.engine.begin() as conn:
            # a factory's name belongs to the identity that first reported under it: another
            # caller naming it would overwrite what the factory said about its pilots and sites
            owner = db.factories.c.actor
            mine = [db.factories.c.name == factory]
            if not actor_is_admin:
                mine.append((owner == actor) | owner.is_(None))
            res = conn.execute(update(db.factories).where(*mine).values(**fac))
            if res.rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(db.factories).values(name=factory, **fac))
                except IntegrityError:
                    held = conn.execute(select(owner).where(db.factories.c.name == factory)
                                        ).scalar()
                    raise PermissionError(f"factory {factory!r} reports as {held}; "
                                          f"{actor} may not report for it") from None
            for p in pilots:
                values = {"site": p["site"], "backend": p.get("backend"),
                          "state": p.get("state", "unknown"),
                          "submitted": _parse_time(p.get("submitted")), "updated": now,
                          "exit_code": p.get("exit_code")}
                res = conn.execute(update(db.pilots).where(
                    db.pilots.c.factory == factory,
                    db.pilots.c.batch_id == str(p["batch_id"])).values(**values))
                if res.rowcount == 0:
                    conn.execute(insert(db.pilots).values(factory=factory,
                                                          batch_id=str(p["batch_id"]), **values))
        return len(pilots)

    def summary(self) -> dict:
        """The factories, and pilots per site and state."""
        with db.read(self.store.engine) as conn:
            facs = [dict(r._mapping) for r in conn.execute(select(db.factories))]
            per_site: dict[str, dict[str, int]] = {}
            for site, state, n in conn.execute(select(db.pilots.c.site, db.pilots.c.state,
                                                      func.count()).group_by(db.pilots.c.site,
                                                                             db.pilots.c.state)):
                per_site.setdefault(site, {})[state] = n
        return {"factories": facs, "sites": per_site}


def _parse_time(value) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).replace(tzinfo=None)
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed
