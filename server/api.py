"""The client API, in PanDA's ``/api/v1/<module>/<method>`` shape: system, tasks, jobs, sites,
data, pilots and factories.

Every method is a plain function ``(ctx, params) -> data`` declared with the roles allowed to
call it (``server/apibase.py``); an unknown task, job or site is reported as success=false with
its message. Reads are open; writes need an identity.
"""
from __future__ import annotations

import json
import logging
import re

from panda_core.debugview import BadDebugRequest
from panda_core.debugview import parse_request as parse_debug_request
from panda_core.replicas import BadFileName
from panda_core.states import FINAL_JOB_STATES

from .api_console import error_text
from .api_panda import panda_file_names, panda_job_names
from .apibase import (ADMIN, PILOTS, WRITERS, ApiError, ApiMethods, Context, Param, as_int,
                      id_list, int_param, str_param)
from .jeditask import CODE_DUPLICATE, CODE_REFUSED, is_jedi_task, task_from_jedi
from .jobcreator import LimitExceeded, TaskSpecError
from .groups import refusal
from .quotas import KINDS, QuotaExceeded
from .queuedata import signed_queuedata
from .taskbuffer import NotFound
from .taskbuffer.data import CatalogueConflict
from .taskbuffer.owners import Owner, OwnershipError

log = logging.getLogger(__name__)

api = ApiMethods()
TASK_ID = Param("task_id", "integer", True, "a jediTaskID", minimum=1)
JOB_IDS = Param("job_ids", "ids", True, "PandaIDs (a repeated key, a list or one id)")
SITE = Param("site", required=True, max_length=128, description="a site's name")
SINCE = Param("since", max_length=64, description="ISO time: modified since")

FINAL_STATES = frozenset(str(s) for s in FINAL_JOB_STATES)
#: files one data/add_files call registers (one transaction)
MAX_FILES_PER_CALL = 10000


def _owns(ctx: Context, owner: str) -> bool:
    return ctx.identity is not None and (ctx.identity.role == "admin"
                                         or ctx.identity.subject == owner)


def _task_view(task: dict, counts: dict[str, int] | None = None) -> dict:
    view = {"jediTaskID": task["task_id"], "task_id": task["task_id"], "taskName": task["name"],
            "status": task["status"], "owner": task["owner"], "priority": task["priority"],
            "share": task["share"], "site": task["site"], "errorDialog": task["error_dialog"],
            "creationDate": task["created"], "modificationTime": task["modified"]}
    if counts is not None:
        view["jobs"] = counts
    return view


# ---------------------------------------------------------------------- system
@api("system", "is_alive")
def is_alive(ctx: Context, params: dict) -> dict:
    return {"alive": True, "time": ctx.clock()}


@api("system", "get_public_key")
def get_public_key(ctx: Context, params: dict) -> str:
    return ctx.keys.public_key_pem


@api("system", "whoami")
def whoami(ctx: Context, params: dict) -> dict | None:
    if ctx.identity is None:
        return None
    return {"subject": ctx.identity.subject, "role": ctx.identity.role, "site": ctx.identity.site}


# ---------------------------------------------------------------------- tasks
@api("task", "submit", ("POST",), WRITERS, params=(
    Param("task_parameters", "object", True, "the task description (docs/contracts.md)"),
    Param("parent_tid", "integer", description="ignored (PanDA's client sends it)")),
    bulk=True)
