"""Move jobs that ended long ago, with their files and state history, to the archive tier.

Why: the dispatcher and the watcher scan the live tables all day; finished history would slow
them down as it grows. A job's row, its ``files`` and its ``job_history`` rows move together,
in one transaction per batch (to ``jobs_archive``/``files_archive``/``job_history_archive``,
stamped with the archive time), so an interrupted run loses nothing and the next run carries
on; an archived row keeps its PandaID, and the readers (``Jobs.get``/``history``/``find``, the
task counts, the monitor) read both tiers. On PostgreSQL a batch is one statement (deletes
``RETURNING`` the rows into the archive's inserts); on MariaDB and SQLite it copies, then
deletes what it copied (``_move_batch``: the one place that differs per database). On
PostgreSQL and MariaDB the batch is picked with ``FOR UPDATE SKIP LOCKED``, so several
archivers may run at once without moving a row twice. The archive is partitioned by month there
(server/archivetiers.py): the archiver makes the partitions ahead, and a retention of N months
drops whole old months.
"""
from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import Executor

from sqlalchemy import bindparam, select, text

from panda_core.states import FINAL_JOB_STATES

from . import archivetiers, db
from .taskbuffer import TaskBuffer
from .transient import describe, is_transient, retrying

log = logging.getLogger(__name__)

DEFAULT_AGE_S = 3 * 24 * 3600
DEFAULT_INTERVAL_S = 600
FINAL = sorted(str(s) for s in FINAL_JOB_STATES)


# ---------------------------------------------------------------- one batch, per database
# The whole of how one batch moves, for each database, is here (docs/database.md, "Archive").

#: the archive time, bound as the columns store it (SQLite keeps timestamps as text)
_NOW = bindparam("now", type_=db.Timestamp)


def _names(table) -> str:
    return ", ".join(c.name for c in table.columns)


def _postgres_move_sql(batch: int) -> str:
    """One statement that moves a batch on PostgreSQL: pick the jobs (``SKIP LOCKED``), delete
    them, their files and their history with ``RETURNING`` and insert what was deleted into the
    archive, in data-modifying CTEs. What is copied is exactly what was deleted (no row
    committed meanwhile can be deleted uncopied), in one round trip with no id list sent
    back and forth. ``batch`` is an int rendered as a literal: with a bound LIMIT a generic
    plan would guess a tenth of the table and hash-join files and history by seq scan."""
    picked = "ARRAY(SELECT panda_id FROM picked)"
    parts = [f"picked AS (SELECT panda_id FROM jobs WHERE status = :status AND "
             f"state_changed < :cutoff ORDER BY state_changed LIMIT {int(batch)} "
             f"FOR UPDATE SKIP LOCKED)"]
    for i, (live, archive) in enumerate(db.ARCHIVE_TIERS):
        names = _names(live)
        parts.append(f"gone{i} AS (DELETE FROM {live.name} WHERE panda_id = ANY ({picked}) "
                     f"RETURNING {names})")
        parts.append(f"kept{i} AS (INSERT INTO {archive.name} ({names}, archived_at) "
                     f"SELECT {names}, :now FROM gone{i})")
    return "WITH " + ",\n".join(parts) + "\nSELECT count(*) FROM gone0"


def _move_postgres(conn, status: str, cutoff: dt.datetime, now: dt.datetime,
                   batch: int) -> int:
    return conn.execute(text(_postgres_move_sql(batch)).bindparams(
        _NOW, bindparam("cutoff", type_=db.Timestamp)),
        {"status": status, "cutoff": cutoff, "now": now}).scalar_one()


def _move_copy_delete(conn, status: str, cutoff: dt.datetime, now: dt.datetime, batch: int,
                      skip_locked: bool) -> int:
    """MariaDB and SQLite (no DELETE ... RETURNING into an INSERT): pick the ids, copy the
    three tables, then delete what was copied. Files and history delete only the rows this
    batch copied: under READ COMMITTED one committed between the copy and the delete stays
    live instead of being deleted uncopied (the job rows themselves are locked by the batch).
    The ids go into the statements as integer literals: binding 1,000 parameters a statement
    (SQLAlchemy's expanding IN, the driver) doubled the client's CPU per batch on MariaDB."""
    j = db.jobs.c
    # one final state at a time, oldest first: a range of ix_jobs_status_changed
    # (status, state_changed) that holds eligible rows only, whatever the live rows ahead
    q = (select(j.panda_id).where(j.status == status, j.state_changed < cutoff)
         .order_by(j.state_changed).limit(batch))
    if skip_locked:
        q = q.with_for_update(skip_locked=True)
    picked = [int(r[0]) for r in conn.execute(q)]
    if not picked:
        return 0
    ids = ", ".join(map(str, picked))
    stamp = {"now": now}
    for live, archive in db.ARCHIVE_TIERS:
        names = _names(live)
        conn.execute(text(f"INSERT INTO {archive.name} ({names}, archived_at) SELECT {names}, "
                          f":now FROM {live.name} WHERE panda_id IN ({ids})")
                     .bindparams(_NOW), stamp)
    for live, archive in reversed(db.ARCHIVE_TIERS):
        if live is db.jobs:
            conn.execute(text(f"DELETE FROM jobs WHERE panda_id IN ({ids})"))
        else:
            conn.execute(text(f"DELETE FROM {live.name} WHERE panda_id IN ({ids}) AND row_id IN "
                              f"(SELECT row_id FROM {archive.name} WHERE panda_id IN ({ids}) "
                              f"AND archived_at = :now)").bindparams(_NOW), stamp)
    return len(picked)


