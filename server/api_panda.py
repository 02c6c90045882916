"""What PanDA's own client (PyPI ``panda-client`` 2.x) and pilot 3 need beyond ``api.py``.

PanDA's client talks to ``/api/v1`` with JSON bodies; most calls map onto our task API, and the
ones registered here translate its shapes: ``job/submit`` takes each job as the positional list
of the client's ``JobSpec`` attributes (and ``FileSpec`` lists), the sandbox cache stores uploads
under a safe name, and replies use PanDA's attribute names. Pilot 3 also reads the storage
endpoints (``/cache/ddmendpoints.json``). Facts and limits: docs/protocol.md. Nothing is unpickled.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web

from panda_core.replicas import BadFileName, check_name

from .apibase import WRITERS, ApiError, ApiMethods, Context, Param, as_int, int_param, str_param
from .handlers import MAX_JSON_DEPTH, BaseHandler, bad_text, json_depth
from .jobcreator import TaskSpec, TaskSpecError
from .queuedata import storagedata
from .taskbuffer.owners import Owner, OwnershipError

log = logging.getLogger(__name__)

api = ApiMethods()

MAX_JOBS_PER_SUBMIT = 1000
MAX_CACHE_FILE_BYTES = 10 * 1024 * 1024   # PanDA's client limit for non-sandbox files

# The order of panda-client 2.x's JobSpec/FileSpec attributes (the protocol's field names). When
# pandaclient is importable in the server's environment its own order is used instead, so a newer
# client keeps working; tests/compat checks these against the installed client.
JOB_ATTRIBUTES: tuple[str, ...] = (
    "PandaID", "jobDefinitionID", "schedulerID", "pilotID", "creationTime", "creationHost",
    "modificationTime", "modificationHost", "AtlasRelease", "transformation", "homepackage",
    "prodSeriesLabel", "prodSourceLabel", "prodUserID", "assignedPriority", "currentPriority",
    "attemptNr", "maxAttempt", "jobStatus", "jobName", "maxCpuCount", "maxCpuUnit",
    "maxDiskCount", "maxDiskUnit", "ipConnectivity", "minRamCount", "minRamUnit", "startTime",
    "endTime", "cpuConsumptionTime", "cpuConsumptionUnit", "commandToPilot", "transExitCode",
    "pilotErrorCode", "pilotErrorDiag", "exeErrorCode", "exeErrorDiag", "supErrorCode",
    "supErrorDiag", "ddmErrorCode", "ddmErrorDiag", "brokerageErrorCode", "brokerageErrorDiag",
    "jobDispatcherErrorCode", "jobDispatcherErrorDiag", "taskBufferErrorCode",
    "taskBufferErrorDiag", "computingSite", "computingElement", "jobParameters", "metadata",
    "prodDBlock", "dispatchDBlock", "destinationDBlock", "destinationSE", "nEvents", "grid",
    "cloud", "cpuConversion", "sourceSite", "destinationSite", "transferType", "taskID",
    "cmtConfig", "stateChangeTime", "prodDBUpdateTime", "lockedby", "relocationFlag",
    "jobExecutionID", "VO", "pilotTiming", "workingGroup", "processingType", "prodUserName",
    "nInputFiles", "countryGroup", "batchID", "parentID", "specialHandling", "jobsetID",
    "coreCount", "nInputDataFiles", "inputFileType", "inputFileProject", "inputFileBytes",
    "nOutputDataFiles", "outputFileBytes", "jobMetrics", "workQueue_ID", "jediTaskID",
    "jobSubStatus", "actualCoreCount", "reqID", "maxRSS", "maxVMEM", "maxSWAP", "maxPSS",
    "avgRSS", "avgVMEM", "avgSWAP", "avgPSS", "maxWalltime", "nucleus", "eventService",
    "failedAttempt", "hs06sec", "gshare", "hs06", "totRCHAR", "totWCHAR", "totRBYTES",
    "totWBYTES", "rateRCHAR", "rateWCHAR", "rateRBYTES", "rateWBYTES", "resource_type", "diskIO",
    "memory_leak", "memory_leak_x2", "container_name", "job_label", "gco2_regional",
    "gco2_global", "cpu_architecture_level", "outputFileType")
FILE_ATTRIBUTES: tuple[str, ...] = (
    "rowID", "PandaID", "GUID", "lfn", "type", "dataset", "status", "prodDBlock",
    "prodDBlockToken", "dispatchDBlock", "dispatchDBlockToken", "destinationDBlock",
    "destinationDBlockToken", "destinationSE", "fsize", "md5sum", "checksum", "scope")


def spec_attributes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(JobSpec names, FileSpec names): the installed client's if there is one, else ours."""
    try:
        from pandaclient.FileSpec import FileSpec
        from pandaclient.JobSpec import JobSpec
        return tuple(JobSpec._attributes), tuple(FileSpec._attributes)
    except Exception:  # noqa: BLE001 - not installed or a different layout: use the known order
        return JOB_ATTRIBUTES, FILE_ATTRIBUTES


