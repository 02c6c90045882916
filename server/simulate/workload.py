"""The workload file of ``panda simulate``: sites, shares and tasks to replay.

YAML or JSON::

    name: ci
    speed: 200            # simulated seconds per real second
    timeout_s: 120        # real seconds before the run gives up
    sample_s: 60          # simulated seconds between two samples of share usage
    shares: [...]         # a global share tree (docs/shares.md); default: the server's default
    sites:
      - {name: SITE_A, slots: 8, cores: 8, failure_rate: 0.05, speed_factor: 1.0}
      - {name: T2_, count: 100, slots: 4}       # T2_0000 ... T2_0099
    tasks:
      - {name: mc, share: mc, n_jobs: 60, duration_s: 600, cores: 1}
      - {name: reco, share: reprocessing, n_jobs: 40, duration_s: 900,
         inputs: {files: 40, at: [SITE_A]}}     # an input dataset, one file per job, at SITE_A

Every error names the field (``WorkloadError``): the command says it and exits 2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: bounds that keep one simulation within one machine's reach
MAX_SITES = 5000
MAX_SLOTS = 100_000
MAX_JOBS = 1_000_000


class WorkloadError(ValueError):
    """A workload file that cannot be replayed; the message names the field and why."""


@dataclass
class SimSite:
    name: str
    slots: int = 4                 # pilots that run at the same time
    cores: int = 8
    memory_mb: int = 16000
    failure_rate: float = 0.0      # probability that a payload fails
    speed_factor: float = 1.0      # payload durations are multiplied by this


@dataclass
class SimInputs:
    files: int
    at: list[str]                  # the sites whose storage holds them


@dataclass
class SimTask:
    name: str
    n_jobs: int
    duration_s: float = 600.0      # mean simulated payload duration
    share: str | None = None
    cores: int = 1
    memory_mb: int = 1000
    priority: int = 1000
    submit_at_s: float = 0.0       # simulated time of submission
    inputs: SimInputs | None = None


@dataclass
class Workload:
    name: str
    sites: list[SimSite]
    tasks: list[SimTask]
    shares: list[dict] | None = None
    speed: float = 100.0
    timeout_s: float = 600.0
    sample_s: float = 60.0
    seed: int = 1

    @property
    def n_jobs(self) -> int:
        return sum(t.n_jobs for t in self.tasks)


def load_workload(path: str | Path) -> Workload:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkloadError(f"{path}: not valid YAML/JSON: {exc}") from None
    try:
        return parse_workload(data)
    except WorkloadError as exc:
        raise WorkloadError(f"{path}: {exc}") from None


def _num(d: dict, key: str, where: str, default, *, lo: float, hi: float, kind=float):
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)) or not lo <= value <= hi:
        raise WorkloadError(f"{where}.{key}: a{'n integer' if kind is int else ' number'} "
                            f"from {lo:g} to {hi:g} (got {value!r})")
    return kind(value)


def _name(d: dict, where: str) -> str:
    name = d.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise WorkloadError(f"{where}.name: letters, digits and _.- only (got {name!r})")
    return name


def _mapping(d: Any, where: str, known: set[str]) -> dict:
    if not isinstance(d, dict):
        raise WorkloadError(f"{where}: must be a mapping")
    unknown = sorted(set(d) - known)
    if unknown:
        raise WorkloadError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    return d


def parse_workload(data: Any) -> Workload:
    top = _mapping(data, "workload", {"name", "speed", "timeout_s", "sample_s", "shares",
                                      "sites", "tasks", "seed"})
    name = _name({"name": top.get("name", "simulation")}, "workload")
    sites: list[SimSite] = []
    raw_sites = top.get("sites")
    if not isinstance(raw_sites, list) or not raw_sites:
        raise WorkloadError("sites: a non-empty list of sites")
    for i, s in enumerate(raw_sites):
        where = f"sites[{i}]"
        s = _mapping(s, where, {"name", "count", "slots", "cores", "memory_mb", "failure_rate",
                                "speed_factor"})
        base = _name(s, where)
        count = _num(s, "count", where, 1, lo=1, hi=MAX_SITES, kind=int)
        kw = dict(slots=_num(s, "slots", where, 4, lo=1, hi=10000, kind=int),
                  cores=_num(s, "cores", where, 8, lo=1, hi=1024, kind=int),
                  memory_mb=_num(s, "memory_mb", where, 16000, lo=1, hi=10**7, kind=int),
                  failure_rate=_num(s, "failure_rate", where, 0.0, lo=0.0, hi=1.0),
                  speed_factor=_num(s, "speed_factor", where, 1.0, lo=0.001, hi=1000.0))
        names = [base] if "count" not in s else [f"{base}{k:04d}" for k in range(count)]
        sites += [SimSite(n, **kw) for n in names]
    seen: set[str] = set()
    for s in sites:
        if s.name in seen:
            raise WorkloadError(f"sites: site {s.name!r} appears twice")
        seen.add(s.name)
    if len(sites) > MAX_SITES:
        raise WorkloadError(f"sites: at most {MAX_SITES} sites (got {len(sites)})")
    if sum(s.slots for s in sites) > MAX_SLOTS:
        raise WorkloadError(f"sites: at most {MAX_SLOTS} slots in all")
    tasks: list[SimTask] = []
    raw_tasks = top.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise WorkloadError("tasks: a non-empty list of tasks")
    for i, t in enumerate(raw_tasks):
        where = f"tasks[{i}]"
        t = _mapping(t, where, {"name", "n_jobs", "duration_s", "share", "cores", "memory_mb",
                                "priority", "submit_at_s", "inputs"})
        share = t.get("share")
        if share is not None and not isinstance(share, str):
            raise WorkloadError(f"{where}.share: a share name")
        inputs = None
        if t.get("inputs") is not None:
            raw = _mapping(t["inputs"], f"{where}.inputs", {"files", "at"})
            at = raw.get("at")
            if not isinstance(at, list) or not at or any(a not in seen for a in at):
                raise WorkloadError(f"{where}.inputs.at: a list of the workload's site names")
            inputs = SimInputs(_num(raw, "files", f"{where}.inputs", None, lo=1, hi=MAX_JOBS,
                                    kind=int), list(at))
        n_jobs = inputs.files if inputs and "n_jobs" not in t else \
            _num(t, "n_jobs", where, None, lo=1, hi=MAX_JOBS, kind=int)
        tasks.append(SimTask(
            _name(t, where), n_jobs,
            duration_s=_num(t, "duration_s", where, 600.0, lo=0.0, hi=10**7),
            share=share, cores=_num(t, "cores", where, 1, lo=1, hi=1024, kind=int),
            memory_mb=_num(t, "memory_mb", where, 1000, lo=1, hi=10**7, kind=int),
            priority=_num(t, "priority", where, 1000, lo=-10**6, hi=10**6, kind=int),
            submit_at_s=_num(t, "submit_at_s", where, 0.0, lo=0.0, hi=10**8), inputs=inputs))
        if inputs and inputs.files != n_jobs:
            raise WorkloadError(f"{where}: with inputs, n_jobs is the number of files "
                                f"(one per job): {inputs.files}")
    if len({t.name for t in tasks}) != len(tasks):
        raise WorkloadError("tasks: task names must differ")
    if sum(t.n_jobs for t in tasks) > MAX_JOBS:
        raise WorkloadError(f"tasks: at most {MAX_JOBS} jobs in all")
    shares = top.get("shares")
    if shares is not None:
        from ..shares import ShareError, parse_shares
        try:
            parse_shares(shares)
        except ShareError as exc:
            raise WorkloadError(f"shares: {exc}") from None
    return Workload(name, sites, tasks, shares=shares,
                    speed=_num(top, "speed", "workload", 100.0, lo=0.01, hi=10**6),
                    timeout_s=_num(top, "timeout_s", "workload", 600.0, lo=1, hi=7 * 86400),
                    sample_s=_num(top, "sample_s", "workload", 60.0, lo=0.001, hi=10**6),
                    seed=_num(top, "seed", "workload", 1, lo=0, hi=2**31, kind=int))
