"""The watcher: fails jobs whose pilot went silent or that are stuck, and creates their retries.

PanDA's server does this in its periodic watchers; here it is a plain module over the task
buffer, so tests drive it with a controllable clock, and each server process runs it from a
Tornado ``PeriodicCallback`` in its thread pool (``start_periodic``). Several processes may run it
at once: every candidate is re-checked and failed in its own transaction, with the row locked
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL/MariaDB, one writer on SQLite) and the state change
guarded by ``WHERE status = <seen>``, so a job is failed, and retried, exactly once.

It also settles tasks whose jobs all ended but whose status did not follow (``repair_tasks``:
the window between a job's final update and its task's, a server killed or a database lost in
it).

Codes are PanDA's ``jobDispatcherErrorCode``: 100 lost heartbeat, 101 recovery failed (a job a
later pilot took over from a dead one, left in holding), 102 sent but the pilot never reported,
103 holding timeout, 104 transferring timeout, 105 a job that went on running far beyond its
wall time although its pilot still beats (the pilot should have killed it).
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exists, func, or_, select

from panda_core.states import JobState, TaskState

from . import db
from .metrics import WATCHER_ACTIONS
from .taskbuffer import TaskBuffer
from .taskbuffer.tasks import LIVE_STATES
from .transient import describe, is_transient

log = logging.getLogger(__name__)

EC_LOST_HEARTBEAT = 100
EC_RECOVERY = 101
EC_SENT_TIMEOUT = 102
EC_HOLDING_TIMEOUT = 103
EC_TRANSFERRING_TIMEOUT = 104
EC_TIMEOUT = 105
#: the pilot's code for a job a later pilot recovered (panda_core.errorcodes.RECOVERED_LOST)
RECOVERED_LOST = 1504

ACTOR = "watcher"
#: task states a task leaves once its jobs have all ended
_UNSETTLED = (str(TaskState.REGISTERED), str(TaskState.READY), str(TaskState.RUNNING),
              str(TaskState.PAUSED), str(TaskState.FINISHING))


@dataclass
class WatcherLimits:
    """Seconds of silence after which a job in each state is given up."""
    heartbeat_s: float = 6 * 3600       # starting/running: pilots beat every 30 min
    sent_s: float = 3600                # sent: the pilot never said starting/running
    holding_s: float = 6 * 3600         # holding: outputs never registered
    transferring_s: float = 12 * 3600   # transferring: outputs never arrived
    overrun_factor: float = 0.0         # running longer than factor x its wall time + grace:
    overrun_grace_s: float = 3600       # 105 (0: never; `panda server` sets 2)


@dataclass
class Rule:
    states: tuple[str, ...]
    limit_s: float
    code: int
    what: str


@dataclass
class WatcherReport:
    failed: dict[int, int] = field(default_factory=dict)    # panda_id -> dispatcher error code
    retries: dict[int, int] = field(default_factory=dict)   # failed panda_id -> retry panda_id
    repaired: list[int] = field(default_factory=list)       # tasks settled by repair_tasks


class Watcher:
    """One pass (``check``) finds the overdue jobs and fails each with its code."""

    def __init__(self, tb: TaskBuffer, limits: WatcherLimits | None = None, batch: int = 500):
        self.tb = tb
        self.limits = limits or WatcherLimits()
        self.batch = batch
        self.last_code = 0              # the code the last _fail used (101 may replace 103)

    def rules(self) -> list[Rule]:
        lim = self.limits
        return [
            Rule((str(JobState.STARTING), str(JobState.RUNNING)), lim.heartbeat_s,
                 EC_LOST_HEARTBEAT, "lost heartbeat"),
            Rule((str(JobState.SENT),), lim.sent_s, EC_SENT_TIMEOUT,
                 "sent to a pilot that never reported"),
            Rule((str(JobState.HOLDING),), lim.holding_s, EC_HOLDING_TIMEOUT, "holding timeout"),
            Rule((str(JobState.TRANSFERRING),), lim.transferring_s, EC_TRANSFERRING_TIMEOUT,
                 "transferring timeout"),
        ]

    def check(self) -> WatcherReport:
        report = WatcherReport()
        now = self.tb.clock()
        for rule in self.rules():
            if rule.limit_s <= 0:
                continue
            cutoff = now - dt.timedelta(seconds=rule.limit_s)
            for panda_id, status in self._overdue(rule.states, cutoff):
                retry = self._fail(panda_id, status, cutoff, rule, now)
                if retry is not False:
                    report.failed[panda_id] = self.last_code
                    if retry is not None:
                        report.retries[panda_id] = retry
        if self.limits.overrun_factor > 0:
            rule = Rule((str(JobState.RUNNING),), 0, EC_TIMEOUT, "wall time overrun")
            for panda_id, walltime_s, started in self._overrun(now):
                retry = self._fail(panda_id, str(JobState.RUNNING), now, rule, now,
                                   overrun=(walltime_s, started))
                if retry is not False:
                    report.failed[panda_id] = EC_TIMEOUT
                    if retry is not None:
                        report.retries[panda_id] = retry
        for panda_id, code in report.failed.items():
            WATCHER_ACTIONS.labels("failed", str(code)).inc()
            if panda_id in report.retries:
                WATCHER_ACTIONS.labels("retried", str(code)).inc()
        if report.failed:
            log.info("watcher failed %d job(s): %s", len(report.failed), report.failed)
        report.repaired = self.repair_tasks()
        return report

    def repair_tasks(self) -> list[int]:
        """Settle tasks whose jobs all ended but whose status did not follow: the server died
        (kill -9) or lost its database between a job's final update and its task's update.
        Returns the tasks whose status changed. Each is re-checked with the task row locked
        (``Tasks.refresh_status``), so a normal update at the same time changes nothing."""
        t, j, a = db.tasks.c, db.jobs.c, db.jobs_archive.c
        live = exists().where(j.task_id == t.task_id, j.status.in_(LIVE_STATES))
        any_job = or_(exists().where(j.task_id == t.task_id),
                      exists().where(a.task_id == t.task_id))
        q = (select(t.task_id, t.status).where(t.status.in_(_UNSETTLED), ~live, any_job)
             .order_by(t.task_id).limit(self.batch))
        with db.read(self.tb.engine) as conn:
            stuck = conn.execute(q).all()
        repaired = []
        for task_id, before in stuck:
            with self.tb.engine.begin() as conn:
                self.tb.tasks.refresh_status(conn, task_id)
            after = self.tb.tasks.get(task_id)["status"]
            if after != before:
                repaired.append(task_id)
                WATCHER_ACTIONS.labels("task_repaired", "0").inc()
                log.warning("task %s: every job had ended but the task stayed %s; now %s",
                            task_id, before, after)
        return repaired

    @staticmethod
    def _last_sign(j):
        """When the pilot last gave a sign of life (dispatch sets heartbeat_time too)."""
        return func.coalesce(j.heartbeat_time, j.state_changed)

    def _overdue(self, states: Iterable[str], cutoff: dt.datetime) -> list[tuple[int, str]]:
        j = db.jobs.c
        q = (select(j.panda_id, j.status).where(j.status.in_(list(states)),
                                                 self._last_sign(j) < cutoff)
             .order_by(j.panda_id).limit(self.batch))
        with db.read(self.tb.engine) as conn:
            return [(r.panda_id, r.status) for r in conn.execute(q)]

    def _overrun(self, now: dt.datetime) -> list[tuple[int, int, dt.datetime]]:
        """Running jobs past ``overrun_factor`` x their wall time + the grace (PanDA's 105)."""
        j = db.jobs.c
        lim = self.limits
        # the longest wall time any job may have bounds the scan: cheap, index on status
        q = (select(j.panda_id, j.walltime_s, j.start_time)
             .where(j.status == str(JobState.RUNNING), j.start_time.is_not(None),
                    j.walltime_s > 0,
                    j.start_time < now - dt.timedelta(seconds=lim.overrun_grace_s))
             .order_by(j.start_time).limit(self.batch))
        with db.read(self.tb.engine) as conn:
            rows = conn.execute(q).all()
        return [(r.panda_id, r.walltime_s, r.start_time) for r in rows
                if (now - r.start_time).total_seconds()
                > lim.overrun_factor * r.walltime_s + lim.overrun_grace_s]

    def _fail(self, panda_id: int, status: str, cutoff: dt.datetime, rule: Rule,
              now: dt.datetime, overrun: tuple[int, dt.datetime] | None = None
              ) -> int | None | bool:
        """Fail one job if it is still overdue; returns its retry's id, None, or False if
        another watcher (or a late heartbeat) got there first."""
        j = db.jobs.c
        with self.tb.engine.begin() as conn:
            q = select(j.panda_id, j.heartbeat_time, j.state_changed, j.pilot_error_code).where(
                j.panda_id == panda_id, j.status == status)
            if overrun is None:
                q = q.where(self._last_sign(j) < cutoff)
            else:
                q = q.where(j.start_time == overrun[1])
            if self.tb.skip_locked:
                q = q.with_for_update(skip_locked=True)
            row = conn.execute(q).first()
            if row is None:
                return False
            code = rule.code
            if overrun is not None:
                ran = int((now - overrun[1]).total_seconds())
                diag = (f"{rule.what}: running for {ran} s, its wall time is {overrun[0]} s "
                        f"(limit {self.limits.overrun_factor:g} x + "
                        f"{int(self.limits.overrun_grace_s)} s); the pilot did not stop it")
            else:
                last = row.heartbeat_time or row.state_changed
                silent = int((now - last).total_seconds())
                what = rule.what
                if code == EC_HOLDING_TIMEOUT and row.pilot_error_code == RECOVERED_LOST:
                    code, what = EC_RECOVERY, "recovery failed"
                diag = (f"{what}: no word from the pilot for {silent} s in state {status} "
                        f"(limit {int(rule.limit_s)} s)")
            before = _max_id(conn)
            ok = self.tb.jobs.fail(conn, panda_id, [status], actor=ACTOR,
                                  dispatcher_error_code=code,
                                  dispatcher_error_diag=diag, command="tobekilled")
            if not ok:
                return False
            retry = conn.execute(select(j.panda_id).where(j.parent_id == panda_id,
                                                          j.panda_id > before)).scalar()
        log.warning("job %s: %s", panda_id, diag, extra={"panda_id": panda_id})
        self.last_code = code
        return retry


def _max_id(conn) -> int:
    return conn.execute(select(func.coalesce(func.max(db.jobs.c.panda_id), 0))).scalar_one()


# ---------------------------------------------------------------------- inside the server
def start_periodic(executor, interval_s: float, tasks: list[tuple[str, Callable[[], Any]]]):
    """Run ``tasks`` (name, blocking callable) every ``interval_s`` in ``executor``.

    A pass never overlaps the previous one in this process; other processes may run theirs at
    the same time, which the guarded updates make safe. Returns the started PeriodicCallback.
    """
    from tornado.ioloop import IOLoop, PeriodicCallback

    busy = False

    async def tick() -> None:
        nonlocal busy
        if busy:
            return
        busy = True
        try:
            for name, task in tasks:
                try:
                    await IOLoop.current().run_in_executor(executor, task)
                except Exception as exc:  # noqa: BLE001 - one failing task must not stop
                    if is_transient(exc):     # the others; the next pass tries again
                        log.warning("periodic task %s: %s; next pass tries again", name,
                                    describe(exc))
                    else:
                        log.exception("periodic task %s failed", name)
        finally:
            busy = False

    pc = PeriodicCallback(tick, interval_s * 1000.0, jitter=0.1)
    pc.start()
    log.info("periodic tasks every %.1f s: %s", interval_s, ", ".join(n for n, _ in tasks))
    return pc


def server_tasks(state, limits: WatcherLimits, data_mover: str | None = "local",
                 data_options: dict | None = None, first_process: bool = True,
                 transfer_timeout_s: float = 600.0, transfer_give_up_s: float = 12 * 3600.0,
                 health=None) -> list[tuple[str, Callable[[], Any]]]:
    """The periodic work of a server process: the watcher, the data service, priorities.

    All of it is safe to run in every process; the data service and the priority recompute
    run only in the first process of a host (``first_process``) because N processes would copy
    the same files N times at once and recompute the same priorities for nothing.
    """
    from .dataservice import DataService
    from .datamovers import load_movers
    from .shares import PriorityCursor, recompute_priorities

    watcher = Watcher(state.tb, limits)
    from .eventranges import EventRangeService

    tasks: list[tuple[str, Callable[[], Any]]] = [
        ("watcher", watcher.check),
        # event-service ranges of ended or silent consumers back to their pool
        ("eventranges", EventRangeService(state.tb).reclaim_expired),
        # the job counters' deltas folded even when no getJob refreshes the share snapshot
        # (an idle dispatcher), so that reading them stays the size of the counter table
        ("counters", state.tb.counts.fold)]
    if data_mover and first_process:
        service = DataService(state.tb, load_movers(data_mover, data_options),
                              timeout_s=transfer_timeout_s, give_up_s=transfer_give_up_s)
        tasks.append(("dataservice", service.process))
    if state.hook is not None and first_process:
        from .brokerage import Brokerage
        from .failurepolicy import Rebrokerage, SiteHealth
        from .submission import TaskSubmitter
        brokerage = Brokerage(state.hook)
        tasks.append(("rebrokerage", Rebrokerage(state.tb, brokerage).process))
        tasks.append(("sitehealth", SiteHealth(state.tb, TaskSubmitter(state.tb, brokerage),
                                               health).check))
        cursor = PriorityCursor()       # each pass goes on where the last one stopped
        tasks.append(("priorities", lambda: recompute_priorities(state.tb, state.hook,
                                                                 cursor=cursor)))
    return tasks
