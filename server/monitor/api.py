"""The alarm API: ``alarm/raise`` (a component or an admin reports a condition), ``alarm/list``,
``alarm/acknowledge`` (a shifter) and ``alarm/clear`` (an admin)."""
from __future__ import annotations

from ..apibase import (ADMIN, PILOTS, WRITERS, ApiError, ApiMethods, Context, Param, int_param,
                       str_param)
from ..taskbuffer import Conflict
from .alarms import SEVERITIES, Alarms

api = ApiMethods()
#: who may raise an alarm: components with a pilot identity (factories) and admins
RAISERS = PILOTS
ALARM_ID = Param("alarm_id", "integer", True, "an alarm's id", minimum=1)


@api("alarm", "raise", ("POST",), RAISERS, params=(
    Param("key", required=True, description="one open alarm per key"),
    Param("title", required=True), Param("severity", enum=tuple(SEVERITIES)),
    Param("message", max_length=10000), Param("site", max_length=128)))
def alarm_raise(ctx: Context, params: dict) -> dict:
    key, title = str_param(params, "key"), str_param(params, "title")
    if not key or not title:
        raise ApiError("parameters 'key' and 'title' are required")
    severity = str_param(params, "severity") or "warning"
    if severity not in SEVERITIES:
        raise ApiError(f"parameter 'severity' must be one of {', '.join(SEVERITIES)}")
    if len(key) > 255:
        raise ApiError("parameter 'key': at most 255 characters")
    alarm = Alarms(ctx.tb).raise_alarm(
        key, title, severity=severity, source="api", message=str_param(params, "message"),
        site=str_param(params, "site"), raised_by=ctx.identity.subject)
    ctx.message = f"alarm {alarm['alarm_id']} ({alarm['state']}, raised {alarm['count']} time(s))"
    return alarm


@api("alarm", "list", params=(
    Param("state", enum=("open", "all", "active", "acknowledged", "cleared")),
    Param("limit", "integer", minimum=1, maximum=10000, description="at most (200)")))
def alarm_list(ctx: Context, params: dict) -> list[dict]:
    state = str_param(params, "state") or "open"
    states = {"open": ("active", "acknowledged"), "all": ("active", "acknowledged", "cleared")
              }.get(state, (state,))
    if not set(states) <= {"active", "acknowledged", "cleared"}:
        raise ApiError("parameter 'state' must be open, all, active, acknowledged or cleared")
    return Alarms(ctx.tb).listing(states, limit=int_param(params, "limit", False) or 200)


@api("alarm", "acknowledge", ("POST",), WRITERS, params=(ALARM_ID,))
def alarm_acknowledge(ctx: Context, params: dict) -> dict:
    try:
        return Alarms(ctx.tb).acknowledge(int_param(params, "alarm_id"), ctx.identity.subject)
    except Conflict as exc:
        raise ApiError(str(exc)) from None


@api("alarm", "clear", ("POST",), ADMIN, params=(ALARM_ID,))
def alarm_clear(ctx: Context, params: dict) -> int:
    return Alarms(ctx.tb).clear(alarm_id=int_param(params, "alarm_id"))
