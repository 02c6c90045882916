"""The job wire format: PanDA's getJob job dict, encoded once (server) and decoded once (pilots).

PanDA sends per-file values as comma-separated strings in parallel fields, in the same order:
``inFiles``/``GUID``/``fsize``/``checksum``/``scopeIn``/... for inputs, ``outFiles`` (the log
file included) with ``scopeOut``/``realDatasets``/... for outputs, ``logFile``/``logGUID``/
``scopeLog`` for the log. ``encode_job`` builds that dict from a job row of the server (the
dispatcher signs it); ``decode_job`` turns it into a ``JobSpec``, checking every name with
``replicas.check_name`` before it can become a path. Our pilot and ARC push mode decode here;
PanDA's pilot 3 reads the same dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errorcodes import CodedError, ErrorCode
from .replicas import BadFileName, check_name

#: what the encoder writes for "no value", as PanDA does; the decoder reads it (and "None") as empty
NULL = "NULL"
_EMPTY = ("", NULL, "None")
#: the field of a job spec that binds it to one dispatch; the signature covers it with the rest
DISPATCH_KEY = "pandaWmsDispatch"


class WireError(CodedError):
    """A job dict that cannot be used: BAD_JOB_SPEC, or HOSTILE_FILE_NAME for a name that could
    escape a directory."""


@dataclass
class FileSpec:
    lfn: str
    scope: str
    guid: str = ""
    fsize: int | None = None
    checksum: str = ""          # "ad:xxxxxxxx" or "md5:..." as PanDA sends it
    dataset: str = ""
    ddm_endpoint: str = ""

    @property
    def adler32(self) -> str | None:
        return self.checksum[3:] if self.checksum.startswith("ad:") else None

    @property
    def md5(self) -> str | None:
        return self.checksum[4:] if self.checksum.startswith("md5:") else None


@dataclass
class JobSpec:
    panda_id: int
    attempt_nr: int
    transformation: str
    job_pars: str
    inputs: list[FileSpec] = field(default_factory=list)
    outputs: list[FileSpec] = field(default_factory=list)   # without the log file
    log: FileSpec | None = None
    max_walltime_s: int = 0       # maxWalltime, 0 = no limit from the job
    max_rss_mb: int = 0           # minRamCount (MB), 0 = no limit from the job
    max_disk_mb: int = 0          # maxDiskCount (MB)
    core_count: int = 1
    direct_read: bool = False     # transferType == "direct"
    container_name: str = ""      # the image the payload asks for ("" = none)
    event_service: bool = False   # eventService: the payload gets event ranges (pilot/eventservice)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return str(self.panda_id)

    @property
    def files(self) -> list[FileSpec]:
        """Inputs, outputs and the log: every file the job names."""
        return self.inputs + self.outputs + ([self.log] if self.log else [])


@dataclass(slots=True)
class Dispatch:
    """To whom a job spec was sent: the site, the pilot (its ``pilotID``) and the nonce that
    pilot sent with its getJob. Signed inside the spec, so a spec replayed to another pilot, or
    to the same pilot's next getJob, does not match what that pilot expects. ``time`` (the
    server's epoch seconds at dispatch) is recorded, not compared: clocks of worker nodes drift."""
    site: str
    pilot_id: str
    nonce: str
    time: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"site": self.site, "pilotID": self.pilot_id, "nonce": self.nonce,
                "time": self.time}

    @classmethod
    def of(cls, raw: dict[str, Any]) -> "Dispatch | None":
        """The binding a job dict carries; None when it has none (or an unreadable one)."""
        value = raw.get(DISPATCH_KEY)
        if not isinstance(value, dict):
            return None
        try:
            return cls(str(value["site"]), str(value["pilotID"]), str(value["nonce"]),
                       int(value.get("time") or 0))
        except (KeyError, TypeError, ValueError):
            return None

    def matches(self, other: "Dispatch") -> bool:
        """Same site, pilot and nonce (the time is not compared)."""
        return (self.site, self.pilot_id, self.nonce) == (other.site, other.pilot_id,
                                                           other.nonce)


