"""The server's policy hooks (pluggy project ``panda.server``).

Every brokerage and priority policy is a plugin implementing some of these hooks; the built-in
ones (``server/policies.py``) are registered exactly as third-party plugins found through the
``panda.server`` entry-point group are. No hook is ``firstresult``: every policy is asked and the
answers are combined (rejections joined, weights multiplied, the lowest priority taken), so a
policy's place in the registration order never changes the outcome.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from datetime import datetime

    from .brokerage import Candidate, JobNeeds

hookspec = pluggy.HookspecMarker("panda.server")
hookimpl = pluggy.HookimplMarker("panda.server")


@hookspec
def panda_broker_filter(needs: JobNeeds, candidates: list[Candidate]) -> dict[str, str] | None:
    """Reject sites for a job.

    ``needs`` is a ``brokerage.JobNeeds``; ``candidates`` the ``brokerage.Candidate`` list still
    in the running. Return ``{site name: reason}`` for the sites this policy rejects (None or an
    empty dict: none); every policy's rejections count. A task's submission asks once for the
    whole task (``Brokerage.plan``): ``needs`` is then the jobs' shape, ``input_lfns`` empty.
    The re-brokerage of retries asks the same way, once per job shape for a pass of retries.
    """


@hookspec
def panda_broker_weight(needs: JobNeeds, candidate: Candidate, load: dict[str, dict[str, int]],
                        locality: dict[str, set[str]]) -> float | None:
    """A factor for ``candidate``'s weight (higher is preferred); None to abstain.

    ``load``: site -> {job status: count}; ``locality``: input lfn -> storage elements holding it.
    Every policy's factor multiplies the weight. A task's submission asks once per site for the
    whole task (``input_lfns`` and ``locality`` empty); each job's data locality is then the
    brokerage's own factor (``brokerage.locality_factor``) and its jobs are spread over the
    sites in proportion to the weights.
    """


@hookspec
def panda_job_priority(job: dict[str, Any], now: datetime, user_running: int) -> int | None:
    """The current priority of an activated job; the lowest answer wins. None to abstain.

    ``job``: the job row (dict) without its big free texts (``shares.PRIORITY_COLUMNS``: no
    ``job_pars``, ``transformation``, diagnostics or ``job_metrics``); ``now``: the task buffer's clock (UTC); ``user_running``: how
    many jobs its owner has running.
    """


@hookspec
def panda_job_priorities(jobs: list[dict[str, Any]], now: datetime,
                         user_running: dict[str, int]) -> list[int | None] | None:
    """``panda_job_priority`` for many waiting jobs at once: one answer per job, in order
    (None abstains for that job), or None to abstain for all. A priority pass asks it once
    per batch (50,000 jobs) where the one-job form costs a hook call per job; both forms are
    asked and, per job, the lowest answer of either wins. ``user_running``: owner -> jobs
    running (absent: none). An answer of another length than ``jobs`` is ignored (logged).
    """


def plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the built-in policies and, optionally, the installed plugins."""
    from . import policies

    pm = pluggy.PluginManager("panda.server")
    pm.add_hookspecs(sys.modules[__name__])
    pm.register(policies, name="builtin-policies")
    if load_entry_points:
        pm.load_setuptools_entrypoints("panda.server")
    return pm
