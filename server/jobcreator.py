"""The job creator: a task description becomes jobs.

A task (JSON or YAML, see docs/contracts.md) names a transformation, its parameters with
placeholders, an input dataset and how to split it. Each job gets its input files, output file
names, a log tarball, and its parameters with the placeholders filled in.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from panda_core.replicas import MAX_NAME_LENGTH, BadFileName, check_name
from panda_core.siteconfig import DEFAULT_JOB_WALLTIME_S

log = logging.getLogger(__name__)


#: PanDA's ``eventService`` values of a job
ES_CONSUMER = 1
ES_MERGE = 2


class TaskSpecError(ValueError):
    """A task description that cannot become jobs; the message names the field and why."""


class LimitExceeded(TaskSpecError):
    """A call that asks for more work than one call may do (HTTP 400, the limit named)."""


#: the jobs one call (a task's submission, one extension) may create: each is a few rows in
#: one transaction, and 20,000 of them held the database for 13 s
MAX_JOBS_PER_CALL = 5000


_PLACEHOLDER = re.compile(
    r"\$\{(IN|OUT|SN|TASK|TASKID|ATTEMPT|OUT\d+|FIRSTEVENT|SKIPEVENTS|MAXEVENTS)\}")


#: the fields of a task that live under its ``resources``
RESOURCE_KEYS = frozenset({"cores", "memory_mb", "walltime_s", "disk_mb"})


@dataclass
class EventServiceSpec:
    """``event_service:`` of a task file: its ranges form one pool that ``consumers`` jobs
    share (PanDA's jobset); a range a job holds longer than ``range_timeout_s`` without a sign
    of life from it goes back to the pool; ``merge`` is the job the server creates once every
    range is done, with ``${IN}`` the range outputs in event order (docs/eventranges.md)."""
    merge_transformation: str
    merge_parameters: str = ""
    consumers: int = 1
    range_timeout_s: int = 3600

    @classmethod
    def from_dict(cls, data: Any) -> "EventServiceSpec":
        _check(isinstance(data, dict), "event_service", "must be a mapping (consumers, "
               "range_timeout_s, merge)")
        unknown = sorted(set(data) - {"consumers", "range_timeout_s", "merge"})
        _check(not unknown, "event_service", f"unknown key(s) {', '.join(map(str, unknown))}")
        merge = data.get("merge")
        _check(isinstance(merge, dict), "event_service.merge",
               "required, a mapping with transformation and job_parameters")
        unknown = sorted(set(merge) - {"transformation", "job_parameters"})
        _check(not unknown, "event_service.merge", f"unknown key(s) {', '.join(map(str, unknown))}")
        trf, pars = merge.get("transformation"), merge.get("job_parameters", "")
        _check(isinstance(trf, str) and trf.strip() != "", "event_service.merge.transformation",
               "required, a non-empty string")
        _check(isinstance(pars, str), "event_service.merge.job_parameters", "must be a string")
        kw: dict[str, Any] = {}
        for key, top in (("consumers", 1000), ("range_timeout_s", 7 * 86400)):
            value = data.get(key)
            if value is None:
                continue
            _check(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top,
                   f"event_service.{key}", f"an integer from 1 to {top}")
            kw[key] = value
        return cls(merge_transformation=trf.strip(), merge_parameters=pars, **kw)


#: the longest text each field may be: its job column's length (job_parameters is TEXT)
_TEXT_LIMITS = {"job_parameters": 1 << 20, "site": 128, "share": 64, "prod_source_label": 32,
                "transfer_type": 16, "pilot_version": 64, "working_group": 64}


@dataclass
class TaskSpec:
    name: str
    transformation: str
    job_parameters: str = ""
    scope: str = "user"
    input_dataset: str | None = None
    output_dataset: str | None = None
    outputs: list[str] = field(default_factory=list)
    files_per_job: int = 1
    n_jobs: int | None = None            # for tasks without input: how many jobs
    site: str | None = None
    priority: int = 1000
    share: str | None = None             # global share; None: chosen from prod_source_label
    prod_source_label: str = "managed"
    working_group: str | None = None     # PanDA's workingGroup: the monitor groups jobs by it
    vo: str | None = None                # PanDA's VO; both checked against the token's groups
    cores: int = 1
    memory_mb: int = 1000
    walltime_s: int = DEFAULT_JOB_WALLTIME_S   # fits the default pilot (panda_core.siteconfig)
    disk_mb: int = 1000
    max_attempts: int = 3
    transfer_type: str | None = None     # "direct": the payload reads inputs in place
    pilot_version: str | None = None
    events_per_job: int | None = None    # split each input file by events (server/eventranges.py)
    events_per_file: int | None = None   # events in each input file
    events_per_range: int | None = None  # event ranges a pilot fetches with getEventRanges
    notify: dict | None = None           # e-mail / webhook on task end, job errors
                                         # (server/notifications.py)
    destination_se: str | None = None    # aggregate outputs there (a T1): jobs end 'finished'
                                         # once the data service has copied them
    event_service: EventServiceSpec | None = None   # one pool of ranges shared by its jobs
    jedi_parameters: dict | None = None  # JEDI's task parameters it was made from, kept as sent

    @classmethod
    def from_dict(cls, data: Any) -> "TaskSpec":
        """Validate a task description; every error names the field."""
        if not isinstance(data, dict):
            raise TaskSpecError("a task description must be a mapping of field -> value")
        known = (set(cls.__dataclass_fields__) - RESOURCE_KEYS) | {"resources"}
        misplaced = sorted(set(data) & RESOURCE_KEYS)
        if misplaced:
            raise TaskSpecError(f"field(s) {', '.join(map(repr, misplaced))}: these go under "
                                f"'resources', e.g. resources: {{{misplaced[0]}: ...}}")
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise TaskSpecError(unknown_fields(unknown, known, elsewhere={
                k: f"resources.{k}" for k in RESOURCE_KEYS}))
        kw: dict[str, Any] = {}
        for key in ("name", "transformation"):
            value = data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise TaskSpecError(f"field {key!r}: required, a non-empty string")
            kw[key] = value.strip()
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", kw["name"]) is not None,
               "name", "letters, digits and ._- only, at most 200 characters")
        for key in ("job_parameters", "scope", "input_dataset", "output_dataset", "site", "share",
                    "prod_source_label", "transfer_type", "pilot_version", "working_group",
                    "destination_se", "vo"):
            if key in data and data[key] is not None:
                _check(isinstance(data[key], str), key, "must be a string")
                _check(len(data[key]) <= _TEXT_LIMITS.get(key, 255), key,
                       f"at most {_TEXT_LIMITS.get(key, 255)} characters")
                kw[key] = data[key]
        for key in ("vo", "working_group"):
            if kw.get(key) is not None:
                _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", kw[key]) is not None,
                       key, "letters, digits and ._- only, at most 64 characters")
        if data.get("notify") is not None:
            from .notifications import NotifySpecError, notify_spec
            try:
                kw["notify"] = notify_spec(data["notify"])
            except NotifySpecError as exc:
                raise TaskSpecError(str(exc)) from None
        for key in ("scope", "input_dataset", "output_dataset"):
            if kw.get(key) or key == "scope" and key in kw:       # an empty scope is no scope
                try:
                    check_name(kw[key], key)
                except BadFileName as exc:
                    raise TaskSpecError(f"field {key!r}: {exc}") from None
        if "outputs" in data:
            outs = data["outputs"]
            _check(isinstance(outs, list) and all(isinstance(o, str) and o for o in outs),
                   "outputs", "must be a list of file name patterns")
            kw["outputs"] = list(outs)
        resources = data.get("resources", {})
        _check(isinstance(resources, dict), "resources", "must be a mapping")
        unknown_res = sorted(set(resources) - RESOURCE_KEYS, key=str)
        _check(not unknown_res, "resources", unknown_fields(unknown_res, RESOURCE_KEYS, "key"))
        ints = {"files_per_job": data.get("files_per_job"), "n_jobs": data.get("n_jobs"),
                **{k: data.get(k) for k in ("events_per_job", "events_per_file",
                                            "events_per_range")},
                "priority": data.get("priority"), "max_attempts": data.get("max_attempts"),
                **{k: resources.get(k) for k in ("cores", "memory_mb", "walltime_s", "disk_mb")}}
        for key, value in ints.items():
            if value is None:
                continue
            _check(isinstance(value, int) and not isinstance(value, bool), key,
                   "must be an integer")
            _check(key == "priority" or value >= 1, key, "must be at least 1")
            limit = 2**63 - 1 if key.startswith("events_") else 2**31 - 1
            _check(-limit <= value <= limit, key, f"must be within -{limit}..{limit}")
            kw[key] = value
        _check(kw.get("max_attempts", 3) <= 100, "max_attempts", "at most 100")
        if kw.get("n_jobs", 0) > MAX_JOBS_PER_CALL:
            raise LimitExceeded(f"field 'n_jobs': at most {MAX_JOBS_PER_CALL} jobs per task "
                                f"submission, got {kw['n_jobs']}")
        if data.get("jedi_parameters") is not None:
            _check(isinstance(data["jedi_parameters"], dict), "jedi_parameters",
                   "must be a mapping (JEDI's task parameters)")
            kw["jedi_parameters"] = data["jedi_parameters"]
        if data.get("event_service") is not None:
            kw["event_service"] = EventServiceSpec.from_dict(data["event_service"])
        spec = cls(**kw)
        if spec.event_service is not None:
            if not (spec.input_dataset and spec.events_per_file and spec.events_per_range):
                raise TaskSpecError("field 'event_service': needs 'input_dataset', "
                                    "'events_per_file' and 'events_per_range'")
            if spec.events_per_job:
                raise TaskSpecError("field 'event_service': the consumers share all ranges; "
                                    "'events_per_job' does not apply")
        if spec.transfer_type not in (None, "direct"):
            raise TaskSpecError("field 'transfer_type': only 'direct' is known")
        if spec.outputs and not spec.output_dataset:
            raise TaskSpecError("field 'output_dataset': required when 'outputs' is given")
        if not spec.input_dataset and not spec.n_jobs:
            raise TaskSpecError("field 'input_dataset' or 'n_jobs': one is required")
        if spec.events_per_job and not (spec.input_dataset and spec.events_per_file):
            raise TaskSpecError("field 'events_per_job': needs 'input_dataset' and "
                                "'events_per_file'")
        if spec.events_per_range and not (spec.events_per_job or spec.event_service):
            raise TaskSpecError("field 'events_per_range': needs 'events_per_job' "
                                "(or 'event_service')")
        if spec.events_per_range and spec.events_per_job and \
                spec.events_per_range > spec.events_per_job:
            raise TaskSpecError("field 'events_per_range': at most 'events_per_job'")
        return spec


def unknown_fields(unknown: list, known: set[str] | frozenset[str], what: str = "field",
                   elsewhere: dict[str, str] | None = None) -> str:
    """"unknown field(s) X (did you mean Y?); known fields: ..." for a person to act on.
    ``elsewhere``: names known at another place (name -> where to write it)."""
    import difflib

    places = {**{k: k for k in known}, **(elsewhere or {})}
    names = []
    for name in unknown[:10]:
        close = difflib.get_close_matches(str(name), sorted(places), n=1)
        names.append(f"{str(name)[:60]!r}"
                     + (f" (did you mean {places[close[0]]!r}?)" if close else ""))
    return (f"unknown {what}(s) {', '.join(names)}; known {what}s: "
            f"{', '.join(sorted(known))}")


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise TaskSpecError(f"field {key!r}: {reason}")


def split_inputs(files: list[dict], files_per_job: int) -> list[list[dict]]:
    """Group input files into jobs of ``files_per_job`` (the last one may hold fewer)."""
    return [files[i:i + files_per_job] for i in range(0, len(files), files_per_job)]


def output_names(spec: TaskSpec, task_id: int, serial: int, attempt: int) -> list[str]:
    """Output lfns of one job; retries get an attempt suffix so no attempt overwrites another."""
    names = []
    for pattern in spec.outputs:
        lfn = _fill(pattern, {"TASK": spec.name, "TASKID": str(task_id), "SN": f"{serial:06d}",
                              "ATTEMPT": str(attempt)})
        if attempt > 1 and "${ATTEMPT}" not in pattern:
            lfn = f"{lfn}.{attempt}"
        names.append(check_name(lfn, "output file name"))
    return names


def log_name(spec_name: str, task_id: int, serial: int, attempt: int) -> str:
    """The job's log tarball; a long task name is shortened, never the ids or the suffix."""
    head, tail = f"log.{task_id}.{serial:06d}.{attempt}.", ".job.log.tgz"
    room = MAX_NAME_LENGTH - len(head) - len(tail) - 2   # a retry's attempt may grow 2 digits
    return check_name(f"{head}{spec_name[:room].rstrip('.')}{tail}", "log file name")


def _with_suffix(base: str, suffix: str) -> str:
    """``base + suffix`` within the name length: the base is shortened, the suffix kept."""
    return base[:MAX_NAME_LENGTH - len(suffix)] + suffix


def _fill(text: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def make_job(spec: TaskSpec, task_id: int, owner: str, serial: int, inputs: list[dict],
             attempt: int = 1, site: str | None = None,
             events: Any = None) -> tuple[dict, list[dict]]:
    """One job's row values and its file rows (inputs, outputs, log).

    ``events``: the job's window of events in its file (``eventranges.EventWindow``), if any.
    """
    outs = output_names(spec, task_id, serial, attempt)
    values = {"IN": ",".join(f["lfn"] for f in inputs), "OUT": outs[0] if outs else "",
              "SN": f"{serial:06d}", "TASK": spec.name, "TASKID": str(task_id),
              "ATTEMPT": str(attempt)}
    if events is not None:
        values.update(FIRSTEVENT=str(events.first), SKIPEVENTS=str(events.first),
                      MAXEVENTS=str(events.count))
    values.update({f"OUT{i}": o for i, o in enumerate(outs)})
    job = {
        "task_id": task_id, "serial": serial, "attempt_nr": attempt,
        "max_attempts": spec.max_attempts, "owner": owner, "site": site or spec.site,
        "prod_source_label": spec.prod_source_label, "share": spec.share,
        "priority": spec.priority, "current_priority": spec.priority,
        "transformation": spec.transformation,
        "job_pars": _fill(spec.job_parameters, values),
        "cores": spec.cores, "memory_mb": spec.memory_mb, "walltime_s": spec.walltime_s,
        "disk_mb": spec.disk_mb, "pilot_version": spec.pilot_version,
        "transfer_type": spec.transfer_type, "working_group": spec.working_group,
        "destination_se": spec.destination_se, "vo": spec.vo,
    }
    files = [{"type": "input", "scope": f["scope"], "lfn": f["lfn"], "dataset": f["dataset"],
              "guid": f["guid"], "fsize": f.get("fsize"), "checksum": f.get("checksum"),
              "status": "ready"} for f in inputs]
    for lfn in outs:
        files.append({"type": "output", "scope": spec.scope, "lfn": lfn,
                      "dataset": spec.output_dataset, "guid": str(uuid.uuid4()),
                      "status": "defined"})
    files.append({"type": "log", "scope": spec.scope,
                  "lfn": log_name(spec.name, task_id, serial, attempt),
                  "dataset": spec.output_dataset or f"{spec.name}.log", "guid": str(uuid.uuid4()),
                  "status": "defined"})
    return job, files


def make_consumer_job(spec: TaskSpec, task_id: int, owner: str, serial: int,
                      inputs: list[dict], site: str | None = None) -> tuple[dict, list[dict]]:
    """An event-service consumer: the task's transformation over ranges of the task's pool
    (its pilot stages only the files its ranges name); no outputs of its own but its log,
    the outputs belong to the merge job."""
    job, files = make_job(dataclasses.replace(spec, outputs=[]), task_id, owner, serial, inputs,
                          site=site)
    job["event_service"] = ES_CONSUMER
    return job, files


def make_merge_job(spec: TaskSpec, task_id: int, owner: str, serial: int,
                   inputs: list[dict], site: str | None = None) -> tuple[dict, list[dict]]:
    """The event-service merge job: ``event_service.merge``'s transformation with ``${IN}``
    the range outputs (``inputs``, in event order) and the task's outputs."""
    assert spec.event_service is not None
    merge = dataclasses.replace(spec, transformation=spec.event_service.merge_transformation,
                                job_parameters=spec.event_service.merge_parameters)
    job, files = make_job(merge, task_id, owner, serial, inputs, site=site)
    job["event_service"] = ES_MERGE
    return job, files


def retry_job_values(job: dict, files: list[dict]) -> tuple[dict, list[dict]]:
    """A new attempt of a failed job: same inputs, fresh output names, attempt + 1."""
    attempt = job["attempt_nr"] + 1
    keep = ("task_id", "serial", "max_attempts", "owner", "site", "prod_source_label", "share",
            "priority", "transformation", "cores", "memory_mb", "walltime_s", "disk_mb",
            "pilot_version", "transfer_type", "working_group", "destination_se",
            "event_service", "vo")
    values = {k: job.get(k) for k in keep}
    values.update(attempt_nr=attempt, parent_id=job["panda_id"],
                  current_priority=job["priority"])
    old_suffix = f".{job['attempt_nr']}" if job["attempt_nr"] > 1 else ""
    renames: dict[str, str] = {}
    new_files = []
    for f in files:
        nf = {k: f[k] for k in ("type", "scope", "lfn", "dataset", "guid", "fsize", "checksum",
                                "status")}
        if f["type"] in ("output", "log"):
            base = f["lfn"][:-len(old_suffix)] if old_suffix and f["lfn"].endswith(old_suffix) \
                else f["lfn"]
            if f["type"] == "log" and base.startswith("log."):
                new = base.replace(f".{job['attempt_nr']}.", f".{attempt}.", 1)
            else:
                new = _with_suffix(base, f".{attempt}")
            renames[f["lfn"]] = new
            nf.update(lfn=check_name(new, "output file name"), guid=str(uuid.uuid4()),
                      status="defined", fsize=None, checksum=None)
        new_files.append(nf)
    pars = job["job_pars"]
    for old, new in renames.items():
        pars = pars.replace(old, new)
    values["job_pars"] = pars
    return values, new_files