# ---------------------------------------------------------------------------------- encoding
def join_field(values: list[Any]) -> str:
    """PanDA's comma-separated field of per-file (or per-job) values; None is NULL."""
    return ",".join(NULL if v is None else str(v) for v in values)


def encode_job(job: dict[str, Any], input_se: str, output_se: str) -> dict[str, Any]:
    """The getJob dict of a server job row (``TaskBuffer`` columns plus ``files``, each with
    ``type`` input/output/log); ``input_se``/``output_se`` are the site's storage element names."""
    ins = [f for f in job["files"] if f["type"] == "input"]
    outs = [f for f in job["files"] if f["type"] == "output"]
    logs = [f for f in job["files"] if f["type"] == "log"]
    out_and_log = outs + logs
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
        "swRelease": NULL,
        "homepackage": NULL,
        "cmtConfig": NULL,
        "container_name": NULL,
        "inFiles": join_field([f["lfn"] for f in ins]),
        "GUID": join_field([f["guid"] for f in ins]),
        "fsize": join_field([f["fsize"] for f in ins]),
        "checksum": join_field([f["checksum"] for f in ins]),
        "scopeIn": join_field([f["scope"] for f in ins]),
        "realDatasetsIn": join_field([f["dataset"] for f in ins]),
        "dispatchDblock": join_field([f["dataset"] for f in ins]),
        "prodDBlocks": join_field([f["dataset"] for f in ins]),
        "ddmEndPointIn": join_field([input_se for _ in ins]),
        "outFiles": join_field([f["lfn"] for f in out_and_log]),
        "scopeOut": join_field([f["scope"] for f in outs]),
        "realDatasets": join_field([f["dataset"] for f in out_and_log]),
        "destinationDblock": join_field([f["dataset"] for f in out_and_log]),
        "destinationDBlockToken": join_field([NULL for _ in out_and_log]),
        "ddmEndPointOut": join_field([output_se for _ in out_and_log]),
        "fileDestinationSE": join_field([output_se for _ in out_and_log]),
        "destinationSE": output_se,
        "logFile": log_file["lfn"] if log_file else NULL,
        "logGUID": log_file["guid"] if log_file else NULL,
        "scopeLog": log_file["scope"] if log_file else NULL,
        "maxCpuCount": job["walltime_s"],
        "minRamCount": job["memory_mb"],
        "maxDiskCount": job["disk_mb"],
        "maxWalltime": job["walltime_s"],
        "coreCount": job["cores"],
        "currentPriority": job["current_priority"],
        "transferType": job["transfer_type"] or NULL,
        "nucleus": NULL,
    }
    if job.get("pilot_version"):
        spec["pilotVersion"] = job["pilot_version"]
    if job.get("event_service") == 1:      # PanDA's keys: a consumer of event ranges
        spec["eventService"] = "True"
    elif job.get("event_service") == 2:    # the merge job of an event-service task
        spec["eventServiceMerge"] = "True"
    return spec


def range_output_lfn(event_range_id: str) -> str:
    """The logical name of the output an event-service pilot stores for one range: the range's
    ID (unique per hand-out) is the whole name, so the server can check a report names no file
    but that range's own."""
    return f"es.{event_range_id}"


# ---------------------------------------------------------------------------------- decoding
def _text(raw: dict, key: str) -> str:
    value = str(raw.get(key) or "").strip()
    return "" if value in _EMPTY else value


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    value = str(value).strip()
    if value in _EMPTY:
        return []
    return [v.strip() for v in value.split(",")]


def _int(raw: dict, key: str, default: int = 0) -> int:
    value = raw.get(key)
    if value in (None, *_EMPTY):
        return default
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise WireError(ErrorCode.BAD_JOB_SPEC, f"{key}={value!r} is not a number") from None


