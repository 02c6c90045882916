"""The JSON replies of the monitor's views, as JSON schemas: the documented contract of each
``?json`` (times are ISO 8601 UTC strings). Tests validate every view's reply against them."""
from __future__ import annotations

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
OPT_S = {"type": ["string", "null"]}
OPT_I = {"type": ["integer", "null"]}
OPT_N = {"type": ["number", "null"]}
COUNTS = {"type": "object", "additionalProperties": I}


def obj(required: dict, optional: dict | None = None, extra: bool = False) -> dict:
    return {"type": "object", "required": sorted(required),
            "properties": {**required, **(optional or {})}, "additionalProperties": extra}


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


ALARM_COUNTS = obj({"active": I, "acknowledged": I, "critical": I})
SELECTION = obj({"filters": {"type": "object", "additionalProperties": S}, "window": S,
                 "since": OPT_S, "until": OPT_S, "limit": I, "active_jobs_unwindowed": B})
FACET_VALUES = arr(obj({"value": OPT_S, "count": I}))
ERROR_CODE = obj({"component": S, "code": I, "count": I, "cpu_hours_lost": N,
                  "sample_diag": OPT_S, "latest": S, "example_panda_id": I, "description": S,
                  "param": S})
GROUP_ROW = obj({"value": OPT_S, "failed": I, "finished": I, "failure_pct": OPT_N,
                 "cpu_hours_lost": N})
JOB_ROW = {"type": "object", "required": ["panda_id", "modification_time"],
           "properties": {"panda_id": I, "status": S, "site": OPT_S, "task_id": I}}
ALARM = obj({"alarm_id": I, "key": S, "open_key": OPT_S, "source": S, "severity": S,
             "title": S, "message": OPT_S, "site": OPT_S, "raised_by": OPT_S, "state": S,
             "first_raised": S, "last_raised": S, "count": I, "acknowledged_by": OPT_S,
             "acknowledged_at": OPT_S, "cleared_at": OPT_S, "notified_at": OPT_S})
SERIES = obj({"width_s": I, "times": arr(S), "series": {"type": "object",
                                                          "additionalProperties": arr(N)}})
HIST = arr(arr(N))
BASE = {"alarms": ALARM_COUNTS}

