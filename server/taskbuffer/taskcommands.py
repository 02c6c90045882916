"""What a task's owner (or an admin) may tell a running task besides retry: pause, resume,
finish, kill and more attempts (PanDA's pauseTask, resumeTask, finishTask, killTask,
increase_attempts; docs/states.md).

Each command is one transaction that locks the task's row first, checks its status, moves the
task's jobs with set-based statements (``JobStates.change_task_jobs``: three statements
whatever their number) and sets the task's status. A paused task's queued jobs are
``throttled``: the dispatch reads activated jobs only, so it never sees them and pays nothing
per getJob; a job of the task that would be activated later (a retry, a brokered or staged
one) is throttled instead by the state machine. Resume activates them again. A kill moves
the jobs in bounded batches, one transaction each, so a task of 100,000 jobs neither takes
100,000 transactions nor holds 100,000 row locks while its pilots report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, update

from panda_core.states import (FINAL_TASK_STATES, LIVE_JOB_STATES, PILOT_OWNED_STATES, JobState,
                               TaskState)

from .. import db
from ..transient import retrying
from .base import Conflict, NotFound, Store
from .jobs import Jobs, kill_values
from .states import JobStates
from .tasks import Tasks

log = logging.getLogger(__name__)

_FINAL_TASK = frozenset(str(s) for s in FINAL_TASK_STATES)
#: jobs no pilot holds yet: a finish cancels them at once
_QUEUED = (str(JobState.DEFINED), str(JobState.ASSIGNED), str(JobState.ACTIVATED),
           str(JobState.THROTTLED))
#: jobs a pilot holds whose payload has not started (PanDA's "queued" includes them): a soft
#: finish kills them too, the running ones (running, holding, transferring) it lets end
_NOT_RUNNING_YET = (str(JobState.SENT), str(JobState.STARTING))
_PILOT_OWNED = tuple(sorted(str(s) for s in PILOT_OWNED_STATES))
#: the live jobs no pilot holds: a kill cancels them without a word to a pilot
_NO_PILOT = tuple(s for s in LIVE_JOB_STATES if s not in _PILOT_OWNED)
#: jobs of each state group a kill moves per transaction (each group one set-based statement)
KILL_BATCH = 1000
#: the task states a pause is accepted in (PanDA refuses ended and paused tasks; a finishing
#: task has nothing queued left to hold)
_PAUSABLE = (str(TaskState.REGISTERED), str(TaskState.READY), str(TaskState.RUNNING))
#: the task states more attempts are given in (PanDA: running, scouting, ready, or paused from
#: one of them)
_MORE_ATTEMPTS = (str(TaskState.READY), str(TaskState.RUNNING), str(TaskState.PAUSED))


@dataclass(frozen=True)
class CommandResult:
    """What a command did: the task's status after it, and how many of its jobs it moved."""
    task_id: int
    status: str
    jobs: int


