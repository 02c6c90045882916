"""Built-in brokerage and priority policies, registered like any ``panda.server`` plugin."""
from __future__ import annotations

import pluggy

from panda_core.states import LIVE_JOB_STATES, JobState

from .brokerage import input_endpoint, locality_factor, site_fits, site_slots, status_accepts

# hookspecs.hookimpl, made here as a third-party plugin makes it (pluggy matches the project
# name): hookspecs.plugin_manager imports this module, so it must not import hookspecs
hookimpl = pluggy.HookimplMarker("panda.server")

#: priority points gained per hour an activated job waits
AGING_PER_HOUR = 10
#: priority points lost per job the owner already has running
USER_PENALTY_PER_RUNNING = 1
#: the jobs that hold one of a site's slots or wait for one: every live state but
#: ``throttled`` (a paused task's, waiting for its owner, as PanDA's brokerage leaves them out)
SLOT_STATES = tuple(s for s in LIVE_JOB_STATES if s != JobState.THROTTLED)


@hookimpl
def panda_broker_filter(needs, candidates):
    rejected = {}
    for c in candidates:
        status = c.config.get("status", "online")
        if not status_accepts(status, needs.prod_source_label):
            rejected[c.name] = f"status {status}"
            continue
        why = site_fits(needs, c.config)
        if why:
            rejected[c.name] = why
    return rejected


@hookimpl
def panda_broker_weight(needs, candidate, load, locality):
    """Prefer data locality strongly, then free capacity (:func:`capacity_weight`)."""
    weight = 1.0
    se = input_endpoint(candidate.config)
    if needs.input_lfns and se:
        held = sum(1 for lfn in needs.input_lfns if se in locality.get(lfn, ()))
        weight *= locality_factor(held, len(needs.input_lfns))
    counts = load.get(candidate.name, {})
    live = sum(counts.get(s, 0) for s in SLOT_STATES)
    return weight * capacity_weight(site_slots(candidate.config), live)


def capacity_weight(slots: int, live: int) -> float:
    """``slots x (slots + idle) / (slots + waiting)``: ``idle`` the slots still free once the
    site's ``live`` jobs all run, ``waiting`` the live jobs beyond its slots.

    ``slots`` is how many jobs the site ends per job duration, so a site's share of a task
    follows its size: two empty sites of 2,000 and 10 slots get jobs 200 to 1, and their
    queues stay equally short. The rest says how soon a new job starts there: up to 2 for an
    empty site (it starts at once, and the slots free again within a job's duration), 1 for
    a site exactly full, ``1 / (1 + waiting / slots)`` beyond, the job durations its queue
    takes to drain. It is ``2 x slots - live`` up to full and ``slots**2 / live`` past it."""
    idle, waiting = max(0, slots - live), max(0, live - slots)
    return slots * (slots + idle) / (slots + waiting)


@hookimpl
def panda_job_priorities(jobs, now, user_running):
    """``priority + AGING_PER_HOUR per hour waited - USER_PENALTY_PER_RUNNING per job the
    owner has running``, for a batch of jobs (one hook call per pass, not per job)."""
    out = []
    for job in jobs:
        waited_h = max(0.0, (now - job["creation_time"]).total_seconds() / 3600.0)
        out.append(int(job["priority"] + AGING_PER_HOUR * waited_h
                       - USER_PENALTY_PER_RUNNING * user_running.get(job["owner"], 0)))
    return out
