"""The task buffer: every read and write of tasks, jobs, files, sites and pilots.

One part per responsibility, each a module of this package: ``states`` (the job state machine:
the one function that changes a job's status), ``counts`` (jobs per site, share and state, kept
by triggers), ``sites``, ``data`` (datasets, replicas, stored
outputs), ``tasks``, ``jobs`` (rows, dispatch, failures, retries, kills), ``taskcommands``
(pause, resume, finish a task, more attempts), ``pilots`` (what pilots and factories report)
and ``tokens`` (revoked bearer tokens). :class:`TaskBuffer` holds
them over one engine and clock, so that callers pass one object around:
``tb.jobs.dispatch(...)``, ``tb.sites.get_cached(...)``.
"""
from __future__ import annotations

from sqlalchemy.engine import Engine

from .base import Clock, Conflict, NotFound, Store, is_retryable, utcnow
from .counts import JobCounts
from .data import Data
from .jobs import Jobs
from .pilots import Pilots
from .sites import Sites
from .states import JobStates
from .taskcommands import TaskCommands
from .tasks import Tasks
from .owners import Ownership
from .tokens import RevokedTokens

__all__ = ["Clock", "Conflict", "NotFound", "TaskBuffer", "is_retryable", "utcnow"]


class TaskBuffer(Store):
    """The task buffer's parts over one database and one clock."""

    def __init__(self, engine: Engine, clock: Clock = utcnow):
        super().__init__(engine, clock)
        self.states = JobStates(self)
        self.counts = JobCounts(self)
        self.sites = Sites(self)
        self.data = Data(self)
        self.tasks = Tasks(self)
        self.jobs = Jobs(self, self.states, self.tasks, self.counts)
        self.commands = TaskCommands(self, self.states, self.tasks, self.jobs)
        self.pilots = Pilots(self, self.states, self.tasks, self.data, self.jobs)
        self.revoked_tokens = RevokedTokens(self)
        self.owners = Ownership(self)          # who may write scopes and datasets
