"""The task buffer: every read and write of tasks, jobs, files and sites goes through here.

Every job state change goes through :meth:`TaskBuffer.set_job_state`, which checks that the
transition is legal and records it with its time in ``job_history``. Dispatch hands a job to
exactly one pilot: the row is picked with ``FOR UPDATE SKIP LOCKED`` where the database has it
(PostgreSQL, MariaDB) and the status change is guarded by ``WHERE status = 'activated'``, so even
two processes that picked the same row cannot both win.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import (BigInteger, Integer, String, and_, bindparam, exists, func, insert, select,
                        union_all, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from panda_core.states import (FINAL_JOB_STATES, PILOT_OWNED_STATES, IllegalTransition, JobState,
                              TaskState, check_job_transition)

from . import db

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """Naive UTC now: what every timestamp column stores."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class NotFound(LookupError):
    """No such task, job or site."""


class Conflict(RuntimeError):
    """The request is valid but the object's state does not allow it."""


class TaskBuffer:
    def __init__(self, engine: Engine, clock: Clock = utcnow):
        self.engine = engine
        self.clock = clock
        self.dialect = engine.dialect.name
        self._skip_locked = self.dialect in ("postgresql", "mysql", "mariadb")
        self._site_cache: dict[str, tuple[float, dict]] = {}
        self._stmt_cache: dict[tuple, Any] = {}
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    # ------------------------------------------------------------------ state changes
    def set_job_state(self, conn: Connection, panda_id: int, new: str, *, actor: str | None,
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
        steps = _steps(old, [*via, new])
        return self._apply_state(conn, int(panda_id), old, steps, actor, fields) is not None

    def _apply_state(self, conn: Connection, target: int | None, old: str,
                     steps: list[tuple[str, str]], actor: str | None, fields: dict,
                     returning: bool = False, pick: tuple | None = None,
                     with_files: bool = False):
        """The guarded UPDATE plus its history rows (checked transitions in ``steps``).

        ``target``: the PandaID; or None and ``pick`` = (cache key or None, scalar subquery
        choosing the row, its parameters). PostgreSQL: one statement (UPDATE ... RETURNING in a
        CTE feeding the history INSERT). Elsewhere: UPDATE (RETURNING on SQLite when the row is
        wanted), then the INSERT. Statements are built once per shape and reused with bind
        parameters: building a Core statement costs more client CPU than running it.
        Returns None if no row matched; else the row (``returning``) or the PandaID.
        ``with_files`` (PostgreSQL, with ``returning``): the row comes with its files
        (``row["files"]``) from the same statement, one round trip less per dispatch.
        """
        now = self.clock()
        values = {"status": steps[-1][1] if steps else old, "modification_time": now, **fields}
        if steps:
            values["state_changed"] = now
        cols = tuple(sorted(values))
        unknown = [c for c in cols if c not in db.jobs.c]
        if unknown:
            raise ValueError(f"not columns of jobs: {', '.join(unknown)}")
        with_files = with_files and returning and self.dialect == "postgresql"
        key = (cols, len(steps), returning, pick[0] if pick else "id", with_files)
        stmt = self._stmt_cache.get(key) if key[3] is not None else None
        if stmt is None:
            stmt = self._state_stmt(cols, len(steps), returning, pick[1]() if pick else None,
                                    with_files)
            if key[3] is not None and len(self._stmt_cache) < 1000:
                self._stmt_cache[key] = stmt
        params = {f"v_{k}": v for k, v in values.items()}
        params["old_status"] = old
        if pick:
            params.update(pick[2])
        else:
            params["target"] = target
        if self.dialect == "postgresql":
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
            conn.execute(_INSERT_HISTORY, [
                {"panda_id": panda_id, "old_status": o, "new_status": n, "time": now,
                 "actor": actor} for o, n in steps])
        return result

    def _state_stmt(self, cols: tuple[str, ...], n_steps: int, returning: bool, pick_subq,
                    with_files: bool = False):
        j = db.jobs.c
        target = pick_subq if pick_subq is not None else bindparam("target", type_=BigInteger)
        stmt = update(db.jobs).where(
            j.panda_id == target, j.status == bindparam("old_status", type_=String)
        ).values({c: bindparam(f"v_{c}", type_=db.jobs.c[c].type) for c in cols})
        if self.dialect == "postgresql":
            upd = stmt.returning(*(db.jobs.c if returning else [j.panda_id])).cte("upd")
            query = select(upd)
            if with_files:
                # the statement's snapshot is taken before the update: files are unchanged by
                # it and seen as they were
                query = (select(upd, *(db.files.c[c].label(f"f_{c}") for c in _FILE_COLS))
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
            if self.dialect != "sqlite":
                raise TypeError(f"UPDATE ... RETURNING is not used on {self.dialect}")
            return stmt.returning(*db.jobs.c)
        return stmt

    # ------------------------------------------------------------------ sites
    def sync_sites(self, configs: list[dict]) -> list[str]:
        """Insert or replace site configs (dicts from site_configs.SiteConfig.to_dict)."""
        now = self.clock()
        names = []
        with self.engine.begin() as conn:
            for cfg in configs:
                name = cfg["name"]
                values = {"status": cfg.get("status", "online"), "config": cfg, "updated": now}
                res = conn.execute(update(db.sites).where(db.sites.c.name == name).values(**values))
                if res.rowcount == 0:
                    conn.execute(insert(db.sites).values(name=name, **values))
                names.append(name)
        return names

    def get_site(self, name: str) -> dict:
        with db.read(self.engine) as conn:
            row = conn.execute(select(db.sites).where(db.sites.c.name == name)).first()
        if row is None:
            raise NotFound(f"unknown site {name!r}")
        return dict(row._mapping)

    def get_site_cached(self, name: str, max_age_s: float = 5.0) -> dict:
        """``get_site`` through a per-process cache: every getJob and updateJob needs the
        site's config, which changes rarely; a change is seen within ``max_age_s``."""
        row = self._cached_site(name)
        if row is None:
            row = self.get_site(name)
            self._site_cache[name] = (time.monotonic() + max_age_s, row)
        return row

    def _cached_site(self, name: str) -> dict | None:
        hit = self._site_cache.get(name)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def site_is_cached(self, name: str) -> bool:
        """Would ``get_site_cached(name)`` answer without reading the database?"""
        return self._cached_site(name) is not None

    def list_sites(self) -> list[dict]:
        with db.read(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(select(db.sites).order_by(db.sites.c.name))]

    # ------------------------------------------------------------------ data
    def add_dataset_files(self, dataset: str, scope: str, file_list: list[dict],
                          ddm_endpoint: str | None) -> int:
        """Register files of ``dataset`` (and their replicas at ``ddm_endpoint``). Idempotent."""
        now = self.clock()
        added = 0
        with self.engine.begin() as conn:
            if conn.execute(select(db.datasets.c.name).where(db.datasets.c.name == dataset)
                            ).first() is None:
                conn.execute(insert(db.datasets).values(name=dataset, scope=scope, created=now))
            have = {r.lfn for r in conn.execute(select(db.dataset_files.c.lfn).where(
                db.dataset_files.c.dataset == dataset, db.dataset_files.c.scope == scope))}
            for f in file_list:
                if f["lfn"] not in have:
                    conn.execute(insert(db.dataset_files).values(
                        dataset=dataset, scope=scope, lfn=f["lfn"],
                        guid=f.get("guid") or str(uuid.uuid4()), fsize=f.get("fsize"),
                        checksum=f.get("checksum"), created=now))
                    added += 1
                if ddm_endpoint:
                    self._add_replica(conn, scope, f["lfn"], ddm_endpoint, f.get("surl"))
        return added

    def _add_replica(self, conn: Connection, scope: str, lfn: str, ddm_endpoint: str,
                     surl: str | None) -> None:
        exists = conn.execute(select(db.replicas.c.row_id).where(
            db.replicas.c.scope == scope, db.replicas.c.lfn == lfn,
            db.replicas.c.ddm_endpoint == ddm_endpoint)).first()
        if exists is None:
            conn.execute(insert(db.replicas).values(scope=scope, lfn=lfn, ddm_endpoint=ddm_endpoint,
                                                    surl=surl, created=self.clock()))

    def add_replica(self, scope: str, lfn: str, ddm_endpoint: str, surl: str | None) -> None:
        with self.engine.begin() as conn:
            self._add_replica(conn, scope, lfn, ddm_endpoint, surl)

    def dataset_files(self, dataset: str, unused_only: bool = False) -> list[dict]:
        q = select(db.dataset_files).where(db.dataset_files.c.dataset == dataset)
        if unused_only:
            q = q.where(db.dataset_files.c.task_id.is_(None))
        with db.read(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(db.dataset_files.c.lfn))]

    def replica_endpoints(self, scope: str, lfns: list[str]) -> dict[str, set[str]]:
        """lfn -> storage elements that hold it."""
        out: dict[str, set[str]] = {lfn: set() for lfn in lfns}
        if not lfns:
            return out
        with db.read(self.engine) as conn:
            for r in conn.execute(select(db.replicas.c.lfn, db.replicas.c.ddm_endpoint).where(
                    db.replicas.c.scope == scope, db.replicas.c.lfn.in_(lfns))):
                out[r.lfn].add(r.ddm_endpoint)
        return out

    # ------------------------------------------------------------------ tasks and jobs
    def insert_task(self, conn: Connection, *, name: str, owner: str, params: dict,
                    priority: int, share: str, site: str | None, max_attempts: int) -> int:
        now = self.clock()
        res = conn.execute(insert(db.tasks).values(
            name=name, status=str(TaskState.REGISTERED), owner=owner, priority=priority,
            share=share, site=site, max_attempts=max_attempts, params=params, created=now,
            modified=now))
        return int(res.inserted_primary_key[0])

    def insert_job(self, conn: Connection, job: dict, job_files: list[dict], actor: str) -> int:
        """Insert one job in ``defined`` with its files; returns its PandaID."""
        now = self.clock()
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

    def set_task_status(self, conn: Connection, task_id: int, status: str,
                        error_dialog: str | None = None) -> None:
        values: dict[str, Any] = {"status": status, "modified": self.clock()}
        if error_dialog is not None:
            values["error_dialog"] = error_dialog
        conn.execute(update(db.tasks).where(db.tasks.c.task_id == task_id).values(**values))

    def get_task(self, task_id: int) -> dict:
        with db.read(self.engine) as conn:
            row = conn.execute(select(db.tasks).where(db.tasks.c.task_id == task_id)).first()
        if row is None:
            raise NotFound(f"no task {task_id}")
        return dict(row._mapping)

    def task_job_counts(self, task_id: int) -> dict[str, int]:
        """Jobs of a task per status, live and archived."""
        counts: dict[str, int] = {}
        with db.read(self.engine) as conn:
            for table in (db.jobs, db.jobs_archive):
                for r in conn.execute(select(table.c.status, func.count()).where(
                        table.c.task_id == task_id).group_by(table.c.status)):
                    counts[r[0]] = counts.get(r[0], 0) + r[1]
        return counts

    def task_job_ids(self, task_id: int) -> list[int]:
        with db.read(self.engine) as conn:
            ids = [r[0] for t in (db.jobs, db.jobs_archive) for r in conn.execute(
                select(t.c.panda_id).where(t.c.task_id == task_id))]
        return sorted(ids)

    def task_state_counts(self) -> dict[str, int]:
        with db.read(self.engine) as conn:
            return {status: n for status, n in conn.execute(
                select(db.tasks.c.status, func.count()).group_by(db.tasks.c.status))}

    def list_tasks(self, owner: str | None = None, since: dt.datetime | None = None,
                   limit: int = 1000) -> list[dict]:
        q = select(db.tasks).order_by(db.tasks.c.task_id.desc()).limit(limit)
        if owner:
            q = q.where(db.tasks.c.owner == owner)
        if since:
            q = q.where(db.tasks.c.modified >= since)
        with db.read(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def get_job(self, panda_id: int, include_archive: bool = True) -> dict | None:
        with db.read(self.engine) as conn:
            for table in (db.jobs, db.jobs_archive) if include_archive else (db.jobs,):
                row = conn.execute(select(table).where(table.c.panda_id == panda_id)).first()
                if row is not None:
                    job = dict(row._mapping)
                    job["files"] = [dict(f._mapping) for f in conn.execute(
                        select(db.files).where(db.files.c.panda_id == panda_id)
                        .order_by(db.files.c.row_id))]
                    job["archived"] = table is db.jobs_archive
                    return job
        return None

    def job_brief(self, panda_id: int) -> dict | None:
        """Status, site, attempt and task of a live job (one indexed read, no files)."""
        j = db.jobs.c
        with db.read(self.engine) as conn:
            row = conn.execute(select(j.panda_id, j.status, j.site, j.attempt_nr, j.task_id)
                               .where(j.panda_id == panda_id)).first()
        return None if row is None else dict(row._mapping)

    def job_history(self, panda_id: int) -> list[dict]:
        with db.read(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(db.job_history).where(db.job_history.c.panda_id == panda_id)
                .order_by(db.job_history.c.row_id))]

    def list_jobs(self, task_id: int | None = None, site: str | None = None,
                  status: str | None = None, limit: int = 1000) -> list[dict]:
        rows: list[dict] = []
        with db.read(self.engine) as conn:
            for table in (db.jobs, db.jobs_archive):
                q = select(table).order_by(table.c.panda_id).limit(limit)
                if task_id is not None:
                    q = q.where(table.c.task_id == task_id)
                if site:
                    q = q.where(table.c.site == site)
                if status:
                    q = q.where(table.c.status == status)
                rows += [dict(r._mapping) for r in conn.execute(q)]
        return rows[:limit]

    def count_jobs(self, site: str | None = None, status: str | None = None) -> int:
        q = select(func.count()).select_from(db.jobs)
        if site:
            q = q.where(db.jobs.c.site == site)
        if status:
            q = q.where(db.jobs.c.status == status)
        with db.read(self.engine) as conn:
            return int(conn.execute(q).scalar_one())

    def site_load(self) -> dict[str, dict[str, int]]:
        """site -> {status: count} over live jobs: what brokerage and the monitor read."""
        out: dict[str, dict[str, int]] = {}
        with db.read(self.engine) as conn:
            for site, status, n in conn.execute(
                    select(db.jobs.c.site, db.jobs.c.status, func.count())
                    .where(db.jobs.c.site.is_not(None))
                    .group_by(db.jobs.c.site, db.jobs.c.status)):
                out.setdefault(site, {})[status] = n
        return out

    # ------------------------------------------------------------------ dispatch
    @staticmethod
    def dispatch_params(site: str, *, cores: int | None = None, memory_mb: int | None = None,
                        walltime_s: int | None = None, pilot_version: str | None = None,
                        prod_source_label: str | None = None) -> dict:
        """The bind parameters of a dispatch pick; absent limits are left out (their shape
        names the statement)."""
        wanted = {"p_site": site, "p_cores": cores or None, "p_memory_mb": memory_mb or None,
                  "p_walltime_s": walltime_s or None, "p_label": prod_source_label or None,
                  "p_version": pilot_version or None}
        return {k: v for k, v in wanted.items() if v is not None}

    @staticmethod
    def pick_conditions(shape: tuple[str, ...], where: list | None = None) -> list:
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
        if self._skip_locked:
            pick = pick.with_for_update(skip_locked=True)
        return pick

    def dispatch(self, site: str, *, node: str | None, actor: str | None,
                 pilot_id: str | None = None, batch_id: str | None = None,
                 cores: int | None = None, memory_mb: int | None = None,
                 walltime_s: int | None = None, pilot_version: str | None = None,
                 prod_source_label: str | None = None, order_by=None,
                 max_tries: int = 5, where: list | None = None) -> dict | None:
        """Hand the best activated job of ``site`` that fits the pilot to this pilot only.

        ``where``: extra conditions on ``db.jobs`` (the share-aware dispatcher asks share by
        share). Returns the job row with its files, or None when nothing fits. PostgreSQL: one
        statement picks (``FOR UPDATE SKIP LOCKED``), marks it sent and writes the history;
        SQLite: ``UPDATE ... WHERE panda_id = (best) RETURNING *`` under the one-writer lock;
        MariaDB: ``SELECT ... FOR UPDATE SKIP LOCKED`` then the guarded update.
        """
        params = self.dispatch_params(site, cores=cores, memory_mb=memory_mb,
                                      walltime_s=walltime_s, pilot_version=pilot_version,
                                      prod_source_label=prod_source_label)
        shape = tuple(sorted(params))
        conds = self.pick_conditions(shape, where)
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
                      "pilot_owner": actor, "heartbeat_time": self.clock()}
            if self.dialect == "postgresql":
                # one statement is its own transaction: no BEGIN/COMMIT round trips; the
                # files of a job do not change while it is dispatched
                with self._autocommit.connect() as conn:
                    return self._apply_state(conn, None, str(JobState.ACTIVATED), steps, actor,
                                             fields, returning=True,
                                             pick=(cache_key, pick_subquery, params),
                                             with_files=True)
            with self.engine.begin() as conn:
                if self.dialect == "sqlite":
                    job = self._apply_state(conn, None, str(JobState.ACTIVATED), steps, actor,
                                            fields, returning=True,
                                            pick=(cache_key, pick_subquery, params))
                    if job is None:      # nothing left (locked rows were skipped, not raced)
                        return None
                else:
                    query = self._stmt_cache.get(cache_key) if cache_key else None
                    if query is None:
                        query = (select(db.jobs).where(and_(*conds)).order_by(*order).limit(1)
                                 .with_for_update(skip_locked=True))
                        if cache_key:
                            self._stmt_cache[cache_key] = query
                    row = conn.execute(query, params).first()
                    if row is None:
                        return None
                    if self._apply_state(conn, int(row.panda_id),
                                         str(JobState.ACTIVATED), steps, actor, fields) is None:
                        continue         # another process won the race: try the next one
                    job = {**row._mapping, **fields, "status": str(JobState.SENT)}
                job["files"] = [dict(f._mapping) for f in
                                conn.execute(_SELECT_FILES, {"pid": job["panda_id"]})]
                return job
        return None

    # ------------------------------------------------------------------ pilot updates
    def pilot_update(self, panda_id: int, state: str, fields: dict, *, actor: str | None,
                     **kw: Any) -> str:
        """Apply a pilot's updateJob (see :meth:`_pilot_update`); a transaction the database
        chose as a deadlock victim is retried, since it was rolled back whole."""
        for attempt in range(1, 4):
            try:
                return self._pilot_update(panda_id, state, dict(fields), actor=actor, **kw)
            except DBAPIError as exc:
                if attempt == 3 or not is_retryable(exc):
                    raise
                log.warning("job %s: %s; retrying the update", panda_id, exc.orig)
        raise AssertionError("unreachable")

    def _pilot_update(self, panda_id: int, state: str, fields: dict, *, actor: str | None,
                      attempt_nr: int | None = None,
                      stored_files: dict[str, dict] | None = None,
                      output_endpoint: str | None = None,
                      check: Callable[[dict], str | None] | None = None) -> str:
        """Apply a pilot's updateJob; returns the command for the pilot ("NULL", "tobekilled").

        A heartbeat for a job the pilot no longer owns (unknown, other attempt, already final)
        gets "tobekilled". A final state is applied via ``holding``: outputs are registered,
        then the job finishes (or fails if an expected output is missing). ``check``: called
        with the job's row ({panda_id, status, site, ...}) before anything changes; it raises
        to refuse the update and returns the output storage element (the dispatcher's
        authorization, without a read of its own).
        """
        if self.dialect == "postgresql" and state not in _FINAL_STRS:
            # a heartbeat or progress report is one guarded statement after the read: in
            # autocommit it needs no BEGIN/COMMIT round trips (the read takes no lock in the
            # transaction either, READ COMMITTED); the rare first "running" that also marks
            # the task running keeps one transaction for both writes (below)
            with self._autocommit.connect() as conn:
                row = conn.execute(_SELECT_PILOT_ROW, {"pid": panda_id}).first()
                if row is None:
                    return "tobekilled"
                if check is not None:
                    check(dict(row._mapping))
                if attempt_nr is not None and attempt_nr != row.attempt_nr:
                    return "tobekilled"
                if row.status not in _PILOT_OWNED_STRS:
                    return "tobekilled" if row.status in _FINAL_STRS else "NULL"
                if not (state == str(JobState.RUNNING) and state != row.status
                        and row.task_status != str(TaskState.RUNNING)):
                    now = self.clock()
                    return self._pilot_progress(conn, panda_id, row, state,
                                                {**fields, "heartbeat_time": now}, actor, now)
            check = None      # checked above; the transaction below re-reads the row
        final = state in (str(JobState.FINISHED), str(JobState.FAILED))
        with self.engine.begin() as conn:
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
                output_endpoint = check(
                    {k: v for k, v in row._mapping.items() if k in _PILOT_ROW_KEYS}
                ) or output_endpoint
            if attempt_nr is not None and attempt_nr != row.attempt_nr:
                return "tobekilled"
            if row.status not in _PILOT_OWNED_STRS:
                return "tobekilled" if row.status in _FINAL_STRS else "NULL"
            now = self.clock()
            fields = {**fields, "heartbeat_time": now}
            if final:
                self._finish(conn, panda_id, row.status, state, fields, actor, stored_files or {},
                             output_endpoint, outs)
                ended_task = row.task_id
            else:
                return self._pilot_progress(conn, panda_id, row, state, fields, actor, now)
        # the task's status is checked after the job's transaction committed, in a short one
        # of its own: the task row lock is then held for microseconds, not across the final
        # update's commit, and the last job to end sees every other one ended
        self.task_after_job_end(ended_task)
        return "NULL"

    def task_after_job_end(self, task_id: int) -> None:
        """Update the task of a job that just ended. One read answers the common case (the
        task runs and still has live jobs: nothing to do); otherwise the locked check."""
        reader = self._autocommit if self.dialect == "postgresql" else self.engine
        with reader.connect() as conn:
            row = conn.execute(_TASK_QUICK, {"tid": task_id, "live": _LIVE_STATES}).first()
        if row is not None and row.status == str(TaskState.RUNNING) and row.pending:
            return
        with self.engine.begin() as conn:
            self._update_task_status(conn, task_id)

    def _pilot_progress(self, conn: Connection, panda_id: int, row, state: str, fields: dict,
                        actor: str | None, now: dt.datetime) -> str:
        """A non-final pilot update (starting, running, holding, transferring, heartbeat)."""
        if state == str(JobState.RUNNING) and row.status in ("sent", "starting"):
            fields.setdefault("start_time", now)
        if state == row.status:
            conn.execute(update(db.jobs).where(db.jobs.c.panda_id == panda_id)
                         .values(modification_time=now, **fields))
        else:
            try:
                self.set_job_state(conn, panda_id, state, actor=actor,
                                   expected=[row.status], **fields)
            except IllegalTransition:
                raise Conflict(f"job {panda_id} is {row.status}; cannot go to {state}") from None
            if state == str(JobState.RUNNING) and row.task_status != str(TaskState.RUNNING):
                self._mark_task_running(conn, row.task_id)
        return row.command or "NULL"

    def _mark_task_running(self, conn: Connection, task_id: int) -> None:
        """A job of the task started: the task runs (one UPDATE that usually matches nothing,
        instead of counting the task's jobs on every heartbeat)."""
        conn.execute(update(db.tasks).where(
            db.tasks.c.task_id == task_id,
            db.tasks.c.status.not_in((str(TaskState.RUNNING), str(TaskState.ABORTED))))
            .values(status=str(TaskState.RUNNING), modified=self.clock()))

    def _finish(self, conn: Connection, panda_id: int, old: str, state: str, fields: dict,
                actor: str | None, stored: dict[str, dict], endpoint: str | None,
                outs: list | None = None) -> None:
        """Register the stored outputs, then end the job via ``holding`` (both steps recorded).

        A few statements whatever the number of files: the file rows are updated with one
        executemany, replicas and dataset entries inserted in bulk (duplicates ignored).
        """
        now = self.clock()
        fields.setdefault("end_time", now)
        if outs is None:      # the caller may have read them with the job's row
            outs = conn.execute(_SELECT_OUTPUTS, {"pid": panda_id}).all()
        missing, file_rows, replica_rows, dataset_rows = [], [], [], []
        for f in outs:
            info = stored.get(f.lfn)
            if info is None:
                if f.type == "output":
                    missing.append(f.lfn)
                continue
            checksum = stored_checksum(info)
            guid = info.get("guid") or f.guid
            file_rows.append({"b_row_id": f.row_id, "b_fsize": info.get("fsize"),
                              "b_checksum": checksum, "b_guid": guid, "b_endpoint": endpoint})
            if endpoint:
                replica_rows.append({"scope": f.scope, "lfn": f.lfn, "ddm_endpoint": endpoint,
                                     "surl": info.get("surl"), "created": now})
            if f.type == "output":
                dataset_rows.append({"dataset": f.dataset, "scope": f.scope, "lfn": f.lfn,
                                     "guid": guid, "fsize": info.get("fsize"),
                                     "checksum": checksum, "task_id": None, "created": now})
        if file_rows:
            conn.execute(_UPDATE_STORED_FILE, file_rows)
        if replica_rows:
            self._insert_ignore(conn, db.replicas, replica_rows)
        if dataset_rows:
            self._insert_ignore(conn, db.dataset_files, dataset_rows)
        if state == str(JobState.FINISHED) and missing:
            state = str(JobState.FAILED)
            fields["pilot_error_code"] = 1165
            fields["pilot_error_diag"] = "missing output file(s): " + ",".join(missing)[:500]
        if not self.set_job_state(conn, panda_id, state, actor=actor, expected=[old],
                                  via=[str(JobState.HOLDING)], command=None, **fields):
            raise Conflict(f"job {panda_id} changed state while its final update was applied")
        if state == str(JobState.FAILED):
            self._maybe_retry(conn, panda_id, actor)

    def _insert_ignore(self, conn: Connection, table, rows: list[dict]) -> None:
        """Bulk INSERT that skips rows violating a unique constraint (idempotent registers)."""
        stmt = self._stmt_cache.get(("insert_ignore", table.name))
        if stmt is None:
            stmt = self._stmt_cache[("insert_ignore", table.name)] = self._insert_ignore_stmt(table)
        conn.execute(stmt, rows)

    def _insert_ignore_stmt(self, table):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            stmt = pg_insert(table).on_conflict_do_nothing()
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert
            stmt = sqlite_insert(table).on_conflict_do_nothing()
        else:
            stmt = insert(table).prefix_with("IGNORE")
        return stmt

    # ------------------------------------------------------------------ failures and retries
    def fail_job(self, conn: Connection, panda_id: int, expected: list[str], *, actor: str,
                 retry: bool = True, **fields: Any) -> bool:
        """Fail a job (watcher, data service); create a retry while attempts remain."""
        if not self.set_job_state(conn, panda_id, str(JobState.FAILED), actor=actor,
                                  expected=expected, end_time=self.clock(), **fields):
            return False
        if retry:
            self._maybe_retry(conn, panda_id, actor)
        task_id = conn.execute(select(db.jobs.c.task_id).where(db.jobs.c.panda_id == panda_id)
                               ).scalar_one()
        self._update_task_status(conn, task_id)
        return True

    def _maybe_retry(self, conn: Connection, panda_id: int, actor: str | None) -> int | None:
        job = dict(conn.execute(select(db.jobs).where(db.jobs.c.panda_id == panda_id)).first()
                   ._mapping)
        if job["attempt_nr"] >= job["max_attempts"]:
            return None
        task = conn.execute(select(db.tasks.c.status).where(db.tasks.c.task_id == job["task_id"])
                            ).first()
        if task is None or task.status == str(TaskState.ABORTED):
            return None
        from .jobcreator import retry_job_values
        files = [dict(r._mapping) for r in conn.execute(select(db.files).where(
            db.files.c.panda_id == panda_id).order_by(db.files.c.row_id))]
        values, new_files = retry_job_values(job, files)
        new_id = self.insert_job(conn, values, new_files, actor or "retry")
        self.set_job_state(conn, new_id, str(JobState.ACTIVATED) if job["site"] else
                           str(JobState.ASSIGNED), actor=actor, expected=[str(JobState.DEFINED)])
        log.info("job %s failed (attempt %s of %s): retry is job %s", panda_id,
                 job["attempt_nr"], job["max_attempts"], new_id)
        return new_id

    def _update_task_status(self, conn: Connection, task_id: int) -> None:
        """A task's status follows its jobs.

        Cheap while the task still has live jobs (two indexed lookups); the jobs are counted
        only once none is left to run. The task row is locked first: two jobs ending at once
        in READ COMMITTED would each see the other still running, and neither end the task.
        """
        q = select(db.tasks.c.status).where(db.tasks.c.task_id == task_id)
        if self._skip_locked:
            q = q.with_for_update()
        task = conn.execute(q).first()
        if task is None or task.status == str(TaskState.ABORTED):
            return
        j = db.jobs.c
        # IN (the live states), not NOT IN (final): one index probe per state instead of a
        # walk over the task's ended jobs
        live = [str(s) for s in JobState if s not in FINAL_JOB_STATES]
        pending = conn.execute(select(j.status).where(j.task_id == task_id,
                                                      j.status.in_(live)).limit(1)).first()
        if pending is not None:
            if task.status == str(TaskState.RUNNING):
                return
            started = ("finished", "starting", "running", "holding", "transferring")
            if conn.execute(select(j.panda_id).where(j.task_id == task_id,
                                                     j.status.in_(started)).limit(1)).first() \
                    is None and conn.execute(select(db.jobs_archive.c.panda_id).where(
                        db.jobs_archive.c.task_id == task_id,
                        db.jobs_archive.c.status == "finished").limit(1)).first() is None:
                return
            status = TaskState.RUNNING
        else:
            # every job is final: count only the latest attempt of each serial, since a failed
            # job that was retried is not a failure of the task
            latest = self._latest_attempt_states(conn, task_id)
            if not latest:
                return
            n_fin = sum(1 for s in latest.values() if s == "finished")
            status = (TaskState.DONE if n_fin == len(latest) else
                      TaskState.FAILED if n_fin == 0 else TaskState.FINISHED)
        if task.status != str(status):
            self.set_task_status(conn, task_id, str(status))

    def _latest_attempt_states(self, conn: Connection, task_id: int) -> dict[int, str]:
        latest: dict[int, tuple[int, str]] = {}
        for table in (db.jobs, db.jobs_archive):
            for serial, attempt, status in conn.execute(select(
                    table.c.serial, table.c.attempt_nr, table.c.status).where(
                    table.c.task_id == task_id)):
                if serial not in latest or attempt > latest[serial][0]:
                    latest[serial] = (attempt, status)
        return {s: st for s, (_, st) in latest.items()}

    # ------------------------------------------------------------------ kill
    def kill_job(self, panda_id: int, actor: str, owner_check: str | None = None) -> bool:
        """Kill a job: one not yet with a pilot is cancelled now; one with a pilot gets
        ``tobekilled`` in its next heartbeat reply and is cancelled. False if already final."""
        with self.engine.begin() as conn:
            row = conn.execute(select(db.jobs.c.status, db.jobs.c.owner, db.jobs.c.task_id)
                               .where(db.jobs.c.panda_id == panda_id)).first()
            if row is None:
                raise NotFound(f"no job {panda_id}")
            if owner_check is not None and row.owner != owner_check:
                raise PermissionError(f"job {panda_id} belongs to {row.owner}, not {owner_check}")
            if row.status in {str(s) for s in FINAL_JOB_STATES}:
                return False
            fields = {"end_time": self.clock(), "task_buffer_error_code": 300,
                      "task_buffer_error_diag": f"killed by {actor}"}
            if row.status in {str(s) for s in PILOT_OWNED_STATES}:
                fields["command"] = "tobekilled"
            ok = self.set_job_state(conn, panda_id, str(JobState.CANCELLED), actor=actor,
                                    expected=[row.status], **fields)
            if ok:
                self._update_task_status(conn, row.task_id)
            return ok

    def pending_command(self, panda_id: int) -> str | None:
        with db.read(self.engine) as conn:
            return conn.execute(select(db.jobs.c.command).where(db.jobs.c.panda_id == panda_id)
                                ).scalar()

    # ------------------------------------------------------------------ pilots (factories)
    def report_pilots(self, factory: str, pilots: list[dict], actor: str | None,
                      site_status: dict | None = None) -> int:
        now = self.clock()
        fac = {"last_seen": now, "actor": actor}
        if site_status is not None:
            fac["site_status"] = site_status
        with self.engine.begin() as conn:
            res = conn.execute(update(db.factories).where(db.factories.c.name == factory)
                               .values(**fac))
            if res.rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(db.factories).values(name=factory, **fac))
                except IntegrityError:
                    pass
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

    def pilot_summary(self) -> dict:
        with db.read(self.engine) as conn:
            facs = [dict(r._mapping) for r in conn.execute(select(db.factories))]
            per_site: dict[str, dict[str, int]] = {}
            for site, state, n in conn.execute(select(db.pilots.c.site, db.pilots.c.state,
                                                      func.count()).group_by(db.pilots.c.site,
                                                                             db.pilots.c.state)):
                per_site.setdefault(site, {})[state] = n
        return {"factories": facs, "sites": per_site}


