"""Disk: free space of the work dir's file system below the site's minimum (1505), and the work
dir itself over its size limit (1104)."""
from __future__ import annotations

import os
import shutil

from pilot.errors import ErrorCode
from pilot.hookspecs import hookimpl
from pilot.monitoring import MonitorContext, Verdict


def dir_size_bytes(path) -> int:
    """Bytes allocated below ``path`` (sparse files count what they use, as the disk sees it)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_blocks * 512
    return total


@hookimpl
def pilot_monitor_check(ctx: MonitorContext) -> Verdict | None:
    free_mb = shutil.disk_usage(ctx.workdir).free / 2**20
    size_mb = dir_size_bytes(ctx.workdir) / 2**20
    ctx.scratch["free_disk_mb"] = free_mb
    ctx.scratch["workdir_mb"] = size_mb
    if ctx.limits.min_free_disk_mb and free_mb < ctx.limits.min_free_disk_mb:
        return Verdict(ErrorCode.DISK_SPACE_LOW,
                       f"free disk {free_mb:.0f} MB below the site's minimum of "
                       f"{ctx.limits.min_free_disk_mb:.0f} MB", "disk")
    if ctx.limits.workdir_mb and size_mb > ctx.limits.workdir_mb:
        return Verdict(ErrorCode.WORKDIR_TOO_LARGE,
                       f"work dir {size_mb:.0f} MB over the limit of "
                       f"{ctx.limits.workdir_mb:.0f} MB",
                       "disk")
    return None


@hookimpl
def pilot_monitor_metrics(ctx: MonitorContext) -> dict[str, int]:
    out = {}
    if "workdir_mb" in ctx.scratch:
        out["workDirSizeMB"] = int(ctx.scratch["workdir_mb"])
    if "free_disk_mb" in ctx.scratch:
        out["freeDiskMB"] = int(ctx.scratch["free_disk_mb"])
    return out