def _nth(items: list[str], i: int, default: str = "") -> str:
    return items[i] if i < len(items) and items[i] not in _EMPTY else default


def _checked(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except BadFileName as exc:
        raise WireError(ErrorCode.HOSTILE_FILE_NAME, str(exc)) from None


def decode_job(raw: dict[str, Any]) -> JobSpec:
    """A JobSpec from a getJob job dict; WireError when it is unusable or names a hostile file."""
    if not isinstance(raw, dict):
        raise WireError(ErrorCode.BAD_JOB_SPEC, "a job must be a JSON object")
    if "PandaID" not in raw:
        raise WireError(ErrorCode.BAD_JOB_SPEC, "job has no PandaID")
    panda_id = _int(raw, "PandaID")
    transformation = _text(raw, "transformation")
    if not transformation:
        raise WireError(ErrorCode.BAD_JOB_SPEC, "job has no transformation")

    scopes = _split(raw.get("scopeIn"))
    guids, sizes = _split(raw.get("GUID")), _split(raw.get("fsize"))
    sums, dsets = _split(raw.get("checksum")), _split(raw.get("realDatasetsIn"))
    endpoints = _split(raw.get("ddmEndPointIn"))
    inputs = []
    for i, lfn in enumerate(_split(raw.get("inFiles"))):
        size = _nth(sizes, i)
        try:
            fsize = int(size) if size else None
        except ValueError:
            raise WireError(ErrorCode.BAD_JOB_SPEC,
                            f"fsize {size!r} of {lfn!r} is not a number") from None
        inputs.append(FileSpec(lfn=_checked(lfn, "input file name"),
                               scope=_checked(_nth(scopes, i) or _nth(scopes, 0), "input scope"),
                               guid=_nth(guids, i), fsize=fsize, checksum=_nth(sums, i),
                               dataset=_nth(dsets, i), ddm_endpoint=_nth(endpoints, i)))

    # outFiles holds the log file too; scopeOut has one scope per output without the log
    log_lfn = _text(raw, "logFile")
    out_scopes, out_dsets = _split(raw.get("scopeOut")), _split(raw.get("realDatasets"))
    out_endpoints = _split(raw.get("ddmEndPointOut"))
    outputs: list[FileSpec] = []
    for i, lfn in enumerate(_split(raw.get("outFiles"))):
        if lfn == log_lfn:
            continue
        scope = _nth(out_scopes, len(outputs)) or _nth(out_scopes, 0)
        outputs.append(FileSpec(lfn=_checked(lfn, "output file name"),
                                scope=_checked(scope, "output scope"),
                                dataset=_nth(out_dsets, i), ddm_endpoint=_nth(out_endpoints, i)))
    log: FileSpec | None = None
    if log_lfn:
        scope = _text(raw, "scopeLog") or _nth(out_scopes, 0)
        log = FileSpec(lfn=_checked(log_lfn, "log file name"), scope=_checked(scope, "log scope"),
                       guid=_text(raw, "logGUID"))
    job = JobSpec(
        panda_id=panda_id, attempt_nr=_int(raw, "attemptNr", 1), transformation=transformation,
        job_pars=str(raw.get("jobPars") or ""), inputs=inputs, outputs=outputs, log=log,
        max_walltime_s=_int(raw, "maxWalltime"), max_rss_mb=_int(raw, "minRamCount"),
        max_disk_mb=_int(raw, "maxDiskCount"), core_count=max(1, _int(raw, "coreCount", 1)),
        direct_read=_text(raw, "transferType").lower() == "direct",
        container_name=_text(raw, "container_name"),
        event_service=_text(raw, "eventService").lower() in ("true", "1"), raw=dict(raw))
    names = [f.lfn for f in job.files]
    if len(set(names)) != len(names):
        raise WireError(ErrorCode.BAD_JOB_SPEC,
                        "a file name appears twice among the job's inputs, outputs and log")
    return job
