"""Local storage copytools: ``cp``, ``mv`` and ``symlink`` for file:// URLs and plain paths.

``cp`` lets the kernel copy (copy_file_range, as coreutils' cp does) while a second thread
checksums the same source pages from the page cache, so the copy costs about what ``cp`` costs.
Files appear under their final name only when complete (written to a hidden name, then renamed).
"""
from __future__ import annotations

import errno
import logging
import os
import threading

from panda_core.errorcodes import ErrorCode

from .base import (CopyTool, Transfer, TransferError, TransferResult, partial_path, url_path,
                   unlink_quietly)
from .checksum import CHUNK, StreamChecksum, checksum_fd, checksum_file

log = logging.getLogger(__name__)

_COPY_CHUNK = 256 * 1024 * 1024   # per copy_file_range call: few GIL round trips


def _kernel_copy(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes in the kernel (copy_file_range, as cp does), else pread/pwrite."""
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src, dst, min(_COPY_CHUNK, size - offset), offset, offset)
            if n == 0:
                raise OSError(errno.EIO, f"source ended early at byte {offset}")
            offset += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while offset < size:
        data = os.pread(src, min(CHUNK, size - offset), offset)
        if not data:
            raise OSError(errno.EIO, f"source ended early at byte {offset}")
        view = memoryview(data)
        while view:
            n = os.pwrite(dst, view, offset)
            view, offset = view[n:], offset + n


def copy_with_checksum(src_path: str, dst_path: str, md5: bool = False) -> StreamChecksum:
    """Copy ``src_path`` to ``dst_path`` (created/truncated) and checksum the bytes meanwhile.

    The kernel copies (copy_file_range: no bytes pass through Python) while a second thread
    reads the same source pages from the page cache and checksums them; both release the GIL,
    so with a free core the pair takes about as long as the copy alone.
    """
    src = os.open(src_path, os.O_RDONLY)
    try:
        size = os.fstat(src).st_size
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            result: dict = {}

            def hash_source() -> None:
                try:
                    result["cs"] = checksum_fd(src, md5, chunk=1024 * 1024)  # stays in L2
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    result["err"] = exc

            hasher = threading.Thread(target=hash_source, name="checksum", daemon=True)
            hasher.start()
            try:
                _kernel_copy(src, dst, size)
            finally:
                hasher.join()
            if "err" in result:
                raise result["err"]
            cs = result["cs"]
            copied = os.fstat(dst).st_size
            if cs.size != size or copied != size:
                raise TransferError(ErrorCode.LOCAL_FILE_SIZE_MISMATCH,
                                    f"{src_path} changed while being copied ({size} bytes at "
                                    f"start, {cs.size} read, {copied} written)", retryable=True)
            return cs
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _os_error(exc: OSError, t: Transfer, direction: str, what: str) -> TransferError:
    """Map an OS error to the PanDA code the pilot reports."""
    if direction == "in":
        if isinstance(exc, FileNotFoundError) and what == "source":
            return TransferError(ErrorCode.MISSING_INPUT, f"{t.lfn}: no such file {t.surl}")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return TransferError(ErrorCode.NO_LOCAL_SPACE,
                                 f"{t.lfn}: no space left writing {t.local_path}: {exc}")
        return TransferError(ErrorCode.STAGEIN_FAILED, f"{t.lfn}: {exc}",
                             retryable=exc.errno in (errno.EIO, errno.EAGAIN, errno.ESTALE))
    if isinstance(exc, FileNotFoundError) and what == "source":
        return TransferError(ErrorCode.NO_SUCH_FILE, f"{t.lfn}: output {t.local_path} is missing")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransferError(ErrorCode.NO_REMOTE_SPACE, f"{t.lfn}: storage element full writing "
                             f"{t.surl}: {exc}")
    return TransferError(ErrorCode.STAGEOUT_FAILED, f"{t.lfn}: {exc}",
                         retryable=exc.errno in (errno.EIO, errno.EAGAIN, errno.ESTALE))


def _se_path(t: Transfer) -> str:
    try:
        return url_path(t.surl)
    except ValueError as exc:
        raise TransferError(ErrorCode.STAGEIN_FAILED, f"{t.lfn}: {exc}") from None


def _place_new(tmp: str, dst: str, cs, t: Transfer, keep_on_conflict: bool = False) -> None:
    """Give the finished copy ``tmp`` the replica's name ``dst``, which must be new: a replica
    is never overwritten. The same bytes already there (a retried stage-out) are success;
    others fail with REPLICA_EXISTS. ``tmp`` is gone afterwards (but on a conflict with
    ``keep_on_conflict``: mv's ``tmp`` is the job's own output)."""
    try:
        os.link(tmp, dst)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK) and \
                not os.path.lexists(dst):   # no hard links here: check, then rename (racy)
            os.replace(tmp, dst)
            return
        if not isinstance(exc, FileExistsError) and not os.path.lexists(dst):
            raise
        try:
            have = checksum_file(dst, False)
        except OSError:
            have = None
        same = have is not None and have.size == cs.size and have.adler32 == cs.adler32
        if same or not keep_on_conflict:
            unlink_quietly(tmp)
        if not same:
            raise TransferError(ErrorCode.REPLICA_EXISTS,
                                f"{t.lfn}: {dst} already holds a different file; a replica is "
                                "never overwritten") from None
        return
    unlink_quietly(tmp)


class CpTool(CopyTool):
    """Copy between a locally mounted storage element and the work directory."""

    name = "cp"
    schemes = ("file",)

    def copy_in(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        src = _se_path(t)
        return self._copy(t, src, t.local_path, want_md5, "in")

    def copy_out(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        dst = _se_path(t)
        try:
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, t, "out", "destination") from None
        return self._copy(t, t.local_path, dst, want_md5, "out")

    def _copy(self, t: Transfer, src: str, dst: str, want_md5: bool, direction: str):
        if not os.path.exists(src):
            raise _os_error(FileNotFoundError(errno.ENOENT, "no such file", src), t, direction,
                            "source")
        tmp = partial_path(dst)
        try:
            cs = copy_with_checksum(src, tmp, want_md5)
            if direction == "out":
                _place_new(tmp, dst, cs, t)
            else:
                os.replace(tmp, dst)
        except OSError as exc:
            unlink_quietly(tmp)
            raise _os_error(exc, t, direction, "destination") from None
        except BaseException:
            unlink_quietly(tmp)
            raise
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)

    def remove_remote(self, surl: str) -> None:
        try:
            unlink_quietly(url_path(surl))
        except ValueError:
            pass

    def cleanup_after_kill(self, t: Transfer, direction: str) -> None:
        super().cleanup_after_kill(t, direction)
        if direction == "out":
            try:
                unlink_quietly(partial_path(url_path(t.surl)))
            except ValueError:
                pass


class MvTool(CpTool):
    """Move instead of copy (files placed for the job, e.g. by an ARC CE or a data cache).

    A rename moves no bytes, so the checksum is computed by reading the file once where it lands;
    across file systems it falls back to cp and removes the source after a verified copy.
    """

    name = "mv"

    def _copy(self, t: Transfer, src: str, dst: str, want_md5: bool, direction: str):
        if not os.path.lexists(src):
            raise _os_error(FileNotFoundError(errno.ENOENT, "no such file", src), t, direction,
                            "source")
        try:
            if direction == "out":
                # never over an existing replica: link, then drop the source name
                _place_new(src, dst, checksum_file(src, want_md5), t, keep_on_conflict=True)
            else:
                os.rename(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise _os_error(exc, t, direction, "destination") from None
            result = super()._copy(t, src, dst, want_md5, direction)
            unlink_quietly(src)
            return result
        cs = checksum_file(dst, want_md5)
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)


class SymlinkTool(CopyTool):
    """Stage in by linking to the replica on a shared file system (no copy at all).

    The linked file is still checksummed (one read) so a corrupt replica is caught before the
    payload uses it. Stage-out is refused: the work directory disappears after the job.
    """

    name = "symlink"
    schemes = ("file",)

    def copy_in(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        src = os.path.abspath(_se_path(t))
        try:
            cs = checksum_file(src, want_md5)
        except OSError as exc:
            raise _os_error(exc, t, "in", "source") from None
        tmp = partial_path(t.local_path)
        try:
            unlink_quietly(tmp)
            os.symlink(src, tmp)
            os.replace(tmp, t.local_path)
        except OSError as exc:
            unlink_quietly(tmp)
            raise _os_error(exc, t, "in", "destination") from None
        return TransferResult(fsize=cs.size, adler32=cs.adler32, md5=cs.md5, surl=t.surl)

    def copy_out(self, t: Transfer, timeout: float, want_md5: bool) -> TransferResult:
        raise TransferError(ErrorCode.STAGEOUT_FAILED,
                            "the symlink copytool cannot stage out: the work directory is removed "
                            "after the job; use cp or mv")
