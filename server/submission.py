"""Task submission: validate, split into jobs, broker each job, store, activate.

A job whose inputs are all at its site's input storage element is activated at once; otherwise
it waits in ``assigned`` until the data service brings the inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import delete, update

from panda_core.states import JobState, TaskState

from . import db
from .brokerage import Brokerage, JobNeeds, input_endpoint
from .eventranges import POOL_SERIAL, EventWindow, create_ranges, split_events
from .jobcreator import MAX_JOBS_PER_CALL, LimitExceeded, TaskSpec, TaskSpecError, \
    make_consumer_job, make_job, split_inputs
from .taskbuffer import TaskBuffer
from .taskbuffer.owners import Owner, user_scope

log = logging.getLogger(__name__)

#: event ranges one event-service task may have (each is a row its consumers' calls scan)
MAX_RANGES_PER_TASK = 100_000
#: jobs created per transaction (the most one call creates: jobcreator.MAX_JOBS_PER_CALL), so
#: no dispatcher or other submitter waits behind a big task's one long transaction
JOB_BATCH = 500


@dataclass
class SubmitResult:
    task_id: int
    job_ids: list[int]
    activated: int
    assigned: int


class TaskSubmitter:
    def __init__(self, tb: TaskBuffer, brokerage: Brokerage):
        from .quotas import Quotas
        self.tb = tb
        self.brokerage = brokerage
        self.quotas = Quotas(tb)

    def submit(self, params: dict, owner: str, into_task: int | None = None,
               first_serial: int = 1, who: Owner | None = None) -> SubmitResult:
        """Create a task and its jobs. Raises TaskSpecError for anything the user must fix.
        ``into_task``: add the jobs to that task instead (from ``first_serial`` on): the jobs
        of one PanDA ``submitJobs`` call share one task, hence one jobsetID. ``who``: the
        caller, held to the owners of scopes and datasets (``taskbuffer/owners.py``: raises
        OwnershipError); None for the server's own tasks. A task without a ``scope`` writes
        the caller's own ``user.<name>``."""
        spec = TaskSpec.from_dict(params)
        if who is not None and "scope" not in params:
            spec.scope = user_scope(who.subject)
        spec.share = self.resolve_share(spec)
        sites = {s["name"]: s for s in self.tb.sites.all()}
        if spec.site and spec.site not in sites:
            raise TaskSpecError(f"field 'site': unknown site {spec.site!r}"
                                f" (known: {', '.join(sorted(sites)) or 'none'})")
        if spec.destination_se:
            from .dataservice import storage_urls
            known = storage_urls(s["config"] for s in sites.values())
            if spec.destination_se not in known:
                raise TaskSpecError(f"field 'destination_se': no site config names a storage "
                                    f"element {spec.destination_se!r} with a URL (known: "
                                    f"{', '.join(sorted(known)) or 'none'})")
        inputs: list[dict] = []
        consume = who is None or who.admin or not spec.input_dataset or \
            self.tb.owners.dataset_owner(spec.input_dataset) in (None, who.subject)
        if spec.input_dataset:
            # another's dataset is read, not consumed: all its files, none marked as used
            inputs = self.tb.data.dataset_files(spec.input_dataset, unused_only=consume)
            if not inputs:
                raise TaskSpecError(f"field 'input_dataset': dataset {spec.input_dataset!r} has "
                                    "no unused files (register them with data/add_files first)")
        groups, windows = _split(spec, inputs)
        self.quotas.check_submit(owner, spec.working_group, len(groups))
        return self._create(spec, params, owner, groups, sites, windows=windows,
                            task_id=into_task, first_serial=first_serial, who=who,
                            consume=consume)

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

    def extend(self, task_id: int, actor: str, who: Owner | None = None) -> SubmitResult:
        """Create jobs for the files added to the task's input dataset since it was created
        (only a task over its owner's own dataset: another's is read whole, not consumed)."""
        task = self.tb.tasks.get(task_id)
        spec = TaskSpec.from_dict(task["params"])
        spec.share = task["share"]
        if not spec.input_dataset:
            raise TaskSpecError("this task has no input dataset to extend")
        ds_owner = self.tb.owners.dataset_owner(spec.input_dataset)
        if ds_owner not in (None, task["owner"]):
            raise TaskSpecError(f"this task reads dataset {spec.input_dataset} of {ds_owner}, "
                                "which it does not consume: it cannot be extended")
        if "scope" not in task["params"]:
            spec.scope = user_scope(task["owner"])
        if spec.event_service is not None:
            raise TaskSpecError("an event-service task cannot be extended: its merge job "
                                "covers the ranges it was created with; submit a new task")
        new = self.tb.data.dataset_files(spec.input_dataset, unused_only=True)
        sites = {s["name"]: s for s in self.tb.sites.all()}
        existing = self.tb.tasks.job_counts(task_id)
        first_serial = max(1, sum(existing.values()) + 1)
        groups, windows = _split(spec, new)
        self.quotas.check_submit(task["owner"], spec.working_group, len(groups))
        return self._create(spec, task["params"], actor, groups, sites, task_id=task_id,
                            first_serial=first_serial, windows=windows, who=who)

    def _create(self, spec: TaskSpec, params: dict, owner: str, groups: list[list[dict]],
                sites: dict[str, dict], task_id: int | None = None,
                first_serial: int = 1, windows: list | None = None,
                who: Owner | None = None, consume: bool = True) -> SubmitResult:
        """Broker and store the jobs: the sites are weighed once for the task
        (``Brokerage.plan``), then the jobs are created ``JOB_BATCH`` per transaction. A new
        task is ``registered`` while that goes on (its job counts show the progress) and
        ``ready`` after."""
        if len(groups) > MAX_JOBS_PER_CALL:
            raise LimitExceeded(f"this call would create {len(groups)} jobs; at most "
                                f"{MAX_JOBS_PER_CALL} per call (raise 'files_per_job' or "
                                "'events_per_job', or register the inputs in several datasets)")
        all_lfns = list(dict.fromkeys(f["lfn"] for g in groups for f in g))
        locality = self.tb.data.replica_endpoints(spec.scope if not groups or not groups[0]
                                             else groups[0][0]["scope"], all_lfns)
        shape = JobNeeds(cores=spec.cores, memory_mb=spec.memory_mb, walltime_s=spec.walltime_s,
                         disk_mb=spec.disk_mb, prod_source_label=spec.prod_source_label)
        plan = self.brokerage.plan(shape, [sites[spec.site]] if spec.site else list(sites.values()),
                                   self.tb.jobs.site_load())
        if not plan:
            raise TaskSpecError("no site can run this task's jobs: "
                                + ("; ".join(plan.rejected) or "no sites are known"))
        if spec.event_service is not None:
            total = sum(-(-int(f.get("n_events") or spec.events_per_file)
                          // int(spec.events_per_range or 1)) for f in groups[0])
            if total > MAX_RANGES_PER_TASK:
                raise LimitExceeded(f"this task would have {total} event ranges; at most "
                                    f"{MAX_RANGES_PER_TASK} (raise 'events_per_range')")
        if who is not None:       # the outputs' scope and dataset must be the caller's
            with self.tb.engine.begin() as conn:
                self.tb.owners.check_scope(conn, who, spec.scope)
                if spec.output_dataset:
                    self.tb.owners.check_dataset(conn, who, spec.output_dataset, spec.scope)
        new_task = task_id is None
        if task_id is None:
            with self.tb.engine.begin() as conn:
                task_id = self.tb.tasks.insert(conn, name=spec.name, owner=owner, params=params,
                                              priority=spec.priority, share=spec.share,
                                              site=spec.site, max_attempts=spec.max_attempts)
                if spec.event_service is not None:
                    n_ranges = sum(create_ranges(
                        self.tb, conn, task_id=task_id, serial=POOL_SERIAL, file=f,
                        window=EventWindow(0, int(f.get("n_events") or spec.events_per_file)),
                        events_per_range=int(spec.events_per_range or 1)) for f in groups[0])
                    log.info("task %s: %d event ranges for %d consumer(s)", task_id, n_ranges,
                             len(groups))
        ids: list[int] = []
        activated = 0
        try:
            for start in range(0, len(groups), JOB_BATCH):
                batch_ids: list[int] = []
                batch_activated = 0
                with self.tb.engine.begin() as conn:
                    batch_lfns: dict[str, None] = {}
                    placed = []
                    for n in range(start, min(start + JOB_BATCH, len(groups))):
                        group = groups[n]
                        lfns = [f["lfn"] for f in group]
                        batch_lfns.update(dict.fromkeys(lfns))
                        placed.append((n, group, plan.site_for(lfns, locality)))
                    if spec.event_service is None and not windows:
                        batch_activated += self._create_jobs(conn, spec, task_id, owner,
                                                             first_serial, placed, sites,
                                                             locality, batch_ids)
                    else:
                        for n, group, site in placed:
                            batch_activated += self._create_job(
                                conn, spec, task_id, owner, first_serial + n, group, site,
                                sites[site], locality, windows[n] if windows else None,
                                batch_ids)
                    if batch_lfns and consume:
                        conn.execute(update(db.dataset_files).where(
                            db.dataset_files.c.dataset == spec.input_dataset,
                            db.dataset_files.c.lfn.in_(list(batch_lfns))).values(task_id=task_id))
                ids += batch_ids                 # committed
                activated += batch_activated
                if len(groups) > JOB_BATCH:
                    log.info("task %s (%s): %d of %d jobs created", task_id, spec.name,
                             len(ids), len(groups))
        except Exception as exc:
            log.error("task %s (%s): job creation stopped after %d of %d jobs: %s", task_id,
                      spec.name, len(ids), len(groups), exc)
            with self.tb.engine.begin() as conn:
                if new_task and not ids:
                    # refused before any job existed (a bad output name, ...): the refusal
                    # changes nothing, so the task this call made goes again
                    conn.execute(delete(db.event_ranges).where(
                        db.event_ranges.c.task_id == task_id))
                    conn.execute(delete(db.tasks).where(db.tasks.c.task_id == task_id))
                else:
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

    def _create_jobs(self, conn, spec: TaskSpec, task_id: int, owner: str, first_serial: int,
                     placed: list[tuple[int, list[dict], str]], sites: dict[str, dict],
                     locality: dict[str, set[str]], ids: list[int]) -> int:
        """:meth:`_create_job` for a batch of plain jobs (no events, no event service) in a few
        statements: one insert per table, one state change per target state. Per job it was
        four round trips, and 100,000 jobs took longer to create than to run (docs/simulate.md).
        Returns how many were activated."""
        made = [make_job(spec, task_id, owner, first_serial + n, group, site=site)
                for n, group, site in placed]
        new_ids = self.tb.jobs.insert_many(conn, made, owner)
        by_target: dict[JobState, list[int]] = {JobState.ACTIVATED: [], JobState.ASSIGNED: []}
        for panda_id, (_n, group, site) in zip(new_ids, placed):
            se = input_endpoint(sites[site]["config"])
            local = all(se in locality.get(f["lfn"], ()) for f in group)
            by_target[JobState.ACTIVATED if local else JobState.ASSIGNED].append(panda_id)
        for target, chosen in by_target.items():
            self.tb.states.change_many(conn, chosen, str(JobState.DEFINED), str(target),
                                       actor="brokerage")
        ids += new_ids
        return len(by_target[JobState.ACTIVATED])

    def _create_job(self, conn, spec: TaskSpec, task_id: int, owner: str, serial: int,
                    group: list[dict], site: str, site_row: dict,
                    locality: dict[str, set[str]], window, ids: list[int]) -> bool:
        """One job at ``site``, activated when its inputs are there (True) else assigned."""
        if spec.event_service is not None:
            job, files = make_consumer_job(spec, task_id, owner, serial, group, site=site)
        else:
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
    """Input groups, one per job, and each job's event window when split by events. The
    consumers of an event-service task each name all the task's inputs (their ranges do)."""
    if spec.event_service is not None:
        return [list(inputs)] * spec.event_service.consumers, None
    if spec.events_per_job and inputs:
        pairs = split_events(inputs, spec.events_per_file, spec.events_per_job)
        return [g for g, _ in pairs], [w for _, w in pairs]
    if inputs:
        return split_inputs(inputs, spec.files_per_job), None
    return [[]] * (spec.n_jobs or 1), None
