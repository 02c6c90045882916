"""The pilots' hot path on PostgreSQL: getJob and the common updateJobs as single statements
run by async psycopg on the server's event loop.

Why: a dispatch cycle (getJob, updateJob running, updateJob finished) is what a PanDA server does
most. Through SQLAlchemy in the thread pool it cost about 11 round trips and 6 ms of server CPU
per cycle: the thread hop, SQLAlchemy's execution layer and the statements themselves each took
a share. Here each request is one prepared statement on a connection owned by the event loop,
and requests of one kind that arrive together share a statement (:class:`Coalescer`).

:class:`HotPath` is a :class:`~server.dispatchpath.DispatchPath` that only ever takes the
*common* case and hands everything else to its :class:`~server.dispatchpath.GeneralPath`, which
stays the one place that knows every rule:

- ``dispatch`` picks with the statement the general path uses (``Jobs.pick_query``, compiled
  once per shape), for as many pilots as are waiting with the same request.
- ``progress`` and ``finish`` are guarded by the job's current state, attempt and site; the
  states they accept are the legal predecessors the task buffer's state machine computes
  (``states.legal_predecessors``), the columns they set the protocol's report columns. When
  the guard does not match (a stale or refused update, a missing output, a job that failed,
  which may need a retry), nothing is changed and they return None: the general path then
  gives the canonical answer.
- after a job ended, its task is checked with the task buffer's own ``TASK_SETTLED``.

Every statement runs in autocommit: it is its own transaction, so a failure changes nothing.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from sqlalchemy import Integer, bindparam

from panda_core.states import FINAL_JOB_STATES, PILOT_OWNED_STATES, JobState, TaskState

from . import db
from .auth import Identity
from .brokerage import OutputSE, output_se
from .dispatcher import REPORT_COLUMNS
from .dispatchpath import DispatchPath, GeneralPath, JobRequest, UpdateRequest
from .taskbuffer import NotFound
from .taskbuffer.data import stored_checksum
from .taskbuffer.states import job_with_files, legal_predecessors
from .taskbuffer.tasks import KEPT_WHILE_LIVE, NOT_MADE_RUNNING, TASK_SETTLED
from .transient import describe, is_transient

log = logging.getLogger(__name__)

_OWNED = sorted(str(s) for s in PILOT_OWNED_STATES)
_FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)
_HOLDING, _FINISHED = str(JobState.HOLDING), str(JobState.FINISHED)


def conninfo(engine_url) -> str:
    """libpq connection string of a SQLAlchemy URL (driver name dropped)."""
    return engine_url.set(drivername="postgresql").render_as_string(hide_password=False)


def psycopg_sql(stmt, dialect) -> tuple[str, dict]:
    """A SQLAlchemy statement as psycopg runs it: (SQL, the parameters it fixes itself)."""
    compiled = stmt.compile(dialect=dialect)
    return compiled.string, {k: v for k, v in compiled.construct_params(_check=False).items()
                             if v is not None}


class ConnectionPool:
    """Async psycopg connections of one event loop, opened on demand up to ``size``.

    A connection is given back after a database error (autocommit: the statement was rolled
    back and the connection is idle again) and dropped after anything else (a cancelled await
    may leave a statement in flight); a later request opens a new one.
    """

    def __init__(self, conninfo: str, size: int):
        self.conninfo = conninfo
        self.size = max(1, size)
        self._idle: list = []
        self._opened = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        while True:
            try:
                conn = await self._get()
                break
            except _Retry:
                continue
        try:
            yield conn
        except psycopg.Error:
            if conn.closed or conn.broken:
                self._discard(conn)
                # the idle ones are of the same age: a database restart or a terminated
                # backend broke them too, and each would fail one more request
                self._drop_idle()
            else:
                self._put(conn)
            raise
        except BaseException:
            self._discard(conn)
            raise
        self._put(conn)

    async def _get(self):
        if self._idle:
            return self._idle.pop()
        if self._opened < self.size:
            self._opened += 1
            try:
                # prepare_threshold=0: every statement is prepared at its first use on the
                # connection; they are few and run millions of times
                return await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, prepare_threshold=0)
            except BaseException:
                self._opened -= 1
                self._wake_one()
                raise
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():   # handed a connection too late
                self._put(waiter.result())
            raise

    def _put(self, conn) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _wake_one(self) -> None:
        """A slot freed without a connection: a waiter may open one itself."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_Retry())
                return

    def _discard(self, conn) -> None:
        self._opened -= 1
        task = asyncio.ensure_future(conn.close())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._wake_one()

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._opened -= 1
            await conn.close()


