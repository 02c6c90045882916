"""The job as the server describes it (PanDA's getJob fields), parsed and checked once.

PanDA sends per-file lists as comma-separated strings in parallel fields (``inFiles``, ``GUID``,
``fsize``, ``checksum``, ``scopeIn``...). They are turned into ``FileSpec`` records here, and every
name is checked with ``panda_wms.storage.check_name`` before it can become a path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from panda_wms.storage import BadFileName, check_name

from .errors import BadJobSpec, ErrorCode, PilotError


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
    max_walltime_s: int = 0       # 0 = no limit from the job
    max_rss_mb: int = 0           # minRamCount (MB), 0 = no limit from the job
    max_disk_mb: int = 0          # maxDiskCount (MB)
    core_count: int = 1
    direct_read: bool = False     # transferType == "direct"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return str(self.panda_id)


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    value = str(value).strip()
    if value in ("", "NULL", "None"):
        return []
    return [v.strip() for v in value.split(",")]


def _int(raw: dict, key: str, default: int = 0) -> int:
    value = raw.get(key)
    if value in (None, "", "NULL", "None"):
        return default
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise BadJobSpec(f"{key}={value!r} is not a number") from None


def _nth(items: list[str], i: int, default: str = "") -> str:
    return items[i] if i < len(items) and items[i] not in ("NULL", "None") else default


def _checked(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except BadFileName as exc:
        raise PilotError(ErrorCode.HOSTILE_FILE_NAME, str(exc)) from None


def parse_job(raw: dict[str, Any]) -> JobSpec:
    """Build a JobSpec from a getJob reply's job dict; raise BadJobSpec/PilotError when unusable."""
    if "PandaID" not in raw:
        raise BadJobSpec("job has no PandaID")
    panda_id = _int(raw, "PandaID")
    transformation = str(raw.get("transformation") or "").strip()
    if not transformation:
        raise BadJobSpec("job has no transformation")

    lfns = _split(raw.get("inFiles"))
    guids, sizes = _split(raw.get("GUID")), _split(raw.get("fsize"))
    sums = _split(raw.get("checksum"))
    scopes, dsets = _split(raw.get("scopeIn")), _split(raw.get("realDatasetsIn"))
    endpoints = _split(raw.get("ddmEndPointIn"))
    inputs = []
    for i, lfn in enumerate(lfns):
        size = _nth(sizes, i)
        try:
            fsize = int(size) if size else None
        except ValueError:
            raise BadJobSpec(f"fsize {size!r} of {lfn!r} is not a number") from None
        inputs.append(FileSpec(lfn=_checked(lfn, "input file name"),
                               scope=_checked(_nth(scopes, i) or _nth(scopes, 0), "input scope"),
                               guid=_nth(guids, i), fsize=fsize, checksum=_nth(sums, i),
                               dataset=_nth(dsets, i), ddm_endpoint=_nth(endpoints, i)))

    log_lfn = str(raw.get("logFile") or "").strip()
    out_lfns = _split(raw.get("outFiles"))
    out_scopes, out_dsets = _split(raw.get("scopeOut")), _split(raw.get("realDatasets"))
    out_endpoints = _split(raw.get("ddmEndPointOut"))
    outputs: list[FileSpec] = []
    log: FileSpec | None = None
    scope_j = 0
    for i, lfn in enumerate(out_lfns):
        if lfn == log_lfn:
            continue
        scope = _nth(out_scopes, scope_j) or _nth(out_scopes, 0)
        outputs.append(FileSpec(lfn=_checked(lfn, "output file name"),
                                scope=_checked(scope, "output scope"),
                                dataset=_nth(out_dsets, i), ddm_endpoint=_nth(out_endpoints, i)))
        scope_j += 1
    if log_lfn:
        scope = str(raw.get("scopeLog") or "").strip() or (out_scopes[0] if out_scopes else "")
        log = FileSpec(lfn=_checked(log_lfn, "log file name"), scope=_checked(scope, "log scope"),
                       guid=str(raw.get("logGUID") or ""))
    names = [f.lfn for f in inputs] + [f.lfn for f in outputs] + ([log.lfn] if log else [])
    if len(set(names)) != len(names):
        raise BadJobSpec("a file name appears twice among the job's inputs, outputs and log")

    return JobSpec(
        panda_id=panda_id, attempt_nr=_int(raw, "attemptNr", 1), transformation=transformation,
        job_pars=str(raw.get("jobPars") or ""), inputs=inputs, outputs=outputs, log=log,
        max_walltime_s=_int(raw, "maxWalltime"), max_rss_mb=_int(raw, "minRamCount"),
        max_disk_mb=_int(raw, "maxDiskCount"), core_count=max(1, _int(raw, "coreCount", 1)),
        direct_read=str(raw.get("transferType") or "").lower() == "direct", raw=dict(raw))