# ---------------------------------------------------------------------- replies in PanDA's names
_JOB_ALIASES = {  # PanDA JobSpec name -> our job column
    "jobDefinitionID": "serial", "jediTaskID": "task_id", "taskID": "task_id",
    "jobsetID": "task_id", "attemptNr": "attempt_nr", "maxAttempt": "max_attempts",
    "computingSite": "site", "prodUserID": "owner", "prodUserName": "owner",
    "prodSourceLabel": "prod_source_label", "transformation": "transformation",
    "jobParameters": "job_pars", "currentPriority": "current_priority",
    "assignedPriority": "priority", "coreCount": "cores", "minRamCount": "memory_mb",
    "maxWalltime": "walltime_s", "maxCpuCount": "walltime_s", "maxDiskCount": "disk_mb",
    "creationTime": "creation_time", "modificationTime": "modification_time",
    "stateChangeTime": "state_changed", "startTime": "start_time", "endTime": "end_time",
    "pilotErrorCode": "pilot_error_code", "pilotErrorDiag": "pilot_error_diag",
    "transExitCode": "trans_exit_code", "exeErrorCode": "exe_error_code",
    "exeErrorDiag": "exe_error_diag", "jobDispatcherErrorCode": "dispatcher_error_code",
    "jobDispatcherErrorDiag": "dispatcher_error_diag", "ddmErrorCode": "ddm_error_code",
    "ddmErrorDiag": "ddm_error_diag", "taskBufferErrorCode": "task_buffer_error_code",
    "taskBufferErrorDiag": "task_buffer_error_diag",
    "cpuConsumptionTime": "cpu_consumption_time", "maxRSS": "max_rss", "nEvents": "n_events",
    "jobMetrics": "job_metrics", "batchID": "batch_id", "pilotID": "pilot_id",
    "commandToPilot": "command", "gshare": "share", "transferType": "transfer_type",
    "modificationHost": "node", "workingGroup": "working_group", "VO": "vo",
}
_FILE_ALIASES = {"rowID": "row_id", "PandaID": "panda_id", "GUID": "guid", "lfn": "lfn",
                 "type": "type", "dataset": "dataset", "status": "status", "scope": "scope",
                 "fsize": "fsize", "checksum": "checksum", "destinationSE": "ddm_endpoint"}


def _panda_value(value: Any) -> Any:
    """Datetimes the way PanDA's client decodes them: ``{"__datetime__": isoformat}``."""
    if isinstance(value, (dt.datetime, dt.date)):
        return {"__datetime__": value.isoformat()}
    return value


def panda_job_names(job: dict) -> dict:
    """PanDA's JobSpec names for a job row (added beside our own names in job views)."""
    out = {name: _panda_value(job.get(col)) for name, col in _JOB_ALIASES.items() if col in job}
    if "destinationDBlock" not in out:
        outs = [f for f in job.get("files", []) if f.get("type") == "output"]
        if outs:
            out["destinationDBlock"] = outs[0].get("dataset")
    return out


