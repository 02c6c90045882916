"""Brokerage: choose a site for a job.

Candidates are the sites whose status takes work and whose resources fit the job; among them,
sites whose input storage already holds the job's inputs are preferred, then the least loaded.
Policies are pluggy hooks (``server/hookspecs.py``): plugins may filter sites out and add to a
site's weight; the built-in policies are registered the same way.

A task's jobs all have the same shape (cores, memory, wall time, disk, label); only their
inputs differ. :meth:`Brokerage.plan` therefore filters and weighs the sites once per task
(the hooks see the task's shape, without inputs) and :class:`TaskPlan` then spreads the jobs
over the candidates by weight (stride scheduling: each site's share of the jobs follows its
weight), boosting the sites whose input storage holds a job's inputs (``LOCALITY_BOOST``). A
job costs O(its inputs' replicas + log sites), a task O(sites + jobs): 100,000 jobs over 1,000
sites in seconds, where asking every hook for every (job, site) took ten minutes.
:meth:`Brokerage.choose` is the same decision for one job, every hook asked with its inputs.
A job may exclude sites (``site_for(..., exclude=)``): the re-brokerage of retries plans once
per shape for a whole batch of retries, each avoiding the sites its earlier attempts failed at.
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Collection
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

#: site status -> does brokerage send it work (test sites only get test jobs)
BROKERABLE = {"online"}
#: a site holding all of a job's inputs weighs 1 + LOCALITY_BOOST times more (half: half that)
LOCALITY_BOOST = 9.0
#: the job slots of a site whose config says none (``pilots.max_running`` absent or unusable:
#: a config stored without the site-config checks, say by a plugin or an older server)
DEFAULT_SLOTS = 10


def locality_factor(held: int, n_inputs: int) -> float:
    """How much more a site weighs for a job when its input storage holds ``held`` of the
    job's ``n_inputs`` input files."""
    return 1.0 + LOCALITY_BOOST * held / n_inputs if n_inputs else 1.0


@dataclass
class JobNeeds:
    cores: int
    memory_mb: int
    walltime_s: int
    disk_mb: int
    prod_source_label: str = "managed"
    input_lfns: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    name: str
    config: dict
    weight: float = 1.0
    reasons: list[str] = field(default_factory=list)


def site_fits(needs: JobNeeds, config: dict) -> str | None:
    """None if the job fits the site's resources, else the reason it does not."""
    res = config.get("resources", {})
    if needs.cores > res.get("cores", 1):
        return f"needs {needs.cores} cores, site has {res.get('cores', 1)}"
    if res.get("memory_mb") and needs.memory_mb > res["memory_mb"]:
        return f"needs {needs.memory_mb} MB memory, site has {res['memory_mb']}"
    if res.get("max_walltime_s") and needs.walltime_s > res["max_walltime_s"]:
        return f"needs {needs.walltime_s} s wall time, site allows {res['max_walltime_s']}"
    if res.get("max_disk_mb") and needs.disk_mb > res["max_disk_mb"]:
        return f"needs {needs.disk_mb} MB disk, site has {res['max_disk_mb']}"
    return None


def status_accepts(status: str, prod_source_label: str) -> bool:
    return status in BROKERABLE or (status == "test" and prod_source_label in ("test", "ptest"))


def input_endpoint(config: dict) -> str | None:
    return (config.get("storage") or {}).get("input", {}).get("name")


def site_slots(config: dict) -> int:
    """How many jobs the site runs at once: its ``pilots.max_running`` (a pilot runs one job
    at a time, whatever its cores), else :data:`DEFAULT_SLOTS`. The site-config checks refuse
    a value below 1 or of another type; a stored config that escaped them weighs as the
    default rather than failing the brokerage of every task."""
    slots = (config.get("pilots") or {}).get("max_running")
    if isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1:
        return slots
    return DEFAULT_SLOTS


def output_endpoint(config: dict) -> str | None:
    return (config.get("storage") or {}).get("output", {}).get("name")


@dataclass(frozen=True)
class OutputSE:
    """Where a site's jobs store their outputs: the storage element's name and root URL (the
    server computes each output's SURL from it and accepts no other)."""
    name: str | None
    url: str | None


def output_se(config: dict) -> OutputSE:
    se = (config.get("storage") or {}).get("output") or {}
    return OutputSE(se.get("name"), se.get("url"))


