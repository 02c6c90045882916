"""The ``gfal`` copytool: any protocol gfal2 speaks (root://, http(s)://, davs://, file://, ...).

gfal2's Python bindings come from Debian (``python3-gfal2``), built for Debian's Python 3.11.
The project runs on another 3.11 interpreter (same ABI), so ``import_gfal2`` loads exactly the
one extension module from Debian's dist-packages by its path, without putting that folder on
``sys.path`` (which would shadow our own packages with Debian's older ones). The bytes are read
and written through gfal2's file API, so this process checksums them as they stream; an upload
is then checked against the storage's own size and adler32 where the protocol offers it.
The gfal2 context is made in the transfer process (after the fork), never in the pilot.
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import importlib.machinery
import importlib.util
import logging
import os
import sys
from types import ModuleType

from panda_core.errorcodes import ErrorCode

from .base import CopyTool, Transfer, TransferError, TransferResult, partial_path, unlink_quietly
from .checksum import StreamChecksum

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
DEBIAN_DIST = "/usr/lib/python3/dist-packages"
_gfal2: ModuleType | None = None


def import_gfal2() -> ModuleType:
    """gfal2's bindings: importable ones first, else Debian's built for this Python's ABI."""
    global _gfal2
    if _gfal2 is not None:
        return _gfal2
    try:
        import gfal2  # type: ignore[import-not-found]
        _gfal2 = gfal2
        return gfal2
    except ImportError:
        pass
    candidates = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidates += glob.glob(os.path.join(DEBIAN_DIST, "gfal2" + suffix))
    if not candidates:
        raise ImportError(f"gfal2 bindings not found for Python {sys.version_info[0]}."
                          f"{sys.version_info[1]} (install Debian's python3-gfal2; looked in "
                          f"{DEBIAN_DIST})")
    loader = importlib.machinery.ExtensionFileLoader("gfal2", candidates[0])
    spec = importlib.util.spec_from_file_location("gfal2", candidates[0], loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["gfal2"] = module
    _gfal2 = module
    return module


def _gerror_code(exc: Exception) -> int:
    return int(getattr(exc, "code", 0) or 0)


def _absolute_url(surl: str) -> str:
    if surl.startswith(("root://", "xroot://", "roots://")):
        from .xrootd import root_url
        return root_url(surl)
    return surl


def _absolute(t: Transfer) -> Transfer:
    """The same transfer with an XRootD URL in absolute form (see xrootd.root_url)."""
    surl = _absolute_url(t.surl)
    return t if surl == t.surl else dataclasses.replace(t, surl=surl)


class GfalTool(CopyTool):
    """Options: ``timeout_ops`` (s, gfal2's per-operation timeout), ``connect_timeout`` (s),
    ``md5``."""

    name = "gfal"
    schemes = ("root", "xroot", "http", "https", "dav", "davs", "file", "srm", "gsiftp")

    def _context(self, timeout: float):
        # XRootD's client reads these once, at its first use, which is in this (forked) process:
        # without them it retries a dead server for minutes
        window = str(max(1, min(int(self.options.get("connect_timeout", 30)), int(timeout))))
        for key, value in (("XRD_CONNECTIONRETRY", "1"), ("XRD_CONNECTIONWINDOW", window),
                           ("XRD_REQUESTTIMEOUT", str(max(1, int(timeout))))):
            os.environ.setdefault(key, value)
        gfal2 = import_gfal2()
        ctx = gfal2.creat_context()
        ops = int(self.options.get("timeout_ops", max(1, int(timeout))))
        for group in ("HTTP PLUGIN", "XROOTD PLUGIN"):
            try:
                ctx.set_opt_integer(group, "OPERATION_TIMEOUT", ops)
            except Exception:  # noqa: BLE001 - a plugin that is not installed has no options
                pass
        return gfal2, ctx

    def _error(self, exc: Exception, t: Transfer, direction: str, what: str) -> TransferError:
        code_no = _gerror_code(exc)
        text = f"{t.lfn}: gfal2 {what} {t.surl}: {exc}"
        if code_no == errno.ETIMEDOUT:
            code = ErrorCode.STAGEIN_TIMEOUT if direction == "in" else ErrorCode.STAGEOUT_TIMEOUT
            return TransferError(code, text, retryable=True)
        if direction == "in" and code_no == errno.ENOENT:
            return TransferError(ErrorCode.MISSING_INPUT, text)
        if direction == "out" and code_no in (errno.ENOSPC, errno.EDQUOT):
            return TransferError(ErrorCode.NO_REMOTE_SPACE, text)
        if code_no in (errno.EACCES, errno.EPERM):
            return TransferError(ErrorCode.STAGEIN_AUTH_FAILURE if direction == "in" else
                                 ErrorCode.STAGEOUT_AUTH_FAILURE, text)
        code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
        return TransferError(code, text, retryable=code_no not in (errno.EACCES, errno.EPERM,
                                                                   errno.ENOSPC, errno.EDQUOT))

    def copy_in(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        surl, t = t.surl, _absolute(t)
        gfal2, ctx = self._context(timeout)
        tmp = partial_path(t.local_path)
        cs = StreamChecksum(want_md5)
        try:
            src = ctx.open(t.surl, "r")
        except gfal2.GError as exc:
            raise self._error(exc, t, "in", "open") from None
        try:
            with open(tmp, "wb") as out:
                while True:
                    data = src.read_bytes(CHUNK)
                    if not data:
                        break
                    out.write(data)
                    cs.update(data)
            os.replace(tmp, t.local_path)
        except gfal2.GError as exc:
            unlink_quietly(tmp)
            raise self._error(exc, t, "in", "read") from None
        except OSError as exc:
            unlink_quietly(tmp)
            code = (ErrorCode.NO_LOCAL_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    else ErrorCode.STAGEIN_FAILED)
            raise TransferError(code, f"{t.lfn}: writing {t.local_path}: {exc}") from None
        finally:
            del src
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=surl)

    def copy_out(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        surl, t = t.surl, _absolute(t)
        gfal2, ctx = self._context(timeout)
        cs = StreamChecksum(want_md5)
        parent = t.surl.rsplit("/", 1)[0]
        try:
            ctx.mkdir_rec(parent, 0o755)
        except gfal2.GError as exc:
            if _gerror_code(exc) != errno.EEXIST:
                log.debug("mkdir_rec %s: %s (the upload will tell)", parent, exc)
        try:
            existing = ctx.stat(t.surl)
        except gfal2.GError:
            existing = None
        if existing is not None:          # a replica is never overwritten (nor removed here)
            return self._existing(ctx, gfal2, t, surl, existing.st_size, want_md5)
        try:
            dst = ctx.open(t.surl, "w")
            with open(t.local_path, "rb") as f:
                while True:
                    data = f.read(CHUNK)
                    if not data:
                        break
                    cs.update(data)
                    dst.write(data)
            del dst  # closing the gfal2 file commits the upload
            size = ctx.stat(t.surl).st_size
        except gfal2.GError as exc:
            if _gerror_code(exc) == errno.EEXIST or "412" in str(exc):
                # another upload made it meanwhile: it is not ours to remove
                raise TransferError(ErrorCode.REPLICA_EXISTS, f"{t.lfn}: {surl} appeared "
                                    f"while it was written: {exc}") from None
            self.remove_remote(t.surl)
            raise self._error(exc, t, "out", "write") from None
        except OSError as exc:
            raise TransferError(ErrorCode.STAGEOUT_FAILED,
                                f"{t.lfn}: reading {t.local_path}: {exc}") from None
        if size != cs.size:
            self.remove_remote(t.surl)
            raise TransferError(ErrorCode.LOCAL_FILE_SIZE_MISMATCH,
                                f"{t.lfn}: sent {cs.size} bytes, storage holds {size}", True)
        try:
            remote = ctx.checksum(t.surl, "adler32").lower().rjust(8, "0")
        except gfal2.GError as exc:
            log.warning("%s: no remote adler32 for %s (%s); only the size was checked",
                        t.lfn, t.surl, exc)
            remote = None
        if remote is not None and remote != cs.adler32:
            self.remove_remote(t.surl)
            raise TransferError(ErrorCode.ADLER32_MISMATCH_OUT,
                                f"{t.lfn}: sent adler32 {cs.adler32}, storage has {remote}", True)
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=surl)

    def _existing(self, ctx, gfal2, t: Transfer, surl: str, size: int,
                  want_md5: bool) -> TransferResult:
        """The destination exists: success if it holds our bytes (a retried stage-out), else
        REPLICA_EXISTS (an unknown remote checksum counts as different)."""
        from .checksum import checksum_file
        mine = checksum_file(t.local_path, want_md5)
        try:
            remote = ctx.checksum(t.surl, "adler32").lower().rjust(8, "0")
        except gfal2.GError:
            remote = None
        if size == mine.size and remote == mine.adler32:
            return TransferResult(fsize=mine.size, adler32=mine.adler32, md5=mine.md5,
                                  surl=surl)
        raise TransferError(ErrorCode.REPLICA_EXISTS, f"{t.lfn}: {surl} already holds a "
                            "different file; a replica is never overwritten")

    def remove_remote(self, surl: str) -> None:
        try:
            gfal2 = import_gfal2()
            gfal2.creat_context().unlink(_absolute_url(surl))
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("could not remove %s: %s", surl, exc)