def panda_file_names(f: dict) -> dict:
    out = {name: f.get(col) for name, col in _FILE_ALIASES.items() if col in f}
    checksum = str(f.get("checksum") or "")
    if checksum.startswith("md5:"):
        out["md5sum"] = checksum[4:]
    return out


# ---------------------------------------------------------------------- job/submit
def _null(value: Any) -> Any:
    return None if value in (None, "NULL", "None", "") else value


def _spec_int(value: Any, name: str) -> int | None:
    """A JobSpec number ("NULL" for unset); 64-bit, whole."""
    value = _null(value)
    if value is None:
        return None
    try:
        return as_int(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(f"{name} must be an integer (64-bit), got {str(value)[:40]!r}") from None


def _load_json_jobs(raw: Any) -> list:
    if isinstance(raw, str):
        def hook(obj: dict) -> Any:
            if "_datetime_object" in obj:
                return str(obj["_datetime_object"])
            return obj
        try:
            raw = json.loads(raw, object_hook=hook)
        except (ValueError, RecursionError):
            raise ApiError("parameter 'jobs' is not valid JSON") from None
        if json_depth(raw) > MAX_JSON_DEPTH or bad_text({"jobs": raw}):
            raise ApiError("parameter 'jobs': nested too deep, or text with a NUL byte or a "
                           "lone surrogate")
    if not isinstance(raw, list) or not raw:
        raise ApiError("parameter 'jobs' must be a non-empty JSON list of jobs")
    if len(raw) > MAX_JOBS_PER_SUBMIT:
        raise ApiError(f"parameter 'jobs': at most {MAX_JOBS_PER_SUBMIT} jobs per call")
    return raw


def job_state_to_dict(state: list, job_names: tuple[str, ...],
                      file_names: tuple[str, ...], index: int) -> tuple[dict, list[dict]]:
    """One positional JobSpec list (files last) -> (job attributes, file attribute dicts)."""
    where = f"job {index}"
    if not isinstance(state, list) or len(state) != len(job_names) + 1:
        raise ApiError(f"{where}: expected a list of {len(job_names)} JobSpec values followed by "
                       f"a list of files, got {type(state).__name__} of length "
                       f"{len(state) if isinstance(state, list) else '-'}")
    job = dict(zip(job_names, state[:-1]))
    files = state[-1]
    if not isinstance(files, list):
        raise ApiError(f"{where}: the last element must be the list of files")
    out_files = []
    for n, f in enumerate(files):
        # the client appends its owner slot (null) after the attributes
        if not isinstance(f, list) or len(f) not in (len(file_names), len(file_names) + 1):
            raise ApiError(f"{where}, file {n}: expected a list of {len(file_names)} "
                           "FileSpec values (and an optional trailing null)")
        out_files.append(dict(zip(file_names, f)))
    return job, out_files


def job_to_task(job: dict, files: list[dict], index: int) -> dict:
    """A client JobSpec as a one-job task of ours (docs/protocol.md: what is mapped, what not)."""
    where = f"job {index}"
    inputs = [f for f in files if _null(f.get("type")) == "input"]
    if inputs:
        raise ApiError(f"{where}: input files in job/submit are not supported here; register "
                       "them with data/add_files and submit a task with an input_dataset")
    outputs = [f for f in files if _null(f.get("type")) == "output"]
    name = str(_null(job.get("jobName")) or f"job.{_null(job.get('jobDefinitionID')) or index}")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")[:200] or f"job.{index}"
    task: dict[str, Any] = {"name": name, "n_jobs": 1}
    if not isinstance(_null(job.get("transformation")), str):
        raise ApiError(f"{where}: transformation is required")
    task["transformation"] = job["transformation"]
    params = _null(job.get("jobParameters"))
    if params is not None:
        task["job_parameters"] = str(params)
    for key, attr in (("site", "computingSite"), ("prod_source_label", "prodSourceLabel"),
                      ("share", "gshare")):
        if isinstance(_null(job.get(attr)), str):
            task[key] = job[attr]
    priority = _spec_int(job.get("assignedPriority"), f"{where}: assignedPriority")
    if priority is None:
        priority = _spec_int(job.get("currentPriority"), f"{where}: currentPriority")
    if priority is not None:
        task["priority"] = priority
    attempts = _spec_int(job.get("maxAttempt"), f"{where}: maxAttempt")
    if attempts and attempts > 0:
        task["max_attempts"] = min(attempts, 100)
    resources = {}
    for key, attrs in (("cores", ("coreCount",)), ("memory_mb", ("minRamCount",)),
                       ("walltime_s", ("maxWalltime", "maxCpuCount")),
                       ("disk_mb", ("maxDiskCount",))):
        for attr in attrs:
            value = _spec_int(job.get(attr), f"{where}: {attr}")
            if value and value > 0:
                resources[key] = value
                break
    if resources:
        task["resources"] = resources
    if outputs:
        task["outputs"] = [str(f.get("lfn")) for f in outputs]
        task["output_dataset"] = str(_null(outputs[0].get("destinationDBlock"))
                                     or _null(outputs[0].get("dataset")) or f"{name}.outputs")
        scope = _null(outputs[0].get("scope"))
        if scope:                    # else the caller's own user.<name> scope
            task["scope"] = str(scope)
    try:
        TaskSpec.from_dict(task)
        for lfn in task.get("outputs", []):
            check_name(lfn, "output file name")
    except (TaskSpecError, BadFileName) as exc:
        raise ApiError(f"{where}: {exc}") from None
    return task


@api("job", "submit", ("POST",), WRITERS, params=(
    Param("jobs", "any", True, "PanDA JobSpecs: a JSON list of positional JobSpec lists, or "
          "that list as JSON text"),), bulk=True)
def job_submit(ctx: Context, params: dict) -> list[list]:
    """PanDA's submitJobs: the jobs of one call become one task owned by the caller (each job
    with its own transformation, parameters, site and outputs), so they share a jobsetID."""
    raw = _load_json_jobs(params.get("jobs"))
    job_names, file_names = spec_attributes()
    converted = []
    for i, state in enumerate(raw):
        job, files = job_state_to_dict(state, job_names, file_names, i)
        converted.append((job, job_to_task(job, files, i)))
    known = {site["name"] for site in ctx.tb.sites.all()}
    for i, (_, task) in enumerate(converted):      # refuse before the first job is created
        if task.get("site") and task["site"] not in known:
            raise ApiError(f"job {i}: unknown computingSite {task['site']!r}")
    results = []
    jobset: int | None = None          # the first job's task: every job of the call joins it
    for n, (job, task) in enumerate(converted):
        try:
            result = ctx.submitter.submit(task, owner=ctx.identity.subject, into_task=jobset,
                                          first_serial=n + 1, who=Owner.of(ctx.identity))
        except OwnershipError as exc:
            raise ApiError(f"job {task['name']}: permission denied: {exc}", 403) from None
        except (TaskSpecError, BadFileName) as exc:
            raise ApiError(f"job {task['name']}: {exc}") from None
        jobset = result.task_id
        def_id = _spec_int(job.get("jobDefinitionID"), "jobDefinitionID")
        results.append([result.job_ids[0], def_id if def_id is not None else 1,
                        {"jobsetID": result.task_id}])
    ctx.message = f"{len(results)} job(s) submitted"
    return results


# ---------------------------------------------------------------------- tasks
def _task_dict(task: dict) -> dict:
    return {"jediTaskID": task["task_id"], "taskName": task["name"], "status": task["status"],
            "userName": task["owner"], "taskPriority": task["priority"],
            "site": task["site"], "errorDialog": task["error_dialog"],
            "creationDate": _panda_value(task["created"]),
            "modificationTime": _panda_value(task["modified"])}


def _since(value: Any) -> dt.datetime | None:
    value = _null(value)
    if value is None:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("T", " ").strip())
    except ValueError:
        raise ApiError(f"parameter 'since' must be a date 'YYYY-MM-DD HH:MM:SS', got {value!r}"
                       ) from None


