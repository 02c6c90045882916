"""The pilot's extension contract (pluggy project ``panda.pilot``).

Monitors and lifecycle listeners are plugins: modules or objects implementing some of these hooks,
registered through the ``panda.pilot`` entry-point group. The built-in monitors in
``pilot/monitors/`` are registered exactly that way, so a third-party monitor is a peer of theirs.

Monitor hooks are called every monitor cycle with a ``MonitorContext`` (pilot/monitoring.py);
``pilot_monitor_check`` returns None or a ``Verdict`` (code, diag) asking the pilot to kill the
payload. Lifecycle hooks are notifications; an exception in one is logged, never fatal.

Plugins are asked in the order ``pilot.plugins.make_manager`` found them (entry points, then
extra objects); ``pilot_monitor_check`` is the one hook whose first answer wins (``firstresult``):
the others are notifications or merge every plugin's answer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from .jobspec import JobSpec
    from .monitoring import MonitorContext, Verdict
    from .payload import PayloadResult

PROJECT = "panda.pilot"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def pilot_monitor_check(ctx: MonitorContext) -> Verdict | None:
    """Judge the payload this cycle: a ``Verdict(code, diag, monitor)`` to have it killed and the
    job failed with ``code``, or None if all is well.

    ``ctx``: the job, its limits, the work dir, a sample of the payload's process tree and
    ``scratch`` (per-job state kept between cycles). The first verdict wins; the plugins after it
    are not asked in that cycle.
    """


@hookspec
def pilot_monitor_metrics(ctx: MonitorContext) -> dict[str, Any] | None:
    """Metrics (name -> number or str) for the next heartbeat's ``jobMetrics``; None for none.

    ``ctx``: as for ``pilot_monitor_check``, asked just after it in the same cycle. Every
    plugin's dict is merged; a name two plugins report keeps the first plugin's value.
    """


@hookspec
def pilot_job_received(job: JobSpec, workdir: Path) -> None:
    """A job was taken from the server and its signature checked; nothing has run yet.

    ``job``: the parsed job; ``workdir``: the payload's (empty) work directory.
    """


@hookspec
def pilot_stagein_done(job: JobSpec, files: dict[str, str]) -> None:
    """All inputs are in place.

    ``files``: lfn -> local path or, for direct read, URL.
    """


@hookspec
def pilot_payload_started(job: JobSpec, pid: int) -> None:
    """The payload process ``pid`` has started in its own process group."""


@hookspec
def pilot_payload_finished(job: JobSpec, result: PayloadResult) -> None:
    """The payload ended.

    ``result``: exit code or signal, CPU time, max RSS and PSS, start and end, whether the pilot
    killed it.
    """


@hookspec
def pilot_stageout_done(job: JobSpec | None, files: dict[str, dict[str, Any]]) -> None:
    """Outputs and log were stored, as far as the job got before its final state.

    ``job``: None when the pilot failed before it had a job (no work dir, a refused or
    unreadable spec); ``files``: the final update's ``xml`` dict, lfn -> {guid, fsize, ...}.
    """


@hookspec
def pilot_job_done(job: JobSpec | None, state: str, error_code: int, error_diag: str) -> None:
    """The final state was decided and is about to be reported.

    ``job``: None when the pilot failed before it had one; ``state``: ``finished`` or
    ``failed``; ``error_code``/``error_diag``: the pilot error (0 and "" when finished).
    """
