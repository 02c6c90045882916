"""The pilot's extension contract (pluggy project ``panda.pilot``).

Monitors and lifecycle listeners are plugins: modules or objects implementing some of these hooks,
registered through the ``panda.pilot`` entry-point group. The built-in monitors in
``pilot/monitors/`` are registered exactly that way, so a third-party monitor is a peer of theirs.

Monitor hooks are called every monitor cycle with a ``MonitorContext`` (pilot/monitoring.py);
``pilot_monitor_check`` returns None or a ``Verdict`` (code, diag) asking the pilot to kill the
payload. Lifecycle hooks are notifications; an exception in one is logged, never fatal.
"""
from __future__ import annotations

import pluggy

PROJECT = "panda.pilot"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def pilot_monitor_check(ctx):
    """Return a Verdict(code, diag) to have the payload killed, or None if all is well."""


@hookspec
def pilot_monitor_metrics(ctx):
    """Return a dict of metrics (name -> number or str) to send with the next heartbeat."""


@hookspec
def pilot_job_received(job, workdir):
    """A job was taken from the server and its signature checked; nothing has run yet."""


@hookspec
def pilot_stagein_done(job, files):
    """All inputs are in place. ``files`` maps lfn -> local path or, for direct read, URL."""


@hookspec
def pilot_payload_started(job, pid):
    """The payload process ``pid`` has started in its own process group."""


@hookspec
def pilot_payload_finished(job, result):
    """The payload ended (``result`` is a PayloadResult: exit code, CPU time, max RSS...)."""


@hookspec
def pilot_stageout_done(job, files):
    """Outputs and log were stored. ``files`` is the final ``xml`` dict {lfn: {...}}."""


@hookspec
def pilot_job_done(job, state, error_code, error_diag):
    """The final state was decided (``finished`` or ``failed``) and is about to be reported."""