@api("task", "get_tasks_modified_since", params=(
    Param("since", max_length=64, description="YYYY-MM-DD HH:MM:SS"),
    Param("dn", description="the owner (default: the caller)"),
    Param("min_task_id", "integer"), Param("prod_source_label", max_length=32),
    Param("full", description="ignored")))
def task_modified_since(ctx: Context, params: dict) -> dict:
    """Tasks of ``dn`` (default: the caller) modified since ``since``; keys are task ids."""
    owner = str_param(params, "dn") or (ctx.identity.subject if ctx.identity else None)
    min_id = int_param(params, "min_task_id", False)
    label = _null(params.get("prod_source_label"))
    out = {}
    for task in ctx.tb.tasks.find(owner=owner, since=_since(params.get("since")), limit=10000):
        if min_id is not None and task["task_id"] < min_id:
            continue
        if label and label != "user" and (task.get("params") or {}).get(
                "prod_source_label", "managed") != label:
            continue
        out[str(task["task_id"])] = _task_dict(task)
    return out


#: JediTaskSpec attributes pbook filters on, and where each is in our task view
_DETAIL_FILTERS = ("jediTaskID", "reqID", "status", "superStatus", "taskName", "userName")


def _task_detail(task: dict, counts: dict[str, int]) -> dict:
    """A task as pbook shows it (JEDI's task view): ids, status, file progress by job."""
    done = counts.get("finished", 0)
    failed = counts.get("failed", 0) + counts.get("cancelled", 0)
    total = sum(counts.values())
    view = _task_dict(task)
    view.update(reqID=task["task_id"], superStatus=task["status"], nFiles=total,
                nFilesFinished=done, nFilesFailed=failed,
                pctFinished=round(100 * done / total) if total else 0,
                pctFailed=round(100 * failed / total) if total else 0)
    return view


