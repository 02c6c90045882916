"""How getJob and updateJob reach the database: one interface, two implementations.

The dispatcher (``server/dispatcher.py``) checks a pilot's request and builds the reply; a
:class:`DispatchPath` takes the checked request to the database. :class:`GeneralPath` runs the
task buffer's code in the thread pool: every database, every case. ``server.pghot.HotPath``
(PostgreSQL) runs the common cases as single statements on the event loop and hands everything
else to a GeneralPath. ``app.build_state`` chooses one at start-up.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from panda_core.states import PILOT_OWNED_STATES

from .auth import Identity
from .brokerage import OutputSE, output_se
from .jobholder import Claim, refusal
from .shares import RUNNING_STATES
from .taskbuffer import NotFound, TaskBuffer
from .transient import retrying

_PILOT_OWNED = frozenset(str(s) for s in PILOT_OWNED_STATES)

#: ``run(func, *args)``: blocking (database) work off the event loop, awaitable
Run = Callable[..., Awaitable[Any]]


def in_pool(executor: Executor | None = None) -> Run:
    """A :data:`Run` over ``executor`` (None: the event loop's default thread pool). Work that
    meets a transient database failure is tried again there (``transient.retrying``)."""
    def run(func, *args):
        return asyncio.get_running_loop().run_in_executor(executor, retrying, func, *args)
    return run


@dataclass
class JobRequest:
    """A getJob's checked fields."""
    site: str
    site_config: dict
    n_jobs: int
    many: bool                 # nJobs was asked: the reply lists the jobs
    fit: dict                  # cores, memory_mb, walltime_s, pilot_version, prod_source_label
    who: dict                  # node, actor, pilot_id, batch_id
    nonce: str = ""            # the pilot's pilotNonce, signed into each spec it gets


@dataclass
class UpdateRequest:
    """An updateJob's checked fields."""
    panda_id: int
    state: str
    fields: dict
    stored: dict
    attempt_nr: int | None
    site: str
    claim: Claim = field(default_factory=Claim)   # the pilot it says it is (jobholder)
    #: set by the path that applied the update when it took the job out of the states whose
    #: cores count as its share's usage (``shares.RUNNING_STATES``): (share, cores)
    released: tuple[str | None, int | None] | None = None

    def note_release(self, old_status: str, attempt_nr: int | None, share: str | None,
                     cores: int | None) -> None:
        """Record (share, cores) in ``released`` if this update, applied to a job that was
        ``old_status`` at attempt ``attempt_nr``, ends its use of the cores."""
        if (old_status in RUNNING_STATES and self.state not in RUNNING_STATES
                and (self.attempt_nr is None or self.attempt_nr == attempt_nr)):
            self.released = (share, cores)


class DispatchPath(ABC):
    """getJob and updateJob against the database."""

    async def get_jobs(self, req: JobRequest, steps: list | None) -> list[dict]:
        """Up to ``req.n_jobs`` jobs, each now sent to the pilot with its files: each time
        the best job of the first share step that has one (``steps``: the share plan, best
        first), else the best of any share."""
        jobs: list[dict] = []
        while len(jobs) < req.n_jobs:
            for share in (*(steps or ()), None):
                job = await self.take(req, share)
                if job is not None:
                    jobs.append(job)
                    break
            else:
                break
        return jobs

    @abstractmethod
    async def take(self, req: JobRequest, share: str | tuple | None) -> dict | None:
        """The best activated job that fits the pilot, of ``share`` (a share's name; a tuple:
        any share not in it; None: any share), now sent to the pilot; None if none fits."""

    @abstractmethod
    async def update(self, req: UpdateRequest, identity: Identity | None) -> str:
        """Apply a pilot's updateJob; the command for the pilot ("NULL", "tobekilled").
        Raises PermissionError for a job the caller may not update, Conflict for a change
        the life cycle forbids."""

    async def close(self) -> None:
        """Give back what the path holds (connections of the current event loop)."""


class GeneralPath(DispatchPath):
    """The task buffer's dispatch and pilot updates, in the thread pool (``run``)."""

    def __init__(self, tb: TaskBuffer, run: Run):
        self.tb = tb
        self.run = run

    async def take(self, req: JobRequest, share: str | tuple | None) -> dict | None:
        return await self.run(self.take_job, req, share)

    def take_job(self, req: JobRequest, share: str | tuple | None) -> dict | None:
        """:meth:`take`, blocking."""
        return self.tb.jobs.dispatch(req.site, share=share, **req.fit, **req.who)

    async def update(self, req: UpdateRequest, identity: Identity | None) -> str:
        return await self.run(self.apply_update, req, identity)

    def apply_update(self, req: UpdateRequest, identity: Identity | None) -> str:
        """:meth:`update`, blocking."""
        sites = self.tb.sites
        # the site row is read before the update's transaction: a second connection reading it
        # inside that transaction waits for its lock on SQLite (30 s, then "database is locked")
        try:
            said_row = sites.get_cached(req.site) if req.site else None
        except NotFound:
            said_row = None

        def check(job: dict) -> OutputSE:
            """Inside the update's transaction: may this caller update the job? Where do its
            outputs go? (Saves a separate read of the job per update.)"""
            if identity is not None and not identity.may_act_for_site(job["site"]):
                raise PermissionError(f"{identity.subject} may not update jobs of {job['site']}")
            if job["status"] in _PILOT_OWNED:    # a job no pilot holds now: tobekilled below
                why = refusal(job, identity, req.claim)
                if why:
                    raise PermissionError(why)
            # applied from here on unless it raises (a stale attempt changes nothing)
            req.note_release(job["status"], job["attempt_nr"], job["share"], job["cores"])
            if not job["site"]:
                return output_se({})
            row = said_row if said_row and said_row["name"] == job["site"] else \
                sites.get_cached(job["site"])
            return output_se(row["config"])

        return self.tb.pilots.update(
            req.panda_id, req.state, req.fields, actor=identity.subject if identity else None,
            attempt_nr=req.attempt_nr, stored_files=req.stored, check=check)
