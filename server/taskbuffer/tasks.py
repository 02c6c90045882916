"""Tasks: their rows, and their status, which follows their jobs'."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import bindparam, exists, func, insert, literal_column, select, update
from sqlalchemy.engine import Connection

from panda_core.states import (FINAL_TASK_STATES, LIVE_JOB_STATES,
                               TASK_STATES_KEPT_WHILE_LIVE, TASK_STATES_NOT_MADE_RUNNING,
                               TaskState)

from .. import db
from .base import NotFound, Store

LIVE_STATES = list(LIVE_JOB_STATES)
#: (the task's status, whether it has live jobs) of task ``tid``: after a job ended, a task
#: that runs (or is paused or finishing: ``KEPT_WHILE_LIVE``) and still has live jobs needs no
#: update (the states are literals: the statement
#: has one parameter, whichever driver runs it)
TASK_SETTLED = select(db.tasks.c.status, exists().where(
    db.jobs.c.task_id == bindparam("tid"),
    db.jobs.c.status.in_([literal_column(f"'{s}'") for s in LIVE_STATES])).label("pending")
).where(db.tasks.c.task_id == bindparam("tid"))
#: job states that show a task has started
_STARTED = ("finished", "starting", "running", "holding", "transferring")
#: the task states a job's progress does not change while the task has live jobs, and those a
#: job that starts does not make running (shared with ``server/pghot.py``'s statements)
KEPT_WHILE_LIVE = frozenset(str(s) for s in TASK_STATES_KEPT_WHILE_LIVE)
NOT_MADE_RUNNING = tuple(sorted(str(s) for s in TASK_STATES_NOT_MADE_RUNNING))


class Tasks:
    def __init__(self, store: Store):
        self.store = store

    def insert(self, conn: Connection, *, name: str, owner: str, params: dict,
               priority: int, share: str, site: str | None, max_attempts: int) -> int:
        now = self.store.clock()
        res = conn.execute(insert(db.tasks).values(
            name=name, status=str(TaskState.REGISTERED), owner=owner, priority=priority,
            share=share, site=site, max_attempts=max_attempts, params=params, created=now,
            modified=now))
        return int(res.inserted_primary_key[0])

    def set_status(self, conn: Connection, task_id: int, status: str,
                   error_dialog: str | None = None) -> None:
        values: dict[str, Any] = {"status": status, "modified": self.store.clock()}
        if error_dialog is not None:
            values["error_dialog"] = error_dialog
        conn.execute(update(db.tasks).where(db.tasks.c.task_id == task_id).values(**values))

    def get(self, task_id: int) -> dict:
        with db.read(self.store.engine) as conn:
            row = conn.execute(select(db.tasks).where(db.tasks.c.task_id == task_id)).first()
        if row is None:
            raise NotFound(f"no task {task_id}")
        return dict(row._mapping)

    def job_counts(self, task_id: int) -> dict[str, int]:
        """Jobs of a task per status, live and archived."""
        counts: dict[str, int] = {}
        with db.read(self.store.engine) as conn:
            for table in (db.jobs, db.jobs_archive):
                for r in conn.execute(select(table.c.status, func.count()).where(
                        table.c.task_id == task_id).group_by(table.c.status)):
                    counts[r[0]] = counts.get(r[0], 0) + r[1]
        return counts

    def job_ids(self, task_id: int) -> list[int]:
        with db.read(self.store.engine) as conn:
            ids = [r[0] for t in (db.jobs, db.jobs_archive) for r in conn.execute(
                select(t.c.panda_id).where(t.c.task_id == task_id))]
        return sorted(ids)

    def state_counts(self) -> dict[str, int]:
        with db.read(self.store.engine) as conn:
            return {status: n for status, n in conn.execute(
                select(db.tasks.c.status, func.count()).group_by(db.tasks.c.status))}

    def find(self, owner: str | None = None, since: dt.datetime | None = None,
             limit: int = 1000) -> list[dict]:
        q = select(db.tasks).order_by(db.tasks.c.task_id.desc()).limit(limit)
        if owner:
            q = q.where(db.tasks.c.owner == owner)
        if since:
            q = q.where(db.tasks.c.modified >= since)
        with db.read(self.store.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def find_live(self, name: str, owner: str) -> int | None:
        """The id of ``owner``'s task called ``name`` that has not ended, if any (JEDI's
        ``uniqueTaskName``); uses the owner index."""
        final = [str(s) for s in FINAL_TASK_STATES]
        with db.read(self.store.engine) as conn:
            return conn.execute(select(db.tasks.c.task_id).where(
                db.tasks.c.owner == owner, db.tasks.c.name == name,
                db.tasks.c.status.not_in(final)).limit(1)).scalar()

    # ------------------------------------------------------------------ status from the jobs
    def after_job_end(self, task_id: int) -> None:
        """Update the task of a job that just ended. One read answers the common case (the
        task runs and still has live jobs: nothing to do); otherwise the locked check."""
        store = self.store
        reader = store.autocommit if store.dialect == "postgresql" else store.engine
        with reader.connect() as conn:
            row = conn.execute(TASK_SETTLED, {"tid": task_id}).first()
        if row is not None and row.status in KEPT_WHILE_LIVE and row.pending:
            return
        with store.engine.begin() as conn:
            self.refresh_status(conn, task_id)

    def mark_running(self, conn: Connection, task_id: int) -> None:
        """A job of the task started: the task runs (one UPDATE that usually matches nothing,
        instead of counting the task's jobs on every heartbeat). A paused, finishing or
        aborted task stays so."""
        conn.execute(update(db.tasks).where(
            db.tasks.c.task_id == task_id, db.tasks.c.status.not_in(NOT_MADE_RUNNING))
            .values(status=str(TaskState.RUNNING), modified=self.store.clock()))

    def refresh_status(self, conn: Connection, task_id: int) -> None:
        """A task's status follows its jobs.

        Cheap while the task still has live jobs (two indexed lookups); the jobs are counted
        only once none is left to run. The task row is locked first: two jobs ending at once
        in READ COMMITTED would each see the other still running, and neither end the task.
        A paused or finishing task keeps its status while it has live jobs; it ends with the
        last one as any other (a finishing one without a new event-service consumer).
        """
        q = select(db.tasks.c.status).where(db.tasks.c.task_id == task_id)
        if self.store.skip_locked:
            q = q.with_for_update()
        task = conn.execute(q).first()
        if task is None or task.status == str(TaskState.ABORTED):
            return
        j = db.jobs.c
        # IN (the live states), not NOT IN (final): one index probe per state instead of a
        # walk over the task's ended jobs
        pending = conn.execute(select(j.status).where(j.task_id == task_id,
                                                      j.status.in_(LIVE_STATES)).limit(1)).first()
        if pending is not None:
            if task.status in KEPT_WHILE_LIVE:
                return
            if conn.execute(select(j.panda_id).where(j.task_id == task_id,
                                                     j.status.in_(_STARTED)).limit(1)).first() \
                    is None and conn.execute(select(db.jobs_archive.c.panda_id).where(
                        db.jobs_archive.c.task_id == task_id,
                        db.jobs_archive.c.status == "finished").limit(1)).first() is None:
                return
            status = TaskState.RUNNING
        else:
            # an event-service pool with ranges left gets a new consumer instead (lazy import:
            # eventranges builds on the task buffer; ``store`` is the TaskBuffer)
            from ..eventranges import continue_pool, pool_left
            if task.status != str(TaskState.FINISHING) and continue_pool(
                    self.store, conn, task_id) is not None:   # type: ignore[arg-type]
                return
            unprocessed = pool_left(conn, task_id)
            # every job is final: count only the latest attempt of each serial, since a failed
            # job that was retried is not a failure of the task
            latest = self._latest_attempt_states(conn, task_id)
            merge = self._merge_state(conn, task_id)
            if merge is not None:   # an event-service task ends as its merge job does
                latest = {0: merge}
            if not latest:
                return
            n_fin = sum(1 for s in latest.values() if s == "finished")
            status = (TaskState.DONE if n_fin == len(latest) and not unprocessed else
                      TaskState.FAILED if n_fin == 0 else TaskState.FINISHED)
        if task.status != str(status):
            self.set_status(conn, task_id, str(status))

    def _merge_state(self, conn: Connection, task_id: int) -> str | None:
        """The state of the latest attempt of an event-service task's merge job, if it has one
        (its consumers' failures are not the task's: their ranges went to other consumers)."""
        latest: tuple[int, str] | None = None
        for table in (db.jobs, db.jobs_archive):
            for attempt, status in conn.execute(select(table.c.attempt_nr, table.c.status).where(
                    table.c.task_id == task_id, table.c.event_service == 2)):
                if latest is None or attempt > latest[0]:
                    latest = (attempt, status)
        return latest[1] if latest else None

    def _latest_attempt_states(self, conn: Connection, task_id: int) -> dict[int, str]:
        latest: dict[int, tuple[int, str]] = {}
        for table in (db.jobs, db.jobs_archive):
            for serial, attempt, status in conn.execute(select(
                    table.c.serial, table.c.attempt_nr, table.c.status).where(
                    table.c.task_id == task_id)):
                if serial not in latest or attempt > latest[serial][0]:
                    latest[serial] = (attempt, status)
        return {s: st for s, (_, st) in latest.items()}
