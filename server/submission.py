"""Task submission: validate, split into jobs, broker each job, store, activate.

A job whose inputs are all at its site's input storage element is activated at once; otherwise
it waits in ``assigned`` until the data service brings the inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import update

from panda_core.states import JobState, TaskState

from . import db
from .brokerage import Brokerage, JobNeeds, input_endpoint
from .eventranges import create_ranges, split_events
from .jobcreator import TaskSpec, TaskSpecError, make_job, split_inputs
from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

#: the most jobs one submission (or extension) creates: beyond it the client is told to split
#: (at 100,000 brokerage takes seconds and creating the jobs a few minutes, docs/server.md)
MAX_JOBS_PER_TASK = 100_000
#: jobs created per transaction: dispatchers and other submitters never wait behind a big task
JOB_BATCH = 500


@dataclass
class SubmitResult:
    task_id: int
    job_ids: list[int]
    activated: int
    assigned: int


class TaskSubmitter:
    def __init__(self, tb: TaskBuffer, brokerage: Brokerage):
        self.tb = tb
        self.brokerage = brokerage

    def submit(self, params: dict, owner: str) -> SubmitResult:
        """Create a task and its jobs. Raises TaskSpecError for anything the user must fix."""
        spec = TaskSpec.from_dict(params)
        spec.share = self.resolve_share(spec)
        sites = {s["name"]: s for s in self.tb.sites.all()}
        if spec.site and spec.site not in sites:
            raise TaskSpecError(f"field 'site': unknown site {spec.site!r}"
                                f" (known: {', '.join(sorted(sites)) or 'none'})")
        inputs: list[dict] = []
        if spec.input_dataset:
            inputs = self.tb.data.dataset_files(spec.input_dataset, unused_only=True)
            if not inputs:
                raise TaskSpecError(f"field 'input_dataset': dataset {spec.input_dataset!r} has "
                                    "no unused files (register them with data/add_files first)")
        groups, windows = _split(spec, inputs)
        return self._create(spec, params, owner, groups, sites, windows=windows)

    def resolve_share(self, spec: TaskSpec) -> str:
        """The global share of the task's jobs: the one it names, which must be in the share
        tree, else ``analysis`` for user jobs and ``production`` for the others when the tree
        has them, else the tree's first share."""
        from .shares import ShareStore, walk

        tree = ShareStore(self.tb).load()
        names = [s.name for s, _, _ in walk(tree)]
        if spec.share:
            if spec.share not in names:
                raise TaskSpecError(f"field 'share': unknown global share {spec.share!r} "
                                    f"(known: {', '.join(names) or 'none'})")
            return spec.share
        wanted = "analysis" if spec.prod_source_label in ("user", "panda") else "production"
        if wanted in names:
            return wanted
        return names[0] if names else "default"

    def extend(self, task_id: int, actor: str) -> SubmitResult:
        """Create jobs for the files added to the task's input dataset since it was created."""
        task = self.tb.tasks.get(task_id)
        spec = TaskSpec.from_dict(task["params"])
        spec.share = task["share"]
        if not spec.input_dataset:
            raise TaskSpecError("this task has no input dataset to extend")
        new = self.tb.data.dataset_files(spec.input_dataset, unused_only=True)
        sites = {s["name"]: s for s in self.tb.sites.all()}
        existing = self.tb.tasks.job_counts(task_id)
        first_serial = max(1, sum(existing.values()) + 1)
        groups, windows = _split(spec, new)
        return self._create(spec, task["params"], actor, groups, sites, task_id=task_id,
                            first_serial=first_serial, windows=windows)

    def _create(self, spec: TaskSpec, params: dict, owner: str, groups: list[list[dict]],
                sites: dict[str, dict], task_id: int | None = None,
                first_serial: int = 1, windows: list | None = None) -> SubmitResult:
        """Broker and store the jobs: the sites are weighed once for the task
        (``Brokerage.plan``), then the jobs are created ``JOB_BATCH`` per transaction. A new
        task is ``registered`` while that goes on (its job counts show the progress) and
        ``ready`` after."""
        all_lfns = [f["lfn"] for g in groups for f in g]
        locality = self.tb.data.replica_endpoints(spec.scope if not groups or not groups[0]
                                             else groups[0][0]["scope"], all_lfns)
        shape = JobNeeds(cores=spec.cores, memory_mb=spec.memory_mb, walltime_s=spec.walltime_s,
                         disk_mb=spec.disk_mb, prod_source_label=spec.prod_source_label)
        plan = self.brokerage.plan(shape, [sites[spec.site]] if spec.site else list(sites.values()),
                                   self.tb.jobs.site_load())
        if not plan:
            raise TaskSpecError("no site can run this task's jobs: "
                                + ("; ".join(plan.rejected) or "no sites are known"))
        if task_id is None:
            with self.tb.engine.begin() as conn:
                task_id = self.tb.tasks.insert(conn, name=spec.name, owner=owner, params=params,
                                              priority=spec.priority, share=spec.share,
                                              site=spec.site, max_attempts=spec.max_attempts)
        ids: list[int] = []
        activated = 0
        try:
            for start in range(0, len(groups), JOB_BATCH):
                batch_ids: list[int] = []
                batch_activated = 0
                with self.tb.engine.begin() as conn:
                    batch_lfns: list[str] = []
                    for n in range(start, min(start + JOB_BATCH, len(groups))):
                        group = groups[n]
                        lfns = [f["lfn"] for f in group]
                        batch_lfns += lfns
                        site = plan.site_for(lfns, locality)
                        batch_activated += self._create_job(
                            conn, spec, task_id, owner, first_serial + n, group, site,
                            sites[site], locality, windows[n] if windows else None, batch_ids)
                    if batch_lfns:
                        conn.execute(update(db.dataset_files).where(
                            db.dataset_files.c.dataset == spec.input_dataset,
                            db.dataset_files.c.lfn.in_(batch_lfns)).values(task_id=task_id))
                ids += batch_ids                 # committed
                activated += batch_activated
                if len(groups) > JOB_BATCH:
                    log.info("task %s (%s): %d of %d jobs created", task_id, spec.name,
                             len(ids), len(groups))
        except Exception as exc:
            log.error("task %s (%s): job creation stopped after %d of %d jobs: %s", task_id,
                      spec.name, len(ids), len(groups), exc)
            with self.tb.engine.begin() as conn:
                self.tb.tasks.set_status(
                    conn, task_id, str(TaskState.READY if ids else TaskState.FAILED),
                    error_dialog=f"job creation stopped after {len(ids)} of {len(groups)} "
                                 f"jobs: {type(exc).__name__}")
            raise
        with self.tb.engine.begin() as conn:
            self.tb.tasks.set_status(conn, task_id, str(TaskState.READY))
        log.info("task %s (%s): %d jobs, %d activated, %d waiting for data", task_id, spec.name,
                 len(ids), activated, len(ids) - activated)
        return SubmitResult(task_id, ids, activated, len(ids) - activated)

    def _create_job(self, conn, spec: TaskSpec, task_id: int, owner: str, serial: int,
                    group: list[dict], site: str, site_row: dict,
                    locality: dict[str, set[str]], window, ids: list[int]) -> bool:
        """One job at ``site``, activated when its inputs are there (True) else assigned."""
        job, files = make_job(spec, task_id, owner, serial, group, site=site, events=window)
        panda_id = self.tb.jobs.insert(conn, job, files, owner)
        if window is not None and spec.events_per_range:
            create_ranges(self.tb, conn, task_id=task_id, serial=serial, file=group[0],
                          window=window, events_per_range=spec.events_per_range)
        se = input_endpoint(site_row["config"])
        local = all(se in locality.get(f["lfn"], ()) for f in group)
        target = JobState.ACTIVATED if local else JobState.ASSIGNED
        self.tb.states.change(conn, panda_id, str(target), actor="brokerage",
                              expected=[str(JobState.DEFINED)])
        ids.append(panda_id)
        return local


def _split(spec: TaskSpec, inputs: list[dict]) -> tuple[list[list[dict]], list | None]:
    """Input groups, one per job, and each job's event window when split by events; a task
    of more than ``MAX_JOBS_PER_TASK`` jobs is refused (before its jobs are built)."""
    if not inputs:
        _check_size(spec.n_jobs or 1)
        return [[]] * (spec.n_jobs or 1), None
    if spec.events_per_job:
        _check_size(sum(-(-int(f.get("n_events") or spec.events_per_file) // spec.events_per_job)
                        for f in inputs))
        pairs = split_events(inputs, spec.events_per_file, spec.events_per_job)
        return [g for g, _ in pairs], [w for _, w in pairs]
    _check_size(-(-len(inputs) // spec.files_per_job))
    return split_inputs(inputs, spec.files_per_job), None


def _check_size(n_jobs: int) -> None:
    if n_jobs > MAX_JOBS_PER_TASK:
        raise TaskSpecError(
            f"this task would make {n_jobs} jobs; one submission makes at most "
            f"{MAX_JOBS_PER_TASK}: split it into several tasks (fewer 'n_jobs', more "
            "'files_per_job' or 'events_per_job', or part of the dataset per task)")
