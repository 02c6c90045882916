"""Job and task states, and which transitions between them are legal.

One table, imported by the server (which enforces it) and by the pilot (which names the states it
reports). See docs/states.md.
"""
from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    DEFINED = "defined"
    ASSIGNED = "assigned"
    ACTIVATED = "activated"
    THROTTLED = "throttled"  # held back from dispatch: its task is paused (PanDA's name)
    SENT = "sent"
    STARTING = "starting"
    RUNNING = "running"
    HOLDING = "holding"
    TRANSFERRING = "transferring"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CLOSED = "closed"

    def __str__(self) -> str:  # so f-strings and form encodings give the bare name
        return self.value


FINAL_JOB_STATES = frozenset({JobState.FINISHED, JobState.FAILED, JobState.CANCELLED,
                              JobState.CLOSED})
#: the states of a job not yet ended (the names)
LIVE_JOB_STATES = tuple(str(s) for s in JobState if s not in FINAL_JOB_STATES)
#: states in which a pilot owns the job and must send heartbeats
PILOT_OWNED_STATES = frozenset({JobState.SENT, JobState.STARTING, JobState.RUNNING,
                                JobState.HOLDING, JobState.TRANSFERRING})
#: what a pilot may report in updateJob
PILOT_REPORTED_STATES = frozenset({JobState.STARTING, JobState.RUNNING, JobState.HOLDING,
                                   JobState.TRANSFERRING, JobState.FINISHED, JobState.FAILED})

_J = JobState
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _J.DEFINED: frozenset({_J.ASSIGNED, _J.ACTIVATED, _J.FAILED, _J.CANCELLED}),
    _J.ASSIGNED: frozenset({_J.ACTIVATED, _J.FAILED, _J.CANCELLED}),
    _J.ACTIVATED: frozenset({_J.SENT, _J.ASSIGNED, _J.THROTTLED, _J.FAILED, _J.CANCELLED}),
    _J.THROTTLED: frozenset({_J.ACTIVATED, _J.CANCELLED}),
    _J.SENT: frozenset({_J.STARTING, _J.RUNNING, _J.HOLDING, _J.TRANSFERRING, _J.FINISHED,
                        _J.FAILED, _J.CANCELLED}),
    _J.STARTING: frozenset({_J.RUNNING, _J.HOLDING, _J.TRANSFERRING, _J.FINISHED, _J.FAILED,
                            _J.CANCELLED}),
    _J.RUNNING: frozenset({_J.HOLDING, _J.TRANSFERRING, _J.FINISHED, _J.FAILED, _J.CANCELLED}),
    _J.HOLDING: frozenset({_J.TRANSFERRING, _J.FINISHED, _J.FAILED, _J.CANCELLED}),
    _J.TRANSFERRING: frozenset({_J.HOLDING, _J.FINISHED, _J.FAILED, _J.CANCELLED}),
    _J.FINISHED: frozenset({_J.CLOSED}),
    _J.FAILED: frozenset({_J.CLOSED}),
    _J.CANCELLED: frozenset({_J.CLOSED}),
    _J.CLOSED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change that the job life cycle does not allow."""


def check_job_transition(old: str, new: str) -> None:
    """Raise IllegalTransition unless ``old -> new`` is a legal job state change."""
    try:
        o, n = JobState(old), JobState(new)
    except ValueError as exc:
        raise IllegalTransition(f"unknown job state: {exc}") from None
    if n not in JOB_TRANSITIONS[o]:
        raise IllegalTransition(f"job state {o.value} -> {n.value} is not allowed")


class TaskState(str, Enum):
    REGISTERED = "registered"
    READY = "ready"          # jobs created
    RUNNING = "running"      # at least one job has started
    PAUSED = "paused"        # its owner paused it: its queued jobs are throttled
    FINISHING = "finishing"  # its owner finished it: no new job starts, it ends with the last
    DONE = "done"            # every job finished
    FINISHED = "finished"    # ended, some jobs failed
    FAILED = "failed"        # ended, no job finished
    ABORTED = "aborted"      # killed by its owner or an admin

    def __str__(self) -> str:
        return self.value


FINAL_TASK_STATES = frozenset({TaskState.DONE, TaskState.FINISHED, TaskState.FAILED,
                               TaskState.ABORTED})
#: task states a job's progress leaves as they are while the task has live jobs: running, and
#: those its owner's command set (paused, finishing), which only the last job's end changes
TASK_STATES_KEPT_WHILE_LIVE = frozenset({TaskState.RUNNING, TaskState.PAUSED,
                                         TaskState.FINISHING})
#: task states a job that starts to run does not make ``running``
TASK_STATES_NOT_MADE_RUNNING = TASK_STATES_KEPT_WHILE_LIVE | {TaskState.ABORTED}
