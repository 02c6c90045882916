"""API methods behind the command line of people used to condor_q, squeue and pbook
(``panda job``, ``panda retry``): one job with its files and its state history timed, and
retries of jobs by hand (a task's: PanDA's ``task/retry`` in ``api_panda``).

Served under ``/api/v1`` beside ``server/api.py`` (``app.API_MODULES``); the parameter readers
``since_param`` and ``states_param`` are shared with ``job/list``.
"""
from __future__ import annotations

import datetime as dt
import logging
import re

from panda_core.states import JobState

from .apibase import WRITERS, ApiError, ApiMethods, Context, Param, id_list, int_param
from .taskbuffer import NotFound

log = logging.getLogger(__name__)

api = ApiMethods()

_STATES = frozenset(str(s) for s in JobState)
_STATE_LIST = re.compile(r"[a-z]+(,[a-z]+)*")


def since_param(params: dict) -> dt.datetime | None:
    """``since``: an ISO 8601 time (a zone is converted to UTC), as naive UTC like the rows."""
    value = params.get("since")
    if value in (None, "", "None"):
        return None
    try:
        when = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(f"parameter 'since' must be an ISO 8601 time (2026-01-31T12:00:00Z), "
                       f"got {str(value)[:40]!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when


def limit_param(params: dict, default: int, most: int) -> int:
    """``limit``: 1 to ``most`` rows (default ``default``)."""
    limit = int_param(params, "limit", False)
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise ApiError(f"parameter 'limit' must be between 1 and {most}, got {limit}")
    return limit


def states_param(params: dict) -> list[str] | None:
    """``status``: one job state or a comma list of them; an unknown one lists the known."""
    value = params.get("status")
    if value in (None, "", "None"):
        return None
    text = ",".join(value) if isinstance(value, list) else str(value)
    text = text.replace(" ", "").lower()
    states = [s for s in text.split(",") if s] if _STATE_LIST.fullmatch(text) else [text]
    unknown = [s for s in states if s not in _STATES]
    if unknown:
        raise ApiError(f"parameter 'status': unknown job state(s) {', '.join(unknown)[:80]}; "
                       f"known: {', '.join(s.value for s in JobState)}")
    return states


def timed_history(history: list[dict], now: dt.datetime) -> list[dict]:
    """Each state change with how long the job stayed in the state it entered (the last one:
    until ``now``, unless it is final)."""
    out = []
    final = {"finished", "failed", "cancelled", "closed"}
    for i, step in enumerate(history):
        end = history[i + 1]["time"] if i + 1 < len(history) else (
            None if step["new_status"] in final else now)
        seconds = (end - step["time"]).total_seconds() if end is not None else None
        out.append({"time": step["time"], "from": step["old_status"], "to": step["new_status"],
                    "actor": step.get("actor"), "seconds": seconds})
    return out


def error_text(job: dict) -> tuple[int, str]:
    """The job's first error code and its text, in PanDA's order of sources."""
    for source in ("pilot", "exe", "ddm", "dispatcher", "task_buffer"):
        code = job.get(f"{source}_error_code") or 0
        if code:
            return int(code), str(job.get(f"{source}_error_diag") or "")
    return 0, ""


@api("job", "get_details", params=(
    Param("job_id", "integer", True, "a PandaID", minimum=1),))
def job_get_details(ctx: Context, params: dict) -> dict:
    """One job (live or archived) with its files, its state history (time in each state) and
    its error; what ``panda job ID`` shows."""
    from .api import _job_view
    panda_id = int_param(params, "job_id")
    job = ctx.tb.jobs.get(panda_id)
    if job is None:
        raise ApiError(f"no job {panda_id}")
    view = _job_view(job)
    view["history"] = timed_history(ctx.tb.jobs.history(panda_id), ctx.clock())
    view["error_code"], view["error_text"] = error_text(job)
    return view


def _retry_ids(ctx: Context, job_ids: list[int]) -> dict[str, int | str]:
    owner = None if ctx.identity.role == "admin" else ctx.identity.subject
    out: dict[str, int | str] = {}
    for panda_id in job_ids:
        try:
            new_id = ctx.tb.jobs.retry_by_hand(panda_id, ctx.identity.subject, owner_check=owner)
        except (NotFound, PermissionError) as exc:
            out[str(panda_id)] = str(exc)
            continue
        out[str(panda_id)] = new_id if new_id is not None else \
            "not retried: not failed or cancelled, or already retried"
    return out


@api("job", "retry", ("POST",), WRITERS, params=(
    Param("job_ids", "ids", True, "PandaIDs (a repeated key, a list or one id)"),))
def job_retry(ctx: Context, params: dict) -> dict[str, int | str]:
    """A new attempt of each failed or cancelled job of ``job_ids`` that has none yet: its
    new PandaID, or why not."""
    results = _retry_ids(ctx, id_list(params, "job_ids"))
    ctx.message = f"{sum(isinstance(v, int) for v in results.values())} job(s) retried"
    return results