@api("task", "get_tasks_detailed_info_since", params=(
    Param("since", max_length=64, description="YYYY-MM-DD HH:MM:SS"),
    Param("n_tasks", "integer", minimum=1, maximum=10000, description="at most (500)"),
    Param("filters", "any", description="JSON object (or its text): JEDI attribute -> value")))
def task_detailed_info_since(ctx: Context, params: dict) -> list[dict]:
    """The caller's tasks modified since ``since`` (all when absent), at most ``n_tasks``,
    filtered by ``filters`` (JSON: JEDI attribute -> value, equality): what pbook lists."""
    if ctx.identity is None:
        raise ApiError("secure connection required: pbook lists the caller's own tasks")
    limit = int_param(params, "n_tasks", False) or 500
    if not 0 < limit <= 10000:
        raise ApiError("parameter 'n_tasks' must be from 1 to 10000")
    raw = _null(params.get("filters"))
    filters: dict = {}
    if raw is not None:
        try:
            filters = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise ApiError("parameter 'filters' must be a JSON object") from None
        if not isinstance(filters, dict):
            raise ApiError("parameter 'filters' must be a JSON object")
        unknown = sorted(set(filters) - set(_DETAIL_FILTERS))
        if unknown:
            raise ApiError(f"parameter 'filters': unknown key(s) {', '.join(map(str, unknown))} "
                           f"(known: {', '.join(_DETAIL_FILTERS)})")
    owner = str(filters.get("userName") or ctx.identity.subject)
    out = []
    for task in ctx.tb.tasks.find(owner=owner, since=_since(params.get("since")), limit=limit):
        view = _task_detail(task, ctx.tb.tasks.job_counts(task["task_id"]))
        if all(str(view.get(k)) == str(v) for k, v in filters.items() if k != "userName"):
            out.append(view)
    return out


@dataclass(frozen=True)
class Codes:
    """PanDA's return codes of a task command's refusals (``data``; 0 on success)."""
    no_task: int = 2
    not_yours: int = 3
    status: int = 4            # the task's status does not allow it