def task_submit(ctx: Context, params: dict) -> int:
    """Our task description, or JEDI's task parameters as prun and pathena send them
    (``server.jeditask``). A refusal's ``data`` is PanDA's code: 2 a live task of the caller
    has this name (JEDI's ``uniqueTaskName``), 4 anything else (the message says why)."""
    task_params = params.get("task_parameters")
    if not isinstance(task_params, dict):
        raise ApiError("parameter 'task_parameters' must be a JSON object (the task description)",
                       data=CODE_REFUSED)
    try:
        if is_jedi_task(task_params):
            task_params = task_from_jedi(task_params)
            if task_params["jedi_parameters"].get("uniqueTaskName"):
                live = ctx.tb.tasks.find_live(task_params["name"], ctx.identity.subject)
                if live is not None:
                    raise ApiError(f"task name {task_params['name']!r} is in use by your task "
                                   f"jediTaskID={live}", data=CODE_DUPLICATE)
        why = refusal(ctx.identity, task_params.get("vo"), task_params.get("working_group"))
        if why:
            raise ApiError(f"permission denied: {why}", 403, data=CODE_REFUSED)
        result = ctx.submitter.submit(task_params, owner=ctx.identity.subject,
                                      who=Owner.of(ctx.identity))
    except OwnershipError as exc:
        raise ApiError(f"permission denied: {exc}", 403, data=CODE_REFUSED) from None
    except QuotaExceeded as exc:
        raise ApiError(str(exc), 403, data=CODE_REFUSED) from None
    except LimitExceeded as exc:
        raise ApiError(f"bad task description: {exc}", 400, data=CODE_REFUSED) from None
    except (TaskSpecError, BadFileName) as exc:   # BadFileName: an output name made from a pattern
        raise ApiError(f"bad task description: {exc}", data=CODE_REFUSED) from None
    ctx.message = (f"jediTaskID={result.task_id} jobs={len(result.job_ids)} "
                   f"activated={result.activated} assigned={result.assigned}")
    return result.task_id


@api("task", "extend", ("POST",), WRITERS, params=(TASK_ID,), bulk=True)
def task_extend(ctx: Context, params: dict) -> dict:
    task_id = int_param(params, "task_id")
    task = ctx.tb.tasks.get(task_id)
    if not _owns(ctx, task["owner"]):
        raise ApiError(f"permission denied: task {task_id} belongs to {task['owner']}")
    try:
        result = ctx.submitter.extend(task_id, ctx.identity.subject, who=Owner.of(ctx.identity))
    except OwnershipError as exc:
        raise ApiError(f"permission denied: {exc}", 403) from None
    except QuotaExceeded as exc:
        raise ApiError(str(exc), 403) from None
    except LimitExceeded as exc:
        raise ApiError(str(exc), 400) from None
    except (TaskSpecError, BadFileName) as exc:
        raise ApiError(str(exc)) from None
    return {"task_id": task_id, "new_jobs": result.job_ids}


@api("task", "get_status", params=(TASK_ID,))
def task_get_status(ctx: Context, params: dict) -> str:
    return ctx.tb.tasks.get(int_param(params, "task_id"))["status"]


@api("task", "get_details", params=(
    TASK_ID, Param("include_parameters", "boolean", description="add taskParams")))
def task_get_details(ctx: Context, params: dict) -> dict:
    task_id = int_param(params, "task_id")
    task = ctx.tb.tasks.get(task_id)
    view = _task_view(task, ctx.tb.tasks.job_counts(task_id))
    if str(params.get("include_parameters", "")).lower() in ("true", "1"):
        view["taskParams"] = task["params"]
    return view


@api("task", "get_task_parameters", params=(TASK_ID,))
def task_get_parameters(ctx: Context, params: dict) -> dict:
    return ctx.tb.tasks.get(int_param(params, "task_id"))["params"]


@api("task", "get_job_ids", params=(TASK_ID,))
def task_get_job_ids(ctx: Context, params: dict) -> list[int]:
    task_id = int_param(params, "task_id")
    ctx.tb.tasks.get(task_id)
    return ctx.tb.tasks.job_ids(task_id)


@api("task", "list", params=(
    Param("owner", description="only this owner's tasks"), SINCE,
    Param("with_counts", "boolean", description="each task with its jobs per state"),
    Param("limit", "integer", minimum=1, maximum=10000, description="at most (100)")))
def task_list(ctx: Context, params: dict) -> list[dict]:
    """The newest tasks; ``owner``, ``since`` (ISO: modified since); ``with_counts``: each
    with its jobs per state."""
    from .api_console import limit_param, since_param
    tasks = ctx.tb.tasks.find(owner=str_param(params, "owner"), since=since_param(params),
                              limit=limit_param(params, 100, 10000))
    counts = str(params.get("with_counts", "")).lower() in ("true", "1")
    return [_task_view(t, ctx.tb.tasks.job_counts(t["task_id"]) if counts else None)
            for t in tasks]


@api("task", "kill", ("POST",), WRITERS, params=(TASK_ID,))
def task_kill(ctx: Context, params: dict) -> int:
    """PanDA's killTask: the task's live jobs cancelled (their pilots told ``tobekilled``),
    the task ``aborted``; the owner or an admin only. The work: ``TaskCommands.kill``."""
    task_id = int_param(params, "task_id")
    task = ctx.tb.tasks.get(task_id)
    if not _owns(ctx, task["owner"]):
        raise ApiError(f"permission denied: task {task_id} belongs to {task['owner']}")
    result = ctx.tb.commands.kill(task_id, ctx.identity.subject)
    ctx.message = f"killed {result.jobs} jobs"
    return 0


