"""The PanDA pilot protocol: getJob, updateJob, getStatus, as plain functions over form dicts.

The Tornado handlers only decode the request and encode the reply; everything a pilot can ask is
answered here, so it is tested without HTTP. Field names are PanDA's (docs/protocol.md).
"""
from __future__ import annotations

import json
import math
import logging
import re
from typing import Any

from panda_wms.states import PILOT_REPORTED_STATES

from .auth import Identity, KeyStore
from .brokerage import output_endpoint
from .taskbuffer import Conflict, NotFound, TaskBuffer

log = logging.getLogger(__name__)

# PanDA's StatusCode values
SC_OK, SC_TIMEOUT, SC_NO_JOBS, SC_FAILED = 0, 10, 20, 30
SC_INVALID_TOKEN, SC_INVALID_ROLE, SC_DENIED, SC_KEY_MISSING = 50, 60, 70, 80

_INT = re.compile(r"^-?\d+$")


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


class Dispatcher:
    def __init__(self, tb: TaskBuffer, keys: KeyStore, job_chooser=None):
        self.tb = tb
        self.keys = keys
        self.job_chooser = job_chooser   # optional: orders candidate jobs (global shares)

    # ------------------------------------------------------------------ getJob
    def get_job(self, form: dict, identity: Identity | None) -> dict:
        site = _require(form, "siteName")
        if identity is not None and not identity.may_act_for_site(site):
            raise ProtocolError(SC_DENIED, f"{identity.subject} may not take jobs of {site}")
        try:
            site_row = self.tb.get_site_cached(site)
        except NotFound:
            raise ProtocolError(SC_FAILED, f"unknown site {site!r}") from None
        if site_row["status"] == "offline":
            return {"StatusCode": SC_NO_JOBS, "errorDialog": f"site {site} is offline"}
        n_jobs = max(1, min(_int(form, "nJobs", 1) or 1, 100))
        remaining = _int(form, "remainingWalltime") or _int(form, "maxWalltime")
        mem = _int(form, "mem")
        cores = _int(form, "cores") or _int(form, "coreCount")
        # share-aware: a chooser with plan() is asked share by share (index reads); a plain
        # job_chooser gives ORDER BY clauses
        chooser = self.job_chooser
        plan = chooser.plan(site) if hasattr(chooser, "plan") else None
        order = chooser(site) if chooser is not None and not hasattr(chooser, "plan") else None
        kw = dict(node=form.get("node"), actor=identity.subject if identity else None,
                  pilot_id=form.get("pilotID") or form.get("pilot_id"),
                  batch_id=form.get("batchID") or form.get("worker_id"),
                  cores=cores, memory_mb=mem, walltime_s=remaining,
                  pilot_version=form.get("pilotVersion"),
                  prod_source_label=form.get("prodSourceLabel") if form.get("prodSourceLabel")
                  in ("test", "ptest", "user") else None)
        jobs = []
        for _ in range(n_jobs):
            job = None
            for where in plan or ():
                job = self.tb.dispatch(site, where=where, **kw)
                if job is not None:
                    break
            if job is None:      # no plan, or the cached plan missed: any job, best first
                job = self.tb.dispatch(site, order_by=order, **kw)
            if job is None:
                break
            jobs.append(self.job_spec(job, site_row["config"]))
        if not jobs:
            return {"StatusCode": SC_NO_JOBS, "errorDialog": "no jobs"}
        if "nJobs" in form:
            return {"StatusCode": SC_OK, "jobs": jobs}
        return {"StatusCode": SC_OK, **jobs[0]}

    def job_spec(self, job: dict, site_config: dict) -> dict:
        """A job row in PanDA's getJob shape, signed."""
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
        spec["specSignature"] = self.keys.sign_job(spec)
        return spec

    # ------------------------------------------------------------------ updateJob
    def update_job(self, form: dict, identity: Identity | None) -> dict:
        panda_id = _int(form, "jobId")
        if panda_id is None:
            raise ProtocolError(SC_KEY_MISSING, "jobId is missing")
        state = _require(form, "state")
        if state not in {str(s) for s in PILOT_REPORTED_STATES}:
            raise ProtocolError(SC_FAILED, f"state {state!r} is not one a pilot may report")
        fields: dict[str, Any] = {}
        for key, column, conv in (
                ("pilotErrorCode", "pilot_error_code", _int),
                ("transExitCode", "trans_exit_code", _int),
                ("exeErrorCode", "exe_error_code", _int),
                ("nEvents", "n_events", _int),
                ("maxRSS", "max_rss", _int),
                ("cpuConsumptionTime", "cpu_consumption_time", _float)):
            value = conv(form, key)
            if value is not None:
                fields[column] = value
        for key, column in (("pilotErrorDiag", "pilot_error_diag"),
                            ("exeErrorDiag", "exe_error_diag"),
                            ("node", "node"), ("batchID", "batch_id"),
                            ("jobMetrics", "job_metrics")):
            if form.get(key) not in (None, ""):
                fields[column] = str(form[key])[:4000]
        stored = {}
        if form.get("xml"):
            stored = parse_stored_files(form["xml"])
        attempt_nr = _int(form, "attemptNr")
        # the site row is read before the update's transaction: a second connection reading it
        # inside that transaction waits for its lock on SQLite (30 s, then "database is locked")
        said_site = str(form.get("siteName") or "")
        try:
            said_row = self.tb.get_site_cached(said_site) if said_site else None
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
                self.tb.get_site_cached(job["site"])
            return output_endpoint(row["config"])

        try:
            command = self.tb.pilot_update(
                panda_id, state, fields, actor=identity.subject if identity else None,
                attempt_nr=attempt_nr, stored_files=stored, check=check)
        except Conflict as exc:
            raise ProtocolError(SC_FAILED, str(exc)) from None
        return {"StatusCode": SC_OK, "command": command}

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
                job = self.tb.get_job(number) if -2**63 < number < 2**63 else None
            except ValueError:
                job = None
            states.append(job["status"] if job else "unknown")
            commands.append((job or {}).get("command") or "NULL")
        return {"StatusCode": SC_OK, "status": _join(states), "command": _join(commands)}


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