COMMAND_CODES = Codes()
#: increase_attempt_nr's own: 1 unknown task, 2 invalid status, 3 permission denied, 4 wrong
#: parameter
INCREASE_CODES = Codes(no_task=1, not_yours=3, status=2)
CODE_BAD_VALUE = 4
TASK_PARAM = Param("task_id", "integer", True, "a jediTaskID", minimum=1)
#: at most this many attempts added at once (a task's max_attempts is at most 100 on submit)
MAX_INCREASE = 100


def _own_task(ctx: Context, task_id: int, codes: Codes = COMMAND_CODES) -> dict:
    """The task, if the caller may command it (its owner or an admin); PanDA's codes else."""
    from .taskbuffer import NotFound
    try:
        task = ctx.tb.tasks.get(task_id)
    except NotFound:
        raise ApiError(f"no task {task_id}", data=codes.no_task) from None
    if ctx.identity.role != "admin" and task["owner"] != ctx.identity.subject:
        raise ApiError(f"permission denied: task {task_id} belongs to {task['owner']}",
                       data=codes.not_yours)
    return task


def _command(ctx: Context, task_id: int, run: Callable[[int, str], Any],
             codes: Codes = COMMAND_CODES) -> Any:
    """Run a task command of the task buffer for the caller; a refusal is PanDA's code."""
    from .taskbuffer import Conflict, NotFound
    _own_task(ctx, task_id, codes)
    try:
        return run(task_id, ctx.identity.subject)
    except NotFound:
        raise ApiError(f"no task {task_id}", data=codes.no_task) from None
    except Conflict as exc:
        raise ApiError(str(exc), data=codes.status) from None


@api("task", "retry", ("POST",), WRITERS, params=(
    TASK_PARAM, Param("new_parameters", "any", description="not supported (refused)")))
def task_retry(ctx: Context, params: dict) -> int:
    """PanDA's retryTask: the failed and cancelled jobs of an ended task run again. ``data``
    is PanDA's code: 0 registered, 2 no such task, 3 permission denied, 4 the task's status
    does not allow it (or nothing to retry); ``new_parameters`` are not supported (refused)."""
    task_id = int_param(params, "task_id")
    if _null(params.get("new_parameters")):
        raise ApiError("retry with new parameters is not supported here",
                       data=COMMAND_CODES.status)
    new_ids = _command(ctx, task_id, ctx.tb.jobs.retry_task)
    if not new_ids:
        raise ApiError(f"task {task_id} has no failed or cancelled job to retry",
                       data=COMMAND_CODES.status)
    ctx.message = f"jediTaskID={task_id} retried: {len(new_ids)} job(s) again"
    return 0


@api("task", "finish", ("POST",), WRITERS, params=(
    TASK_PARAM, Param("soft", "boolean", description="let the running jobs end (else they "
                      "are killed too)"),
    Param("broadcast", "boolean", description="ignored (PanDA's message to pilots)")))
def task_finish(ctx: Context, params: dict) -> int:
    """PanDA's finishTask: the task ends without more jobs. Jobs whose payload has not started
    are cancelled; ``soft`` lets the running ones end, else they are killed too; the task then
    ends done, finished or failed by what ran. ``data``: 0, or 2 no such task, 3 permission
    denied, 4 the task has ended."""
    task_id = int_param(params, "task_id")
    soft = bool(params.get("soft", False))
    result = _command(ctx, task_id,
                      lambda tid, actor: ctx.tb.commands.finish(tid, actor, soft=soft))
    ctx.message = (f"jediTaskID={task_id} {'soft ' if soft else ''}finish: {result.jobs} "
                   f"job(s) cancelled; the task is {result.status}")
    return 0


@api("task", "pause", ("POST",), WRITERS, params=(TASK_PARAM,))
def task_pause(ctx: Context, params: dict) -> int:
    """PanDA's pauseTask: the task's queued jobs are held back from dispatch (``throttled``),
    its running ones go on. ``data``: 0, or 2 no such task, 3 permission denied, 4 the task
    is paused, finishing or has ended."""
    task_id = int_param(params, "task_id")
    result = _command(ctx, task_id, ctx.tb.commands.pause)
    ctx.message = f"jediTaskID={task_id} paused: {result.jobs} queued job(s) held"
    return 0


