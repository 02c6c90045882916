"""Memory: PSS (RSS where PSS is unreadable) of the payload's whole process tree over the job's
limit -> 1235.

The limit is the job's ``minRamCount`` (MB) or the site's memory per slot. PSS, like PanDA's memory
monitor, counts shared pages once across the tree, so a forking payload is not charged N times
for the same libraries.
"""
from __future__ import annotations

from pilot.errors import ErrorCode
from pilot.hookspecs import hookimpl
from pilot.monitoring import MonitorContext, Verdict


@hookimpl
def pilot_monitor_check(ctx: MonitorContext) -> Verdict | None:
    limit_mb = ctx.limits.memory_mb
    if not limit_mb or limit_mb <= 0:
        return None
    used_mb = (ctx.sample.pss_kb or ctx.sample.rss_kb) / 1024
    if used_mb > limit_mb:
        return Verdict(ErrorCode.MEMORY_LIMIT,
                       f"payload PSS {used_mb:.0f} MB over the limit of {limit_mb:.0f} MB "
                       f"(RSS {ctx.sample.rss_kb / 1024:.0f} MB, {len(ctx.sample.pids)} processes)",
                       "memory")
    return None


@hookimpl
def pilot_monitor_metrics(ctx: MonitorContext) -> dict[str, int]:
    return {"rssMB": ctx.sample.rss_kb // 1024, "pssMB": ctx.sample.pss_kb // 1024,
            "nProcesses": len(ctx.sample.pids)}