# ---------------------------------------------------------------------- jobs
def _job_view(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k != "files"}
    out["PandaID"] = job["panda_id"]
    out["jobStatus"] = job["status"]
    out.update(panda_job_names(job))                           # PanDA's names, for its client
    out["Files"] = [{**f, **panda_file_names(f)} for f in job.get("files", [])]
    out["error_code"], out["error_text"] = error_text(job)    # the first error, for people
    return out


@api("job", "get_description", ("GET", "POST"), params=(JOB_IDS,))
def job_get_description(ctx: Context, params: dict) -> list[dict | None]:
    return [(_job_view(j) if (j := ctx.tb.jobs.get(i, include_archive=False)) else None)
            for i in id_list(params, "job_ids")]


@api("job", "get_description_incl_archive", ("GET", "POST"), params=(JOB_IDS,))
def job_get_description_incl_archive(ctx: Context, params: dict) -> list[dict | None]:
    return [(_job_view(j) if (j := ctx.tb.jobs.get(i)) else None)
            for i in id_list(params, "job_ids")]


@api("job", "get_history", params=(
    Param("job_id", "integer", True, "a PandaID", minimum=1),))
def job_get_history(ctx: Context, params: dict) -> list[dict]:
    return ctx.tb.jobs.history(int_param(params, "job_id"))


@api("job", "list", params=(
    Param("task_id", "integer", description="only this task's jobs"),
    Param("site", description="only jobs at this site"),
    Param("status", "any", description="only jobs in these states (one, a comma list or a "
          "list)"),
    Param("owner", description="only this owner's jobs"), SINCE,
    Param("newest", "boolean", description="the last `limit` jobs, not the first"),
    Param("limit", "integer", minimum=1, maximum=100000, description="at most (1000)")))
def job_list(ctx: Context, params: dict) -> list[dict]:
    """Jobs by PandaID; filters ``task_id``, ``site``, ``status`` (comma list), ``owner``,
    ``since`` (ISO time: modified since); ``newest``: the last ``limit`` jobs, not the first."""
    from .api_console import limit_param, since_param, states_param
    return [_job_view(j) for j in ctx.tb.jobs.find(
        task_id=int_param(params, "task_id", False), site=str_param(params, "site"),
        status=states_param(params), limit=limit_param(params, 1000, 100000),
        owner=str_param(params, "owner"), since=since_param(params),
        newest_first=str(params.get("newest", "")).lower() in ("true", "1"))]


@api("job", "kill", ("POST",), WRITERS, params=(JOB_IDS,))
def job_kill(ctx: Context, params: dict) -> list[bool]:
    owner = None if ctx.identity.role == "admin" else ctx.identity.subject
    results = []
    for panda_id in id_list(params, "job_ids"):
        try:
            results.append(ctx.tb.jobs.kill(panda_id, ctx.identity.subject, owner_check=owner))
        except (NotFound, PermissionError):
            results.append(False)
    return results


@api("job", "set_debug_mode", ("POST",), WRITERS, params=(
    Param("job_id", "integer", True, "a PandaID", minimum=1),
    Param("mode", "any", description="true (on, the default) or false (off)"),
    Param("view", description="tail [NAME] | ls | ps | du")))
def job_set_debug_mode(ctx: Context, params: dict) -> dict:
    """Debug mode on (``mode`` true, ``view``: tail [NAME] | ls | ps | du) or off for one job;
    the job's owner or an admin. Only the built-in views: never a command line."""
    panda_id = int_param(params, "job_id")
    mode = params.get("mode", True)
    if not isinstance(mode, bool):
        raise ApiError("parameter 'mode' must be true or false")
    request = None
    if mode:
        try:
            request = parse_debug_request(str_param(params, "view")).to_wire()
        except BadDebugRequest as exc:
            raise ApiError(f"parameter 'view': {exc}", 400) from None
    owner = None if ctx.identity.role == "admin" else ctx.identity.subject
    try:
        ok = ctx.tb.jobs.set_debug(panda_id, request, ctx.identity.subject, owner_check=owner)
    except PermissionError as exc:
        raise ApiError(str(exc), 403) from None
    if not ok:
        raise ApiError(f"job {panda_id} has ended: nothing to debug")
    ctx.message = f"job {panda_id}: debug mode " + (f"on ({request})" if request else "off")
    return {"job_id": panda_id, "debug": request}


