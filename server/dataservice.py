"""The data service: brings the inputs of ``assigned`` jobs to their site, then activates them.

Brokerage may send a job where its inputs are not; such a job waits in ``assigned``. Each pass
(``DataService.process``) looks at the waiting jobs, copies every missing input from a storage
element that holds it to the site's input storage element through a pluggable mover (stevedore
group ``panda.datamovers``; the default, ``local``, copies ``file://`` replicas between the
local storage elements of the site configs), verifies size and checksum while the bytes stream,
registers the new replica and moves the job to ``activated``.

A file that no storage element holds, or whose every copy is missing or corrupt, fails the job
(``ddm_error_code`` 100, PanDA's EC_Setupper) with a diag naming the file and what was tried; a
destination problem (full disk, permissions, a copy that takes too long) leaves the job waiting
for the next pass and loses nothing: copies go to a temporary name and are renamed into place
only once verified. Several server processes may run passes at once: renames are atomic, the
replica insert tolerates a concurrent twin, and activation is a guarded state change.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
import urllib.parse
import uuid
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from panda_core.drivers import load_driver
from panda_core.replicas import BadFileName, replica_url
from panda_core.states import JobState

from . import db
from .brokerage import input_endpoint
from .metrics import DATASERVICE_ACTIONS
from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

EC_SETUPPER = 100          # PanDA's ddmErrorCode for "inputs could not be prepared"
ACTOR = "dataservice"
CHUNK = 1 << 20


class SourceError(Exception):
    """This copy of the file cannot be used (missing, not a file, wrong size or checksum)."""


class TransferFailed(Exception):
    """The copy failed for a reason that may pass (destination full, unwritable, too slow)."""


@dataclass
class FileRef:
    scope: str
    lfn: str
    fsize: int | None
    checksum: str | None          # "ad:xxxxxxxx" or "md5:..." as registered


class DataMover(ABC):
    """A data-management backend: copies one replica from one storage element to another."""

    name = "base"
    schemes: tuple[str, ...] = ()

    def handles(self, url: str) -> bool:
        return urllib.parse.urlparse(url).scheme in self.schemes

    @abstractmethod
    def copy(self, src_url: str, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        """Put a verified copy at ``dst_url``; raise SourceError or TransferFailed."""


def load_mover(name: str = "local", **options) -> DataMover:
    """A mover by its entry-point name in ``panda.datamovers``."""
    return load_driver("panda.datamovers", name, invoke_kwds=options, error=ValueError,
                       kind="data mover")


def _file_path(url: str) -> Path:
    parts = urllib.parse.urlparse(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"not a local file URL: {url}")
    return Path(urllib.parse.unquote(parts.path))


def _matches(expected: FileRef, size: int, adler: str, md5: str) -> str | None:
    """None if size and checksum agree with the catalogue, else what differs."""
    if expected.fsize is not None and size != expected.fsize:
        return f"size {size} bytes, catalogue says {expected.fsize}"
    ck = expected.checksum or ""
    if ck.startswith("ad:") and ck[3:].lower().zfill(8) != adler:
        return f"adler32 {adler}, catalogue says {ck[3:]}"
    if ck.startswith("md5:") and ck[4:].lower() != md5:
        return f"md5 {md5}, catalogue says {ck[4:]}"
    return None


class LocalMover(DataMover):
    """``file://`` to ``file://``: the storage elements of the site configs on this host."""

    name = "local"
    schemes = ("file",)

    def __init__(self, fsync: bool = True):
        self.fsync = fsync

    def copy(self, src_url: str, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        src, dst = _file_path(src_url), _file_path(dst_url)
        if dst.is_file() and self._verify(dst, expected, timeout_s) is None:
            return                                   # already there and good: nothing to do
        try:
            st = os.stat(src)
        except FileNotFoundError:
            raise SourceError(f"{src_url}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{src_url}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):             # a FIFO or device would hang the copy
            raise SourceError(f"{src_url}: not a regular file")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransferFailed(f"cannot create {dst.parent}: {exc.strerror}") from None
        tmp = dst.with_name(f".{dst.name}.part-{uuid.uuid4().hex[:8]}")
        deadline = time.monotonic() + timeout_s
        adler, md5, size = 1, hashlib.md5(), 0
        try:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                while chunk := fin.read(CHUNK):
                    adler = zlib.adler32(chunk, adler)
                    md5.update(chunk)
                    size += len(chunk)
                    fout.write(chunk)
                    if time.monotonic() > deadline:
                        raise TransferFailed(f"copy of {src_url} took more than {timeout_s:g} s")
                fout.flush()
                if self.fsync:
                    os.fsync(fout.fileno())
            bad = _matches(expected, size, f"{adler:08x}", md5.hexdigest())
            if bad:
                raise SourceError(f"{src_url}: {bad}")
            os.replace(tmp, dst)
        except OSError as exc:
            what = "destination full" if exc.errno == errno.ENOSPC else exc.strerror
            raise TransferFailed(f"copy {src_url} -> {dst_url}: {what}") from None
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass

    def _verify(self, path: Path, expected: FileRef, timeout_s: float) -> str | None:
        adler, md5, size = 1, hashlib.md5(), 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    adler = zlib.adler32(chunk, adler)
                    md5.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            return exc.strerror
        return _matches(expected, size, f"{adler:08x}", md5.hexdigest())


@dataclass
class DataReport:
    activated: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)      # panda_id -> diag
    waiting: dict[int, str] = field(default_factory=dict)     # panda_id -> why it still waits
    copied: int = 0


class DataService:
    def __init__(self, tb: TaskBuffer, mover: DataMover | None = None, batch: int = 200,
                 timeout_s: float = 600.0):
        self.tb = tb
        self.mover = mover or LocalMover()
        self.batch = batch
        self.timeout_s = timeout_s

    def process(self) -> DataReport:
        """One pass over the assigned jobs."""
        report = DataReport()
        sites = {s["name"]: s["config"] for s in self.tb.sites.all()}
        urls = storage_urls(sites.values())
        j = db.jobs.c
        with db.read(self.tb.engine) as conn:
            jobs = [dict(r._mapping) for r in conn.execute(
                select(j.panda_id, j.site).where(j.status == str(JobState.ASSIGNED),
                                                 j.site.is_not(None))
                .order_by(j.current_priority.desc(), j.panda_id).limit(self.batch))]
        for job in jobs:
            self._one(job["panda_id"], sites.get(job["site"]), urls, report)
        for action, n in (("activated", len(report.activated)), ("failed", len(report.failed)),
                          ("waiting", len(report.waiting)), ("copied", report.copied)):
            if n:
                DATASERVICE_ACTIONS.labels(action).inc(n)
        if report.activated or report.failed:
            log.info("data service: %d activated, %d failed, %d waiting, %d file(s) copied",
                     len(report.activated), len(report.failed), len(report.waiting),
                     report.copied)
        return report

    def _one(self, panda_id: int, config: dict | None, urls: dict[str, str],
             report: DataReport) -> None:
        if config is None:
            return self._fail(panda_id, "its site is not known to this server", report)
        dest = input_endpoint(config)
        if not dest or dest not in urls:
            return self._fail(panda_id, f"site {config.get('name')} has no input storage "
                                        "element with a URL", report)
        with db.read(self.tb.engine) as conn:
            inputs = [dict(r._mapping) for r in conn.execute(select(db.files).where(
                db.files.c.panda_id == panda_id, db.files.c.type == "input"))]
        for f in inputs:
            where = self.tb.data.replica_endpoints(f["scope"], [f["lfn"]])
            held = where.get(f["lfn"], set())
            if dest in held:
                continue
            ref = FileRef(f["scope"], f["lfn"], f["fsize"], f["checksum"])
            try:
                dst_url = replica_url(urls[dest], f["scope"], f["lfn"])
            except BadFileName as exc:
                return self._fail(panda_id, str(exc), report)
            tried = []
            sources = sorted(se for se in held if se in urls and self.mover.handles(urls[se]))
            for se in sources:
                src_url = replica_url(urls[se], f["scope"], f["lfn"])
                try:
                    self.mover.copy(src_url, dst_url, ref, self.timeout_s)
                except SourceError as exc:
                    tried.append(f"{se}: {exc}")
                    continue
                except TransferFailed as exc:
                    report.waiting[panda_id] = str(exc)
                    log.warning("job %s waits: %s", panda_id, exc,
                                extra={"panda_id": panda_id, "site": config.get("name")})
                    return
                self._register(f["scope"], f["lfn"], dest, dst_url)
                report.copied += 1
                break
            else:
                if tried:
                    why = "; ".join(tried)
                elif held:
                    why = (f"registered only at {', '.join(sorted(held))}, which this server "
                           f"cannot read from")
                else:
                    why = "no storage element holds it"
                return self._fail(panda_id, f"input {f['scope']}:{f['lfn']} cannot be brought to "
                                            f"{dest}: {why}", report)
        with self.tb.engine.begin() as conn:
            if self.tb.states.change(conn, panda_id, str(JobState.ACTIVATED), actor=ACTOR,
                                     expected=[str(JobState.ASSIGNED)]):
                report.activated.append(panda_id)

    def _register(self, scope: str, lfn: str, endpoint: str, surl: str) -> None:
        try:
            self.tb.data.add_replica(scope, lfn, endpoint, surl)
        except IntegrityError:
            pass                         # another server process registered it first

    def _fail(self, panda_id: int, diag: str, report: DataReport) -> None:
        with self.tb.engine.begin() as conn:
            ok = self.tb.jobs.fail(conn, panda_id, [str(JobState.ASSIGNED)], actor=ACTOR,
                                  retry=False, ddm_error_code=EC_SETUPPER,
                                  ddm_error_diag=diag[:4000])
        if ok:
            report.failed[panda_id] = diag
            log.warning("job %s failed: %s", panda_id, diag, extra={"panda_id": panda_id})


def storage_urls(configs) -> dict[str, str]:
    """Storage element name -> root URL, from every site's input and output storage."""
    out: dict[str, str] = {}
    for cfg in configs:
        for role in ("input", "output"):
            se = (cfg.get("storage") or {}).get(role) or {}
            if se.get("name") and se.get("url"):
                out.setdefault(se["name"], se["url"])
    return out
