"""Job counters: jobs and cores per (site, share, status) without counting the jobs table.

Database triggers on ``jobs`` (migration 0018) append every change's +1/-1 to
``job_count_deltas`` in the writer's own transaction, so the counters are exactly as committed
as the jobs themselves, whoever wrote them (the state machine, a set-based insert, the
archiver). Appending rather than updating one counter row per (site, share, status) keeps
concurrent dispatchers from queueing behind a hot row. :meth:`JobCounts.fold` moves the deltas
into ``job_counts`` (delete-returning and add, one transaction, several processes at once are
safe: each delta is deleted, hence added, once); :meth:`JobCounts.read` sums both tables in one
statement, so a reader never sees a fold half done. The share ranking reads a per-process
:meth:`snapshot` that one thread refreshes however many requests find it stale.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, text
from sqlalchemy.exc import DBAPIError

from .. import db
from .base import Store, is_retryable

log = logging.getLogger(__name__)

#: (site, share, status) -> (jobs, cores); site '' is a job without a site
Counts = dict[tuple[str, str, str], tuple[int, int]]

_READ = ("SELECT site, share, status, sum(n), sum(cores) FROM ("
         "SELECT site, share, status, n, cores FROM job_counts{w} UNION ALL "
         "SELECT site, share, status, n, cores FROM job_count_deltas{w}) both_tables "
         "GROUP BY site, share, status")
#: the same over every site, summed by the database: one row per (share, status)
_READ_BY_SHARE = text(
    "SELECT share, status, sum(n), sum(cores) FROM ("
    "SELECT share, status, n, cores FROM job_counts UNION ALL "
    "SELECT share, status, n, cores FROM job_count_deltas) both_tables GROUP BY share, status")

_PG_FOLD = text(
    "WITH gone AS (DELETE FROM job_count_deltas WHERE row_id IN ("
    " SELECT row_id FROM job_count_deltas ORDER BY row_id LIMIT :limit FOR UPDATE SKIP LOCKED)"
    " RETURNING site, share, status, n, cores),"
    " folded AS (INSERT INTO job_counts (site, share, status, n, cores)"
    " SELECT site, share, status, sum(n), sum(cores) FROM gone GROUP BY site, share, status"
    " ORDER BY site, share, status"
    " ON CONFLICT (site, share, status) DO UPDATE SET n = job_counts.n + excluded.n,"
    " cores = job_counts.cores + excluded.cores RETURNING 1)"
    " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM folded)")
# MariaDB: lock the batch first, skipping rows a writer has not committed (a DELETE would
# wait for them, and the writer's next trigger insert then deadlocks with it); then delete
# exactly what was locked
_MARIADB_LOCK = text("SELECT row_id, site, share, status, n, cores FROM job_count_deltas "
                     "ORDER BY row_id LIMIT :limit FOR UPDATE SKIP LOCKED")
_MARIADB_ADD = text("INSERT INTO job_counts (site, share, status, n, cores) "
                    "VALUES (:site, :share, :status, :n, :cores) ON DUPLICATE KEY UPDATE "
                    "n = n + VALUES(n), cores = cores + VALUES(cores)")
_SQLITE_TAKE = text("DELETE FROM job_count_deltas WHERE row_id IN (SELECT row_id FROM "
                    "job_count_deltas ORDER BY row_id LIMIT :limit) "
                    "RETURNING site, share, status, n, cores")
_SQLITE_ADD = text("INSERT INTO job_counts (site, share, status, n, cores) "
                   "VALUES (:site, :share, :status, :n, :cores) ON CONFLICT (site, share, status) "
                   "DO UPDATE SET n = n + excluded.n, cores = cores + excluded.cores")
_DROP_EMPTY = text("DELETE FROM job_counts WHERE n = 0 AND cores = 0")
_REBUILD = text("INSERT INTO job_counts (site, share, status, n, cores) "
                "SELECT COALESCE(site, ''), share, status, count(*), COALESCE(sum(cores), 0) "
                "FROM jobs GROUP BY COALESCE(site, ''), share, status")


@dataclass(frozen=True)
class Snapshot:
    """The counters as one read saw them, by site: {site: {(share, status): (jobs, cores)}}."""
    by_site: dict[str, dict[tuple[str, str], tuple[int, int]]]
    taken: float                       # time.monotonic() of the read

    def site(self, name: str) -> dict[tuple[str, str], tuple[int, int]]:
        return self.by_site.get(name, {})


class JobCounts:
    """Read and fold the trigger-kept job counters (see the module docstring)."""

    def __init__(self, store: Store, fold_batch: int = 50000):
        self.store = store
        self.fold_batch = fold_batch
        self._snapshot: Snapshot | None = None
        self._refreshing = threading.Lock()

    # ------------------------------------------------------------------ exact reads
    def read(self, site: str | None = None) -> Counts:
        """Every (site, share, status) with its jobs and cores, exact as committed now."""
        where = "" if site is None else " WHERE site = :site"
        out: Counts = {}
        with db.read(self.store.engine) as conn:
            for s, share, status, n, cores in conn.execute(
                    text(_READ.format(w=where)), {} if site is None else {"site": site}):
                if n:
                    out[(s, share, status)] = (int(n), int(cores or 0))
        return out

    def by_share(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(share, status) -> (jobs, cores) over every site, exact as committed now: a few
        rows whatever the number of sites (``read`` returns one per site)."""
        with db.read(self.store.engine) as conn:
            return {(share, status): (int(n), int(cores or 0))
                    for share, status, n, cores in conn.execute(_READ_BY_SHARE) if n}

    def site_load(self, include_unsited: bool = False) -> dict[str, dict[str, int]]:
        """site -> {status: jobs}; jobs without a site under '' if ``include_unsited``."""
        out: dict[str, dict[str, int]] = {}
        for (site, _share, status), (n, _cores) in self.read().items():
            if site or include_unsited:
                per = out.setdefault(site, {})
                per[status] = per.get(status, 0) + n
        return out

    # ------------------------------------------------------------------ the cached view
    def snapshot(self, max_age_s: float = 2.0) -> Snapshot:
        """The counters as read at most ``max_age_s`` ago. One thread of the process refreshes
        (fold, then read) while the others keep answering from the previous snapshot; only
        the very first callers wait for it."""
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.taken < max_age_s:
            return snap
        if snap is not None:
            if not self._refreshing.acquire(blocking=False):
                return snap                      # someone is refreshing: the old one will do
        else:
            self._refreshing.acquire()
        again = self._snapshot                   # refreshed while we were getting the lock?
        if again is not None and again is not snap or (
                again is not None and time.monotonic() - again.taken < max_age_s):
            self._refreshing.release()
            return again
        try:
            try:
                self.fold()
            except DBAPIError as exc:            # a fold can wait: the read is exact anyway
                log.warning("folding job counters failed: %s", exc.orig)
            taken = time.monotonic()
            by_site: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}
            for (site, share, status), value in self.read().items():
                by_site.setdefault(site, {})[(share, status)] = value
            snap = self._snapshot = Snapshot(by_site, taken)
            return snap
        finally:
            self._refreshing.release()

    @property
    def current(self) -> Snapshot | None:
        """The last snapshot taken (however old), without reading anything."""
        return self._snapshot

    def is_fresh(self, max_age_s: float) -> bool:
        """Would ``snapshot(max_age_s)`` answer without reading the database?"""
        snap = self._snapshot
        return snap is not None and (time.monotonic() - snap.taken < max_age_s
                                     or self._refreshing.locked())

    # ------------------------------------------------------------------ folding
    def fold(self, max_rounds: int = 20) -> int:
        """Move pending deltas into ``job_counts``; returns how many were folded."""
        total = 0
        for _ in range(max_rounds):
            for attempt in range(3):
                try:
                    n = self._fold_once()
                    break
                except DBAPIError as exc:
                    if not is_retryable(exc) or attempt == 2:
                        raise
            total += n
            if n < self.fold_batch:
                break
        if total:
            log.debug("folded %d job counter delta(s)", total)
        return total

    def _fold_once(self) -> int:
        dialect = self.store.dialect
        if dialect in ("mysql", "mariadb"):
            return self._fold_mariadb()
        with self.store.engine.begin() as conn:
            if dialect == "postgresql":
                taken, _ = conn.execute(_PG_FOLD, {"limit": self.fold_batch}).one()
            else:
                rows = conn.execute(_SQLITE_TAKE, {"limit": self.fold_batch}).all()
                taken = len(rows)
                self._add(conn, _SQLITE_ADD, rows)
            if taken:
                conn.execute(_DROP_EMPTY)
        return int(taken)

    def _fold_mariadb(self) -> int:
        """One fold at a time (a named lock; a process that finds it taken skips its fold):
        two folds' DELETEs were seen to deadlock on each other's rows."""
        with self.store.engine.connect() as conn:
            got = conn.execute(text("SELECT GET_LOCK('panda_wms_fold_counts', 0)")).scalar()
            conn.commit()          # the lock is the session's; end the autobegun transaction
            if not got:
                return 0
            try:
                with conn.begin():
                    locked = conn.execute(_MARIADB_LOCK, {"limit": self.fold_batch}).all()
                    if locked:
                        conn.execute(delete(db.job_count_deltas).where(
                            db.job_count_deltas.c.row_id.in_([r[0] for r in locked])))
                        self._add(conn, _MARIADB_ADD, [r[1:] for r in locked])
                        conn.execute(_DROP_EMPTY)
            finally:
                conn.execute(text("SELECT RELEASE_LOCK('panda_wms_fold_counts')"))
                conn.commit()
        return len(locked)

    @staticmethod
    def _add(conn, upsert, rows) -> None:
        sums = _sum(rows)
        if sums:
            conn.execute(upsert, [{"site": k[0], "share": k[1], "status": k[2], "n": v[0],
                                   "cores": v[1]} for k, v in sorted(sums.items())])

    def rebuild(self) -> Counts:
        """Recount from the jobs table (a repair after hand edits; scans the table once). On
        PostgreSQL writers wait meanwhile; elsewhere run it with the servers stopped."""
        with self.store.engine.begin() as conn:
            if self.store.dialect == "postgresql":
                conn.exec_driver_sql("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
            conn.execute(text("DELETE FROM job_count_deltas"))
            conn.execute(text("DELETE FROM job_counts"))
            conn.execute(_REBUILD)
        self._snapshot = None
        return self.read()


def _sum(rows: Iterable) -> Counts:
    sums: dict[tuple[str, str, str], list[int]] = {}
    for site, share, status, n, cores in rows:
        acc = sums.setdefault((site, share, status), [0, 0])
        acc[0] += int(n)
        acc[1] += int(cores or 0)
    return {k: (v[0], v[1]) for k, v in sums.items()}
