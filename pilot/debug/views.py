"""The views debug mode sends: tail of a work-dir file, ``ls``, ``ps`` and ``du`` of the job.

Each is computed here, in Python, from the work dir and the payload's process tree; nothing is
ever run from a command line the server sent. A file is opened one path part at a time below
the work dir with ``O_NOFOLLOW`` (a link anywhere in the name, or one swapped in while we look,
is refused, so a payload cannot point a tail at the pilot's token), and only a regular file is
read. Every view's text is bounded (``MAX_TEXT_BYTES``); ``ls`` and ``du`` stop after
``MAX_ENTRIES`` entries and never follow links.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

from panda_core.debugview import MAX_TEXT_BYTES, BadDebugRequest, DebugRequest, check_name

MAX_ENTRIES = 2000          # ls lines, du's files walked before it says "at least"
MAX_PROCS = 200


def open_in_workdir(workdir: Path, name: str) -> int:
    """A read-only fd of the regular file ``name`` below ``workdir``; BadDebugRequest when the
    name leaves it, passes through a link, or is not a regular file."""
    parts = check_name(name).split("/")
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise BadDebugRequest(f"{name}: {part} is not a folder of the work dir "
                                      f"({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        try:
            leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise BadDebugRequest(f"{name}: cannot open ({exc.strerror})") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(leaf).st_mode):
        os.close(leaf)
        raise BadDebugRequest(f"{name}: not a regular file")
    return leaf


def tail(workdir: Path, name: str, limit: int = MAX_TEXT_BYTES) -> tuple[str, bool]:
    """The last ``limit`` bytes of a work-dir file as text; (text, truncated)."""
    fd = open_in_workdir(workdir, name)
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        os.lseek(fd, start, os.SEEK_SET)
        data = os.read(fd, limit)
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace")
    if start:
        text = text.partition("\n")[2] or text    # start on a whole line
    return text, start > 0


def _kind(mode: int) -> str:
    return ("d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode)
            else "-" if stat.S_ISREG(mode) else "?")


def ls(workdir: Path) -> tuple[str, bool]:
    """The work dir's entries, recursively, sorted: type, size, mtime (UTC), relative name."""
    lines: list[str] = []
    truncated = False
    for root, dirs, files in os.walk(workdir):         # os.walk does not follow links
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, workdir)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime))
            link = ""
            if stat.S_ISLNK(st.st_mode):
                try:
                    link = " -> " + os.readlink(path)
                except OSError:
                    pass
            lines.append(f"{_kind(st.st_mode)} {st.st_size:>12} {when} {rel}{link}")
            if len(lines) >= MAX_ENTRIES:
                truncated = True
                break
        if truncated:
            break
    return _bounded("\n".join(lines), truncated)


def du(workdir: Path) -> tuple[str, bool]:
    """Bytes used below the work dir, per top-level entry and in all (links not followed)."""
    sizes: dict[str, int] = {}
    seen = 0
    truncated = False
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            top = os.path.relpath(path, workdir).split(os.sep)[0]
            sizes[top] = sizes.get(top, 0) + st.st_blocks * 512
            seen += 1
        if seen >= 50 * MAX_ENTRIES:
            truncated = True
            break
    lines = [f"{size:>14} {name}" for name, size in sorted(sizes.items(), key=lambda i: -i[1])]
    total = sum(sizes.values())
    lines.append(f"{total:>14} total{' (at least: too many files to count)' if truncated else ''}")
    return _bounded("\n".join(lines[-MAX_ENTRIES:]), truncated)


def ps(payload) -> tuple[str, bool]:
    """The payload's process tree (pilot/payload.py's, sandbox included): pid, ppid, CPU
    seconds, RSS, state and command line."""
    import psutil

    rows = ["    PID    PPID    CPU_S     RSS_KB STATE    COMMAND"]
    procs = payload._tree() if payload is not None else []
    for p in sorted(procs, key=lambda p: p.pid)[:MAX_PROCS]:
        try:
            with p.oneshot():
                ct = p.cpu_times()
                cmd = " ".join(p.cmdline()) or p.name()
                rows.append(f"{p.pid:>7} {p.ppid():>7} {ct.user + ct.system:>8.2f} "
                            f"{p.memory_info().rss // 1024:>10} {p.status():<8} {cmd[:300]}")
        except psutil.Error:
            continue
    if len(rows) == 1:
        rows.append("(no payload process)")
    return _bounded("\n".join(rows), len(procs) > MAX_PROCS)


def _bounded(text: str, truncated: bool) -> tuple[str, bool]:
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_TEXT_BYTES:
        return text, truncated
    return data[:MAX_TEXT_BYTES].decode("utf-8", "ignore"), True


def view(request: DebugRequest, workdir: Path, payload=None) -> dict[str, Any]:
    """The requested view as the update's ``debugView`` object; a view that cannot be made (a
    missing file, a refused name) says why in ``error``, never raises."""
    out: dict[str, Any] = {"view": request.view, "time": round(time.time(), 3)}
    if request.view == "tail":
        out["name"] = request.target
    try:
        if request.view == "tail":
            text, cut = tail(workdir, request.target)
        elif request.view == "ls":
            text, cut = ls(workdir)
        elif request.view == "du":
            text, cut = du(workdir)
        else:
            text, cut = ps(payload)
    except BadDebugRequest as exc:
        out["error"] = str(exc)
        return out
    except OSError as exc:
        out["error"] = f"{request.view}: {exc.strerror or exc}"
        return out
    out.update(text=text, truncated=cut)
    return out
