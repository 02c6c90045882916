"""What a monitor plugin sees each cycle, and the limits it judges by.

Limits come from the job spec first (PanDA's ``maxWalltime``, ``minRamCount``, ``maxDiskCount``)
and from the site config's ``limits``/``resources`` otherwise; 0 means "no limit".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panda_core.siteconfig import SiteConfig
from panda_core.wire import JobSpec
from .payload import Sample

#: files the pilot itself writes in a work dir: never evidence that the payload made progress
PILOT_FILES = frozenset({"pilot_state.json", ".pilot.lock", ".payload_exit", "payload.stdout",
                         "payload.stderr", "pilot.log"})


@dataclass
class Verdict:
    """A monitor's request to kill the payload, with the error code to report."""
    code: int
    diag: str
    monitor: str = ""


@dataclass
class JobLimits:
    looping_s: float
    memory_mb: float
    workdir_mb: float
    min_free_disk_mb: float
    walltime_s: float
    stdout_silent_s: float

    @classmethod
    def resolve(cls, job: JobSpec, site: SiteConfig) -> "JobLimits":
        limits = site.limits
        return cls(looping_s=limits.looping_s,
                   memory_mb=float(job.max_rss_mb or site.resources.memory_mb or 0),
                   workdir_mb=float(job.max_disk_mb or limits.max_workdir_mb or 0),
                   min_free_disk_mb=limits.min_free_disk_mb,
                   walltime_s=float(job.max_walltime_s or site.resources.max_walltime_s or 0),
                   stdout_silent_s=limits.stdout_silent_s)


@dataclass
class MonitorContext:
    job: JobSpec
    limits: JobLimits
    workdir: Path
    payload_start: float
    now: float
    sample: Sample
    pilot_deadline: float | None = None       # epoch seconds when the batch slot ends
    reserve_s: float = 60.0                   # time kept for stage-out before that deadline
    ignore: frozenset[str] = PILOT_FILES      # names (top level) that are not payload output
    scratch: dict[str, Any] = field(default_factory=dict)   # per-job state kept between cycles

    @property
    def elapsed(self) -> float:
        return self.now - self.payload_start

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "payload.stdout"
