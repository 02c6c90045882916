"""Brokerage: choose a site for a job.

Candidates are the sites whose status takes work and whose resources fit the job; among them,
sites whose input storage already holds the job's inputs are preferred, then the least loaded.
Policies are pluggy hooks (``server/hookspecs.py``): plugins may filter sites out and add to a
site's weight; the built-in policies are registered the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: site status -> does brokerage send it work (test sites only get test jobs)
BROKERABLE = {"online"}


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