@api("job", "get_debug_view", params=(
    Param("job_id", "integer", True, "a PandaID", minimum=1),))
def job_get_debug_view(ctx: Context, params: dict) -> dict:
    """The latest view the job's pilot sent in debug mode, and what it is asked for."""
    panda_id = int_param(params, "job_id")
    job = ctx.tb.jobs.get(panda_id)
    if job is None:
        raise NotFound(f"no job {panda_id}")
    view = json.loads(job["debug_view"]) if job.get("debug_view") else None
    # an ended job's pilot is gone: its request, if never cleared, asks nobody any more
    asked = None if job["status"] in FINAL_STATES else job.get("debug_request")
    return {"job_id": panda_id, "status": job["status"], "debug": asked,
            "view": view, "modificationTime": job["modification_time"]}


# ---------------------------------------------------------------------- quotas
@api("quota", "list")
def quota_list(ctx: Context, params: dict) -> list[dict]:
    return [q.to_dict() for q in ctx.submitter.quotas.all()]


@api("quota", "set", ("POST",), ADMIN, params=(
    Param("kind", enum=("user", "group"), description="whose quota (user)"),
    Param("name", required=True, description="the user (token subject), the group, or '*'"),
    Param("max_running", "integer", minimum=0, maximum=2**31 - 1,
          description="jobs at once (empty: no limit)"),
    Param("max_per_day", "integer", minimum=0, maximum=2**31 - 1,
          description="jobs a day (empty: no limit)")))
def quota_set(ctx: Context, params: dict) -> dict:
    kind = str_param(params, "kind") or "user"
    if kind not in KINDS:
        raise ApiError(f"parameter 'kind': one of {', '.join(KINDS)}", 400)
    name = str_param(params, "name")
    if not name:
        raise ApiError("parameter 'name': the user (token subject), the group, or '*'", 400)
    limits = {}
    for key in ("max_running", "max_per_day"):
        value = params.get(key)
        limits[key] = None if value in (None, "") else int_param(params, key)
    try:
        return ctx.submitter.quotas.set(kind, name, **limits).to_dict()
    except ValueError as exc:
        raise ApiError(str(exc), 400) from None


@api("quota", "usage", params=(
    Param("user", description="whose usage (default: the caller)"),
    Param("group", max_length=64, description="and this group's")))
def quota_usage(ctx: Context, params: dict) -> dict:
    """A user's (default: the caller's) and a group's use against their quotas."""
    user = str_param(params, "user") or (ctx.identity.subject if ctx.identity else None)
    if not user:
        raise ApiError("parameter 'user': whose usage (or call with a token)", 400)
    return ctx.submitter.quotas.usage(user, str_param(params, "group"))


# ---------------------------------------------------------------------- sites
@api("site", "list")
def site_list(ctx: Context, params: dict) -> list[dict]:
    load = ctx.tb.jobs.site_load()
    return [{"name": s["name"], "status": s["status"], "status_reason": s.get("status_reason"),
             "configured_status": s["configured_status"], "updated": s["updated"],
             "jobs": load.get(s["name"], {}),
             "scheduler": (s["config"].get("scheduler") or {}).get("backend")}
            for s in ctx.tb.sites.all()]


@api("site", "get_config", params=(SITE,))
def site_get_config(ctx: Context, params: dict) -> dict:
    return ctx.tb.sites.get(str(params.get("site", "")))["config"]


@api("site", "queuedata", params=(SITE,))
def site_queuedata(ctx: Context, params: dict) -> dict:
    return signed_queuedata(site_get_config(ctx, params), ctx.keys.sign_canonical)


@api("site", "sync", ("POST",), ADMIN, params=(
    Param("sites", "array", True, "site configs (docs/site-configs.md)", max_length=10000),))
def site_sync(ctx: Context, params: dict) -> list[str]:
    configs = params.get("sites")
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise ApiError("parameter 'sites' must be a list of site config objects")
    if ctx.site_loader is not None:
        configs, errors = ctx.site_loader(configs)
        if errors:
            raise ApiError("invalid site config(s): " + "; ".join(errors))
    for c in configs:
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise ApiError("every site config needs a 'name'")
    return ctx.tb.sites.sync(configs)


