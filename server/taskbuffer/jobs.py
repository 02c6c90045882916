"""Jobs: their rows and files, dispatch to a pilot, failure with retries, and kills.

Dispatch hands a job to exactly one pilot: the row is picked with ``FOR UPDATE SKIP LOCKED``
where the database has it (PostgreSQL, MariaDB) and the status change is guarded by
``WHERE status = 'activated'``, so even two processes that picked the same row cannot both win.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import Integer, String, all_, and_, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from panda_core.states import (FINAL_JOB_STATES, FINAL_TASK_STATES, PILOT_OWNED_STATES, JobState,
                               TaskState)

from .. import db
from ..failurepolicy import excluded_after
from ..jobcreator import retry_job_values
from .base import Conflict, NotFound, Store
from .counts import JobCounts
from .states import JobStates
from .tasks import Tasks

log = logging.getLogger(__name__)

SELECT_FILES = (select(db.files).where(db.files.c.panda_id == bindparam("pid"))
                .order_by(db.files.c.row_id))
# an archived job's files: the live columns only, so both tiers give the same dicts
SELECT_ARCHIVED_FILES = (select(*[db.files_archive.c[c.name] for c in db.files.c])
                         .where(db.files_archive.c.panda_id == bindparam("pid"))
                         .order_by(db.files_archive.c.row_id))
_FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)
_PILOT_OWNED = frozenset(str(s) for s in PILOT_OWNED_STATES)
_FINAL_TASK = frozenset(str(s) for s in FINAL_TASK_STATES)
#: a failed job of a task in these states gets no new attempt (killed, or finished by its owner)
_NO_RETRY_TASK = frozenset((str(TaskState.ABORTED), str(TaskState.FINISHING)))


def kill_values(now: Any, actor: str, with_pilot: bool, why: str | None = None) -> dict:
    """The columns a killed job gets: its end, the task buffer's kill code (300) and who
    killed it (and why); ``tobekilled`` for the pilot that holds it (``with_pilot``)."""
    values: dict[str, Any] = {"end_time": now, "task_buffer_error_code": 300,
                              "task_buffer_error_diag": f"killed by {actor}"
                                                        + (f": {why}" if why else "")}
    if with_pilot:
        values["command"] = "tobekilled"
    return values


class Jobs:
    def __init__(self, store: Store, states: JobStates, tasks: Tasks, counts: JobCounts):
        self.store = store
        self.states = states
        self.tasks = tasks
        self.counts = counts

    # ------------------------------------------------------------------ rows
    def insert(self, conn: Connection, job: dict, job_files: list[dict], actor: str) -> int:
        """Insert one job in ``defined`` with its files; returns its PandaID."""
        now = self.store.clock()
        values = {"status": str(JobState.DEFINED), "creation_time": now,
                  "modification_time": now, "state_changed": now, **job}
        panda_id = int(conn.execute(insert(db.jobs).values(**values)).inserted_primary_key[0])
        conn.execute(insert(db.job_history).values(panda_id=panda_id, old_status=None,
                                                   new_status=str(JobState.DEFINED), time=now,
                                                   actor=actor))
        if job_files:
            # executemany needs the same keys in every row
            blank = dict.fromkeys(("guid", "fsize", "checksum", "ddm_endpoint"))
            conn.execute(insert(db.files), [{**blank, "panda_id": panda_id,
                                             "task_id": job["task_id"], **f} for f in job_files])
        return panda_id

    def insert_many(self, conn: Connection, jobs: list[tuple[dict, list[dict]]],
                    actor: str) -> list[int]:
        """``insert`` for many jobs of one shape (the same keys in every job dict) in three
        statements (jobs, history, files) instead of three per job; PandaIDs in order."""
        if not jobs:
            return []
        now = self.store.clock()
        base = {"status": str(JobState.DEFINED), "creation_time": now,
                "modification_time": now, "state_changed": now}
        result = conn.execute(insert(db.jobs).returning(db.jobs.c.panda_id,
                                                        sort_by_parameter_order=True),
                              [{**base, **job} for job, _ in jobs])
        ids = [int(r[0]) for r in result]
        conn.execute(insert(db.job_history), [
            {"panda_id": pid, "old_status": None, "new_status": str(JobState.DEFINED),
             "time": now, "actor": actor} for pid in ids])
        blank = dict.fromkeys(("guid", "fsize", "checksum", "ddm_endpoint"))
        file_rows = [{**blank, "panda_id": pid, "task_id": job["task_id"], **f}
                     for pid, (job, files) in zip(ids, jobs) for f in files]
        if file_rows:
            conn.execute(insert(db.files), file_rows)
        return ids

    def get(self, panda_id: int, include_archive: bool = True) -> dict | None:
        with db.read(self.store.engine) as conn:
            for table in (db.jobs, db.jobs_archive) if include_archive else (db.jobs,):
                row = conn.execute(select(table).where(table.c.panda_id == panda_id)).first()
                if row is not None:
                    job = dict(row._mapping)
                    archived = table is db.jobs_archive
                    job["files"] = [dict(f._mapping) for f in conn.execute(
                        SELECT_ARCHIVED_FILES if archived else SELECT_FILES, {"pid": panda_id})]
                    job["archived"] = archived
                    return job
        return None

    def history(self, panda_id: int) -> list[dict]:
        """The job's state changes, oldest first, from the live table and the archive tier
        (a job moves there whole, but a reader may look while a batch moves)."""
        rows: list[dict] = []
        with db.read(self.store.engine) as conn:
            for table in (db.job_history, db.job_history_archive):
                rows += [dict(r._mapping) for r in conn.execute(
                    select(*[table.c[c.name] for c in db.job_history.c])
                    .where(table.c.panda_id == panda_id))]
        seen: set[int] = set()
        unique = [r for r in sorted(rows, key=lambda r: r["row_id"])
                  if not (r["row_id"] in seen or seen.add(r["row_id"]))]
        return unique

    def find(self, task_id: int | None = None, site: str | None = None,
             status: str | list[str] | None = None, limit: int = 1000, *,
             owner: str | None = None, since: Any = None,
             newest_first: bool = False) -> list[dict]:
        """Jobs, live and archived, by PandaID (``newest_first``: the last ``limit`` ones);
        ``status``: one state or a list; ``since``: modified at or after this time."""
        rows: list[dict] = []
        with db.read(self.store.engine) as conn:
            for table in (db.jobs, db.jobs_archive):
                c = table.c
                q = select(table).order_by(c.panda_id.desc() if newest_first else c.panda_id
                                           ).limit(limit)
                if task_id is not None:
                    q = q.where(c.task_id == task_id)
                if site:
                    q = q.where(c.site == site)
                if isinstance(status, (list, tuple)) and status:
                    q = q.where(c.status.in_(list(status)))
                elif status:
                    q = q.where(c.status == status)
                if owner:
                    q = q.where(c.owner == owner)
                if since is not None:
                    q = q.where(c.modification_time >= since)
                rows += [dict(r._mapping) for r in conn.execute(q)]
        if newest_first:
            rows.sort(key=lambda r: r["panda_id"], reverse=True)
        return rows[:limit]

    def count(self, site: str | None = None, status: str | None = None) -> int:
        q = select(func.count()).select_from(db.jobs)
        if site:
            q = q.where(db.jobs.c.site == site)
        if status:
            q = q.where(db.jobs.c.status == status)
        with db.read(self.store.engine) as conn:
            return int(conn.execute(q).scalar_one())

    def activated_shape(self, site: str) -> dict[str, Any]:
        """What the activated jobs of ``site`` need at least: their number, the smallest
        walltime, memory and cores among them, and how many run on any pilot version. One
        aggregate over the partial index of activated jobs (``server.nofit`` explains with it
        why a pilot got no job)."""
        j = db.jobs.c
        q = (select(func.count(), func.min(j.walltime_s), func.min(j.memory_mb),
                    func.min(j.cores), func.count(j.pilot_version))
             .where(j.site == site, db.ACTIVATED_ONLY))
        with db.read(self.store.engine) as conn:
            n, walltime, memory, cores, pinned = conn.execute(q).one()
        return {"activated": int(n), "walltime_s": walltime, "memory_mb": memory,
                "cores": cores, "any_version": int(n) - int(pinned or 0)}

    def count_fitting(self, site: str, **fit: Any) -> int:
        """Activated jobs of ``site`` a pilot with these limits (``dispatch_params``'
        keywords) could take: the dispatch's own conditions, counted."""
        params = self.dispatch_params(site, **fit)
        q = (select(func.count()).select_from(db.jobs)
             .where(and_(*self.pick_conditions(tuple(sorted(params))))))
        with db.read(self.store.engine) as conn:
            return int(conn.execute(q, params).scalar_one())

    def site_load(self) -> dict[str, dict[str, int]]:
        """site -> {status: count} over the jobs table: what brokerage and the monitor read.
        From the trigger-kept counters (``taskbuffer.counts``): exact, and the same cost at
        a million jobs as at ten."""
        return self.counts.site_load()

    # ------------------------------------------------------------------ dispatch
    @staticmethod
    def dispatch_params(site: str, *, cores: int | None = None, memory_mb: int | None = None,
                        walltime_s: int | None = None, pilot_version: str | None = None,
                        prod_source_label: str | None = None,
                        share: str | tuple | None = None) -> dict:
        """The bind parameters of a dispatch pick; absent limits are left out (their shape
        names the statement). ``share``: only this share, or (a tuple) only shares not in it
        (the steps of a share plan, ``shares.ShareChooser.share_plan``)."""
        wanted = {"p_site": site, "p_cores": cores or None, "p_memory_mb": memory_mb or None,
                  "p_walltime_s": walltime_s or None, "p_label": prod_source_label or None,
                  "p_version": pilot_version or None,
                  "p_share": share if isinstance(share, str) else None,
                  "p_known": tuple(share) if isinstance(share, tuple) else None}
        return {k: v for k, v in wanted.items() if v is not None}

    def pick_conditions(self, shape: tuple[str, ...], where: list | None = None) -> list:
        """WHERE conditions choosing an activated job of a site that fits the pilot (``shape``:
        the names of :meth:`dispatch_params`)."""
        j = db.jobs.c
        conds = [j.site == bindparam("p_site", type_=String),
                 db.ACTIVATED_ONLY]        # a literal: the partial dispatch indexes need it
        if "p_cores" in shape:
            conds.append(j.cores <= bindparam("p_cores", type_=Integer))
        if "p_memory_mb" in shape:
            conds.append(j.memory_mb <= bindparam("p_memory_mb", type_=Integer))
        if "p_walltime_s" in shape:
            conds.append(j.walltime_s <= bindparam("p_walltime_s", type_=Integer))
        if "p_label" in shape:
            conds.append(j.prod_source_label == bindparam("p_label", type_=String))
        if "p_version" in shape:
            conds.append(j.pilot_version.is_(None)
                         | (j.pilot_version == bindparam("p_version", type_=String)))
        else:
            conds.append(j.pilot_version.is_(None))
        if "p_share" in shape:
            conds.append(j.share == bindparam("p_share", type_=String))
        if "p_known" in shape:      # one array parameter on PostgreSQL: a statement of its own
            conds.append(j.share != all_(bindparam("p_known", type_=ARRAY(String)))
                         if self.store.dialect == "postgresql" else
                         j.share.not_in(bindparam("p_known", expanding=True)))
        return conds + list(where or ())

    def pick_query(self, shape: tuple[str, ...], where: list | None = None, order=None,
                   limit=1):
        """SELECT the PandaIDs (and priorities) of the best activated jobs that fit, best
        first, locking them and skipping rows other dispatches hold (PostgreSQL, MariaDB).
        ``shape``: the names of :meth:`dispatch_params`; ``limit``: a number or a bind
        parameter (the hot path dispatches to several pilots at once)."""
        j = db.jobs.c
        order = order if order is not None else [j.current_priority.desc(), j.panda_id]
        pick = (select(j.panda_id, j.current_priority)
                .where(and_(*self.pick_conditions(shape, where))).order_by(*order).limit(limit))
        if self.store.skip_locked:
            pick = pick.with_for_update(skip_locked=True)
        return pick

    def dispatch(self, site: str, *, node: str | None, actor: str | None,
                 pilot_id: str | None = None, batch_id: str | None = None,
                 nonce: str | None = None, cores: int | None = None, memory_mb: int | None = None,
                 walltime_s: int | None = None, pilot_version: str | None = None,
                 prod_source_label: str | None = None, share: str | tuple | None = None,
                 order_by=None, max_tries: int = 5, where: list | None = None) -> dict | None:
        """Hand the best activated job of ``site`` that fits the pilot to this pilot only
        (``nonce``: the digest of its pilotNonce, ``server/jobholder.py``).

        ``share``: see :meth:`dispatch_params`; ``where``, ``order_by``: extra conditions on
        ``db.jobs`` and another order (built each time, not cached). Returns the job row with its files, or None when nothing fits. PostgreSQL: one
        statement picks (``FOR UPDATE SKIP LOCKED``), marks it sent and writes the history;
        SQLite: ``UPDATE ... WHERE panda_id = (best) RETURNING *`` under the one-writer lock;
        MariaDB: ``SELECT ... FOR UPDATE SKIP LOCKED`` then the guarded update.
        """
        store = self.store
        params = self.dispatch_params(site, cores=cores, memory_mb=memory_mb,
                                      walltime_s=walltime_s, pilot_version=pilot_version,
                                      prod_source_label=prod_source_label, share=share)
        shape = tuple(sorted(params))
        if "p_known" in params:
            params["p_known"] = list(params["p_known"])
        # the default shape is cached with the statement; a chooser's order or extra
        # conditions (literal values inside) are built each time
        cache_key = ("dispatch", shape) if order_by is None and not where else None
        j = db.jobs.c
        order = order_by if order_by is not None else [j.current_priority.desc(), j.panda_id]
        steps = [(str(JobState.ACTIVATED), str(JobState.SENT))]

        def pick_subquery():
            """The best row, locked and skipping locked ones: built only on a cache miss."""
            return (self.pick_query(shape, where, order).with_only_columns(j.panda_id)
                    .scalar_subquery())

        for _ in range(max_tries):
            fields = {"node": node, "pilot_id": pilot_id, "batch_id": batch_id,
                      "pilot_owner": actor, "pilot_nonce": nonce,
                      "heartbeat_time": store.clock()}
            if store.dialect == "postgresql":
                # one statement is its own transaction: no BEGIN/COMMIT round trips; the
                # files of a job do not change while it is dispatched
                with store.autocommit.connect() as conn:
                    return self.states.apply(conn, None, str(JobState.ACTIVATED), steps, actor,
                                             fields, returning=True,
                                             pick=(cache_key, pick_subquery, params),
                                             with_files=True)
            with store.engine.begin() as conn:
                if store.dialect == "sqlite":
                    job = self.states.apply(conn, None, str(JobState.ACTIVATED), steps, actor,
                                            fields, returning=True,
                                            pick=(cache_key, pick_subquery, params))
                    if job is None:      # nothing left (locked rows were skipped, not raced)
                        return None
                else:
                    query = store.statement(
                        ("mariadb-pick", shape) if cache_key else None,
                        lambda: select(db.jobs).where(and_(*self.pick_conditions(shape, where)))
                        .order_by(*order).limit(1).with_for_update(skip_locked=True))
                    row = conn.execute(query, params).first()
                    if row is None:
                        return None
                    if self.states.apply(conn, int(row.panda_id), str(JobState.ACTIVATED),
                                         steps, actor, fields) is None:
                        continue         # another process won the race: try the next one
                    job = {**row._mapping, **fields, "status": str(JobState.SENT)}
                job["files"] = [dict(f._mapping) for f in
                                conn.execute(SELECT_FILES, {"pid": job["panda_id"]})]
                return job
        return None

    # ------------------------------------------------------------------ failures and kills
    def fail(self, conn: Connection, panda_id: int, expected: list[str], *, actor: str,
             retry: bool = True, **fields: Any) -> bool:
        """Fail a job (watcher, data service); create a retry while attempts remain."""
        if not self.states.change(conn, panda_id, str(JobState.FAILED), actor=actor,
                                  expected=expected, end_time=self.store.clock(), **fields):
            return False
        if retry:
            self.retry(conn, panda_id, actor)
        task_id = conn.execute(select(db.jobs.c.task_id).where(db.jobs.c.panda_id == panda_id)
                               ).scalar_one()
        self.tasks.refresh_status(conn, task_id)
        return True

    def retry(self, conn: Connection, panda_id: int, actor: str | None) -> int | None:
        """A new attempt of a failed job while its attempts and its task allow; its PandaID."""
        job = dict(conn.execute(select(db.jobs).where(db.jobs.c.panda_id == panda_id)).first()
                   ._mapping)
        if job["attempt_nr"] >= job["max_attempts"]:
            return None
        if job.get("event_service") == 1 and conn.execute(select(db.event_ranges.c.row_id).where(
                db.event_ranges.c.task_id == job["task_id"], db.event_ranges.c.serial == 0,
                db.event_ranges.c.status.in_(("ready", "sent", "running"))).limit(1)
                ).first() is None:
            log.info("job %s failed: an event-service consumer, and its task's pool has no "
                     "range left: no retry", panda_id)
            return None
        # locked (as the task's update after the failure locks it anyway): a finish or pause of
        # the task and this retry happen one after the other, so no retry of a finishing task
        # slips in
        q = select(db.tasks.c.status).where(db.tasks.c.task_id == job["task_id"])
        task = conn.execute(q.with_for_update() if self.store.skip_locked else q).first()
        if task is None or task.status in _NO_RETRY_TASK:
            return None
        files = [dict(r._mapping) for r in conn.execute(SELECT_FILES, {"pid": panda_id})]
        values, new_files = retry_job_values(job, files)
        pinned = conn.execute(select(db.tasks.c.site).where(
            db.tasks.c.task_id == job["task_id"])).scalar()
        if pinned or job.get("event_service"):
            new_id = self.insert(conn, values, new_files, actor or "retry")
            self.states.change(conn, new_id, str(JobState.ACTIVATED) if job["site"] else
                               str(JobState.ASSIGNED), actor=actor,
                               expected=[str(JobState.DEFINED)])
        else:
            # re-brokered (server/failurepolicy.py): no site yet, and never one it failed at
            # for the site's reasons
            values.update(site=None, excluded_sites=json.dumps(excluded_after(job)))
            new_id = self.insert(conn, values, new_files, actor or "retry")
        log.info("job %s failed (attempt %s of %s): retry is job %s%s", panda_id,
                 job["attempt_nr"], job["max_attempts"], new_id,
                 "" if pinned else " (to be brokered)")
        return new_id

    def set_debug(self, panda_id: int, request: str | None, actor: str,
                  owner_check: str | None = None) -> bool:
        """Debug mode on (``request``: a checked ``panda_core.debugview`` request) or off (None)
        for a job; its pilot gets ``debug`` in its heartbeat replies while it is on. A pending
        kill keeps its command. False when the job has ended (nothing to debug)."""
        with self.store.engine.begin() as conn:
            row = conn.execute(select(db.jobs.c.status, db.jobs.c.owner, db.jobs.c.command)
                               .where(db.jobs.c.panda_id == panda_id)).first()
            if row is None:
                if self.get(panda_id) is not None:
                    return False                  # archived: ended long ago
                raise NotFound(f"no job {panda_id}")
            if owner_check is not None and row.owner != owner_check:
                raise PermissionError(f"job {panda_id} belongs to {row.owner}, not {owner_check}")
            if row.status in _FINAL and request is not None:
                return False
            command = row.command
            if request is not None and command in (None, "", "NULL", "debug"):
                command = "debug"
            elif request is None and command == "debug":
                command = None
            conn.execute(update(db.jobs).where(db.jobs.c.panda_id == panda_id).values(
                debug_request=request, command=command))
        log.info("job %s: debug mode %s by %s", panda_id, request or "off", actor)
        return True

    def debug_request(self, panda_id: int) -> str | None:
        """The view a job in debug mode is asked for (None: not in debug mode)."""
        with db.read(self.store.engine) as conn:
            return conn.execute(select(db.jobs.c.debug_request)
                                .where(db.jobs.c.panda_id == panda_id)).scalar()

    def retry_by_hand(self, panda_id: int, actor: str, owner_check: str | None = None
                      ) -> int | None:
        """``panda retry``: a new attempt of a failed or cancelled job that has none yet, even
        when its attempts are used up (the new one may run once more) or its task was aborted
        (the task runs again). Its PandaID; None when the job did not fail, already has a
        retry, or its task is being killed. NotFound, PermissionError as :meth:`kill`."""
        j = db.jobs.c
        with self.store.engine.begin() as conn:
            row = conn.execute(select(j.status, j.owner, j.task_id, j.attempt_nr)
                               .where(j.panda_id == panda_id)).first()
            if row is None:
                raise NotFound(f"no job {panda_id} (archived jobs are not retried)")
            if owner_check is not None and row.owner != owner_check:
                raise PermissionError(f"job {panda_id} belongs to {row.owner}, not {owner_check}")
            if row.status not in (str(JobState.FAILED), str(JobState.CANCELLED)):
                return None
            if conn.execute(select(j.panda_id).where(j.parent_id == panda_id).limit(1)
                            ).first() is not None:
                return None
            task = conn.execute(select(db.tasks.c.status)
                                .where(db.tasks.c.task_id == row.task_id)).first()
            if task is not None and task.status in _FINAL_TASK:      # it runs again
                self.tasks.set_status(conn, row.task_id, str(TaskState.RUNNING),
                                      error_dialog=f"job {panda_id} retried by {actor}")
            conn.execute(db.jobs.update().where(j.panda_id == panda_id)
                         .values(max_attempts=func.max(j.max_attempts, row.attempt_nr + 1)
                                 if self.store.dialect == "sqlite" else
                                 func.greatest(j.max_attempts, row.attempt_nr + 1)))
            return self.retry(conn, panda_id, actor)

    @staticmethod
    def latest_attempts(conn: Connection, task_id: int) -> list[dict]:
        """The latest attempt of each job of a task (its serial's highest attempt), live table
        only: archived jobs are not retried."""
        latest: dict[int, dict] = {}
        for row in conn.execute(select(db.jobs).where(db.jobs.c.task_id == task_id)
                                .order_by(db.jobs.c.serial, db.jobs.c.attempt_nr)):
            latest[row.serial] = dict(row._mapping)
        return list(latest.values())

    def retry_task(self, task_id: int, actor: str) -> list[int]:
        """Run again the work of an ended task that did not succeed (PanDA's task retry): a new
        attempt of every job whose latest attempt failed or was cancelled, beyond the task's
        ``max_attempts`` if need be. Returns the new PandaIDs (none: nothing to retry).
        Raises Conflict while the task still runs. Jobs already archived are not retried."""
        with self.store.engine.begin() as conn:
            task = conn.execute(select(db.tasks.c.status).where(db.tasks.c.task_id == task_id)
                                .with_for_update()).first()
            if task is None:
                raise NotFound(f"no task {task_id}")
            if task.status not in {str(s) for s in FINAL_TASK_STATES}:
                raise Conflict(f"task {task_id} is {task.status}: only an ended task is retried")
            targets = [j for j in self.latest_attempts(conn, task_id)
                       if j["status"] in (str(JobState.FAILED), str(JobState.CANCELLED))]
            if not targets:
                return []
            conn.execute(update(db.tasks).where(db.tasks.c.task_id == task_id).values(
                status=str(TaskState.READY), modified=self.store.clock()))
            new_ids = []
            for job in targets:
                files = [dict(r._mapping) for r in conn.execute(SELECT_FILES,
                                                                {"pid": job["panda_id"]})]
                values, new_files = retry_job_values(job, files)
                values["max_attempts"] = max(values["max_attempts"] or 0, values["attempt_nr"])
                new_id = self.insert(conn, values, new_files, actor)
                self.states.change(conn, new_id, str(JobState.ACTIVATED) if job["site"] else
                                   str(JobState.ASSIGNED), actor=actor,
                                   expected=[str(JobState.DEFINED)])
                new_ids.append(new_id)
            log.info("task %s retried by %s: %d job(s) again", task_id, actor, len(new_ids))
            return new_ids

    def kill(self, panda_id: int, actor: str, owner_check: str | None = None) -> bool:
        """Kill a job: one not yet with a pilot is cancelled now; one with a pilot gets
        ``tobekilled`` in its next heartbeat reply and is cancelled. False if already final."""
        with self.store.engine.begin() as conn:
            row = conn.execute(select(db.jobs.c.status, db.jobs.c.owner, db.jobs.c.task_id)
                               .where(db.jobs.c.panda_id == panda_id)).first()
            if row is None:
                raise NotFound(f"no job {panda_id}")
            if owner_check is not None and row.owner != owner_check:
                raise PermissionError(f"job {panda_id} belongs to {row.owner}, not {owner_check}")
            if row.status in _FINAL:
                return False
            fields = kill_values(self.store.clock(), actor, row.status in _PILOT_OWNED)
            ok = self.states.change(conn, panda_id, str(JobState.CANCELLED), actor=actor,
                                    expected=[row.status], **fields)
            if ok:
                self.tasks.refresh_status(conn, row.task_id)
            return ok