def _move_batch(tb: TaskBuffer, status: str, cutoff: dt.datetime, now: dt.datetime,
                batch: int) -> int:
    """Move up to ``batch`` jobs in ``status`` that changed before ``cutoff``, with their files
    and history, in one transaction. Returns how many jobs moved."""
    with tb.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            return _move_postgres(conn, status, cutoff, now, batch)
        return _move_copy_delete(conn, status, cutoff, now, batch, tb.skip_locked)


def archive_jobs(tb: TaskBuffer, older_than_s: float, batch: int = 1000,
                 limit: int | None = None) -> int:
    """Archive final jobs whose state changed more than ``older_than_s`` ago (by ``tb.clock``),
    with their files and history, at most about ``limit`` (whole batches) when given.

    Returns how many jobs moved.
    """
    if older_than_s < 0:
        raise ValueError("older_than_s must be >= 0")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    now = tb.clock()
    cutoff = now - dt.timedelta(seconds=older_than_s)
    archivetiers.ensure_months(tb.engine, now)
    moved = 0
    for status in FINAL:
        while True:
            # a deadlock victim (two archivers on MariaDB) was rolled back whole: again
            n = retrying(_move_batch, tb, status, cutoff, now, batch)
            moved += n
            if n:
                log.debug("archived %d %s job(s), %d so far", n, status, moved)
            if n < batch or (limit is not None and moved >= limit):
                break
        if limit is not None and moved >= limit:
            break
    if moved:
        log.info("archived %d job(s) that ended before %s", moved, cutoff.isoformat())
    return moved


def keep_from(now: dt.datetime, retention_months: int) -> dt.date:
    """The oldest archive month a retention of ``retention_months`` keeps: a month goes once
    all of it is more than ``retention_months`` months old."""
    return archivetiers.month_start(archivetiers.add_months(archivetiers.month_start(now),
                                                            -retention_months))


def prune_archive(tb: TaskBuffer, retention_months: int | None) -> int:
    """Drop archive months older than the retention (None: keep all). Returns partitions
    dropped (PostgreSQL, MariaDB) or rows deleted (SQLite)."""
    if retention_months is None:
        return 0
    if retention_months < 1:
        raise ValueError("retention_months must be >= 1")
    return archivetiers.drop_months_before(tb.engine, keep_from(tb.clock(), retention_months))


def archive_pass(tb: TaskBuffer, age_s: float, retention_months: int | None = None) -> int:
    """One archiver pass: move old jobs, then drop the months past the retention."""
    moved = archive_jobs(tb, age_s)
    prune_archive(tb, retention_months)
    return moved


def start_archiver(tb: TaskBuffer, executor: Executor, age_s: float = DEFAULT_AGE_S,
                   interval_s: float = DEFAULT_INTERVAL_S, retention_months: int | None = None):
    """Run :func:`archive_pass` every ``interval_s`` in ``executor`` from the Tornado loop.

    Returns the started PeriodicCallback, or None when ``interval_s`` <= 0 (disabled).
    """
    if interval_s <= 0:
        return None
    from tornado.ioloop import IOLoop, PeriodicCallback

    running = False

    async def tick() -> None:
        nonlocal running
        if running:          # a slow run is still going: skip this tick
            return
        running = True
        try:
            await IOLoop.current().run_in_executor(executor, archive_pass, tb, age_s,
                                                 retention_months)
        except Exception as exc:  # noqa: BLE001 - keep serving; the next tick tries again
            if is_transient(exc):
                log.warning("archiving jobs: %s; the next pass tries again", describe(exc))
            else:
                log.exception("archiving jobs failed")
        finally:
            running = False

    callback = PeriodicCallback(tick, interval_s * 1000, jitter=0.1)
    callback.start()
    return callback