class Brokerage:
    """Chooses sites using the policy hooks of a ``server.hooks`` plugin manager."""

    def __init__(self, hook):
        self.hook = hook

    def choose(self, needs: JobNeeds, sites: list[dict], load: dict[str, dict[str, int]],
               locality: dict[str, set[str]]) -> tuple[str | None, list[str]]:
        """Return (site name or None, reasons why each rejected site was rejected)."""
        candidates = [Candidate(s["name"], s["config"]) for s in sites]
        rejected: list[str] = []
        for results in self.hook.panda_broker_filter(needs=needs, candidates=candidates):
            for name, reason in (results or {}).items():
                rejected.append(f"{name}: {reason}")
                candidates = [c for c in candidates if c.name != name]
        if not candidates:
            log.warning("brokerage: no site for a job needing %d core(s), %d MB, %d s: %s",
                        needs.cores, needs.memory_mb, needs.walltime_s,
                        "; ".join(rejected[:5]) or "no site takes work")
            return None, rejected
        for c in candidates:
            for w in self.hook.panda_broker_weight(needs=needs, candidate=c, load=load,
                                                   locality=locality):
                if w is not None:
                    c.weight *= w
        best = max(candidates, key=lambda c: (c.weight, c.name))
        log.debug("brokerage: %s (weights %s)", best.name,
                  {c.name: round(c.weight, 3) for c in candidates})
        return best.name, rejected

    def plan(self, needs: JobNeeds, sites: list[dict], load: dict[str, dict[str, int]]
             ) -> "TaskPlan":
        """Filter and weigh ``sites`` once for jobs shaped like ``needs`` (its inputs are not
        looked at: each job's go to :meth:`TaskPlan.site_for`)."""
        shape = replace(needs, input_lfns=[])
        candidates = [Candidate(s["name"], s["config"]) for s in sites]
        rejected: list[str] = []
        for results in self.hook.panda_broker_filter(needs=shape, candidates=candidates):
            if results:
                rejected += [f"{name}: {reason}" for name, reason in results.items()]
                candidates = [c for c in candidates if c.name not in results]
        for c in candidates:
            for w in self.hook.panda_broker_weight(needs=shape, candidate=c, load=load,
                                                   locality={}):
                if w is not None:
                    c.weight *= w
        candidates = [c for c in candidates if c.weight > 0]
        if not candidates:
            log.warning("brokerage: no site for jobs needing %d core(s), %d MB, %d s: %s",
                        needs.cores, needs.memory_mb, needs.walltime_s,
                        "; ".join(rejected[:5]) or "no site takes work")
        return TaskPlan(candidates, rejected)


class TaskPlan:
    """A task's candidate sites, weighed once; :meth:`site_for` spreads jobs over them.

    Each candidate's next job costs (jobs given + 1) / weight; a job goes to the cheapest
    site, where a site holding the job's inputs has its weight multiplied by
    :func:`locality_factor`. Without locality this hands out jobs in proportion to the weights
    (stride scheduling). The cheapest site without locality is the top of a heap; the sites
    with locality are found from the inputs' replicas, so neither walks every site.
    """

    def __init__(self, candidates: list[Candidate], rejected: list[str]):
        self.candidates = candidates
        self.rejected = rejected
        self.given = [0] * len(candidates)
        self._heap = [(1.0 / c.weight, c.name, i) for i, c in enumerate(candidates)]
        heapq.heapify(self._heap)
        self.by_endpoint: dict[str, list[int]] = {}
        for i, c in enumerate(candidates):
            se = input_endpoint(c.config)
            if se:
                self.by_endpoint.setdefault(se, []).append(i)

    def __bool__(self) -> bool:
        return bool(self.candidates)

    def _cost(self, i: int, factor: float = 1.0) -> float:
        return (self.given[i] + 1) / (self.candidates[i].weight * factor)

    def site_for(self, input_lfns: list[str], locality: dict[str, set[str]],
                 exclude: Collection[str] = ()) -> str:
        """The site of the next job (reading ``input_lfns``); counts it as given there.

        ``exclude``: site names this job must not go to (a retry avoids the sites an earlier
        attempt failed at for their own reasons); their heap entries are set aside and put
        back, O(len(exclude) log sites). Raises LookupError when no candidate is left."""
        heap = self._heap
        aside: list[tuple[float, str, int]] = []
        while heap:                               # entries go stale when a site is given a job
            cost, name, i = heap[0]
            if cost != self._cost(i):
                heapq.heapreplace(heap, (self._cost(i), name, i))
            elif name in exclude:
                aside.append(heapq.heappop(heap))
            else:
                break
        if not heap:                  # every candidate left is excluded (or there is none)
            for entry in aside:
                heapq.heappush(heap, entry)
            raise LookupError("no candidate site")
        best_cost, best_name, best = heap[0]
        if input_lfns:
            held: dict[int, int] = {}
            for lfn in input_lfns:
                for se in locality.get(lfn, ()):
                    for j in self.by_endpoint.get(se, ()):
                        held[j] = held.get(j, 0) + 1
            for j, n in held.items():
                name = self.candidates[j].name
                if name in exclude:
                    continue
                cost = self._cost(j, locality_factor(n, len(input_lfns)))
                if (cost, name) < (best_cost, best_name):
                    best_cost, best_name, best = cost, name, j
        self.given[best] += 1
        if best == heap[0][2]:
            heapq.heapreplace(heap, (self._cost(best), best_name, best))
        # else: the site's one entry is stale (too cheap) and is mended when it comes up
        for entry in aside:           # still fresh: their sites were given nothing
            heapq.heappush(heap, entry)
        return best_name
