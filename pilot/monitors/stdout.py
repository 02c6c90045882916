"""Payload stdout silent: nothing written to stdout for longer than the site's
``limits.stdout_silent_s`` (off when 0) -> 1502."""
from __future__ import annotations

import os

from pilot.errors import ErrorCode
from pilot.hookspecs import hookimpl
from pilot.monitoring import MonitorContext, Verdict


@hookimpl
def pilot_monitor_check(ctx: MonitorContext) -> Verdict | None:
    limit = ctx.limits.stdout_silent_s
    if not limit or limit <= 0:
        return None
    try:
        last = max(os.stat(ctx.stdout_path).st_mtime, ctx.payload_start)
    except OSError:
        last = ctx.payload_start
    silent = ctx.now - last
    if silent > limit:
        return Verdict(ErrorCode.PAYLOAD_STDOUT_SILENT,
                       f"payload wrote nothing to stdout for {silent:.0f} s (limit {limit:.0f} s)",
                       "stdout")
    return None
