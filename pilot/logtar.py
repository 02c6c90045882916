"""The job's log tarball: the work dir (minus inputs and outputs), capped in size.

Small files go in whole, smallest first; a file that does not fit the remaining budget goes in as
its tail (``NAME.tail``), which is where a payload's fatal message usually is.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

from .errors import ErrorCode, PilotError

log = logging.getLogger(__name__)

DEFAULT_CAP = 50 * 2**20
_MIN_TAIL = 64 * 1024


def make_log_tarball(workdir: Path, dest: Path, exclude: set[str],
                     cap_bytes: int = DEFAULT_CAP, extra: dict[str, Path] | None = None) -> Path:
    """Write a gzip tarball of ``workdir`` to ``dest``; top-level names in ``exclude`` stay out;
    ``extra`` adds files from outside the work dir under the given names (the pilot's log)."""
    try:
        entries: list[tuple[int, Path, str]] = []
        for rel, path in (extra or {}).items():
            try:
                if path.is_file() and not path.is_symlink():
                    entries.append((path.stat().st_size, path, rel))
            except OSError:
                continue
        for root, dirs, files in os.walk(workdir):
            dirs[:] = sorted(d for d in dirs if not (root == str(workdir) and d in exclude))
            for name in files:
                path = Path(root) / name
                rel = str(path.relative_to(workdir))
                if (root == str(workdir) and name in exclude) or path == dest:
                    continue
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if path.is_symlink() or not path.is_file():
                    continue
                entries.append((st.st_size, path, rel))
        entries.sort()
        budget = cap_bytes
        prefix = dest.name.split(".")[0] or "log"
        with tarfile.open(dest, "w:gz") as tar:
            for size, path, rel in entries:
                arc = f"{prefix}/{rel}"
                if size <= budget:
                    tar.add(path, arcname=arc, recursive=False)
                    budget -= size
                elif budget >= _MIN_TAIL:
                    take = budget
                    with open(path, "rb") as fh:
                        fh.seek(size - take)
                        data = fh.read(take)
                    info = tarfile.TarInfo(arc + ".tail")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    budget -= len(data)
                    log.info("log tarball: %s cut to its last %d bytes", rel, take)
                else:
                    log.info("log tarball: %s (%d bytes) left out, size cap reached", rel, size)
        return dest
    except OSError as exc:
        raise PilotError(ErrorCode.LOG_CREATION_FAILURE, f"log tarball: {exc}") from None
