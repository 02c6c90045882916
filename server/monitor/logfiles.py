"""A job's log tarball, browsed file by file: the payload's stdout and stderr and the pilot's log
are members of it (``pilot/logtar.py``).

The tarball is read from its replica's SURL as the pilot registered it, only when that SURL lies
under one of the job's site's storage URLs (a pilot cannot make the server open another path),
over ``file://`` or ``http(s)://``, at most :data:`MAX_TARBALL_BYTES`. Members are shown as
text, the last :data:`MAX_MEMBER_BYTES` of a longer one.
"""
from __future__ import annotations

import io
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from sqlalchemy import select

from .. import db

MAX_TARBALL_BYTES = 64 * 1024 * 1024
MAX_MEMBER_BYTES = 2 * 1024 * 1024
FETCH_TIMEOUT_S = 20
#: members the job page links to by name (a ``.tail`` suffix: cut to its end by the pilot)
WELL_KNOWN = {"payload.stdout": "payload stdout", "payload.stderr": "payload stderr",
              "pilot.log": "pilot log"}


class LogUnavailable(Exception):
    """Why the log tarball cannot be shown."""


@dataclass
class LogTarball:
    lfn: str
    surl: str | None
    members: list[dict] = field(default_factory=list)
    error: str | None = None


def log_file(job: dict) -> dict | None:
    return next((f for f in job.get("files", []) if f["type"] == "log"), None)


def replica_surls(tb, scope: str, lfn: str) -> list[str]:
    r = db.replicas.c
    with db.read(tb.engine) as conn:
        return [s for (s,) in conn.execute(select(r.surl).where(r.scope == scope, r.lfn == lfn))
                if s]


def storage_prefixes(tb, site: str | None) -> list[str]:
    if not site:
        return []
    with db.read(tb.engine) as conn:
        cfg = conn.execute(select(db.sites.c.config).where(db.sites.c.name == site)).scalar()
    storage = (cfg or {}).get("storage") or {}
    return [s["url"].rstrip("/") + "/" for s in storage.values()
            if isinstance(s, dict) and s.get("url")]


def _fetch(surl: str) -> bytes:
    parsed = urllib.parse.urlparse(surl)
    if parsed.scheme == "file":
        path = urllib.parse.unquote(parsed.path)
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_TARBALL_BYTES + 1)
        except OSError as exc:
            raise LogUnavailable(f"cannot read {surl}: {exc.strerror or exc}") from None
    elif parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(surl, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310
                data = resp.read(MAX_TARBALL_BYTES + 1)
        except OSError as exc:
            raise LogUnavailable(f"cannot fetch {surl}: {exc}") from None
    else:
        raise LogUnavailable(f"the monitor cannot read {parsed.scheme}:// replicas")
    if len(data) > MAX_TARBALL_BYTES:
        raise LogUnavailable(f"log tarball larger than {MAX_TARBALL_BYTES // 2**20} MiB")
    return data


def _open(tb, job: dict) -> tuple[LogTarball, tarfile.TarFile | None]:
    f = log_file(job)
    if f is None:
        raise LogUnavailable("this job has no log file")
    surls = replica_surls(tb, f["scope"], f["lfn"])
    tarball = LogTarball(f["lfn"], surls[0] if surls else None)
    if not surls:
        tarball.error = "no replica of the log tarball is registered (yet)"
        return tarball, None
    prefixes = storage_prefixes(tb, job.get("site"))
    allowed = [s for s in surls if any(s.startswith(p) for p in prefixes)]
    if not allowed:
        tarball.error = "the log replica is not under the site's storage: not opened"
        return tarball, None
    tarball.surl = allowed[0]
    try:
        data = _fetch(allowed[0])
        return tarball, tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except LogUnavailable as exc:
        tarball.error = str(exc)
    except tarfile.TarError as exc:
        tarball.error = f"not a readable tarball: {exc}"
    return tarball, None


def list_log(tb, job: dict) -> LogTarball:
    """The tarball's files (name, size, and the well-known ones' labels)."""
    try:
        tarball, tar = _open(tb, job)
    except LogUnavailable as exc:
        return LogTarball("", None, error=str(exc))
    if tar is not None:
        with tar:
            for m in tar.getmembers():
                if m.isfile():
                    base = m.name.rsplit("/", 1)[-1].removesuffix(".tail")
                    tarball.members.append({"name": m.name, "size": m.size,
                                            "label": WELL_KNOWN.get(base)})
    return tarball


def read_member(tb, job: dict, name: str) -> tuple[str, bool]:
    """(text, cut) of member ``name``; LogUnavailable when there is no such member."""
    tarball, tar = _open(tb, job)
    if tar is None:
        raise LogUnavailable(tarball.error or "log tarball unavailable")
    with tar:
        try:
            member = tar.getmember(name)
        except KeyError:
            raise LogUnavailable(f"no file {name!r} in {tarball.lfn}") from None
        if not member.isfile():
            raise LogUnavailable(f"{name!r} is not a file")
        fh = tar.extractfile(member)
        assert fh is not None
        cut = member.size > MAX_MEMBER_BYTES
        if cut:
            fh.seek(member.size - MAX_MEMBER_BYTES)
        data = fh.read(MAX_MEMBER_BYTES)
    return data.decode("utf-8", "replace"), cut