VIEWS: dict[str, dict] = {
    "dash": obj({**BASE, "states": arr(S), "selection": SELECTION, "totals": COUNTS,
                 "regions": {"type": "object", "additionalProperties": COUNTS},
                 "pilot_hours": I,
                 "sites": arr(obj({"site": S, "region": S, "site_status": OPT_S,
                                   "states": COUNTS, "total": I, "failure_pct": OPT_N,
                                   "pilots": COUNTS, "pilots_total": I}))}),
    "jobs": obj({**BASE, "selection": SELECTION, "description": S, "in_selection": I,
                 "capped": B, "facets": {"type": "object", "additionalProperties": FACET_VALUES},
                 "errors": arr(ERROR_CODE), "jobs": arr(JOB_ROW), "next": OPT_S}),
    "job": obj({**BASE, "job": {"type": "object", "required": ["panda_id", "status"]},
                "files": arr(obj({"type": S, "lfn": S, "scope": S, "status": S}, extra=True)),
                "errors": arr(obj({"component": S, "code": I, "diag": OPT_S,
                                   "description": S})),
                "history": arr(obj({"new_status": S, "time": S, "seconds": OPT_N,
                                    "ongoing": B}, extra=True)),
                "attempts": arr({"type": "object", "required": ["panda_id", "errors"]}),
                "debug_view": {}, "log": obj({"lfn": S, "surl": OPT_S, "error": OPT_S,
                                              "members": arr(obj({"name": S, "size": I,
                                                                  "label": OPT_S}))})}),
    "joblog": obj({**BASE, "panda_id": I}, {"lfn": S, "surl": OPT_S, "error": OPT_S,
                                             "members": arr({"type": "object"}), "file": S,
                                             "text": S, "cut": B}),
    "tasks": obj({**BASE, "facets": {"type": "object", "additionalProperties": FACET_VALUES},
                  "tasks": arr(obj({"task_id": I, "name": S, "status": S, "owner": S,
                                    "jobs": COUNTS, "n_jobs": I, "finished_pct": N,
                                    "failed_pct": N}, extra=True)),
                  "in_selection": I, "capped": B, "selection": {"type": "object"}}),
    "task": obj({**BASE, "task": {"type": "object", "required": ["task_id", "status"]},
                 "jobs": COUNTS, "n_jobs": I, "finished_pct": N, "failed_pct": N,
                 "datasets": arr(obj({"dataset": S, "type": S, "files": I, "bytes": I,
                                      "states": COUNTS})),
                 "histograms": {"type": "object", "additionalProperties": obj(
                     {"label": S, "edges": arr(N), "finished": arr(I), "failed": arr(I)})},
                 "event_ranges": {"type": "object", "additionalProperties": obj(
                     {"ranges": I, "events": I})}}),
    "errors": obj({**BASE, "selection": SELECTION, "description": S, "by_code": arr(ERROR_CODE),
                   "by_site": arr(GROUP_ROW), "by_user": arr(GROUP_ROW),
                   "by_task": arr(GROUP_ROW), "failed": I,
                   "over_time": obj({"width_s": I, "buckets": arr(S), "series": {
                       "type": "object", "additionalProperties": arr(I)}})}),
    "sites": obj({**BASE, "sites": arr(obj({"name": S, "status": S, "jobs": COUNTS},
                                           extra=True))}),
    "site": obj({**BASE, "site": obj({"name": S, "status": S, "updated": S},
                                     {"status_reason": OPT_S, "configured_status": S}),
                 "config": arr(obj({"key": S, "value": {}})), "factories": arr(
                     {"type": "object"}), "pilots": arr({"type": "object"}), "jobs": COUNTS,
                 "errors": arr(ERROR_CODE), "waiting": arr({"type": "object"}),
                 "site_alarms": arr(ALARM)}),
    "pilots": obj({**BASE, "factories": arr(obj({"name": S, "alive": B}, extra=True)),
                   "sites": {"type": "object", "additionalProperties": COUNTS},
                   "submitted": arr(obj({"factory": S, "site": S, "state": S, "pilots": I})),
                   "hours": I,
                   "nodes": arr(obj({"site": OPT_S, "cpu_model": S, "cores": OPT_I,
                                     "pilot_version": OPT_S, "jobs": I, "nodes": I,
                                     "load1": OPT_N, "min_disk_free_mb": OPT_I}))}),
    "users": obj({**BASE, "selection": SELECTION, "in_selection": I, "capped": B,
                  "users": arr(obj({"user": S, "jobs": I, "states": COUNTS, "sites": COUNTS,
                                    "success_pct": OPT_N}))}),
    "user": obj({**BASE, "user": S, "selection": SELECTION, "in_selection": I,
                 "states": FACET_VALUES, "sites": FACET_VALUES, "success_pct": OPT_N,
                 "tasks": arr(obj({"task_id": I, "name": S, "status": S, "modified": S,
                                   "jobs": COUNTS}))}),
    "search": obj({**BASE, "q": S, "found": OPT_S}),
    "alarms": obj({**BASE, "state": S, "list": arr(ALARM), "next": OPT_S}),
    "incidents": obj({**BASE, "window": S, "filters": {"type": "object"}, "next": OPT_S,
                      "incidents": arr(obj({"row_id": I, "time": S, "component": S,
                                            "level": S, "message": S, "site": OPT_S,
                                            "panda_id": OPT_I, "host": OPT_S,
                                            "suppressed": I}))}),
    "history": obj({**BASE, "window": S, "running": SERIES, "finished": SERIES,
                    "failed": SERIES, "table": arr(obj({"time": S, "status": S, "jobs": I}))}),
    "waiting": obj({**BASE, "site": OPT_S, "groups": arr(obj(
        {"status": S, "site": OPT_S, "jobs": I, "reasons": arr(S), "cores": I,
         "memory_mb": I, "walltime_s": I, "share": S}, extra=True))}),
    "plots": obj({**BASE, "selection": SELECTION, "sites": {"type": "object"},
                  "errors": {"type": "object"}, "shares": arr(obj(
                      {"share": S, "target_pct": N, "used_pct": N, "running_cores": I})),
                  "durations": obj({"jobs": I, "queue_s": HIST, "per_state": {
                      "type": "object", "additionalProperties": HIST}}),
                  "running": SERIES, "finished": SERIES}),
    "errorcodes": obj({**BASE, "codes": arr(obj({"component": S, "code": I,
                                                 "description": S}))}),
}
