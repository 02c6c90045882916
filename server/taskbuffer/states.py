"""The job state machine: every change of a job's status, checked and recorded.

:meth:`JobStates.change` is the only way a job's status changes: it checks the transition
against the life cycle (``panda_core.states``), updates the row only if it is still in the state
the caller saw (``WHERE status = :old``), and writes a ``job_history`` row with the time and the
actor for each step. A job of a paused task that would be activated is throttled instead (it
passes through ``activated``): the dispatch, which picks activated jobs only, never sees it.
:meth:`JobStates.change_task_jobs` moves a task's jobs of some states in a few set-based
statements (pause, resume, finish, kill: ``taskbuffer.taskcommands``).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import (BigInteger, String, and_, bindparam, insert, literal, select, union_all,
                        update)
from sqlalchemy.engine import Connection

from panda_core.states import (PILOT_OWNED_STATES, IllegalTransition, JobState, TaskState,
                               check_job_transition)

from .. import db
from .base import NotFound, Store

INSERT_HISTORY = insert(db.job_history)
#: the file columns a dispatch statement returns, ``f_``-prefixed (see :func:`job_with_files`)
FILE_COLUMNS = tuple(c.name for c in db.files.c)
_PILOT_OWNED = sorted(str(s) for s in PILOT_OWNED_STATES)
_ACTIVATED, _THROTTLED = str(JobState.ACTIVATED), str(JobState.THROTTLED)
#: the status of a job's task, its row locked: a pause (which locks it too) and an activation of
#: one of its jobs happen one after the other, so none is activated unseen. Not a share lock:
#: the transaction may lock the row again to update the task (``Tasks.refresh_status``), and
#: two that share it would each wait for the other to let go
_TASK_OF_JOB = (select(db.tasks.c.status)
                .where(db.tasks.c.task_id == select(db.jobs.c.task_id).where(
                    db.jobs.c.panda_id == bindparam("pid")).scalar_subquery()))


def path_steps(old: str, path: Iterable[str]) -> list[tuple[str, str]]:
    """The (from, to) steps of a state path, each checked against the life cycle."""
    steps = []
    for state in path:
        if state != old:
            check_job_transition(old, state)
            steps.append((old, state))
            old = state
    return steps


def legal_predecessors(new: str, via: tuple[str, ...] = ()) -> list[str]:
    """The pilot-owned states from which ``via`` then ``new`` is a legal path: what a guarded
    statement may accept as a job's current state for a pilot's report of ``new``."""
    out = []
    for old in _PILOT_OWNED:
        try:
            path_steps(old, [*via, new])
        except IllegalTransition:
            continue
        out.append(old)
    return out


def job_with_files(names: list[str], rows: list) -> dict | None:
    """The rows of a dispatch statement (job columns, then ``f_``-prefixed file columns, one
    row per file) as one job dict with ``files``; None without rows."""
    if not rows:
        return None
    split = next((i for i, n in enumerate(names) if n.startswith("f_")), len(names))
    job = dict(zip(names[:split], rows[0][:split]))
    file_names = [n[2:] for n in names[split:]]
    row_id = file_names.index("row_id") + split if "row_id" in file_names else None
    job["files"] = [dict(zip(file_names, r[split:])) for r in rows
                    if row_id is not None and r[row_id] is not None]
    return job


class JobStates:
    def __init__(self, store: Store):
        self.store = store

    def change(self, conn: Connection, panda_id: int, new: str, *, actor: str | None,
               expected: Iterable[str] | None = None, via: Iterable[str] = (),
               **fields: Any) -> bool:
        """Move one job to ``new``; the only way a job's status changes.

        ``expected``: the states the caller saw; the update only happens if the row is still in
        one of them (optimistic guard). Returns False if the guard did not match. Raises
        IllegalTransition if the life cycle forbids the change. ``via``: states passed through
        on the way within this transaction (e.g. ``holding`` between ``running`` and
        ``finished``); each step is checked and gets its own history row.
        """
        expected = None if expected is None else list(expected)
        if expected is None or len(expected) > 1:
            # history records the real old state: read it first
            current = conn.execute(select(db.jobs.c.status).where(db.jobs.c.panda_id == panda_id)
                                   ).scalar()
            if current is None:
                raise NotFound(f"no job {panda_id}")
            if expected is not None and current not in expected:
                return False
            expected = [current]
        old = expected[0]
        if new == _ACTIVATED and self._paused(conn, panda_id):
            new, via = _THROTTLED, [*via, _ACTIVATED]
        steps = path_steps(old, [*via, new])
        return self.apply(conn, int(panda_id), old, steps, actor, fields) is not None

    def _paused(self, conn: Connection, panda_id: int) -> bool:
        """Is the job's task paused? (Read with the task's row locked.)"""
        stmt = self.store.statement(("task-of-job", self.store.skip_locked), lambda: (
            _TASK_OF_JOB.with_for_update() if self.store.skip_locked else _TASK_OF_JOB))
        return conn.execute(stmt, {"pid": panda_id}).scalar() == str(TaskState.PAUSED)

    def change_many(self, conn: Connection, panda_ids: list[int], old: str, new: str, *,
                    actor: str | None) -> None:
        """``change`` of many jobs, all in ``old``, to ``new``: one UPDATE and one history
        insert. For jobs this transaction made (the new jobs of one task): no one else can have
        moved them, so a row that did not match is an error, not a lost race."""
        if not panda_ids:
            return
        steps = path_steps(old, [new])
        if new == _ACTIVATED and self._paused(conn, panda_ids[0]):
            new = _THROTTLED
            steps = path_steps(old, [_ACTIVATED, new])
        now = self.store.clock()
        j = db.jobs.c
        res = conn.execute(update(db.jobs).where(j.panda_id.in_(panda_ids), j.status == old)
                           .values(status=new, modification_time=now, state_changed=now))
        if res.rowcount != len(panda_ids):
            raise RuntimeError(f"{len(panda_ids) - res.rowcount} of {len(panda_ids)} jobs were "
                               f"not in {old} any more")
        conn.execute(INSERT_HISTORY, [{"panda_id": pid, "old_status": o, "new_status": n,
                                       "time": now, "actor": actor}
                                      for pid in panda_ids for o, n in steps])

    def change_task_jobs(self, conn: Connection, task_id: int, old: Iterable[str], new: str, *,
                         actor: str | None, limit: int | None = None, **fields: Any) -> int:
        """Move every job of a task that is in one of the ``old`` states to ``new`` (one step
        each, checked), in three statements whatever their number: lock them (the dispatch
        skips locked rows), write their history rows from a SELECT, update them. The caller
        holds the task's row locked, so no job of it enters an ``old`` state meanwhile.
        ``limit``: at most that many (the lowest PandaIDs), so that a caller can move a big
        task in bounded transactions; the history and the update then touch only the rows
        locked here (a job that entered an ``old`` state since, unlocked, is left for the next
        batch rather than updated without its history row). Returns how many moved."""
        old = sorted(set(old))
        for state in old:
            check_job_transition(state, new)
        j = db.jobs.c
        which = and_(j.task_id == task_id, j.status.in_(old))
        lock = select(j.panda_id).where(which)
        if limit is not None or self.store.skip_locked:
            lock = lock.order_by(j.panda_id)
        if limit is not None:
            lock = lock.limit(limit)
        if self.store.skip_locked:
            lock = lock.with_for_update()
        locked = conn.execute(lock).scalars().all()
        moved = len(locked)
        if not moved:
            return 0
        if limit is not None:
            which = and_(which, j.panda_id.in_(locked))
        now = self.store.clock()
        conn.execute(insert(db.job_history).from_select(
            ["panda_id", "old_status", "new_status", "time", "actor"],
            select(j.panda_id, j.status, literal(new, String), literal(now, db.Timestamp),
                   literal(actor, String)).where(which)))
        conn.execute(update(db.jobs).where(which).values(
            status=new, modification_time=now, state_changed=now, **fields))
        return moved

    def apply(self, conn: Connection, target: int | None, old: str,
              steps: list[tuple[str, str]], actor: str | None, fields: dict,
              returning: bool = False, pick: tuple | None = None, with_files: bool = False):
        """The guarded UPDATE plus its history rows (checked transitions in ``steps``).

        ``target``: the PandaID; or None and ``pick`` = (cache key or None, a function building
        the scalar subquery that chooses the row, its parameters). PostgreSQL: one statement
        (UPDATE ... RETURNING in a CTE feeding the history INSERT). Elsewhere: UPDATE (RETURNING
        on SQLite when the row is wanted), then the INSERT. Statements are built once per shape
        and reused with bind parameters.
        Returns None if no row matched; else the row (``returning``) or the PandaID.
        ``with_files`` (PostgreSQL, with ``returning``): the row comes with its files
        (``row["files"]``) from the same statement, one round trip less per dispatch.
        """
        store = self.store
        now = store.clock()
        values = {"status": steps[-1][1] if steps else old, "modification_time": now, **fields}
        if steps:
            values["state_changed"] = now
        cols = tuple(sorted(values))
        unknown = [c for c in cols if c not in db.jobs.c]
        if unknown:
            raise ValueError(f"not columns of jobs: {', '.join(unknown)}")
        postgres = store.dialect == "postgresql"
        with_files = with_files and returning and postgres
        shape = pick[0] if pick else "id"
        stmt = store.statement(
            None if shape is None else ("state", cols, len(steps), returning, shape, with_files),
            lambda: self._statement(cols, len(steps), returning, pick[1]() if pick else None,
                                    with_files))
        params = {f"v_{k}": v for k, v in values.items()}
        params["old_status"] = old
        if pick:
            params.update(pick[2])
        else:
            params["target"] = target
        if postgres:
            params.update(now=now, actor=actor)
            for i, (o, n) in enumerate(steps):
                params[f"o{i}"], params[f"n{i}"] = o, n
            if with_files:
                result = conn.execute(stmt, params)
                return job_with_files(list(result.keys()), result.all())
            row = conn.execute(stmt, params).first()
            if row is None:
                return None
            return dict(row._mapping) if returning else row.panda_id
        if returning:
            row = conn.execute(stmt, params).first()
            if row is None:
                return None
            result: Any = dict(row._mapping)
            panda_id = row.panda_id
        else:
            if target is None:
                raise TypeError("a PandaID is needed here (no UPDATE ... RETURNING)")
            if conn.execute(stmt, params).rowcount != 1:
                return None
            result = panda_id = target
        if steps:
            conn.execute(INSERT_HISTORY, [
                {"panda_id": panda_id, "old_status": o, "new_status": n, "time": now,
                 "actor": actor} for o, n in steps])
        return result

    def _statement(self, cols: tuple[str, ...], n_steps: int, returning: bool, pick_subq,
                   with_files: bool = False):
        j = db.jobs.c
        dialect = self.store.dialect
        target = pick_subq if pick_subq is not None else bindparam("target", type_=BigInteger)
        stmt = update(db.jobs).where(
            j.panda_id == target, j.status == bindparam("old_status", type_=String)
        ).values({c: bindparam(f"v_{c}", type_=db.jobs.c[c].type) for c in cols})
        if dialect == "postgresql":
            upd = stmt.returning(*(db.jobs.c if returning else [j.panda_id])).cte("upd")
            query = select(upd)
            if with_files:
                # the statement's snapshot is taken before the update: files are unchanged by
                # it and seen as they were
                query = (select(upd, *(db.files.c[c].label(f"f_{c}") for c in FILE_COLUMNS))
                         .select_from(upd.outerjoin(db.files,
                                                    db.files.c.panda_id == upd.c.panda_id))
                         .order_by(db.files.c.row_id))
            if n_steps:
                rows = [select(upd.c.panda_id, bindparam(f"o{i}", type_=String),
                               bindparam(f"n{i}", type_=String),
                               bindparam("now", type_=db.Timestamp),
                               bindparam("actor", type_=String)) for i in range(n_steps)]
                hist = insert(db.job_history).from_select(
                    ["panda_id", "old_status", "new_status", "time", "actor"],
                    rows[0] if n_steps == 1 else union_all(*rows)).cte("hist")
                query = query.add_cte(hist)
            return query
        if returning:
            if dialect != "sqlite":
                raise TypeError(f"UPDATE ... RETURNING is not used on {dialect}")
            return stmt.returning(*db.jobs.c)
        return stmt
