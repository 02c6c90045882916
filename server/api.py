"""The client API, in PanDA's ``/api/v1/<module>/<method>`` shape.

Every method is a plain function ``(ctx, params) -> data`` registered with the roles allowed to
call it; the Tornado handler wraps the result as ``{"success", "message", "data"}``. Reads are
open; writes need an identity (a bearer token's subject or a certificate DN).
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from panda_wms.storage import BadFileName

from .auth import Identity, KeyStore
from .jobcreator import TaskSpecError
from .queuedata import queuedata
from .submission import TaskSubmitter
from .taskbuffer import NotFound, TaskBuffer

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A logical error: reported as success=false with the message (HTTP 200, as PanDA does)."""


class Forbidden(Exception):
    """No identity, or one whose role may not call this method (HTTP 403)."""


@dataclass
class Context:
    tb: TaskBuffer
    keys: KeyStore
    submitter: TaskSubmitter
    identity: Identity | None
    clock: Callable[[], dt.datetime]
    site_loader: Callable[[list[dict]], tuple[list[dict], list[str]]] | None = None
    message: str = ""


@dataclass
class Method:
    func: Callable[[Context, dict], Any]
    http: tuple[str, ...]
    roles: tuple[str, ...] | None   # None: open to anyone


REGISTRY: dict[tuple[str, str], Method] = {}


def api(module: str, name: str, http: tuple[str, ...] = ("GET",),
        roles: tuple[str, ...] | None = None):
    def deco(func):
        REGISTRY[(module, name)] = Method(func, http, roles)
        return func
    return deco


WRITERS = ("user", "admin")
ADMIN = ("admin",)
PILOTS = ("pilot", "admin")


_MAX_ID = 2**63   # a BIGINT: larger values would overflow the database driver