# ---------------------------------------------------------------------- data
@api("data", "add_files", ("POST",), WRITERS, params=(
    Param("dataset", required=True, description="the dataset's name"),
    Param("scope", required=True, description="the files' scope"),
    Param("files", "array", True, "[{lfn, fsize, checksum, guid?, surl?}]",
          max_length=MAX_FILES_PER_CALL),
    Param("ddm_endpoint", max_length=128, description="the storage element holding them")))
def data_add_files(ctx: Context, params: dict) -> int:
    from panda_core.replicas import BadFileName, check_name
    dataset, scope = params.get("dataset"), params.get("scope")
    files = params.get("files")
    try:
        check_name(str(dataset), "dataset")
        check_name(str(scope), "scope")
        if not isinstance(files, list) or not files:
            raise ApiError("parameter 'files' must be a non-empty list")
        if len(files) > MAX_FILES_PER_CALL:
            raise ApiError(f"parameter 'files': at most {MAX_FILES_PER_CALL} per call, got "
                           f"{len(files)}", 400)
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("lfn"), str):
                raise ApiError("each file must be an object with lfn, fsize, checksum", 400)
            check_name(str(f.get("lfn")), "lfn")
            checksum = f.get("checksum")
            if checksum and not re.fullmatch(r"ad:[0-9a-fA-F]{8}|md5:[0-9a-fA-F]{32}",
                                             str(checksum)):
                raise ApiError(f"file {f['lfn']}: checksum must be 'ad:<8 hex>' or 'md5:<hex>'")
            if f.get("fsize") is not None:
                try:
                    if as_int(f["fsize"]) < 0:
                        raise ValueError
                except (TypeError, ValueError, OverflowError):
                    raise ApiError(f"file {f['lfn']}: fsize must be a size in bytes") from None
            for key in ("guid", "surl"):
                if f.get(key) is not None and (not isinstance(f[key], str)
                                               or len(f[key]) > (64 if key == "guid" else 4000)):
                    raise ApiError(f"file {f['lfn']}: {key} must be a string")
    except BadFileName as exc:
        raise ApiError(str(exc)) from None
    endpoint = str_param(params, "ddm_endpoint")
    se_url = None
    if endpoint:       # a storage element the sites know: replicas only at the server's path
        from .dataservice import storage_urls
        se_url = storage_urls(s["config"] for s in ctx.tb.sites.all()).get(endpoint)
    who = Owner.of(ctx.identity)
    try:
        return ctx.tb.data.add_dataset_files(
            dataset, scope, files, endpoint, se_url=se_url,
            authorize=lambda conn: (ctx.tb.owners.check_scope(conn, who, scope),
                                    ctx.tb.owners.check_dataset(conn, who, dataset, scope)))
    except OwnershipError as exc:
        raise ApiError(f"permission denied: {exc}", 403) from None
    except CatalogueConflict as exc:
        raise ApiError(str(exc), 409) from None


@api("scope", "add", ("POST",), ADMIN, params=(
    Param("scope", required=True, max_length=255, description="the scope's name"),
    Param("owner", max_length=255, description="the account that owns it (or group:<name>)"),
    Param("production", "boolean", description="a production scope: admins write it")))
def scope_add(ctx: Context, params: dict) -> dict:
    """Register a scope to an owner account, or as a production scope (admins write it)."""
    from panda_core.replicas import check_name
    scope, owner = params.get("scope"), params.get("owner")
    try:
        check_name(str(scope), "scope")
    except BadFileName as exc:
        raise ApiError(str(exc), 400) from None
    production = str(params.get("production", "")).lower() in ("true", "1")
    if not production and (not isinstance(owner, str) or not owner or len(owner) > 255):
        raise ApiError("parameter 'owner' must be the account that owns the scope (or give "
                       "production=true)", 400)
    return ctx.tb.owners.add_scope(str(scope), owner or ctx.identity.subject, production)


@api("scope", "list", params=())
def scope_list(ctx: Context, params: dict) -> list[dict]:
    return ctx.tb.owners.scopes()


@api("data", "list_files", params=(
    Param("dataset", required=True, description="the dataset's name"),))
