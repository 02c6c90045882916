"""The PanDA pilot protocol: getJob, updateJob, getStatus, as plain functions over form dicts.

The Tornado handlers only decode the request and encode the reply; everything a pilot can ask is
answered here, so it is tested without HTTP. Field names are PanDA's (docs/protocol.md).
"""
from __future__ import annotations

import json
import math
import logging
import re
from dataclasses import dataclass
from typing import Any

from panda_wms.states import FINAL_JOB_STATES, PILOT_REPORTED_STATES

from .auth import Identity, KeyStore, canonical_job_bytes
from . import db
from .brokerage import output_endpoint
from .taskbuffer import Conflict, NotFound, TaskBuffer

log = logging.getLogger(__name__)

# PanDA's StatusCode values
SC_OK, SC_TIMEOUT, SC_NO_JOBS, SC_FAILED = 0, 10, 20, 30
SC_INVALID_TOKEN, SC_INVALID_ROLE, SC_DENIED, SC_KEY_MISSING = 50, 60, 70, 80

_INT = re.compile(r"^-?\d+$")
_REPORTED = frozenset(str(s) for s in PILOT_REPORTED_STATES)
_FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)


class ProtocolError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


def _int(form: dict, key: str, default: int | None = None) -> int | None:
    """An integer field; anything else (text, inf, nan, out of a BIGINT's range) is refused."""
    value = form.get(key)
    if value in (None, "", "NULL", "None"):
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        text = str(value).strip()
        number = int(text) if _INT.match(text) else int(float(text))
        if not -2**63 < number < 2**63:
            raise ValueError
        return number
    except (ValueError, OverflowError):
        raise ProtocolError(SC_FAILED, f"{key} must be a number, got {str(value)[:100]!r}"
                            ) from None


def _int32(form: dict, key: str, default: int | None = None) -> int | None:
    """An integer field stored in a 32-bit column: a bigger one is refused, not truncated."""
    value = _int(form, key, default)
    if value is not None and not -2**31 <= value < 2**31:
        raise ProtocolError(SC_FAILED, f"{key} must be a 32-bit integer, got {value}")
    return value


def _text(value: Any, column: str) -> str | None:
    """A free-text field cut to its column's length (node names, batch ids, diagnostics)."""
    if value in (None, ""):
        return None
    length = db.jobs.c[column].type.length or 4000
    return str(value)[:length]


def _clamp32(value: int | None) -> int | None:
    return None if value is None else max(-2**31, min(value, 2**31 - 1))


def _float(form: dict, key: str) -> float | None:
    value = form.get(key)
    if value in (None, "", "NULL", "None"):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    except (TypeError, ValueError):
        raise ProtocolError(SC_FAILED, f"{key} must be a number, got {str(value)[:100]!r}"
                            ) from None


def _require(form: dict, key: str) -> str:
    value = form.get(key)
    if value in (None, ""):
        raise ProtocolError(SC_KEY_MISSING, f"{key} is missing")
    return str(value)


def _join(values: list[Any]) -> str:
    return ",".join("NULL" if v is None else str(v) for v in values)


class JsonReply(dict):
    """A reply that carries its own JSON encoding (``json_text``), equal to the dict's."""
    json_text: str = ""


@dataclass
class JobRequest:
    """A getJob's checked fields."""
    site: str
    site_config: dict
    n_jobs: int
    many: bool                 # nJobs was asked: the reply lists the jobs
    fit: dict                  # cores, memory_mb, walltime_s, pilot_version, prod_source_label
    who: dict                  # node, actor, pilot_id, batch_id


@dataclass
class UpdateRequest:
    """An updateJob's checked fields."""
    panda_id: int
    state: str
    fields: dict
    stored: dict
    attempt_nr: int | None
    site: str


