"""Why a pilot got no job while jobs wait at its site.

A pilot that asks with less wall time, memory or cores than every activated job needs gets
StatusCode 20 like a pilot at an empty site; without a reason a site admin sees pilots come and
go while jobs sit ``activated``. The explanation is built from one aggregate per site (the
smallest needs among its activated jobs, ``Jobs.activated_shape``), kept for a few seconds so a
crowd of idle pilots costs one query, and worded for a person:
``24 activated jobs at SITE, none fits this pilot: walltime 3600 s > remaining 3000 s``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

#: how long one site's shape is reused (seconds): a pilot's answer may be this stale
SHAPE_TTL_S = 10.0
#: at most this many sites' shapes are kept
MAX_SITES = 4096


@dataclass(frozen=True)
class PilotFit:
    """What a pilot offers (None: not said, no limit)."""
    walltime_s: int | None = None
    memory_mb: int | None = None
    cores: int | None = None
    pilot_version: str | None = None


def misfits(shape: dict[str, Any], fit: PilotFit) -> list[str]:
    """The limits of ``fit`` that the smallest need of the site's activated jobs exceeds."""
    out = []
    if fit.walltime_s and shape.get("walltime_s") and shape["walltime_s"] > fit.walltime_s:
        out.append(f"walltime {shape['walltime_s']} s > remaining {fit.walltime_s} s")
    if fit.memory_mb and shape.get("memory_mb") and shape["memory_mb"] > fit.memory_mb:
        out.append(f"memory {shape['memory_mb']} MB > the pilot's {fit.memory_mb} MB")
    if fit.cores and shape.get("cores") and shape["cores"] > fit.cores:
        out.append(f"cores {shape['cores']} > the pilot's {fit.cores}")
    if not fit.pilot_version and shape.get("activated") and shape.get("any_version") == 0:
        out.append("every job asks for a pilot version and the pilot sent none")
    return out


def explain(site: str, shape: dict[str, Any], fit: PilotFit) -> str:
    """The reason a pilot with ``fit`` got no job at ``site`` (``shape``: activated_shape)."""
    n = shape.get("activated") or 0
    if n == 0:
        return f"no activated jobs at {site}"
    jobs = f"{n} activated job{'s' if n != 1 else ''} at {site}"
    why = misfits(shape, fit)
    if why:
        least = "the smallest needs " if n > 1 else "it needs "
        return f"{jobs}, none fits this pilot: {least}" + "; ".join(why)
    return (f"{jobs}, none handed to this pilot: taken by other pilots meanwhile, pinned to "
            "another pilot version, or none fits all of its cores, memory and walltime at once")


class NoFitExplainer:
    """The per-site shapes, cached for :data:`SHAPE_TTL_S`; ``reason`` may run in any thread."""

    def __init__(self, jobs, ttl_s: float = SHAPE_TTL_S, clock=time.monotonic):
        self.jobs = jobs
        self.ttl_s = ttl_s
        self.clock = clock
        self._shapes: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def cached(self, site: str) -> dict[str, Any] | None:
        hit = self._shapes.get(site)
        return hit[1] if hit is not None and self.clock() - hit[0] < self.ttl_s else None

    def shape(self, site: str) -> dict[str, Any]:
        shape = self.cached(site)
        if shape is None:
            shape = self.jobs.activated_shape(site)
            with self._lock:
                if len(self._shapes) >= MAX_SITES:
                    self._shapes.clear()
                self._shapes[site] = (self.clock(), shape)
        return shape

    def reason(self, site: str, fit: PilotFit) -> str:
        return explain(site, self.shape(site), fit)