@api("task", "resume", ("POST",), WRITERS, params=(TASK_PARAM,))
def task_resume(ctx: Context, params: dict) -> int:
    """PanDA's resumeTask: a paused task's held jobs are dispatched again. ``data``: 0, or 2
    no such task, 3 permission denied, 4 the task is not paused."""
    task_id = int_param(params, "task_id")
    result = _command(ctx, task_id, ctx.tb.commands.resume)
    ctx.message = (f"jediTaskID={task_id} resumed: {result.jobs} job(s) queued again; the "
                   f"task is {result.status}")
    return 0


@api("task", "increase_attempts", ("POST",), WRITERS, params=(
    TASK_PARAM, Param("increase", "any", description=f"attempts to add, 0..{MAX_INCREASE} "
                      "(the client sends 3)")))
def task_increase_attempts(ctx: Context, params: dict) -> int:
    """PanDA's increase_attempt_nr: the task's jobs may fail ``increase`` more times; those
    whose attempts were used up run again now. ``data``: 0, or 1 no such task, 2 the task is
    not ready, running or paused, 3 permission denied, 4 a wrong ``increase``."""
    task_id = int_param(params, "task_id")
    raw = params.get("increase", 3)           # panda-client's default
    try:
        increase = as_int(raw)
        if not 0 <= increase <= MAX_INCREASE:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ApiError(f"increase must be a whole number from 0 to {MAX_INCREASE}, got "
                       f"{str(raw)[:40]!r}", data=CODE_BAD_VALUE) from None
    result = _command(ctx, task_id, lambda tid, actor: ctx.tb.commands.increase_attempts(
        tid, actor, increase), INCREASE_CODES)
    ctx.message = (f"jediTaskID={task_id}: {increase} more attempt(s) for its jobs, "
                   f"{result.jobs} failed job(s) run again")
    return 0


#: PanDA task commands this server answers with a reason (which PanDA's client prints) instead
#: of "unknown method"
NOT_SUPPORTED = {
    "reactivate": "reactivateTask is not supported here (PanDA's production managers rerun a "
                  "done task's input with it); retryTask reruns an ended task's failed and "
                  "cancelled jobs",
    "reload_input": "reload_input is not supported here: a task's input is fixed when it is "
                    "submitted (task/extend adds jobs for files added to its dataset since)",
}


def _refusal(why: str):
    def refuse(ctx: Context, params: dict) -> None:
        raise ApiError(why)
    refuse.__doc__ = f"Refused: {why}."
    return refuse


for _name, _why in NOT_SUPPORTED.items():
    api("task", _name, ("POST",), WRITERS, params=(TASK_PARAM,))(_refusal(_why))


@api("task", "get_datasets_and_files", params=(
    Param("task_id", "integer", True, "a jediTaskID", minimum=1),
    Param("dataset_types", "any", description="input, output: comma-separated text or a "
          "list (as PanDA's client sends it)")))
def task_datasets_and_files(ctx: Context, params: dict) -> list[dict]:
    """The files of a task's input (and, if asked, output) dataset with their use status."""
    task = ctx.tb.tasks.get(int_param(params, "task_id"))
    types = params.get("dataset_types") or "input,pseudo_input"
    if isinstance(types, list):
        types = ",".join(str(t) for t in types)
    wanted = {t.strip() for t in str(types).split(",")}
    spec = task["params"] or {}
    out = []
    for kind, key in (("input", "input_dataset"), ("output", "output_dataset")):
        name = spec.get(key)
        if not name or kind not in wanted:
            continue
        files = ctx.tb.data.dataset_files(name)
        out.append({"dataset": {"name": name, "id": name, "type": kind},
                    "files": [{"lfn": f["lfn"], "scope": f["scope"], "id": f["row_id"],
                               "status": "used" if f.get("task_id") == task["task_id"]
                               else "ready"} for f in files]})
    return out