def _log_fallback(what: str, exc: BaseException) -> None:
    """Why the general path answers: one line for a transient failure (a connection the
    database closed: the general path retries), the trace for anything else."""
    if is_transient(exc):
        log.warning("%s: the hot path met a transient failure (%s); using the general path",
                    what, describe(exc))
    else:
        log.warning("%s: the hot path failed; using the general path", what, exc_info=exc)


class _Retry(Exception):
    """Internal: a pool slot freed while this request waited; ask again."""


class Coalescer:
    """Requests of one kind that arrive while a statement for that kind is in flight are
    served together by the next statement ("group commit"): under load one statement and one
    commit serve many requests; an idle server runs each request at once.

    ``run(key, items) -> results`` answers a batch (``results[i]`` for ``items[i]``; a short
    list answers the rest with None; an exception as a result is raised to that caller only).
    At most ``max_inflight`` batches of one key run at once (one: while it runs, the next group
    gathers), each of at most ``max_batch`` items. A batch only ever starts after its requests
    arrived.
    """

    def __init__(self, run, max_batch: int = 100, max_inflight: int = 1):
        self.run = run
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._waiting: dict[Any, list] = {}
        self._inflight: dict[Any, int] = {}
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, key, item) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((item, future))
        if self._inflight.get(key, 0) < self.max_inflight:
            self._launch(key)
        return await future

    def _launch(self, key) -> None:
        waiting = [w for w in self._waiting.pop(key, ()) if not w[1].done()]
        if not waiting:
            return
        batch, rest = waiting[:self.max_batch], waiting[self.max_batch:]
        if rest:
            self._waiting[key] = rest
        self._inflight[key] = self._inflight.get(key, 0) + 1
        task = asyncio.ensure_future(self._run(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key, batch: list) -> None:
        try:
            results = await self.run(key, [item for item, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception)
                                         else RuntimeError("cancelled"))
            if not isinstance(exc, Exception):
                raise
        else:
            for i, (_, future) in enumerate(batch):
                result = results[i] if i < len(results) else None
                if isinstance(result, Exception):
                    if not future.done():
                        future.set_exception(result)
                elif not future.done():
                    future.set_result(result)
                elif result is not None:      # e.g. a job sent: the watcher reclaims it
                    log.warning("a request left before its reply; its result was %r",
                                result.get("panda_id") if isinstance(result, dict) else result)
        finally:
            self._inflight[key] -= 1
            if self._waiting.get(key):
                self._launch(key)
            elif not self._inflight[key]:
                del self._inflight[key]


class HotPath(DispatchPath):
    """One per server process; connections are opened by the loop that first asks.
    ``general``: the path for everything the hot statements do not take."""

    def __init__(self, general: GeneralPath, size: int = 8):
        tb = general.tb
        if tb.dialect != "postgresql":
            raise ValueError("the hot path runs on PostgreSQL only")
        self.general = general
        self.tb = tb
        self.size = size
        self._conninfo = conninfo(tb.engine.url)
        self._pools: dict[asyncio.AbstractEventLoop, ConnectionPool] = {}
        self._dispatch_sql: dict[tuple, tuple[str, dict]] = {}
        self._names: dict[str, list[str]] = {}     # result column names per statement
        self._dispatches = Coalescer(self._dispatch_batch)
        self._progresses = Coalescer(self._progress_batch)
        self._finishes = Coalescer(self._finish_batch)
        self._task_checks = Coalescer(self._task_check_batch)
        self._from_state = {s: legal_predecessors(s) for s in _OWNED}
        self._finish_from = legal_predecessors(_FINISHED, (_HOLDING,))
        self._task_settled = psycopg_sql(TASK_SETTLED, tb.engine.dialect)

    def _pool(self) -> ConnectionPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for old in [lp for lp in self._pools if lp.is_closed()]:
                del self._pools[old]
            pool = self._pools[loop] = ConnectionPool(self._conninfo, self.size)
        return pool

    async def close(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------------ the DispatchPath
    async def take(self, req: JobRequest, share: str | tuple | None) -> dict | None:
        params = self.tb.jobs.dispatch_params(req.site, share=share, **req.fit)
        try:
            return await self.dispatch(params, **req.who)
        except Exception as exc:  # noqa: BLE001 - the general path answers; the log says why
            _log_fallback("getJob", exc)
        return await self.general.take(req, share)

    async def update(self, req: UpdateRequest, identity: Identity | None) -> str:
        """A heartbeat or progress report, and a job that finished with its outputs, of a job
        at the site the pilot names; anything else, or anything the statements do not apply,
        goes to the general path, which gives the canonical answer."""
        site = req.site
        if not site or (identity is not None and not identity.may_act_for_site(site)):
            return await self.general.update(req, identity)
        site_row = self.tb.sites.cached(site)
        if site_row is None:      # this process's copy of the sites is stale: read them all
            try:
                site_row = await self.general.run(self.tb.sites.get_cached, site)
            except NotFound:
                return await self.general.update(req, identity)
            except Exception as exc:  # noqa: BLE001 - the general path answers; the log says why
                _log_fallback(f"updateJob {req.panda_id}", exc)
                return await self.general.update(req, identity)
        actor = identity.subject if identity else None
        # the holder rules of server/jobholder.py, as the statements' guard: an update that is
        # not the holder's matches no row and the general path refuses it with the reason
        holder = {"holder": actor if identity is not None and identity.role != "admin" else None,
                  "claim_pilot": req.claim.pilot_id, "claim_nonce": req.claim.digest}
        try:
            if req.state not in _FINAL:
                command = await self.progress(req.panda_id, req.state, req.fields, actor=actor,
                                              attempt_nr=req.attempt_nr, site=site,
                                              holder=holder, req=req)
                if command is not None:
                    return command
            elif req.state == _FINISHED:
                task_id = await self.finish(req.panda_id, req.fields, actor=actor,
                                            attempt_nr=req.attempt_nr, site=site,
                                            endpoint=output_se(site_row["config"]),
                                            stored=req.stored, holder=holder, req=req)
                if task_id is not None:
                    await self._after_finish(task_id)
                    return "NULL"
        except Exception as exc:  # noqa: BLE001 - one statement: nothing was changed; the
            _log_fallback(f"updateJob {req.panda_id}", exc)          # general path answers
        return await self.general.update(req, identity)

    async def _after_finish(self, task_id: int) -> None:
        """The task of a job the hot path just finished (committed): its status follows.
        The job's update stands whatever happens here; a task check that fails even in the
        general path (with its retries) is left to the watcher's repair of tasks whose jobs
        all ended (``watcher.Watcher.repair_tasks``)."""
        try:
            settled = await self.task_settled(task_id)
        except Exception as exc:  # noqa: BLE001 - the general path's check decides
            _log_fallback(f"task {task_id}", exc)
            settled = False
        if not settled:
            try:
                await self.general.run(self.tb.tasks.after_job_end, task_id)
            except Exception:  # noqa: BLE001 - the job is final: do not let the pilot resend
                log.warning("task %s: status not updated after a job ended (the watcher "
                            "repairs it)", task_id, exc_info=True)

    # ------------------------------------------------------------------ getJob
    def _dispatch_statement(self, shape: tuple[str, ...]):
        """(SQL, constant parameters) of the batched dispatch for one shape of pilot request
        (see ``Jobs.dispatch_params``): one statement for pilots of any number of sites.

        Each group of pilots that ask with the same parameters (a site, a share step, the
        pilots' limits) is one row of ``q``; the general path's pick (``Jobs.pick_query``)
        runs once per row (``LATERAL``), its parameters taken from the row and its LIMIT the
        number of pilots in the group. The share's array of known names (``p_known``, the
        same for every site) stays a parameter of the statement."""
        hit = self._dispatch_sql.get(shape)
        if hit is None:
            dialect = self.tb.engine.dialect
            compiled = self.tb.jobs.pick_query(
                shape, limit=bindparam("p_n", type_=Integer)).compile(dialect=dialect)
            base = {k: v for k, v in compiled.construct_params(_check=False).items()
                    if v is not None}
            cols = [name for name in shape if name != "p_known"] + ["p_n"]
            pick = compiled.string
            for name in cols:
                pick = pick.replace(f"%({name})s", f"q.{name}")
            arrays = ", ".join(
                f"%(q_{name})s::{compiled.binds[name].type.compile(dialect=dialect)}[]"
                for name in cols)
            file_cols = ", ".join(f"f.{c.name} AS f_{c.name}" for c in db.files.c)
            sent, activated = str(JobState.SENT), str(JobState.ACTIVATED)
            sql = (
                f"WITH q AS (SELECT * FROM unnest({arrays}) WITH ORDINALITY "
                f"AS q({', '.join(cols)}, k)), "
                f"pick AS (SELECT q.k, p.panda_id, p.current_priority FROM q "
                f"CROSS JOIN LATERAL ({pick}) p), "
                "ranked AS (SELECT panda_id, k, row_number() OVER (PARTITION BY k "
                "ORDER BY current_priority DESC, panda_id) AS j FROM pick), "
                "who AS (SELECT * FROM unnest(%(w_k)s::int[], %(w_j)s::int[], "
                "%(w_node)s::varchar[], %(w_pilot)s::varchar[], %(w_batch)s::varchar[], "
                "%(w_actor)s::varchar[], %(w_nonce)s::varchar[]) "
                "WITH ORDINALITY AS w(k, j, node, pilot_id, batch_id, actor, nonce, i)), "
                f"upd AS (UPDATE jobs SET status = '{sent}', modification_time = %(now)s, "
                "state_changed = %(now)s, heartbeat_time = %(now)s, node = who.node, "
                "pilot_id = who.pilot_id, batch_id = who.batch_id, pilot_owner = who.actor, "
                "pilot_nonce = who.nonce "
                "FROM ranked JOIN who ON who.k = ranked.k AND who.j = ranked.j "
                f"WHERE jobs.panda_id = ranked.panda_id AND jobs.status = '{activated}' "
                "RETURNING jobs.*, who.i AS w_i, who.actor AS w_actor), "
                "hist AS (INSERT INTO job_history (panda_id, old_status, new_status, time, "
                f"actor) SELECT panda_id, '{activated}', '{sent}', %(now)s, w_actor FROM upd) "
                f"SELECT upd.*, {file_cols} FROM upd LEFT JOIN files f "
                "ON f.panda_id = upd.panda_id ORDER BY upd.w_i, f.row_id")
            hit = self._dispatch_sql[shape] = (sql.replace("%(now)s", "%(now)s::timestamp"),
                                               base, cols)
        return hit

    async def dispatch(self, params: dict, *, node: str | None, actor: str | None,
                       pilot_id: str | None, batch_id: str | None,
                       nonce: str | None = None) -> dict | None:
        """The best fitting activated job (as ``Jobs.dispatch`` picks it), now sent to this
        pilot, with its files; None when no job fits. ``params``: ``Jobs.dispatch_params``.

        Pilots asking with parameters of the same shape while a dispatch of that shape is in
        flight are served together by the next statement, whatever their sites (group
        dispatch: one statement, one commit, for many getJobs under load; no waiting when the
        server is idle): a grid of many sites costs as few statements per getJob as one."""
        shape = tuple(sorted(params))
        return await self._dispatches.submit((shape, params.get("p_known")),
                                             (params, (node, pilot_id, batch_id, actor, nonce)))

    async def _dispatch_batch(self, key, items: list[tuple[dict, tuple]]) -> list:
        shape = key[0]
        results: list = [None] * len(items)
        # the statements of one batch (usually one) run side by side, each its own
        # transaction: they skip each other's locked rows as any two dispatches do
        await asyncio.gather(*(self._dispatch_round(shape, items, picks, results)
                               for picks in _dispatch_rounds(items)))
        return results

    async def _dispatch_round(self, shape: tuple[str, ...], items: list[tuple[dict, tuple]],
                              picks: list[list[int]], results: list) -> None:
        """One statement of a batch; its items' jobs (or errors) into ``results``."""
        try:
            got = await self._dispatch_many(shape, items, picks)
        except psycopg.Error as exc:
            alone = [i for group in picks for i in group]
            if len(items) == 1:
                raise
            if len(alone) == 1:
                results[alone[0]] = exc
                return
            # the database refused the statement (say, one pilot's node name is too long for
            # its column): one by one, so that only the bad request goes to the general path
            for i in alone:
                try:
                    results[i] = (await self._dispatch_many(shape, items, [[i]])).get(i)
                except psycopg.Error as one_exc:
                    results[i] = one_exc
            return
        for i, job in got.items():
            results[i] = job

    async def _dispatch_many(self, shape: tuple[str, ...], items: list[tuple[dict, tuple]],
                             picks: list[list[int]]) -> dict[int, dict]:
        """One statement for ``picks`` (groups of indexes of ``items`` that ask with the same
        parameters); {index of an item: the job it got}."""
        sql, base, cols = self._dispatch_statement(shape)
        args: dict[str, Any] = {**base, "now": self.tb.clock()}
        first = items[picks[0][0]][0]
        if "p_known" in first:
            args["p_known"] = list(first["p_known"])
        for name in cols:
            args[f"q_{name}"] = [len(g) if name == "p_n" else items[g[0]][0][name]
                                 for g in picks]
        order = [i for group in picks for i in group]         # who's ordinality - 1
        args["w_k"] = [k for k, group in enumerate(picks, 1) for _ in group]
        args["w_j"] = [j for group in picks for j in range(1, len(group) + 1)]
        for n, name in enumerate(("w_node", "w_pilot", "w_batch", "w_actor", "w_nonce")):
            args[name] = [items[i][1][n] for i in order]
        async with self._pool().connection() as conn:
            cur = await conn.execute(sql, args)
            rows = await cur.fetchall()
            names = self._names.get(sql)
            if names is None:
                names = self._names[sql] = [c.name for c in cur.description]
        jobs: dict[int, dict] = {}
        start = 0
        pid = names.index("panda_id")
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][pid] != rows[start][pid]:
                job = job_with_files(names, rows[start:i])
                jobs[order[job.pop("w_i") - 1]] = job
                del job["w_actor"]
                start = i
        return jobs

    # ------------------------------------------------------------------ updateJob, not final
    async def progress(self, panda_id: int, state: str, fields: dict, *, actor: str | None,
                       attempt_nr: int | None, site: str | None,
                       holder: dict | None = None, req: UpdateRequest | None = None
                       ) -> str | None:
        """A heartbeat or a progress report (starting, running, holding, transferring).
        Returns the command for the pilot, or None when the general path must decide.
        Reports that arrive together are applied by one statement (see Coalescer). ``req``:
        the request whose ``released`` to note (``UpdateRequest.note_release``)."""
        allowed = self._from_state.get(state)
        if not allowed or not fields.keys() <= _PROGRESS_COLS.keys():
            return None
        item = {"pid": panda_id, "state": state, "allowed": ",".join(allowed),
                "attempt": attempt_nr, "site": site, "actor": actor, **(holder or {}), **fields}
        return _applied(await self._progresses.submit(None, item), req)

    async def _progress_batch(self, _key, items: list[dict]) -> list[tuple | None]:
        results = await self._apply_batch(_PROGRESS_SQL, items, {})
        return [None if r is _NOT_APPLIED else (r[0] or "NULL", *r[1:]) for r in results]

    async def _apply_batch(self, sql: str, items: list[dict], extra: dict) -> list:
        """Run a batched statement (rows ``(i, values...)`` back) over ``items``; per item the
        list of its row's values, or ``_NOT_APPLIED`` when the statement did not apply to it.
        When the database refuses a batch (say, a number out of a column's range in one
        report), its items are tried one by one, so one bad report sends only itself to the
        general path."""
        results: list = [_NOT_APPLIED] * len(items)
        async with self._pool().connection() as conn:
            pending = _unique_pid_groups(items)
            while pending:
                group = pending.pop(0)
                rows = [{**items[i], "i": i} for i in group]
                try:
                    cur = await conn.execute(sql, {"items": json.dumps(rows),
                                                   "now": self.tb.clock(), **extra})
                except psycopg.Error as exc:
                    if conn.broken or conn.closed:
                        raise
                    if len(group) > 1:
                        pending[:0] = [[i] for i in group]
                    else:
                        log.info("job %s: the database refused the hot path's statement (%s); "
                                 "the general path answers", items[group[0]]["pid"], exc)
                    continue
                for i, *values in await cur.fetchall():
                    results[i] = values
        return results

    # ------------------------------------------------------------------ updateJob finished
    async def finish(self, panda_id: int, fields: dict, *, actor: str | None,
                     attempt_nr: int | None, site: str, endpoint: OutputSE | str | None,
                     stored: dict[str, dict], holder: dict | None = None,
                     req: UpdateRequest | None = None) -> int | None:
        """A job finished with every expected output stored: register the outputs (file rows,
        replicas at ``endpoint``, dataset entries) and end the job via ``holding``, both steps
        in its history. Returns its task's id, or None when the general path must decide.
        Jobs that finish together are ended by one statement (see Coalescer). ``req``: as
        for :meth:`progress`."""
        if not fields.keys() <= _PROGRESS_COLS.keys():
            return None
        if not isinstance(endpoint, OutputSE):            # a storage element's name alone
            endpoint = OutputSE(endpoint, None)
        files = [{"lfn": lfn, "guid": info.get("guid") or None, "fsize": info.get("fsize"),
                  "checksum": stored_checksum(info), "surl": info.get("surl")}
                 for lfn, info in stored.items()]
        item = {"pid": panda_id, "site": site, "attempt": attempt_nr, "actor": actor,
                "endpoint": endpoint.name, "se_url": endpoint.url, "stored": files,
                **(holder or {}), **fields}
        return _applied(await self._finishes.submit(None, item), req)

    async def _finish_batch(self, _key, items: list[dict]) -> list[tuple | None]:
        results = await self._apply_batch(_FINISH_SQL, items, {"from": self._finish_from})
        return [None if r is _NOT_APPLIED else tuple(r) for r in results]

    async def task_settled(self, task_id: int) -> bool:
        """After a job ended: is its task running with live jobs left (nothing to update)?

        The answer comes from a read that started after the caller's job committed, so that
        the last job to end sees every other one ended. Callers that ask about the same task
        while such a read is in flight share the next one (under load a 10,000-job task gets a
        few reads a second instead of one per job)."""
        return await self._task_checks.submit(task_id, None)

    async def _task_check_batch(self, task_id: int, items: list) -> list[bool]:
        sql, base = self._task_settled
        async with self._pool().connection() as conn:
            cur = await conn.execute(sql, {**base, "tid": task_id})
            row = await cur.fetchone()
        settled = row is not None and row[0] in KEPT_WHILE_LIVE and bool(row[1])
        return [settled] * len(items)


def _report_types() -> dict[str, str]:
    """The columns a pilot's report may set, with their PostgreSQL types (from ``db.jobs``):
    the record type of the reports' JSON."""
    from sqlalchemy.dialects import postgresql
    dialect = postgresql.dialect()
    return {c: db.jobs.c[c].type.compile(dialect=dialect) for c in REPORT_COLUMNS}


_PROGRESS_COLS = _report_types()


#: the report rows' columns that say who sends them, and the guard that is
#: ``server.jobholder.refusal`` in SQL (``r.node``: the node the update names)
_HOLDER_COLS = "holder varchar, claim_pilot varchar, claim_nonce varchar, "
_HOLDER_GUARD = (
    "(jobs.pilot_nonce IS NULL OR jobs.pilot_nonce = r.claim_nonce) "
    "AND (r.holder IS NULL OR jobs.pilot_owner IS NULL OR jobs.pilot_owner = r.holder) "
    "AND (jobs.pilot_nonce IS NOT NULL OR ((jobs.pilot_id IS NULL OR r.claim_pilot IS NULL "
    "OR jobs.pilot_id = r.claim_pilot) AND (jobs.node IS NULL OR r.node IS NULL "
    "OR jobs.node = r.node)))")


#: ``panda_core.replicas.replica_url(r.se_url, scope, lfn)`` in SQL, for the simple scopes
#: (a scope with an empty dotted part differs and so goes to the general path, which is exact)
_EXPECTED_SURL = (
    "CASE WHEN r.se_url IS NULL OR r.se_url = '' THEN NULL ELSE rtrim(r.se_url, '/') || '/' || "
    "replace(f.scope, '.', '/') || '/' || substr(md5(f.scope || ':' || f.lfn), 1, 2) || '/' || "
    "substr(md5(f.scope || ':' || f.lfn), 3, 2) || '/' || f.lfn END")


def _progress_sql() -> str:
    """Progress reports of several jobs in one statement: each row is guarded by its job's
    state (the legal predecessors of the reported one), attempt and site; a report that does
    not match changes nothing and gets no row back. Rows are locked in PandaID order, so two
    such statements never wait for each other in a circle."""
    cols = ", ".join(f"{c} {t}" for c, t in _PROGRESS_COLS.items())
    sets = ", ".join(f"{c} = COALESCE(r.{c}, jobs.{c})" for c in _PROGRESS_COLS)
    running, now = str(JobState.RUNNING), "%(now)s::timestamp"
    kept = ", ".join(f"'{s}'" for s in NOT_MADE_RUNNING)
    return (
        "WITH r AS (SELECT * FROM json_to_recordset(%(items)s::json) AS r(i int, pid bigint, "
        f"state varchar, allowed text, attempt int, site varchar, actor varchar, {_HOLDER_COLS}"
        f"{cols})), "
        "cur AS (SELECT jobs.panda_id, jobs.status, r.i FROM jobs JOIN r ON jobs.panda_id = r.pid "
        "WHERE jobs.status = ANY(string_to_array(r.allowed, ',')) "
        "AND (r.attempt IS NULL OR jobs.attempt_nr = r.attempt) "
        "AND (r.site IS NULL OR jobs.site = r.site) "
        f"AND {_HOLDER_GUARD} "
        "ORDER BY jobs.panda_id FOR UPDATE OF jobs), "
        f"upd AS (UPDATE jobs SET status = r.state, modification_time = {now}, "
        f"heartbeat_time = {now}, state_changed = CASE WHEN cur.status = r.state "
        f"THEN jobs.state_changed ELSE {now} END, start_time = CASE WHEN r.state = "
        f"'{running}' AND cur.status IN ('sent', 'starting') THEN {now} "
        f"ELSE jobs.start_time END, {sets} "
        "FROM cur JOIN r ON r.i = cur.i WHERE jobs.panda_id = cur.panda_id "
        "RETURNING jobs.panda_id, cur.status AS old_status, r.state, r.actor, r.i, "
        "jobs.command, jobs.task_id, jobs.share, jobs.cores), "
        "hist AS (INSERT INTO job_history (panda_id, old_status, new_status, time, actor) "
        f"SELECT panda_id, old_status, state, {now}, actor FROM upd "
        "WHERE old_status <> state), "
        # the first job that runs marks its task running (usually matches nothing)
        f"task AS (UPDATE tasks SET status = '{TaskState.RUNNING}', modified = {now} "
        f"WHERE task_id IN (SELECT task_id FROM upd WHERE state = '{running}' "
        f"AND old_status <> '{running}') AND status NOT IN ({kept})) "
        "SELECT i, command, old_status, share, cores FROM upd")


_PROGRESS_SQL = _progress_sql()


_NOT_APPLIED = object()     # a batched statement returned no row for this item


def _applied(result: tuple | None, req: UpdateRequest | None) -> Any:
    """A hot update's answer (the command, or the task's id) from its statement's row
    ``(answer, old status, share, cores)``, noting the job's release of its cores in ``req``
    (the statement matched the request's attempt, or it would have returned no row)."""
    if result is None:
        return None
    answer, old_status, share, cores = result
    if req is not None:
        req.note_release(old_status, req.attempt_nr, share, cores)
    return answer


def _dispatch_rounds(items: list[tuple[dict, tuple]]) -> list[list[list[int]]]:
    """The dispatch statements for a batch of getJobs (``(params, who)`` each): per statement,
    its picks (indexes of the items asking with the same parameters). Two picks of one
    statement never ask at the same site and share: a statement does not skip the rows it
    locked itself, so two such picks would pick the same jobs (and one group of pilots would
    be left without); pilots with other limits at the same site (say, another remaining
    walltime) go to another statement, run beside the first in its own transaction. Usually
    one statement."""
    picks: dict[tuple, list[int]] = {}
    for i, (params, _) in enumerate(items):
        picks.setdefault(tuple(sorted(params.items())), []).append(i)
    return _first_fit(list(picks.values()),
                      lambda group: (items[group[0]][0]["p_site"],
                                     items[group[0]][0].get("p_share")))


def _first_fit(entries: list, key) -> list[list]:
    """``entries`` in groups, in order, each entry in the first group that holds no entry of
    the same ``key(entry)``; usually one group."""
    groups: list[list] = []
    keys: list[set] = []
    for entry in entries:
        k = key(entry)
        for group, seen in zip(groups, keys):
            if k not in seen:
                break
        else:
            groups.append([])
            keys.append(set())
            group, seen = groups[-1], keys[-1]
        group.append(entry)
        seen.add(k)
    return groups


def _unique_pid_groups(items: list[dict]) -> list[list[int]]:
    """Indexes of ``items`` in groups without a PandaID twice (a job twice in one statement
    would be updated once); usually one group."""
    return _first_fit(list(range(len(items))), lambda i: items[i]["pid"])


def _finish_sql() -> str:
    """Finished jobs with their stored outputs in one statement. Per job: guarded by its state
    (a legal predecessor of holding -> finished), attempt and site; applied only if every
    expected output is among the stored files (else the general path fails the job). The
    output and log files get their size, checksum, GUID and endpoint; replicas and dataset
    entries are added (duplicates ignored); the job ends via holding, both steps recorded."""
    cols = ", ".join(f"{c} {t}" for c, t in _PROGRESS_COLS.items())
    sets = "".join(f", {c} = COALESCE(r.{c}, jobs.{c})" for c in _PROGRESS_COLS)
    now = "%(now)s::timestamp"
    return (
        "WITH r AS (SELECT * FROM json_to_recordset(%(items)s::json) AS r(i int, pid bigint, "
        f"site varchar, attempt int, actor varchar, endpoint varchar, se_url varchar, "
        f"stored json, {_HOLDER_COLS}{cols})), "
        "j AS (SELECT jobs.panda_id, jobs.status, r.i FROM jobs JOIN r ON jobs.panda_id = r.pid "
        "WHERE jobs.status = ANY(%(from)s) AND jobs.site = r.site "
        "AND (r.attempt IS NULL OR jobs.attempt_nr = r.attempt) "
        f"AND {_HOLDER_GUARD} "
        "AND jobs.destination_se IS NULL "      # aggregated outputs: the general path
        "ORDER BY jobs.panda_id FOR UPDATE OF jobs), "
        f"outs AS (SELECT f.row_id, f.type, f.scope, f.lfn, f.dataset, f.guid, j.i, {_EXPECTED_SURL}"
        " AS exp FROM files f JOIN j ON f.panda_id = j.panda_id JOIN r ON r.i = j.i "
        "WHERE f.type IN ('output', 'log')), "
        "stored AS (SELECT r.i, s.* FROM r CROSS JOIN LATERAL json_to_recordset(r.stored) "
        "AS s(lfn text, guid text, fsize bigint, checksum text, surl text)), "
        "ok AS (SELECT j.panda_id, j.status, j.i FROM j WHERE NOT EXISTS (SELECT 1 FROM outs "
        "WHERE outs.i = j.i AND outs.type = 'output' AND NOT EXISTS (SELECT 1 FROM stored "
        "WHERE stored.i = outs.i AND stored.lfn = outs.lfn)) "
        # an output already in the catalogue (compared by the general path)
        "AND NOT EXISTS (SELECT 1 FROM outs JOIN dataset_files d ON d.scope = outs.scope "
        "AND d.lfn = outs.lfn WHERE outs.i = j.i AND outs.type = 'output') "
        # a file stored elsewhere than where the server puts it: the general path fails the job
        "AND NOT EXISTS (SELECT 1 FROM outs JOIN stored ON stored.i = outs.i "
        "AND stored.lfn = outs.lfn WHERE outs.i = j.i AND stored.surl IS NOT NULL "
        "AND outs.exp IS DISTINCT FROM stored.surl AND outs.exp IS NOT NULL)), "
        "matched AS (SELECT o.row_id, o.type, o.scope, o.lfn, o.dataset, "
        "COALESCE(s.guid, o.guid) AS guid, s.fsize, s.checksum, COALESCE(o.exp, s.surl) AS surl, "
        "r.endpoint "
        "FROM ok JOIN outs o ON o.i = ok.i JOIN stored s ON s.i = o.i AND s.lfn = o.lfn "
        "JOIN r ON r.i = ok.i), "
        "uf AS (UPDATE files SET status = 'ready', fsize = m.fsize, checksum = m.checksum, "
        "guid = m.guid, ddm_endpoint = m.endpoint FROM matched m WHERE files.row_id = m.row_id), "
        "rep AS (INSERT INTO replicas (scope, lfn, ddm_endpoint, surl, created) "
        f"SELECT scope, lfn, endpoint, surl, {now} FROM matched WHERE endpoint IS NOT NULL "
        "ON CONFLICT DO NOTHING), "
        "ds AS (INSERT INTO dataset_files (dataset, scope, lfn, guid, fsize, checksum, task_id, "
        f"created) SELECT dataset, scope, lfn, guid, fsize, checksum, NULL, {now} "
        "FROM matched WHERE type = 'output' ON CONFLICT DO NOTHING), "
        f"upd AS (UPDATE jobs SET status = '{_FINISHED}', modification_time = {now}, "
        f"state_changed = {now}, heartbeat_time = {now}, end_time = {now}, command = NULL"
        + sets
        + " FROM ok JOIN r ON r.i = ok.i WHERE jobs.panda_id = ok.panda_id "
        "RETURNING jobs.panda_id, ok.status AS old_status, jobs.task_id, r.i, r.actor, "
        "jobs.share, jobs.cores), "
        "hist AS (INSERT INTO job_history (panda_id, old_status, new_status, time, actor) "
        f"SELECT panda_id, old_status, '{_HOLDING}', {now}, actor FROM upd "
        f"WHERE old_status <> '{_HOLDING}' UNION ALL "
        f"SELECT panda_id, '{_HOLDING}', '{_FINISHED}', {now}, actor FROM upd) "
        "SELECT i, task_id, old_status, share, cores FROM upd")


_FINISH_SQL = _finish_sql()
