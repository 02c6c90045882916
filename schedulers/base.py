"""The scheduler backend contract: submit, status, cancel. Nothing more.

Like Parsl's execution providers, a backend only talks to its batch system; how many pilots to
submit, where and when is the factory's policy (schedulers/factory.py). A backend is a stevedore
driver in the ``panda.schedulers`` group, constructed with the site config's
``scheduler.options`` as keyword arguments.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from panda_core.drivers import load_driver

GROUP = "panda.schedulers"


class BatchState(str, Enum):
    """The one set of states every backend maps its batch system's states to."""
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


FINAL_BATCH_STATES = frozenset({BatchState.DONE, BatchState.FAILED, BatchState.CANCELLED})


@dataclass
class PilotSpec:
    """Everything a backend needs to start one pilot."""
    site: str
    command: list[str]                     # argv of the pilot, e.g. [python, -m, panda_wms.cli, pilot, ...]
    walltime_s: int = 3600
    cores: int = 1
    memory_mb: int = 2000
    env: dict[str, str] = field(default_factory=dict)   # extra environment for the pilot only
    workdir: str | None = None             # where the batch job starts (and writes its stdout)
    name: str = "panda-pilot"


@dataclass
class BatchInfo:
    """A pilot's state plus what the batch system knows about its end (for the factory's report)."""
    state: BatchState
    exit_code: int | None = None
    reason: str = ""


class SchedulerError(RuntimeError):
    """The batch system refused or could not be reached; the message says which and why."""


class PushDriver(Protocol):
    """What the factory drives, every cycle, for a site in push mode (no pilot: the factory
    takes jobs from the server and the backend runs them itself)."""

    def poll(self) -> dict[int, str]:
        """Follow the jobs in flight and report them to the server; PandaID -> state reported."""

    def tracked(self) -> list[Any]:
        """The jobs followed, each with a ``final`` state that is None while it is in flight."""

    def fetch_and_submit(self, n_jobs: int = 1) -> list[int]:
        """Take up to ``n_jobs`` jobs from the server and submit them; their PandaIDs."""


class SchedulerBackend(abc.ABC):
    """Base class of all backends; subclasses set ``name`` and implement the three methods."""

    name: str = ""
    # Option through which the factory hands a backend a folder of its own for its state (the
    # ``local`` backend keeps its pilots' pids there); None: the backend needs none.
    state_dir_option: str | None = None
    # Push mode: a site of this backend whose options say ``push: true`` gets no pilots; the
    # factory asks ``push_driver`` for the driver that takes the site's jobs and runs them.
    supports_push: ClassVar[bool] = False

    def __init__(self, **options) -> None:
        self.options = options

    @abc.abstractmethod
    def submit(self, spec: PilotSpec) -> str:
        """Submit one pilot; return its batch id. Raise SchedulerError on refusal."""

    @abc.abstractmethod
    def status(self, batch_ids: list[str]) -> dict[str, BatchState]:
        """Current state of each id; ids the batch system no longer knows map to UNKNOWN."""

    @abc.abstractmethod
    def cancel(self, batch_ids: list[str]) -> None:
        """Cancel the given pilots; cancelling an id that already ended is not an error."""

    def details(self, batch_ids: list[str]) -> dict[str, BatchInfo]:
        """Like ``status`` with exit codes and reasons where the batch system tells them.

        Backends that know exit codes override this; the default has only the states.
        """
        return {bid: BatchInfo(state) for bid, state in self.status(batch_ids).items()}

    @classmethod
    def push_driver(cls, site_config: dict[str, Any], server_url: str, token: str,
                    state_dir: Path) -> PushDriver:
        """The push driver of one site (``SiteConfig.to_dict()``), speaking to the server at
        ``server_url`` with the pilot ``token`` and keeping its jobs in flight in ``state_dir``.

        Backends with ``supports_push`` override this; the factory asks no other."""
        raise SchedulerError(f"scheduler backend {cls.name!r} has no push mode")


def backend_class(name: str) -> type[SchedulerBackend]:
    """The class registered as ``name`` in ``panda.schedulers``, not yet constructed."""
    return load_driver(GROUP, name, invoke=False, error=SchedulerError, kind="scheduler backend")


def load_backend(name: str, **options) -> SchedulerBackend:
    """Load the backend ``name`` from the ``panda.schedulers`` entry points (stevedore)."""
    return load_driver(GROUP, name, invoke_kwds=options, error=SchedulerError,
                       kind="scheduler backend")
