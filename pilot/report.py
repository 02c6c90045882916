"""What the pilot tells the server: heartbeat and final ``updateJob`` forms, and their delivery.

Field names are PanDA's (DESIGN.md). The final form is also what a state file keeps when the server
is away, so a later pilot can send it unchanged.
"""
from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from panda_core.client import PilotClient, ProtocolError, status_code, try_again
from panda_core.retry import Deadline, RetryPolicy

from .errors import PilotError, ServerUnreachable, diag_limit, error_text
from .payload import Payload, PayloadResult

log = logging.getLogger(__name__)

#: heartbeats are retried briefly: the next one comes soon anyway
HEARTBEAT_RETRY = RetryPolicy(attempts=2, backoff_s=1, timeout_s=10)
#: ``command`` values that stop the payload (1144)
KILL_COMMANDS = frozenset({"tobekilled", "softkill", "kill"})

_SECRET_OPTION = re.compile(r"token|secret|passw|credential", re.IGNORECASE)


def redact(site_config: dict[str, Any]) -> dict[str, Any]:
    """The site config without copytool secrets (the state file is on a disk the payload can
    read); recovery takes secrets from the recovering pilot's own queuedata."""
    cfg = json.loads(json.dumps(site_config))
    for tool in (cfg.get("copytools") or {}).values():
        if isinstance(tool, dict) and isinstance(tool.get("options"), dict):
            tool["options"] = {k: v for k, v in tool["options"].items()
                               if not (_SECRET_OPTION.search(k) and not k.endswith("_file"))}
    return cfg


def result_dict(res: PayloadResult | None) -> dict[str, Any] | None:
    if res is None:
        return None
    return {"exit_code": res.exit_code, "signal": res.signal, "cpu_s": res.cpu_s,
            "max_rss_kb": res.max_rss_kb, "max_pss_kb": res.max_pss_kb, "start": res.start,
            "end": res.end, "killed": res.killed}


def err_dict(err: PilotError | None) -> dict[str, Any] | None:
    return None if err is None else {"code": err.code, "diag": err.diag}


def heartbeat_form(form: dict[str, Any], metrics: dict[str, Any],
                   payload: Payload | None) -> dict[str, Any]:
    """A ``running`` update with node facts and monitor metrics in ``jobMetrics`` (k=v k=v)."""
    form = dict(form)
    form["jobMetrics"] = " ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in metrics.items())
    if payload is not None:
        form["maxRSS"] = payload.max_rss_kb
        form["maxPSS"] = payload.max_pss_kb
        if payload.last_sample is not None:
            form["cpuConsumptionTime"] = round(payload.last_sample.cpu_s, 3)
            form["cpuConsumptionUnit"] = "s"
    return form


def final_form(form: dict[str, Any], error: PilotError | None, res: PayloadResult | None,
               stored: dict[str, dict], timing: dict[str, float], start: float) -> dict[str, Any]:
    """The final updateJob fields (PanDA names)."""
    form = dict(form)
    form["pilotErrorCode"] = error.code if error else 0
    form["pilotErrorDiag"] = diag_limit(error.diag) if error else ""
    form["startTime"] = int(start)
    form["endTime"] = int(time.time())
    if res is not None:
        form["transExitCode"] = (res.exit_code if res.exit_code is not None
                                 else 128 + (res.signal or 0))
        form["exeErrorCode"] = form["transExitCode"]
        form["exeErrorDiag"] = "" if res.exit_code == 0 else (
            f"exit code {res.exit_code}" if res.exit_code is not None else f"signal {res.signal}")
        form["cpuConsumptionTime"] = round(res.cpu_s, 3)
        form["cpuConsumptionUnit"] = "s"
        form["maxRSS"] = res.max_rss_kb
        form["maxPSS"] = res.max_pss_kb
        timing = {**timing, "payload": res.wall_s}
    form["pilotTiming"] = "|".join(f"{k}={v:.2f}" for k, v in timing.items())
    form["xml"] = json.dumps({lfn: {k: v for k, v in info.items() if k != "scope"}
                              for lfn, info in stored.items()})
    if error is not None:
        form["jobMetrics"] = f"pilotErrorText={error_text(error.code).replace(' ', '_')}"
    return form


def send_final(client: PilotClient, form: dict[str, Any], policy: RetryPolicy,
               deadline: float | None = None) -> bool:
    """Deliver a final update; True once the server answered for good: it took the update, or
    refused it (asking again would get the same answer). False when the server stayed away or
    kept answering "try again" (StatusCode 10) through ``policy``, or ``deadline`` (epoch
    seconds: the pilot's batch slot, less what it needs to exit) came first: the caller keeps
    the update and the job's work dir on disk for a later attempt (its own, or a later pilot's
    recovery)."""
    waits = policy.waits()
    bound = Deadline(deadline)
    while True:
        try:
            reply = client.update_job(form, policy, deadline)
        except ServerUnreachable as exc:
            log.warning("final update of job %s not delivered: %s", form.get("jobId"), exc)
            return False
        except Exception as exc:
            log.error("final update of job %s refused: %s", form.get("jobId"), exc)
            return False
        try:
            code = status_code(reply)
        except ProtocolError as exc:   # not the server speaking: keep the update for later
            log.error("final update of job %s: %s", form.get("jobId"), exc)
            return False
        if not try_again(code):
            break
        wait = next(waits, None)
        if wait is None:
            log.warning("final update of job %s: the server says try again (%s); kept for "
                        "later", form.get("jobId"), reply.get("errorDialog", ""))
            return False
        wait = bound.wait(wait, policy.timeout_s)
        if wait is None:
            log.warning("final update of job %s: the server says try again (%s) and %s is "
                        "reached: kept for later", form.get("jobId"),
                        reply.get("errorDialog", ""), bound.describe())
            return False
        log.warning("final update of job %s: the server says try again (%s); retrying in "
                    "%.1f s", form.get("jobId"), reply.get("errorDialog", ""), wait)
        time.sleep(wait)
    if code != 0:
        log.error("final update of job %s refused by the server: StatusCode %s %s",
                  form.get("jobId"), code, reply.get("errorDialog", ""))
        # the server will never take it: keeping it would only repeat the refusal
    return True