_INSERT_HISTORY = insert(db.job_history)
_SELECT_OUTPUTS = select(db.files.c.row_id, db.files.c.type, db.files.c.scope, db.files.c.lfn,
                         db.files.c.dataset, db.files.c.guid).where(
    db.files.c.panda_id == bindparam("pid"), db.files.c.type.in_(("output", "log")))
_UPDATE_STORED_FILE = update(db.files).where(db.files.c.row_id == bindparam("b_row_id")).values(
    status="ready", fsize=bindparam("b_fsize"), checksum=bindparam("b_checksum"),
    guid=bindparam("b_guid"), ddm_endpoint=bindparam("b_endpoint"))
_LIVE_STATES = [str(s) for s in JobState if s not in FINAL_JOB_STATES]
_FINAL_STRS = frozenset(str(s) for s in FINAL_JOB_STATES)
_PILOT_OWNED_STRS = frozenset(str(s) for s in PILOT_OWNED_STATES)
_TASK_QUICK = select(db.tasks.c.status, exists().where(
    db.jobs.c.task_id == bindparam("tid"),
    db.jobs.c.status.in_(bindparam("live", expanding=True))).label("pending")).where(
    db.tasks.c.task_id == bindparam("tid"))
# the job a pilot updates, with its task's status (to skip the task update when it runs)
_SELECT_PILOT_ROW = select(
    db.jobs.c.panda_id, db.jobs.c.status, db.jobs.c.attempt_nr, db.jobs.c.command,
    db.jobs.c.task_id, db.jobs.c.site, db.tasks.c.status.label("task_status")
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
_FILE_COLS = tuple(c.name for c in db.files.c)
_SELECT_FILES = (select(db.files).where(db.files.c.panda_id == bindparam("pid"))
                 .order_by(db.files.c.row_id))


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


def is_retryable(exc: DBAPIError) -> bool:
    """A deadlock victim or a lock wait timeout: the transaction was rolled back, try again.
    PostgreSQL SQLSTATE 40P01/40001; MariaDB errors 1213 (deadlock) and 1205 (lock wait)."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in ("40P01", "40001"):
        return True
    args = getattr(orig, "args", ())
    return bool(args) and args[0] in (1213, 1205)


def stored_checksum(info: dict) -> str | None:
    """A stored file's checksum as the catalogue keeps it (``ad:<hex>`` or ``md5:<hex>``)."""
    if info.get("adler32"):
        return f"ad:{info['adler32']}"
    if info.get("md5sum"):
        return f"md5:{info['md5sum']}"
    return None


def _steps(old: str, path: list[str]) -> list[tuple[str, str]]:
    """The (from, to) steps of a state path, each checked against the life cycle."""
    steps = []
    for state in path:
        if state != old:
            check_job_transition(old, state)
            steps.append((old, state))
            old = state
    return steps


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