# ---------------------------------------------------------------------- sandbox cache
@api("file_server", "validate_cache_file", ("POST",), WRITERS, params=(
    Param("file_size", "integer", True, "the sandbox's size in bytes", minimum=0),
    Param("checksum", "integer", True, "the gzip trailer's CRC32")))
def validate_cache_file(ctx: Context, params: dict) -> None:
    """panda-client's sandbox reuse check (``file_size``, ``checksum``: the gzip trailer's CRC32).
    Always "not found", so the client uploads: a CRC32 and a size are easy to match with other
    content, and naming another upload here would let whoever made it choose what a user's
    jobs unpack."""
    for key in ("file_size", "checksum"):
        int_param(params, key)
    ctx.message = "not found: upload the sandbox"
    return None


def cache_dir(state) -> Path:
    """Uploaded user files: ``$PANDA_CACHE_DIR``, else ``cache/`` beside the key directory."""
    env = os.environ.get("PANDA_CACHE_DIR")
    return Path(env) if env else Path(state.keys.key_dir).resolve().parent / "cache"


class UploadCacheHandler(BaseHandler):
    """``POST /api/v1/file_server/upload_cache_file``: multipart field ``file``."""
    json_errors = True

    def post(self) -> None:
        identity = self.caller(WRITERS, "upload files")
        uploads = self.request.files.get("file") or []
        if len(uploads) != 1:
            raise ApiError("send exactly one multipart field named 'file'", 400)
        upload = uploads[0]
        name = os.path.basename(upload["filename"] or "")
        try:
            check_name(name, "cache file name")
        except BadFileName as exc:
            raise ApiError(str(exc), 400) from None
        body = upload["body"]
        if len(body) > MAX_CACHE_FILE_BYTES and not name.startswith("sources."):
            raise ApiError(f"{name}: larger than {MAX_CACHE_FILE_BYTES} bytes", 413)
        folder = cache_dir(self.state)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        taken = f"{name} exists with other content: choose another name"
        if target.exists():
            if target.read_bytes() == body:
                return self.reply(True, f"{name} already cached")
            raise ApiError(taken)
        tmp = folder / f".{name}.{os.getpid()}.part"
        try:
            tmp.write_bytes(body)
            os.link(tmp, target)       # never replaces a file another upload just created
        except FileExistsError:
            raise ApiError(taken) from None
        except OSError as exc:
            log.error("cache upload of %s failed: %s", name, exc)
            raise ApiError(f"cannot store {name}: {exc.strerror}", 507) from None
        finally:
            tmp.unlink(missing_ok=True)
        log.info("cache: %s stored %s (%d bytes)", identity.subject, name, len(body))
        self.reply(True, f"stored {name}")


class CacheFileHandler(BaseHandler):
    """``GET /cache/<name>``: a file uploaded to the sandbox cache."""

    def get(self, name: str) -> None:
        try:
            check_name(name, "cache file name")
        except BadFileName as exc:
            raise tornado.web.HTTPError(400, reason=str(exc).replace("\n", " ")[:200])
        path = cache_dir(self.state) / name
        if not path.is_file():
            raise tornado.web.HTTPError(404, reason=f"no cached file {name}")
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(path.read_bytes())


class StoragedataHandler(BaseHandler):
    """``GET /cache/ddmendpoints.json``: storage endpoints in pilot 3's shape."""

    async def get(self) -> None:
        sites = await self.run(self.state.tb.sites.all)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(storagedata([s["config"] for s in sites])))


def routes(kw: dict) -> list:
    """Routes that must come before the generic ``/api/v1/<module>/<method>`` one."""
    return [
        (r"/api/v1/file_server/upload_cache_file", UploadCacheHandler, kw),
        (r"/cache/ddmendpoints\.json", StoragedataHandler, kw),
        (r"/cache/([^/]+)", CacheFileHandler, kw),
    ]