def _as_int(value: Any) -> int:
    """An integer from JSON or query text; floats only when whole. ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    number = int(value)
    if not -_MAX_ID < number < _MAX_ID:
        raise ValueError
    return number


def _int_param(params: dict, key: str, required: bool = True) -> int | None:
    value = params.get(key)
    if value in (None, "", "None"):
        if required:
            raise ApiError(f"parameter {key!r} is required")
        return None
    try:
        return _as_int(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(f"parameter {key!r} must be an integer (64-bit), got "
                       f"{str(value)[:40]!r}") from None


def _str_param(params: dict, key: str) -> str | None:
    """An optional text parameter; a list (a repeated query key) or an object is refused."""
    value = params.get(key)
    if value in (None, "", "None"):
        return None
    if isinstance(value, (list, dict)):
        raise ApiError(f"parameter {key!r} must be one text value")
    return str(value)


def _id_list(params: dict, key: str) -> list[int]:
    value = params.get(key)
    if value is None:
        raise ApiError(f"parameter {key!r} is required")
    if not isinstance(value, list):
        value = [value]
    if len(value) > 10000:
        raise ApiError(f"parameter {key!r}: at most 10000 ids")
    out = []
    for v in value:
        try:
            out.append(_as_int(v))
        except (TypeError, ValueError, OverflowError):
            raise ApiError(f"parameter {key!r}: {str(v)[:40]!r} is not an integer (64-bit)"
                           ) from None
    return out


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
@api("task", "submit", ("POST",), WRITERS)
def task_submit(ctx: Context, params: dict) -> int:
    task_params = params.get("task_parameters")
    if not isinstance(task_params, dict):
        raise ApiError("parameter 'task_parameters' must be a JSON object (the task description)")
    try:
        result = ctx.submitter.submit(task_params, owner=ctx.identity.subject)
    except (TaskSpecError, BadFileName) as exc:   # BadFileName: an output name made from a pattern
        raise ApiError(f"bad task description: {exc}") from None
    ctx.message = (f"jediTaskID={result.task_id} jobs={len(result.job_ids)} "
                   f"activated={result.activated} assigned={result.assigned}")
    return result.task_id


@api("task", "extend", ("POST",), WRITERS)
def task_extend(ctx: Context, params: dict) -> dict:
    task_id = _int_param(params, "task_id")
    task = _get_task(ctx, task_id)
    if not _owns(ctx, task["owner"]):
        raise ApiError(f"permission denied: task {task_id} belongs to {task['owner']}")
    try:
        result = ctx.submitter.extend(task_id, ctx.identity.subject)
    except (TaskSpecError, BadFileName) as exc:
        raise ApiError(str(exc)) from None
    return {"task_id": task_id, "new_jobs": result.job_ids}


def _get_task(ctx: Context, task_id: int) -> dict:
    try:
        return ctx.tb.tasks.get(task_id)
    except NotFound:
        raise ApiError(f"no task {task_id}") from None


@api("task", "get_status")
def task_get_status(ctx: Context, params: dict) -> str:
    return _get_task(ctx, _int_param(params, "task_id"))["status"]


@api("task", "get_details")
def task_get_details(ctx: Context, params: dict) -> dict:
    task_id = _int_param(params, "task_id")
    task = _get_task(ctx, task_id)
    view = _task_view(task, ctx.tb.tasks.job_counts(task_id))
    if str(params.get("include_parameters", "")).lower() in ("true", "1"):
        view["taskParams"] = task["params"]
    return view


@api("task", "get_task_parameters")
def task_get_parameters(ctx: Context, params: dict) -> dict:
    return _get_task(ctx, _int_param(params, "task_id"))["params"]


@api("task", "get_job_ids")
def task_get_job_ids(ctx: Context, params: dict) -> list[int]:
    task_id = _int_param(params, "task_id")
    _get_task(ctx, task_id)
    return ctx.tb.tasks.job_ids(task_id)


@api("task", "list")
def task_list(ctx: Context, params: dict) -> list[dict]:
    return [_task_view(t) for t in ctx.tb.tasks.find(owner=_str_param(params, "owner"),
                                                     limit=_int_param(params, "limit", False) or 100)]


@api("task", "kill", ("POST",), WRITERS)
def task_kill(ctx: Context, params: dict) -> int:
    from panda_wms.states import TaskState
    task_id = _int_param(params, "task_id")
    task = _get_task(ctx, task_id)
    if not _owns(ctx, task["owner"]):
        raise ApiError(f"permission denied: task {task_id} belongs to {task['owner']}")
    killed = 0
    for job in ctx.tb.jobs.find(task_id=task_id, limit=1_000_000):
        if not job.get("archived", False):
            try:
                killed += ctx.tb.jobs.kill(job["panda_id"], ctx.identity.subject)
            except NotFound:
                pass
    with ctx.tb.engine.begin() as conn:
        ctx.tb.tasks.set_status(conn, task_id, str(TaskState.ABORTED),
                               error_dialog=f"killed by {ctx.identity.subject}")
    ctx.message = f"killed {killed} jobs"
    return 0


# ---------------------------------------------------------------------- jobs
def _job_view(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k != "files"}
    out["PandaID"] = job["panda_id"]
    out["jobStatus"] = job["status"]
    from .api_panda import panda_file_names, panda_job_names   # PanDA's names, for its client
    out.update(panda_job_names(job))
    out["Files"] = [{**f, **panda_file_names(f)} for f in job.get("files", [])]
    return out


@api("job", "get_description", ("GET", "POST"))
def job_get_description(ctx: Context, params: dict) -> list[dict | None]:
    return [(_job_view(j) if (j := ctx.tb.jobs.get(i, include_archive=False)) else None)
            for i in _id_list(params, "job_ids")]


@api("job", "get_description_incl_archive", ("GET", "POST"))
def job_get_description_incl_archive(ctx: Context, params: dict) -> list[dict | None]:
    return [(_job_view(j) if (j := ctx.tb.jobs.get(i)) else None)
            for i in _id_list(params, "job_ids")]


@api("job", "get_history")
def job_get_history(ctx: Context, params: dict) -> list[dict]:
    return ctx.tb.jobs.history(_int_param(params, "job_id"))


@api("job", "list")
def job_list(ctx: Context, params: dict) -> list[dict]:
    return [_job_view(j) for j in ctx.tb.jobs.find(
        task_id=_int_param(params, "task_id", False), site=_str_param(params, "site"),
        status=_str_param(params, "status"), limit=_int_param(params, "limit", False) or 1000)]


@api("job", "kill", ("POST",), WRITERS)
def job_kill(ctx: Context, params: dict) -> list[bool]:
    owner = None if ctx.identity.role == "admin" else ctx.identity.subject
    results = []
    for panda_id in _id_list(params, "job_ids"):
        try:
            results.append(ctx.tb.jobs.kill(panda_id, ctx.identity.subject, owner_check=owner))
        except (NotFound, PermissionError):
            results.append(False)
    return results


# ---------------------------------------------------------------------- sites
@api("site", "list")
def site_list(ctx: Context, params: dict) -> list[dict]:
    load = ctx.tb.jobs.site_load()
    return [{"name": s["name"], "status": s["status"], "updated": s["updated"],
             "jobs": load.get(s["name"], {}),
             "scheduler": (s["config"].get("scheduler") or {}).get("backend")}
            for s in ctx.tb.sites.all()]


@api("site", "get_config")
def site_get_config(ctx: Context, params: dict) -> dict:
    try:
        return ctx.tb.sites.get(str(params.get("site", "")))["config"]
    except NotFound as exc:
        raise ApiError(str(exc)) from None


@api("site", "queuedata")
def site_queuedata(ctx: Context, params: dict) -> dict:
    return queuedata(site_get_config(ctx, params))


@api("site", "sync", ("POST",), ADMIN)
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
@api("data", "add_files", ("POST",), WRITERS)
def data_add_files(ctx: Context, params: dict) -> int:
    from panda_wms.storage import BadFileName, check_name
    dataset, scope = params.get("dataset"), params.get("scope")
    files = params.get("files")
    try:
        check_name(str(dataset), "dataset")
        check_name(str(scope), "scope")
        if not isinstance(files, list) or not files:
            raise ApiError("parameter 'files' must be a non-empty list")
        if len(files) > 100000:
            raise ApiError("parameter 'files': at most 100000 per call")
        for f in files:
            if not isinstance(f, dict):
                raise ApiError("each file must be an object with lfn, fsize, checksum")
            check_name(str(f.get("lfn")), "lfn")
            checksum = f.get("checksum")
            if checksum and not re.fullmatch(r"ad:[0-9a-fA-F]{8}|md5:[0-9a-fA-F]{32}",
                                             str(checksum)):
                raise ApiError(f"file {f['lfn']}: checksum must be 'ad:<8 hex>' or 'md5:<hex>'")
            if f.get("fsize") is not None:
                try:
                    if _as_int(f["fsize"]) < 0:
                        raise ValueError
                except (TypeError, ValueError, OverflowError):
                    raise ApiError(f"file {f['lfn']}: fsize must be a size in bytes") from None
            for key in ("guid", "surl"):
                if f.get(key) is not None and (not isinstance(f[key], str)
                                               or len(f[key]) > (64 if key == "guid" else 4000)):
                    raise ApiError(f"file {f['lfn']}: {key} must be a string")
    except BadFileName as exc:
        raise ApiError(str(exc)) from None
    endpoint = _str_param(params, "ddm_endpoint")
    return ctx.tb.data.add_dataset_files(dataset, scope, files, endpoint)


@api("data", "list_files")
def data_list_files(ctx: Context, params: dict) -> list[dict]:
    return ctx.tb.data.dataset_files(str(params.get("dataset", "")))


# ---------------------------------------------------------------------- pilots and factories
@api("pilot", "activated_count")
def pilot_activated_count(ctx: Context, params: dict) -> dict:
    site = str(params.get("site", ""))
    try:
        ctx.tb.sites.get(site)
    except NotFound as exc:
        raise ApiError(str(exc)) from None
    return {"site": site, "activated": ctx.tb.jobs.count(site=site, status="activated")}


@api("pilot", "report", ("POST",), PILOTS + ("user",))
def pilot_report(ctx: Context, params: dict) -> int:
    factory = params.get("factory")
    pilots = params.get("pilots")
    if not isinstance(factory, str) or not factory:
        raise ApiError("parameter 'factory' must be the factory's name")
    if not isinstance(pilots, list) or not all(isinstance(p, dict) and "batch_id" in p
                                               and "site" in p for p in pilots):
        raise ApiError("parameter 'pilots' must be a list of objects with batch_id and site")
    sites = params.get("sites")
    if sites is not None and not (isinstance(sites, dict)
                                  and all(isinstance(v, dict) for v in sites.values())):
        raise ApiError("parameter 'sites' must be an object {site: {submitting, reason}}")
    return ctx.tb.pilots.report(factory, pilots, ctx.identity.subject, site_status=sites)


@api("pilot", "summary")
def pilot_summary(ctx: Context, params: dict) -> dict:
    return ctx.tb.pilots.summary()