class Dispatcher:
    def __init__(self, tb: TaskBuffer, keys: KeyStore, job_chooser=None, hot=None):
        self.tb = tb
        self.keys = keys
        self.job_chooser = job_chooser   # optional: orders candidate jobs (global shares)
        self.hot = hot                   # optional: server.pghot.HotPath (PostgreSQL)

    # ------------------------------------------------------------------ getJob
    def _job_request(self, form: dict, identity: Identity | None) -> JobRequest | dict:
        """A getJob's checked fields; or the reply itself when the site takes no jobs."""
        site = _require(form, "siteName")
        if identity is not None and not identity.may_act_for_site(site):
            raise ProtocolError(SC_DENIED, f"{identity.subject} may not take jobs of {site}")
        try:
            site_row = self.tb.sites.get_cached(site)
        except NotFound:
            raise ProtocolError(SC_FAILED, f"unknown site {site!r}") from None
        if site_row["status"] == "offline":
            return {"StatusCode": SC_NO_JOBS, "errorDialog": f"site {site} is offline"}
        n_jobs = max(1, min(_int(form, "nJobs", 1) or 1, 100))
        # a resource beyond a 32-bit column fits any job: clamp instead of failing the query
        remaining = _clamp32(_int(form, "remainingWalltime") or _int(form, "maxWalltime"))
        mem = _clamp32(_int(form, "mem"))
        cores = _clamp32(_int(form, "cores") or _int(form, "coreCount"))
        label = form.get("prodSourceLabel")
        return JobRequest(
            site=site, site_config=site_row["config"], n_jobs=n_jobs, many="nJobs" in form,
            fit=dict(cores=cores, memory_mb=mem, walltime_s=remaining,
                     pilot_version=form.get("pilotVersion"),
                     prod_source_label=label if label in ("test", "ptest", "user") else None),
            who=dict(node=_text(form.get("node"), "node"),
                     actor=identity.subject if identity else None,
                     pilot_id=_text(form.get("pilotID") or form.get("pilot_id"), "pilot_id"),
                     batch_id=_text(form.get("batchID") or form.get("worker_id"), "batch_id")))

    def _job_reply(self, req: JobRequest, jobs: list[dict]) -> dict:
        if not jobs:
            return {"StatusCode": SC_NO_JOBS, "errorDialog": "no jobs"}
        if req.many:
            return {"StatusCode": SC_OK,
                    "jobs": [self.job_spec(job, req.site_config) for job in jobs]}
        spec, canonical = self._signed_spec(jobs[0], req.site_config)
        reply = JsonReply(StatusCode=SC_OK, **spec)
        # the reply's JSON reuses the canonical encoding the signature was made over
        reply.json_text = ('{"StatusCode":%d,%s,"specSignature":"%s"}'
                           % (SC_OK, canonical[1:-1].decode(), spec["specSignature"]))
        return reply

    def get_job(self, form: dict, identity: Identity | None) -> dict:
        req = self._job_request(form, identity)
        if isinstance(req, dict):
            return req
        site = req.site
        # share-aware: a chooser with plan() is asked share by share (index reads); a plain
        # job_chooser gives ORDER BY clauses
        chooser = self.job_chooser
        plan = chooser.plan(site) if hasattr(chooser, "plan") else None
        order = chooser(site) if chooser is not None and not hasattr(chooser, "plan") else None
        kw = {**req.fit, **req.who}
        jobs = []
        for _ in range(req.n_jobs):
            job = None
            for where in plan or ():
                job = self.tb.jobs.dispatch(site, where=where, **kw)
                if job is not None:
                    break
            if job is None:      # no plan, or the cached plan missed: any job, best first
                job = self.tb.jobs.dispatch(site, order_by=order, **kw)
            if job is None:
                break
            jobs.append(job)
        return self._job_reply(req, jobs)

    async def get_job_async(self, form: dict, identity: Identity | None, run) -> dict:
        """getJob on the server's event loop: through the PostgreSQL hot path when there is
        one (``self.hot``), else ``get_job`` in the thread pool (``run(func, *args)``)."""
        hot, chooser = self.hot, self.job_chooser
        if hot is None or (chooser is not None and not hasattr(chooser, "share_plan")):
            return await run(self.get_job, form, identity)
        site = str(form.get("siteName") or "")
        if not (self.tb.sites.cached(site) is not None and (chooser is None or chooser.is_fresh(site))):
            await run(self._warm_caches, site)     # the caches' database reads, off the loop
            if not self.tb.sites.cached(site) is not None:   # unknown site: its error, off the loop too
                return await run(self.get_job, form, identity)
        req = self._job_request(form, identity)
        if isinstance(req, dict):
            return req
        params = self.tb.jobs.dispatch_params(site, **req.fit)
        steps = chooser.share_plan(site) if chooser is not None else None
        jobs: list[dict] = []
        try:
            for _ in range(req.n_jobs):
                job = None
                for step in steps or ():
                    job = await hot.dispatch(params, share=step, **req.who)
                    if job is not None:
                        break
                if job is None:
                    job = await hot.dispatch(params, share=None, **req.who)
                if job is None:
                    break
                jobs.append(job)
        except Exception:  # noqa: BLE001 - the general path answers; the log says why
            log.warning("getJob: the hot path failed; using the general path", exc_info=True)
            if not jobs:
                return await run(self.get_job, form, identity)
        return self._job_reply(req, jobs)

    def _warm_caches(self, site: str) -> None:
        try:
            self.tb.sites.get_cached(site)
        except NotFound:
            return
        if self.job_chooser is not None and hasattr(self.job_chooser, "share_plan"):
            self.job_chooser.share_plan(site)

    def _unsigned_spec(self, job: dict, site_config: dict) -> dict:
        """A job row in PanDA's getJob shape."""
        ins = [f for f in job["files"] if f["type"] == "input"]
        outs = [f for f in job["files"] if f["type"] == "output"]
        logs = [f for f in job["files"] if f["type"] == "log"]
        out_and_log = outs + logs
        storage = site_config.get("storage") or {}
        in_se = storage.get("input", {}).get("name", "")
        out_se = storage.get("output", {}).get("name", "")
        log_file = logs[0] if logs else None
        spec = {
            "PandaID": job["panda_id"],
            "jobsetID": job["task_id"],
            "jobDefinitionID": job["serial"],
            "taskID": job["task_id"],
            "jediTaskID": job["task_id"],
            "attemptNr": job["attempt_nr"],
            "prodSourceLabel": job["prod_source_label"],
            "processingType": "panda-wms",
            "prodUserID": job["owner"],
            "transformation": job["transformation"],
            "jobPars": job["job_pars"],
            "swRelease": "NULL",
            "homepackage": "NULL",
            "cmtConfig": "NULL",
            "container_name": "NULL",
            "inFiles": _join([f["lfn"] for f in ins]),
            "GUID": _join([f["guid"] for f in ins]),
            "fsize": _join([f["fsize"] for f in ins]),
            "checksum": _join([f["checksum"] for f in ins]),
            "scopeIn": _join([f["scope"] for f in ins]),
            "realDatasetsIn": _join([f["dataset"] for f in ins]),
            "dispatchDblock": _join([f["dataset"] for f in ins]),
            "prodDBlocks": _join([f["dataset"] for f in ins]),
            "ddmEndPointIn": _join([in_se for _ in ins]),
            "outFiles": _join([f["lfn"] for f in out_and_log]),
            "scopeOut": _join([f["scope"] for f in outs]),
            "realDatasets": _join([f["dataset"] for f in out_and_log]),
            "destinationDblock": _join([f["dataset"] for f in out_and_log]),
            "destinationDBlockToken": _join(["NULL" for _ in out_and_log]),
            "ddmEndPointOut": _join([out_se for _ in out_and_log]),
            "fileDestinationSE": _join([out_se for _ in out_and_log]),
            "destinationSE": out_se,
            "logFile": log_file["lfn"] if log_file else "NULL",
            "logGUID": log_file["guid"] if log_file else "NULL",
            "scopeLog": log_file["scope"] if log_file else "NULL",
            "maxCpuCount": job["walltime_s"],
            "minRamCount": job["memory_mb"],
            "maxDiskCount": job["disk_mb"],
            "maxWalltime": job["walltime_s"],
            "coreCount": job["cores"],
            "currentPriority": job["current_priority"],
            "transferType": job["transfer_type"] or "NULL",
            "nucleus": "NULL",
        }
        if job.get("pilot_version"):
            spec["pilotVersion"] = job["pilot_version"]
        return spec

    def job_spec(self, job: dict, site_config: dict) -> dict:
        """A job row in PanDA's getJob shape, signed (``specSignature``)."""
        return self._signed_spec(job, site_config)[0]

    def _signed_spec(self, job: dict, site_config: dict) -> tuple[dict, bytes]:
        spec = self._unsigned_spec(job, site_config)
        canonical = canonical_job_bytes(spec)
        spec["specSignature"] = self.keys.sign_canonical(canonical)
        return spec, canonical

    # ------------------------------------------------------------------ updateJob
    def _update_request(self, form: dict) -> UpdateRequest:
        panda_id = _int(form, "jobId")
        if panda_id is None:
            raise ProtocolError(SC_KEY_MISSING, "jobId is missing")
        state = _require(form, "state")
        if state not in _REPORTED:
            raise ProtocolError(SC_FAILED, f"state {state!r} is not one a pilot may report")
        fields: dict[str, Any] = {}
        for key, column, conv in _REPORT_NUMBERS:
            value = conv(form, key)
            if value is not None:
                fields[column] = value
        for key, column in _REPORT_TEXTS:
            if form.get(key) not in (None, ""):
                fields[column] = _text(form[key], column)
        stored = parse_stored_files(form["xml"]) if form.get("xml") else {}
        return UpdateRequest(panda_id=panda_id, state=state, fields=fields, stored=stored,
                             attempt_nr=_int32(form, "attemptNr"),
                             site=str(form.get("siteName") or ""))

    def update_job(self, form: dict, identity: Identity | None) -> dict:
        req = self._update_request(form)
        # the site row is read before the update's transaction: a second connection reading it
        # inside that transaction waits for its lock on SQLite (30 s, then "database is locked")
        try:
            said_row = self.tb.sites.get_cached(req.site) if req.site else None
        except NotFound:
            said_row = None

        def check(job: dict) -> str | None:
            """Inside the update's transaction: may this caller update the job? Where do its
            outputs go? (Saves a separate read of the job per update.)"""
            if identity is not None and not identity.may_act_for_site(job["site"]):
                raise ProtocolError(SC_DENIED,
                                    f"{identity.subject} may not update jobs of {job['site']}")
            if not job["site"]:
                return output_endpoint({})
            row = said_row if said_row and said_row["name"] == job["site"] else \
                self.tb.sites.get_cached(job["site"])
            return output_endpoint(row["config"])

        try:
            command = self.tb.pilots.update(
                req.panda_id, req.state, req.fields,
                actor=identity.subject if identity else None, attempt_nr=req.attempt_nr,
                stored_files=req.stored, check=check)
        except Conflict as exc:
            raise ProtocolError(SC_FAILED, str(exc)) from None
        return {"StatusCode": SC_OK, "command": command}

    async def update_job_async(self, form: dict, identity: Identity | None, run) -> dict:
        """updateJob on the server's event loop. The hot path takes a heartbeat or progress
        report, and a job that finished with its outputs, of a job at the site the pilot
        names; anything else, or anything it cannot apply, goes to ``update_job`` in the
        thread pool, which gives the canonical answer."""
        hot = self.hot
        site = str(form.get("siteName") or "")
        if hot is None or not site or not self.tb.sites.cached(site) is not None or (
                identity is not None and not identity.may_act_for_site(site)):
            return await run(self.update_job, form, identity)
        req = self._update_request(form)
        actor = identity.subject if identity else None
        try:
            if req.state not in _FINAL:
                command = await hot.progress(req.panda_id, req.state, req.fields, actor=actor,
                                             attempt_nr=req.attempt_nr, site=site)
                if command is not None:
                    return {"StatusCode": SC_OK, "command": command}
            elif req.state == "finished":
                endpoint = output_endpoint(self.tb.sites.get_cached(site)["config"])
                task_id = await hot.finish(req.panda_id, req.fields, actor=actor,
                                           attempt_nr=req.attempt_nr, site=site,
                                           endpoint=endpoint, stored=req.stored)
                if task_id is not None:
                    if not await hot.task_settled(task_id):
                        await run(self.tb.tasks.after_job_end, task_id)
                    return {"StatusCode": SC_OK, "command": "NULL"}
        except Exception:  # noqa: BLE001 - one statement: nothing was changed; the general
            log.warning("updateJob %s: the hot path failed; using the general path",  # path
                        req.panda_id, exc_info=True)                                  # answers
        return await run(self.update_job, form, identity)

    # ------------------------------------------------------------------ event ranges
    def get_event_ranges(self, form: dict, identity: Identity | None) -> dict:
        from .eventranges import EventRangeError, protocol_get
        for key in ("pandaID", "nRanges", "jediTaskID", "taskID"):   # ids beyond a BIGINT
            text = str(form.get(key, "")).strip()                      # would break the query
            if _INT.match(text) and not -2**63 < int(text) < 2**63:
                raise ProtocolError(SC_FAILED, f"{key} must be an integer within 64 bits, "
                                               f"got {text[:40]!r}")
        try:
            return protocol_get(self.tb, form, identity)
        except EventRangeError as exc:
            raise ProtocolError(exc.status_code, str(exc)) from None

    def update_event_ranges(self, form: dict, identity: Identity | None) -> dict:
        from .eventranges import EventRangeError, protocol_update
        try:
            return protocol_update(self.tb, form, identity)
        except EventRangeError as exc:
            raise ProtocolError(exc.status_code, str(exc)) from None

    def get_status(self, form: dict) -> dict:
        ids = [i for i in str(form.get("ids", "")).split(",") if i.strip()]
        states, commands = [], []
        for raw in ids[:1000]:
            try:
                number = int(raw)
                job = self.tb.jobs.get(number) if -2**63 < number < 2**63 else None
            except ValueError:
                job = None
            states.append(job["status"] if job else "unknown")
            commands.append((job or {}).get("command") or "NULL")
        return {"StatusCode": SC_OK, "status": _join(states), "command": _join(commands)}


