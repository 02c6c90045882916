"""``file://`` to ``file://``: the storage elements of the site configs on the server's host.

Reads of a regular file do not block forever (a hung network file system would hold the process
in an uninterruptible wait that no signal ends either), so the deadline is checked per chunk.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path

from .base import DataMover, DestinationExists, FileRef, SourceError, TransferFailed, mismatch

CHUNK = 1 << 20


def file_path(url: str) -> Path:
    parts = urllib.parse.urlparse(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"not a local file URL: {url}")
    return Path(urllib.parse.unquote(parts.path))


class LocalMover(DataMover):
    """Options: ``fsync`` (default true): flush each copy to disk before it is registered."""

    name = "local"
    schemes = ("file",)

    def __init__(self, fsync: bool = True):
        self.fsync = fsync

    def copy(self, src_url: str, dst_url: str, expected: FileRef, timeout_s: float) -> None:
        src, dst = file_path(src_url), file_path(dst_url)
        if os.path.lexists(dst):
            bad = self._verify(dst, expected)
            if bad is None:
                return                               # already there and good: nothing to do
            raise DestinationExists(dst_url, bad)
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
            bad = mismatch(expected, size, f"{adler:08x}", md5.hexdigest())
            if bad:
                raise SourceError(f"{src_url}: {bad}")
            try:
                os.link(tmp, dst)                    # create-if-absent: never replaces a file
            except FileExistsError:                  # it appeared during the copy
                bad = self._verify(dst, expected)
                if bad is not None:
                    raise DestinationExists(dst_url, bad) from None
        except OSError as exc:
            what = "destination full" if exc.errno == errno.ENOSPC else exc.strerror
            raise TransferFailed(f"copy {src_url} -> {dst_url}: {what}") from None
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _verify(path: Path, expected: FileRef) -> str | None:
        adler, md5, size = 1, hashlib.md5(), 0
        if not path.is_file():
            return "not a regular file"
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    adler = zlib.adler32(chunk, adler)
                    md5.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            return exc.strerror
        return mismatch(expected, size, f"{adler:08x}", md5.hexdigest())
