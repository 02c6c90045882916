"""Stage-in before the payload and stage-out after it, one file at a time through the copytools.

Each file goes through ``copytools.run_transfer`` with the site's tool for its direction (input and
output tools may differ), under the site's timeout and retries. A copytool option that names a
program (``CopyTool.program_options``) is refused unless the program is in the pilot's local
allow list (``--allow-program``): the queue description comes over the network, and the pilot
never runs a program because the network named it. Replica URLs come from
``panda_core.replicas.replica_url``, so every part of the system agrees where a file lives.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panda_core.replicas import BadFileName, replica_url
from .errors import ErrorCode, StageError
from panda_core.siteconfig import SiteConfig
from panda_core.wire import FileSpec, JobSpec


log = logging.getLogger(__name__)


@dataclass
class StageSettings:
    timeout_s: float
    retries: int
    backoff_s: float = 1.0
    allowed_programs: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_site(cls, site: SiteConfig, backoff_s: float = 1.0,
                  allowed_programs: frozenset[str] = frozenset()) -> "StageSettings":
        return cls(site.transfer.timeout_s, site.transfer.retries, backoff_s, allowed_programs)


def _tool(name: str, options: dict[str, Any], direction: str, allowed: frozenset[str]):
    import copytools

    code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
    try:
        tool = copytools.load(name, **options)
    except Exception as exc:  # unknown tool, bad options, broken plugin: all one failure
        raise StageError(code, f"copytool {name!r} for stage-{direction} unusable: {exc}") from None
    permitted = {os.path.realpath(p) for p in allowed}
    for option in type(tool).program_options:
        program = options.get(option)
        if program and os.path.realpath(str(program)) not in permitted:
            raise StageError(code, f"copytool {name!r} option {option!r} names the program "
                             f"{str(program)[:200]!r}, which is not in this pilot's allow list "
                             "(--allow-program)")
    return tool


def _surl(se_url: str, scope: str, lfn: str, code: int) -> str:
    if not se_url:
        raise StageError(code, "the site config names no storage element", lfn)
    try:
        return replica_url(se_url, scope, lfn)
    except BadFileName as exc:
        raise StageError(ErrorCode.HOSTILE_FILE_NAME, str(exc), lfn) from None


def stage_in(job: JobSpec, site: SiteConfig, workdir: Path,
             settings: StageSettings) -> dict[str, str]:
    """Bring the job's inputs into ``workdir``; return {lfn: local path or URL for direct read}."""
    files: dict[str, str] = {}
    if not job.inputs:
        return files
    from copytools import Transfer, TransferError, run_transfer

    direct = site.direct_read and job.direct_read
    tool = None if direct else _tool(site.copytools.input.name, site.copytools.input.options, "in",
                                     settings.allowed_programs)
    for f in job.inputs:
        surl = _surl(site.storage.input.url, f.scope, f.lfn, ErrorCode.STAGEIN_FAILED)
        if direct:
            files[f.lfn] = surl
            log.info("direct read of %s:%s from %s", f.scope, f.lfn, surl)
            continue
        local = workdir / f.lfn
        t = Transfer(lfn=f.lfn, scope=f.scope, surl=surl, local_path=str(local), fsize=f.fsize,
                     checksum=f.checksum or None, guid=f.guid or None)
        try:
            run_transfer(tool, t, "in", settings.timeout_s, settings.retries, settings.backoff_s)
        except TransferError as exc:
            raise StageError(int(exc.code), f"stage-in of {f.lfn}: {exc.message}", f.lfn) from None
        files[f.lfn] = str(local)
    return files


def _new_guid() -> str:
    """A fresh GUID for an output (uuid imported here: stage-in, on the way to the payload,
    never needs it)."""
    import uuid

    return str(uuid.uuid4())


def stage_out(files: list[FileSpec], local_dir: Path, site: SiteConfig,
              settings: StageSettings) -> dict[str, dict[str, Any]]:
    """Store ``files`` from ``local_dir``; return PanDA's ``xml`` dict {lfn: {guid, fsize, adler32,
    surl}}. Raises StageError on the first file that cannot be stored (with what was stored so far
    in ``exc.stored``)."""
    stored: dict[str, dict[str, Any]] = {}
    if not files:
        return stored
    from copytools import Transfer, TransferError, run_transfer

    tool = _tool(site.copytools.output.name, site.copytools.output.options, "out",
                 settings.allowed_programs)
    for f in files:
        local = local_dir / f.lfn
        if not local.is_file():
            err = StageError(ErrorCode.NO_SUCH_FILE, f"output file {f.lfn} was not produced", f.lfn)
            err.stored = stored
            raise err
        surl = _surl(site.storage.output.url, f.scope, f.lfn, ErrorCode.STAGEOUT_FAILED)
        guid = f.guid or _new_guid()
        t = Transfer(lfn=f.lfn, scope=f.scope, surl=surl, local_path=str(local), guid=guid)
        try:
            res = run_transfer(tool, t, "out", settings.timeout_s, settings.retries,
                               settings.backoff_s)
        except TransferError as exc:
            err = StageError(int(exc.code), f"stage-out of {f.lfn}: {exc.message}", f.lfn)
            err.stored = stored
            raise err from None
        entry: dict[str, Any] = {"guid": guid, "fsize": res.fsize, "adler32": res.adler32,
                                 "surl": res.surl or surl, "scope": f.scope}
        if res.md5:
            entry["md5sum"] = res.md5
        stored[f.lfn] = entry
    return stored
