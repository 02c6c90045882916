"""Wall time: the job's own limit (``maxWalltime`` or the site's, 1503) and the batch slot's end
(1213, leaving time for stage-out)."""
from __future__ import annotations

from pilot.errors import ErrorCode
from pilot.hookspecs import hookimpl
from pilot.monitoring import MonitorContext, Verdict


@hookimpl
def pilot_monitor_check(ctx: MonitorContext) -> Verdict | None:
    limit = ctx.limits.walltime_s
    if limit and ctx.elapsed > limit:
        return Verdict(ErrorCode.PAYLOAD_WALLTIME,
                       f"payload ran {ctx.elapsed:.0f} s, over the job's wall time of "
                       f"{limit:.0f} s",
                       "walltime")
    if ctx.pilot_deadline is not None and ctx.now > ctx.pilot_deadline - ctx.reserve_s:
        return Verdict(ErrorCode.BATCH_WALLTIME,
                       f"batch slot ends in {ctx.pilot_deadline - ctx.now:.0f} s: payload stopped "
                       "to leave time for stage-out", "walltime")
    return None


@hookimpl
def pilot_monitor_metrics(ctx: MonitorContext) -> dict[str, int]:
    return {"payloadWallSeconds": int(ctx.elapsed)}