class TaskCommands:
    def __init__(self, store: Store, states: JobStates, tasks: Tasks, jobs: Jobs):
        self.store = store
        self.states = states
        self.tasks = tasks
        self.jobs = jobs

    def _lock(self, conn, task_id: int) -> str:
        """The task's status, its row locked until the command's transaction ends."""
        q = select(db.tasks.c.status).where(db.tasks.c.task_id == task_id)
        if self.store.skip_locked:
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"no task {task_id}")
        return row.status

    def _status(self, conn, task_id: int) -> str:
        return conn.execute(select(db.tasks.c.status).where(db.tasks.c.task_id == task_id)
                            ).scalar_one()

    def pause(self, task_id: int, actor: str) -> CommandResult:
        """Hold a task's queued jobs back from dispatch (``activated`` -> ``throttled``); its
        running jobs go on. Conflict unless the task is registered, ready or running."""
        with self.store.engine.begin() as conn:
            status = self._lock(conn, task_id)
            if status not in _PAUSABLE:
                raise Conflict(f"task {task_id} is {status}: only a task that is registered, "
                               "ready or running can be paused")
            held = self.states.change_task_jobs(conn, task_id, [str(JobState.ACTIVATED)],
                                                str(JobState.THROTTLED), actor=actor)
            self.tasks.set_status(conn, task_id, str(TaskState.PAUSED),
                                  error_dialog=f"paused by {actor}")
        log.info("task %s paused by %s: %d queued job(s) throttled", task_id, actor, held)
        return CommandResult(task_id, str(TaskState.PAUSED), held)

    def resume(self, task_id: int, actor: str) -> CommandResult:
        """Make a paused task's throttled jobs dispatchable again; the task is then running
        (ready if no job of it ever started, ended if none is left). Conflict unless paused."""
        with self.store.engine.begin() as conn:
            status = self._lock(conn, task_id)
            if status != str(TaskState.PAUSED):
                raise Conflict(f"task {task_id} is {status}: only a paused task can be resumed")
            freed = self.states.change_task_jobs(conn, task_id, [str(JobState.THROTTLED)],
                                                 str(JobState.ACTIVATED), actor=actor)
            self.tasks.set_status(conn, task_id, str(TaskState.READY),
                                  error_dialog=f"resumed by {actor}")
            self.tasks.refresh_status(conn, task_id)
            status = self._status(conn, task_id)
        log.info("task %s resumed by %s: %d job(s) activated again, task %s", task_id, actor,
                 freed, status)
        return CommandResult(task_id, status, freed)

    def finish(self, task_id: int, actor: str, soft: bool = False) -> CommandResult:
        """End a task without more jobs, as PanDA's finishTask: the jobs whose payload has not
        started are cancelled (those a pilot holds get ``tobekilled``); ``soft`` lets the
        running ones end, else they are killed too. The task is ``finishing`` until its last
        job ends, then done, finished or failed by what ran; a failed job gets no retry.
        Conflict when the task has ended already."""
        how = "soft finish" if soft else "finish"
        with self.store.engine.begin() as conn:
            status = self._lock(conn, task_id)
            if status in _FINAL_TASK:
                raise Conflict(f"task {task_id} is {status}: it has ended already")
            now = self.store.clock()
            why = f"task {task_id} finished"
            killed = self.states.change_task_jobs(
                conn, task_id, _QUEUED, str(JobState.CANCELLED), actor=actor,
                **kill_values(now, actor, False, why))
            killed += self.states.change_task_jobs(
                conn, task_id, _NOT_RUNNING_YET if soft else _PILOT_OWNED,
                str(JobState.CANCELLED), actor=actor, **kill_values(now, actor, True, why))
            self.tasks.set_status(conn, task_id, str(TaskState.FINISHING),
                                  error_dialog=f"{how} by {actor}")
            self.tasks.refresh_status(conn, task_id)
            status = self._status(conn, task_id)
        log.info("task %s: %s by %s: %d job(s) cancelled, task %s", task_id, how, actor, killed,
                 status)
        return CommandResult(task_id, status, killed)

    def kill(self, task_id: int, actor: str, batch: int = KILL_BATCH) -> CommandResult:
        """Kill a task, as PanDA's killTask: every live job cancelled (those a pilot holds get
        ``tobekilled`` in their pilot's next heartbeat reply), the task ``aborted``; accepted in
        any status (a second kill cancels what is left, usually nothing). ``jobs``: how many
        this call cancelled.

        Batches of at most ``batch`` jobs per state group, each transaction with the task's
        row locked and the task set ``aborted`` first: from the first batch on a job that
        fails gets no retry, a job that starts does not make the task run again. The last
        transaction finds nothing live and leaves the task aborted. A pilot's update racing a
        batch either lands first (its job is then not in a live state any more, or still is,
        and is killed from there) or waits for the batch and finds its job cancelled: the
        status guards count each job once."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        killed = batches = 0
        while True:
            moved = retrying(self._kill_batch, task_id, actor, batch)
            killed += moved
            batches += 1
            if not moved:
                break
        log.info("task %s killed by %s: %d job(s) cancelled in %d transaction(s)", task_id,
                 actor, killed, batches)
        return CommandResult(task_id, str(TaskState.ABORTED), killed)

    def _kill_batch(self, task_id: int, actor: str, batch: int) -> int:
        """One transaction of a kill; how many jobs it cancelled. It locks the task's row, then
        jobs' rows, where a pilot's first ``running`` locks its job's row, then the task's: a
        deadlock victim, rolled back whole, is run again by the caller (``retrying``)."""
        with self.store.engine.begin() as conn:
            self._lock(conn, task_id)
            self.tasks.set_status(conn, task_id, str(TaskState.ABORTED),
                                  error_dialog=f"killed by {actor}")
            now = self.store.clock()
            moved = self.states.change_task_jobs(
                conn, task_id, _NO_PILOT, str(JobState.CANCELLED), actor=actor, limit=batch,
                **kill_values(now, actor, False))
            return moved + self.states.change_task_jobs(
                conn, task_id, _PILOT_OWNED, str(JobState.CANCELLED), actor=actor, limit=batch,
                **kill_values(now, actor, True))

    def increase_attempts(self, task_id: int, actor: str, increase: int) -> CommandResult:
        """PanDA's increase_attempts: the task's live jobs (and its future ones) may fail
        ``increase`` more times, and each job whose last attempt failed with its attempts used
        up gets a new attempt now, with ``increase`` attempts from there (``jobs``: how many).
        Conflict unless the task is ready, running or paused (its new attempts then held)."""
        j = db.jobs.c
        with self.store.engine.begin() as conn:
            status = self._lock(conn, task_id)
            if status not in _MORE_ATTEMPTS:
                raise Conflict(f"task {task_id} is {status}: only a ready, running or paused "
                               "task gets more attempts")
            conn.execute(update(db.tasks).where(db.tasks.c.task_id == task_id).values(
                max_attempts=db.tasks.c.max_attempts + increase, modified=self.store.clock()))
            conn.execute(update(db.jobs).where(j.task_id == task_id,
                                               j.status.in_(LIVE_JOB_STATES))
                         .values(max_attempts=j.max_attempts + increase))
            used_up = [r["panda_id"] for r in self.jobs.latest_attempts(conn, task_id)
                       if r["status"] == str(JobState.FAILED)
                       and r["attempt_nr"] >= r["max_attempts"]]
            again = 0
            if used_up and increase:
                conn.execute(update(db.jobs).where(j.panda_id.in_(used_up))
                             .values(max_attempts=j.attempt_nr + increase))
                again = sum(self.jobs.retry(conn, pid, actor) is not None for pid in used_up)
        log.info("task %s: %d more attempt(s) by %s, %d failed job(s) again", task_id, increase,
                 actor, again)
        return CommandResult(task_id, status, again)
