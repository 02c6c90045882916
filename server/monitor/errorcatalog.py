"""The error-code table the monitor describes failures with: one entry per (component, code).

A job carries one code per component that can fail it: the pilot (``pilot_error_code``, the
shared table in ``panda_core.errorcodes``), the payload (``exe_error_code``,
``trans_exit_code``), the dispatcher and watcher (``dispatcher_error_code``), the data service
(``ddm_error_code``) and the task buffer (``task_buffer_error_code``). Each component has its
own numbers, so a code is only meaningful with its component.
"""
from __future__ import annotations

from dataclasses import dataclass

from panda_core.errorcodes import ERROR_TEXT, DispatcherCode


@dataclass(frozen=True)
class Component:
    name: str            # as the monitor names it (BigPanDA's)
    code_column: str
    diag_column: str | None
    param: str           # the job list's parameter for its code
    label: str


COMPONENTS: tuple[Component, ...] = (
    Component("pilot", "pilot_error_code", "pilot_error_diag", "piloterrorcode", "pilot"),
    Component("exe", "exe_error_code", "exe_error_diag", "exeerrorcode", "payload"),
    Component("jobdispatcher", "dispatcher_error_code", "dispatcher_error_diag",
              "jobdispatchererrorcode", "dispatcher / watcher"),
    Component("ddm", "ddm_error_code", "ddm_error_diag", "ddmerrorcode", "data service"),
    Component("taskbuffer", "task_buffer_error_code", "task_buffer_error_diag",
              "taskbuffererrorcode", "task buffer"),
)
BY_NAME = {c.name: c for c in COMPONENTS}

_DISPATCHER = {
    DispatcherCode.LOST_HEARTBEAT: "lost heartbeat: the pilot stopped reporting while the job "
    "was starting or running (the watcher failed it)",
    DispatcherCode.RECOVERY_FAILED: "the job could not be recovered",
    DispatcherCode.NO_REPLY: "sent to a pilot that never reported (the watcher failed it)",
    DispatcherCode.HOLDING_TIMEOUT: "stuck in holding: its outputs were never registered",
    DispatcherCode.TRANSFERRING_TIMEOUT: "stuck in transferring: its outputs never arrived",
    DispatcherCode.TIMEOUT: "timed out",
}
_DDM = {100: "an input could not be placed at the site's storage (the data service gave up)"}
_TASKBUFFER = {300: "killed (by its owner, an admin or its task being aborted)"}


def describe(component: str, code: int | None) -> str:
    """A description of ``code`` of ``component``; unknown codes get a generic one."""
    if code is None or code == 0:
        return ""
    if component == "pilot":
        text = ERROR_TEXT.get(code)
        return text if text else f"pilot error {code} (not in the pilot's error table)"
    if component == "exe":
        if code > 128 and code - 128 < 65:
            return f"the payload exited with {code} (killed by signal {code - 128})"
        return f"the payload exited with code {code}"
    table = {"jobdispatcher": _DISPATCHER, "ddm": _DDM, "taskbuffer": _TASKBUFFER}.get(component)
    if table is None:
        raise ValueError(f"unknown error component {component!r}")
    return table.get(code, f"{BY_NAME[component].label} error {code}")


def job_errors(job: dict) -> list[dict]:
    """The non-zero error codes of one job row, with their diagnostics and descriptions."""
    out = []
    for comp in COMPONENTS:
        code = job.get(comp.code_column) or 0
        if code:
            out.append({"component": comp.name, "code": code,
                        "diag": job.get(comp.diag_column) if comp.diag_column else None,
                        "description": describe(comp.name, code)})
    if job.get("trans_exit_code") and not job.get("exe_error_code"):
        out.append({"component": "exe", "code": job["trans_exit_code"], "diag": None,
                    "description": describe("exe", job["trans_exit_code"])})
    return out


def catalogue() -> list[dict]:
    """Every code the server knows a description for (the error-code table view)."""
    rows = [{"component": "pilot", "code": int(c), "description": t}
            for c, t in sorted(ERROR_TEXT.items())]
    for name, table in (("jobdispatcher", _DISPATCHER), ("ddm", _DDM),
                        ("taskbuffer", _TASKBUFFER)):
        rows += [{"component": name, "code": int(c), "description": t}
                 for c, t in sorted(table.items())]
    return rows
