"""Move jobs that ended long ago from ``jobs`` to ``jobs_archive``.

Why: the dispatcher and the watcher scan the live table all day; finished history would slow
them down as it grows. An archived row keeps its PandaID, and ``files`` and ``job_history`` are
keyed by PandaID, so a job's files and history stay findable; ``get_job``, ``list_jobs`` and the
task counts read both tables. Rows move in batches, each batch one transaction (copy, then
delete), so an interrupted run loses nothing and the next run carries on. On PostgreSQL and
MariaDB the batch is picked with ``FOR UPDATE SKIP LOCKED``, so several server processes may run
it at once without moving a row twice.
"""
from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import Executor

from sqlalchemy import delete, insert, select

from panda_core.states import FINAL_JOB_STATES

from . import db
from .taskbuffer import TaskBuffer
from .transient import describe, is_transient

log = logging.getLogger(__name__)

DEFAULT_AGE_S = 3 * 24 * 3600
DEFAULT_INTERVAL_S = 600
FINAL = sorted(str(s) for s in FINAL_JOB_STATES)


def archive_jobs(tb: TaskBuffer, older_than_s: float, batch: int = 1000,
                 limit: int | None = None) -> int:
    """Archive final jobs whose state changed more than ``older_than_s`` ago (by ``tb.clock``),
    at most about ``limit`` (whole batches) when given.

    Returns how many jobs moved.
    """
    if older_than_s < 0:
        raise ValueError("older_than_s must be >= 0")
    cutoff = tb.clock() - dt.timedelta(seconds=older_than_s)
    j = db.jobs.c
    columns = [c.name for c in db.jobs.columns]
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
                conn.execute(insert(db.jobs_archive).from_select(
                    columns, select(*[db.jobs.c[name] for name in columns])
                    .where(j.panda_id.in_(ids))))
                conn.execute(delete(db.jobs).where(j.panda_id.in_(ids)))
            moved += len(ids)
            log.debug("archived %d %s job(s), %d so far", len(ids), status, moved)
            if len(ids) < batch or (limit is not None and moved >= limit):
                break
        if limit is not None and moved >= limit:
            break
    if moved:
        log.info("archived %d job(s) that ended before %s", moved, cutoff.isoformat())
    return moved


def start_archiver(tb: TaskBuffer, executor: Executor, age_s: float = DEFAULT_AGE_S,
                   interval_s: float = DEFAULT_INTERVAL_S):
    """Run :func:`archive_jobs` every ``interval_s`` in ``executor`` from the Tornado loop.

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
            await IOLoop.current().run_in_executor(executor, archive_jobs, tb, age_s)
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
