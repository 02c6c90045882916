"""One job: its fields, errors with their descriptions, state history with the time spent in
each state, files, previous attempts and where its logs are."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from panda_core.debugview import render as render_debug_view
from panda_core.states import FINAL_JOB_STATES

from .. import db
from .errorcatalog import job_errors
from .selection import JOB_TABLES

_FINAL = frozenset(str(s) for s in FINAL_JOB_STATES)
ATTEMPT_COLUMNS = ("panda_id", "attempt_nr", "status", "site", "modification_time",
                   "pilot_error_code", "pilot_error_diag", "exe_error_code", "exe_error_diag",
                   "dispatcher_error_code", "dispatcher_error_diag", "ddm_error_code",
                   "ddm_error_diag", "task_buffer_error_code", "task_buffer_error_diag",
                   "trans_exit_code", "parent_id")
#: where issue 16's debug mode keeps the latest view the pilot sent (a job field, JSON); the page
#: shows it rendered (panda_core.debugview.render), with what the pilot is asked for
DEBUG_FIELDS = ("debug_view", "debug_data")


def state_times(history: list[dict], now: dt.datetime) -> list[dict]:
    """Each history row with the seconds spent in its new state (until the next change, or
    until now for a job still in it)."""
    out = []
    for i, row in enumerate(history):
        nxt = history[i + 1]["time"] if i + 1 < len(history) else None
        if nxt is None and row["new_status"] in _FINAL:
            spent = None
        else:
            spent = ((nxt or now) - row["time"]).total_seconds()
        out.append({**row, "seconds": spent, "ongoing": nxt is None and spent is not None})
    return out


def previous_attempts(tb, job: dict, max_depth: int = 100) -> list[dict]:
    """The attempts this job retries, newest first (each a primary-key lookup)."""
    out = []
    parent = job.get("parent_id")
    with db.read(tb.engine) as conn:
        while parent and len(out) < max_depth:
            row = None
            for t in JOB_TABLES:
                row = conn.execute(select(*[t.c[c] for c in ATTEMPT_COLUMNS])
                                   .where(t.c.panda_id == parent)).first()
                if row is not None:
                    break
            if row is None:
                break
            attempt = dict(row._mapping)
            attempt["errors"] = job_errors(attempt)
            out.append(attempt)
            parent = attempt["parent_id"]
    return out


def job_page(tb, panda_id: int) -> dict | None:
    job = tb.jobs.get(panda_id)
    if job is None:
        return None
    now = tb.clock()
    files = job.pop("files")
    debug = next((job[k] for k in DEBUG_FIELDS if job.get(k)), None)
    asked = job.get("debug_request") if job["status"] not in _FINAL else None
    if debug is not None or asked:
        state = f"debug mode on ({asked})" if asked else "debug mode off"
        debug = f"{state}\n" + (render_debug_view(debug) if debug is not None
                                 else "no view received from the pilot yet")
    return {"job": job, "files": files, "errors": job_errors(job),
            "history": state_times(tb.jobs.history(panda_id), now),
            "attempts": previous_attempts(tb, job), "debug_view": debug}