def data_list_files(ctx: Context, params: dict) -> list[dict]:
    return ctx.tb.data.dataset_files(str(params.get("dataset", "")))


# ---------------------------------------------------------------------- pilots and factories
@api("pilot", "activated_count", params=(SITE,))
def pilot_activated_count(ctx: Context, params: dict) -> dict:
    """Activated jobs at a site; given a pilot's ``walltime_s``, ``memory_mb``, ``cores``,
    also how many of them such a pilot could take (``fitting``) and, when none, why."""
    from .nofit import PilotFit, explain
    site = str(params.get("site", ""))
    ctx.tb.sites.get(site)                 # an unknown site: its message
    out: dict = {"site": site, "activated": ctx.tb.jobs.count(site=site, status="activated")}
    fit = PilotFit(**{k: int_param(params, k, False) for k in ("walltime_s", "memory_mb",
                                                                "cores")})
    if any(v is not None for v in (fit.walltime_s, fit.memory_mb, fit.cores)):
        out["fitting"] = ctx.tb.jobs.count_fitting(site, walltime_s=fit.walltime_s,
                                                   memory_mb=fit.memory_mb, cores=fit.cores)
        if out["activated"] and not out["fitting"]:
            out["reason"] = explain(site, ctx.tb.jobs.activated_shape(site), fit)
    return out


@api("pilot", "report", ("POST",), PILOTS + ("user",), params=(
    Param("factory", required=True, description="the factory's name"),
    Param("pilots", "array", True, "[{batch_id, site, state, backend?, submitted?, exit_code?}]",
          max_length=100000),
    Param("sites", "object", description="{site: {submitting, reason}}")))
def pilot_report(ctx: Context, params: dict) -> int:
    factory = params.get("factory")
    pilots = params.get("pilots")
    if not isinstance(factory, str) or not factory:
        raise ApiError("parameter 'factory' must be the factory's name")
    if not isinstance(pilots, list) or not all(isinstance(p, dict) and "batch_id" in p
                                               and "site" in p for p in pilots):
        raise ApiError("parameter 'pilots' must be a list of objects with batch_id and site")
    _check_pilot_entries(pilots)
    sites = params.get("sites")
    if sites is not None and not (isinstance(sites, dict)
                                  and all(isinstance(v, dict) for v in sites.values())):
        raise ApiError("parameter 'sites' must be an object {site: {submitting, reason}}")
    for site, status in sorted((sites or {}).items()):       # incidents for the monitor
        if status.get("submitting") is False:
            log.warning("factory %s does not submit to %s: %s", factory, site,
                        status.get("reason") or "no reason given", extra={"site": site})
    failed = [p for p in pilots if p.get("state") == "failed"]
    if failed:
        log.warning("factory %s reports %d failed pilot(s) at %s", factory, len(failed),
                    ", ".join(sorted({str(p["site"]) for p in failed})),
                    extra={"site": str(failed[0]["site"])})
    try:
        return ctx.tb.pilots.report(factory, pilots, ctx.identity.subject, site_status=sites,
                                    actor_is_admin=ctx.identity.role == "admin")
    except PermissionError as exc:
        raise ApiError(f"permission denied: {exc}", 403) from None


#: a reported pilot's fields: (type check, the column's length or the integer's bits)
_PILOT_FIELDS = {"batch_id": ((str, int), 255), "site": ((str,), 128), "state": ((str,), 16),
                 "backend": ((str,), 64), "submitted": ((str,), 64), "exit_code": ((int,), 32)}


def _check_pilot_entries(pilots: list[dict]) -> None:
    """Each reported pilot's fields fit their columns: a reason naming the field, not a
    database error."""
    for i, p in enumerate(pilots):
        for key, (types, size) in _PILOT_FIELDS.items():
            value = p.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, types):
                raise ApiError(f"pilots[{i}].{key} must be "
                               f"{'an integer' if types == (int,) else 'text'}", 400)
            if isinstance(value, int) and not (-2**(size - 1) <= value < 2**(size - 1)
                                               if key == "exit_code" else 0 <= value < 2**63):
                raise ApiError(f"pilots[{i}].{key} is out of range", 400)
            if isinstance(value, str) and len(value) > size:
                raise ApiError(f"pilots[{i}].{key}: at most {size} characters", 400)


@api("pilot", "summary")
def pilot_summary(ctx: Context, params: dict) -> dict:
    return ctx.tb.pilots.summary()
