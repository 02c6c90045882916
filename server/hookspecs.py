"""The server's policy hooks (pluggy project ``panda.server``).

Every brokerage and priority policy is a plugin implementing some of these hooks; the built-in
ones (``server/policies.py``) are registered exactly as third-party plugins found through the
``panda.server`` entry-point group are.
"""
from __future__ import annotations

import sys

import pluggy

hookspec = pluggy.HookspecMarker("panda.server")
hookimpl = pluggy.HookimplMarker("panda.server")


@hookspec
def panda_broker_filter(needs, candidates) -> dict[str, str] | None:
    """Reject sites for a job.

    ``needs`` is a ``brokerage.JobNeeds``; ``candidates`` the ``brokerage.Candidate`` list still
    in the running. Return ``{site name: reason}`` for the sites this policy rejects.
    """


@hookspec
def panda_broker_weight(needs, candidate, load, locality) -> float | None:
    """A factor for ``candidate``'s weight (higher is preferred); None to abstain.

    ``load``: site -> {job status: count}; ``locality``: input lfn -> storage elements holding it.
    """


@hookspec
def panda_job_priority(job, now, user_running) -> int | None:
    """The current priority of an activated job; the lowest answer wins. None to abstain.

    ``job``: the job row (dict); ``user_running``: how many jobs its owner has running.
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
