"""Looping job: no output file in the work dir changed for longer than the limit -> 1150."""
from __future__ import annotations

import os

from pilot.errors import ErrorCode
from pilot.hookspecs import hookimpl
from pilot.monitoring import MonitorContext, Verdict


def last_touch(ctx: MonitorContext) -> float:
    """Newest mtime of the payload's files (not the pilot's own, not the staged-in inputs)."""
    newest = ctx.payload_start
    inputs = {f.lfn for f in ctx.job.inputs}
    for root, dirs, files in os.walk(ctx.workdir):
        top = root == str(ctx.workdir)
        for name in files:
            if top and (name in ctx.ignore or name in inputs):
                continue
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


@hookimpl
def pilot_monitor_check(ctx: MonitorContext) -> Verdict | None:
    limit = ctx.limits.looping_s
    if not limit or limit <= 0:
        return None
    idle = ctx.now - last_touch(ctx)
    ctx.scratch["looping_idle_s"] = idle
    if idle > limit:
        return Verdict(ErrorCode.LOOPING_JOB,
                       f"looping job: no output file changed for {idle:.0f} s "
                       f"(limit {limit:.0f} s)",
                       "looping")
    return None


@hookimpl
def pilot_monitor_metrics(ctx: MonitorContext) -> dict[str, int]:
    idle = ctx.scratch.get("looping_idle_s")
    return {"outputIdleSeconds": int(idle)} if idle is not None else {}