# what an updateJob may set on the job: (form key, column[, converter])
_REPORT_NUMBERS = (("pilotErrorCode", "pilot_error_code", _int32),
                   ("transExitCode", "trans_exit_code", _int32),
                   ("exeErrorCode", "exe_error_code", _int32),
                   ("nEvents", "n_events", _int),
                   ("maxRSS", "max_rss", _int),
                   ("cpuConsumptionTime", "cpu_consumption_time", _float))
_REPORT_TEXTS = (("pilotErrorDiag", "pilot_error_diag"), ("exeErrorDiag", "exe_error_diag"),
                 ("node", "node"), ("batchID", "batch_id"), ("jobMetrics", "job_metrics"))
#: the job columns an updateJob may set (the hot path's statements set exactly these)
REPORT_COLUMNS = tuple(c for _, c, *_ in _REPORT_NUMBERS + _REPORT_TEXTS)


def parse_stored_files(xml: str) -> dict[str, dict]:
    """The final updateJob's ``xml``: a JSON object {lfn: {guid, fsize, adler32|md5sum, surl}}."""
    try:
        data = json.loads(xml)
    except (TypeError, ValueError):
        raise ProtocolError(SC_FAILED, "xml must be a JSON object of stored files") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ProtocolError(SC_FAILED, "xml must be a JSON object {lfn: {...}}")
    out = {}
    for lfn, info in data.items():
        entry = {"guid": info.get("guid"), "surl": info.get("surl")}
        try:
            entry["fsize"] = int(info["fsize"]) if info.get("fsize") not in (None, "") else None
        except (TypeError, ValueError):
            raise ProtocolError(SC_FAILED, f"xml: fsize of {lfn} is not a number") from None
        if info.get("adler32"):
            entry["adler32"] = str(info["adler32"])
        if info.get("md5sum"):
            entry["md5sum"] = str(info["md5sum"])
        out[str(lfn)] = entry
    return out
