"""Move jobs that ended long ago, with their files and state history, to the archive tier.

Why: the dispatcher and the watcher scan the live tables all day; finished history would slow
them down as it grows. A job's row, its ``files`` and its ``job_history`` rows move together,
in one transaction per batch (copy to ``jobs_archive``/``files_archive``/``job_history_archive``
stamped with the archive time, then delete), so an interrupted run loses nothing and the next
run carries on; an archived row keeps its PandaID, and the readers (``Jobs.get``/``history``/
``find``, the task counts, the monitor) read both tiers. On PostgreSQL and MariaDB the batch is
picked with ``FOR UPDATE SKIP LOCKED``, so several server processes may run it at once without
moving a row twice. The archive is partitioned by month there (server/archivetiers.py): the
archiver makes the partitions ahead, and a retention of N months drops whole old months.
"""
from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import Executor

from sqlalchemy import delete, insert, literal, select

from panda_core.states import FINAL_JOB_STATES

from . import archivetiers, db
from .taskbuffer import TaskBuffer
from .transient import describe, is_transient

log = logging.getLogger(__name__)

DEFAULT_AGE_S = 3 * 24 * 3600
DEFAULT_INTERVAL_S = 600
FINAL = sorted(str(s) for s in FINAL_JOB_STATES)


def _copy(conn, live, archive, ids: list[int], now: dt.datetime) -> None:
    names = [c.name for c in live.columns]
    conn.execute(insert(archive).from_select(
        [*names, "archived_at"],
        select(*[live.c[n] for n in names], literal(now, db.Timestamp).label("archived_at"))
        .where(live.c.panda_id.in_(ids))))


def _delete_copied(live, archive, ids: list[int], now: dt.datetime):
    """Delete the live rows of ``ids`` that this batch copied: under READ COMMITTED a files or
    history row committed between the copy and the delete stays live (for the next pass)
    instead of being deleted uncopied. The job rows themselves are locked by the batch."""
    q = delete(live).where(live.c.panda_id.in_(ids))
    if live is db.jobs:
        return q
    return q.where(live.c.row_id.in_(select(archive.c.row_id).where(
        archive.c.panda_id.in_(ids), archive.c.archived_at == now)))


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
    j = db.jobs.c
    moved = 0
    for status in FINAL:
        # one final state at a time, oldest first: a range of ix_jobs_status_changed
        # (status, state_changed) that holds eligible rows only, whatever the live rows ahead
        q = (select(j.panda_id).where(j.status == status, j.state_changed < cutoff)
             .order_by(j.state_changed).limit(batch))
        if tb.skip_locked:
            q = q.with_for_update(skip_locked=True)
        while True:
            with tb.engine.begin() as conn:
                ids = [r[0] for r in conn.execute(q)]
                if not ids:
                    break
                # the job, its files and its history move in this one transaction
                for live, archive in db.ARCHIVE_TIERS:
                    _copy(conn, live, archive, ids, now)
                for live, archive in reversed(db.ARCHIVE_TIERS):
                    conn.execute(_delete_copied(live, archive, ids, now))
            moved += len(ids)
            log.debug("archived %d %s job(s), %d so far", len(ids), status, moved)
            if len(ids) < batch or (limit is not None and moved >= limit):
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
