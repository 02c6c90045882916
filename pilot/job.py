"""One job from getJob to the final updateJob: check, stage-in, payload under monitors, stage-out.

Every step writes the job's state file first, so a pilot that dies at any point leaves enough on
disk for a later pilot to finish the job's bookkeeping (pilot/recovery.py). Heartbeats run in their
own thread so a slow server never delays the monitors, and the monitors never delay a heartbeat.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panda_core.client import PilotClient, server_commands, try_again
from panda_core.retry import RetryPolicy
from panda_core.siteconfig import SiteConfig
from panda_core.wire import Dispatch, JobSpec, decode_job

from . import statefile as sf
from .errors import BadJobSpec, ErrorCode, PayloadKilled, PilotError, ServerUnreachable
from .payload import Payload, PayloadResult, build_argv, scrub_env
from .plugins import notify
from .report import (HEARTBEAT_RETRY, KILL_COMMANDS, err_dict, final_form, heartbeat_form,
                     redact, result_dict, send_final)
from .signature import NotOurDispatch, check_dispatch

log = logging.getLogger(__name__)

__version__ = "panda-wms-pilot 0.1"
PILOT_LOG = "pilot.log"     # in the job dir; the log tarball carries it


class JobLogHandler(logging.FileHandler):
    """The job's ``pilot.log``. A payload that fills the disk fills it for this file too: a
    line that cannot be written is dropped (the pilot's stderr still has every line, and the
    job fails with the disk error), not answered with logging's traceback on stderr per line;
    closing drops what the disk refused instead of raising out of the job's ``finally``."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)

    def close(self) -> None:
        try:
            super().close()        # the file is closed even when its last flush fails
        except OSError:
            pass


def pilot_version() -> str:
    """The pilot's version with, for a one-file pilot, its file's version (``PANDA_PILOT_VERSION``,
    set by the batch script that verified it): what the worker-node information reports.
    getJob's ``pilotVersion`` stays ``__version__``: jobs may be bound to a pilot version."""
    file_version = os.environ.get("PANDA_PILOT_VERSION", "")
    return f"{__version__}+{file_version}" if file_version else __version__


@dataclass
class PilotConfig:
    """Everything the command line and the environment decide about a pilot run."""
    server: str
    site: str
    workdir_base: Path
    deadline: float | None = None          # epoch seconds when the batch slot ends
    reserve_s: float = 60.0                # kept free before the deadline for stage-out and report
    exit_s: float | None = None            # of the reserve (at most half), kept after the
                                           # last call to the server to exit; None: a sixth
    heartbeat_s: float | None = None       # None: the site's limits.heartbeat_s
    monitor_interval_s: float = 10.0
    lost_heartbeat_s: float = 0.0          # kill the payload (1317) when no update got through
                                           # for this long; 0 = never (finish, report later)
    max_jobs: int = 0                      # 0 = as many as wall time allows
    server_retry: RetryPolicy = field(default_factory=RetryPolicy)
    final_retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=8, backoff_s=5))
    transfer_backoff_s: float = 1.0
    log_cap_bytes: int = 50 * 2**20
    keep_workdirs: bool = False
    kill_grace_s: float = 3.0
    batch_id: str = ""
    node: str = field(default_factory=socket.gethostname)
    allowed_programs: frozenset[str] = frozenset()   # what a copytool option may name
    payload_env: tuple[str, ...] = ()      # names (or PREFIX*) the payload gets beyond the defaults
    hidden_paths: tuple[str, ...] = ()     # the pilot's files a sandboxed payload must not see
                                           # (its token file); the job dirs' base is always hidden
    event_service: Any = None              # pilot.eventservice.EventServiceSettings
    debug_interval_s: float = 30.0         # seconds between updates while in debug mode

    def remaining_s(self, now: float | None = None) -> float | None:
        return None if self.deadline is None else self.deadline - (now or time.time())

    def report_deadline(self) -> float | None:
        """When the pilot's calls to the server must be over (epoch seconds; None: no wall
        time): the batch slot's end less ``exit_s``, so that a server that keeps answering 503
        cannot hold a report until the batch system kills the pilot mid-report. The exit
        gets a sixth of the reserve unless told (10 s of the default 60 s), at most half of
        it: the rest is the stage-out's and the report's."""
        if self.deadline is None:
            return None
        exit_s = self.reserve_s / 6 if self.exit_s is None else self.exit_s
        return self.deadline - min(exit_s, self.reserve_s / 2)


class KillRequest:
    """First reason to stop the payload wins; the monitor loop acts on it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()   # RLock: signal handlers call set() on the main thread
        self.code: int | None = None
        self.diag = ""
        self.event = threading.Event()

    def set(self, code: int, diag: str) -> None:
        with self._lock:
            if self.code is None:
                self.code, self.diag = int(code), diag
                self.event.set()

    @property
    def requested(self) -> bool:
        return self.code is not None


class JobRun:
    """``verifier`` checks the spec's signature and ``expected`` its binding to the getJob that
    brought it (recovery passes neither: its specs come from the job dir's state file)."""

    def __init__(self, cfg: PilotConfig, client: PilotClient, site: SiteConfig, pm,
                 raw: dict[str, Any], verifier=None, stop: KillRequest | None = None,
                 expected: Dispatch | None = None, sandbox=None) -> None:
        self.cfg, self.client, self.site, self.pm, self.raw = cfg, client, site, pm, raw
        self.sandbox = sandbox               # pilot.sandbox.Sandbox; None: the site's, loaded here
        self.verifier = verifier
        self.expected = expected
        self.pilot_stop = stop               # set by the pilot's signal handlers
        self.kill = KillRequest()
        self.job: JobSpec | None = None
        self.jobdir: Path | None = None      # the pilot's: state file, lock, log tarball
        self.workdir: Path | None = None     # the payload's: jobdir/work
        self.lock: sf.JobLock | None = None
        self.state: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.payload: Payload | None = None
        self.es = None                       # pilot.eventservice's session, for such a job
        self.result: PayloadResult | None = None
        self.last_heartbeat_ok = time.time()
        self.start_time = time.time()
        self.timing: dict[str, float] = {}
        self.debug = None                    # panda_core.debugview.DebugRequest while it is set
        self.debug_refused = ""              # why the server's debug request was refused
        self._hb_stop = threading.Event()
        self._hb_wake = threading.Event()    # a heartbeat now (debug mode was switched on)

    # --- helpers ----------------------------------------------------------------------------
    @property
    def panda_id(self) -> str:
        return str(self.raw.get("PandaID", "0"))

    def _save(self, phase: str, **extra: Any) -> None:
        self.state.update(phase=phase, **extra)
        if self.jobdir is not None:
            try:
                sf.write_state(self.jobdir, self.state)
            except OSError as exc:  # full disk: the job goes on, only recovery is weakened
                log.error("job %s: state file not written: %s", self.panda_id, exc)

    def _base_form(self, state: str) -> dict[str, Any]:
        form: dict[str, Any] = {"jobId": self.panda_id, "state": state,
                                "timestamp": int(time.time()), "siteName": self.site.name,
                                "node": self.cfg.node,
                                "attemptNr": self.raw.get("attemptNr", 1),
                                "pilotID": f"{self.cfg.node}:{os.getpid()}",
                                "coreCount": self.job.core_count if self.job else 1}
        dispatch = Dispatch.of(self.raw)
        if dispatch is not None and dispatch.nonce:
            # the job is held by the pilot it was dispatched to (server/jobholder.py): every
            # update repeats that getJob's secret nonce and pilotID, also when a later pilot
            # recovers the job from the work dir (the spec is in the state file)
            form["pilotNonce"] = dispatch.nonce
            form["pilotID"] = dispatch.pilot_id or form["pilotID"]
        if self.cfg.batch_id:
            form["batchID"] = self.cfg.batch_id
        return form

    def _make_jobdir(self) -> tuple[Path, sf.JobLock]:
        """``<base>/panda_job_<PandaID>_<pid>``, locked; the payload runs in its ``work``
        subfolder, so it never sees (or deletes) the pilot's state file and lock.

        The dir is made and locked under a hidden name and renamed after: another pilot's
        recovery never sees a job dir that is not yet locked."""
        base = self.cfg.workdir_base
        base.mkdir(parents=True, exist_ok=True)
        digits = "".join(c for c in str(self.raw.get("PandaID", "")) if c.isdigit())[:20]
        name = f"{sf.JOB_DIR_PREFIX}{digits or 0}_{os.getpid()}"   # never a path from the spec
        tmp = base / f".{name}.creating"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        (tmp / sf.WORK_DIR).mkdir()
        lock = sf.JobLock(tmp)
        if not lock.acquire():
            raise OSError(f"cannot lock {tmp}")
        jd, n = base / name, 0
        while jd.exists():
            n += 1
            jd = base / f"{name}.{n}"
        os.rename(tmp, jd)
        lock.path = jd / sf.LOCK_FILE
        return jd, lock

    # --- the job ----------------------------------------------------------------------------
    def run(self) -> str:
        """Run the job to its end; return the final state reported (or kept on disk).

        Whatever goes wrong, the server hears a final state with an error code: a work dir that
        cannot be made (full disk) or a bug in the pilot is reported, never just logged."""
        try:
            self.jobdir, self.lock = self._make_jobdir()
            self.workdir = self.jobdir / sf.WORK_DIR
        except OSError as exc:
            log.error("job %s: cannot create its work dir: %s", self.panda_id, exc)
            self.jobdir = self.workdir = None
            code = ErrorCode.NO_LOCAL_SPACE if getattr(exc, "errno", 0) == 28 else ErrorCode.GENERAL
            return self._finish("failed", PilotError(code, f"cannot create work dir: {exc}"), {})
        self.state = {"version": 1, "pilot_pid": os.getpid(), "node": self.cfg.node,
                      "server": self.client.url, "site": redact(self.site.to_dict()),
                      "site_name": self.site.name,
                      "job": self.raw, "started": self.start_time}
        self._save(sf.RECEIVED)
        handler = self._job_log_handler()
        try:
            return self._run()
        except Exception as exc:  # a pilot bug must still end in a reported failure
            log.exception("job %s: unexpected pilot error", self.panda_id)
            if self.payload is not None and self.payload.result is None:
                self.result = self.payload.kill(self.cfg.kill_grace_s)
            return self._finish("failed", PilotError(ErrorCode.GENERAL,
                                f"unexpected pilot error: {type(exc).__name__}: {exc}"), {})
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
            if self.lock is not None:
                self.lock.release()

    def _job_log_handler(self) -> logging.Handler | None:
        """The pilot's log lines of this job go to ``pilot.log`` in the job dir (beside the work
        dir, out of a sandboxed payload's sight), and so into the job's log tarball, as PanDA's
        pilot log does."""
        try:
            handler = JobLogHandler(self.jobdir / PILOT_LOG)
        except OSError:
            return None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(handler)
        return handler

    def _run(self) -> str:
        error: PilotError | None = None
        stored: dict[str, dict] = {}
        try:
            if self.verifier is not None:
                self.verifier.verify(self.raw)
            if self.expected is not None:
                check_dispatch(self.raw, self.expected)
            try:
                self.job = decode_job(self.raw)
            except PilotError:
                raise
            except Exception as exc:  # anything unexpected in a spec is a bad spec
                raise BadJobSpec(f"unreadable job spec: {exc}") from None
            self._check_walltime(self.job)
        except NotOurDispatch as exc:
            # another pilot's job, or this pilot's earlier one: reporting on it would end a job
            # that is not ours; the server's watcher reclaims a dispatch nobody reports on
            log.error("job %s refused, not reported: %s", self.panda_id, exc)
            self._save(sf.DONE)
            if not self.cfg.keep_workdirs:
                shutil.rmtree(self.jobdir, ignore_errors=True)
            return "refused"
        except PilotError as exc:
            log.error("job %s refused: %s", self.panda_id, exc)
            return self._finish("failed", exc, {})

        job = self.job
        notify(self.pm, "pilot_job_received", job=job, workdir=self.workdir)
        self._update_form(self._with_node(self._base_form("starting")), HEARTBEAT_RETRY)
        try:
            self._check_stop()
            self._save(sf.STAGEIN)
            t0 = time.time()
            from .stage import stage_in
            # an event-service job stages in only the files its ranges name, as they come
            files = {} if job.event_service else stage_in(job, self.site, self.workdir,
                                                          self._stage_settings())
            self.timing["stagein"] = time.time() - t0
            notify(self.pm, "pilot_stagein_done", job=job, files=files)
            self._check_stop()
            self._run_payload(job, files)
        except PilotError as exc:
            error = exc
        if error is None and self.kill.requested:
            error = PayloadKilled(self.kill.code, self.kill.diag)
        if error is None and self.result is not None:
            error = self._judge(self.result)
        self._save(sf.STAGEOUT, result=result_dict(self.result), error=err_dict(error))
        if error is None:
            try:
                stored = self._stage_out_outputs()
            except PilotError as exc:
                error = exc
                stored = getattr(exc, "stored", {}) or {}
        return self._finish("failed" if error else "finished", error, stored)

    def _check_walltime(self, job: JobSpec) -> None:
        remaining = self.cfg.remaining_s()
        if remaining is None or not job.max_walltime_s:
            return
        if job.max_walltime_s > remaining - self.cfg.reserve_s:
            raise PilotError(ErrorCode.BATCH_WALLTIME,
                             f"job needs {job.max_walltime_s} s but the batch slot has only "
                             f"{remaining:.0f} s left ({self.cfg.reserve_s:.0f} s kept for "
                             "stage-out)")

    def _check_stop(self) -> None:
        """Before the next step: has the server (``tobekilled``) or a signal stopped the job?"""
        if self.kill.requested:
            raise PayloadKilled(self.kill.code, self.kill.diag)
        if self.pilot_stop is not None and self.pilot_stop.requested:
            raise PilotError(self.pilot_stop.code, self.pilot_stop.diag)

    def _run_payload(self, job: JobSpec, files: dict[str, str]) -> None:
        replacements = {lfn: url for lfn, url in files.items() if "://" in url}
        inputs = json.dumps(files)
        extra = {"PANDA_ID": job.job_id, "PANDA_SITE": self.site.name,
                 "PANDA_WORKDIR": str(self.workdir), "ATHENA_CORE_NUMBER": str(job.core_count)}
        if len(inputs) < 65536:   # the kernel caps an env string at 128 KiB: big lists on disk
            extra["PANDA_INPUTS"] = inputs
        if job.event_service:
            try:
                extra.update(self._event_service_session(job).prepare())
            except OSError as exc:
                self.es = None
                raise PilotError(ErrorCode.GENERAL, f"cannot make the event-service pipes in "
                                 f"the work dir: {exc}") from None
        env = scrub_env(os.environ, extra, self.cfg.payload_env)
        sandbox = self._sandbox()
        # in an image (the job's or the site's) the transformation is the image's: the node's
        # PATH says nothing about it
        argv = build_argv(job.transformation, job.job_pars, replacements, path=env.get("PATH"),
                          check=not sandbox.runs_images)
        (self.workdir / "pilot_inputs.json").write_text(inputs)
        wrapped = sandbox.wrap(self._sandbox_spec(job, argv, env, files))
        self.payload = Payload(wrapped.argv, self.workdir, wrapped.env)
        try:
            pid = self.payload.start()
        except OSError as exc:
            if self.es is not None:        # nothing was fetched: only the pipes to remove
                self.es.finish(payload_crashed=False)
            raise PilotError(ErrorCode.PAYLOAD_EXECUTION_FAILURE,
                             f"cannot start payload: {exc}") from None
        self._save(sf.RUNNING, payload={"pid": pid, "start": self.payload.start_time})
        notify(self.pm, "pilot_payload_started", job=job, pid=pid)
        hb = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{job.job_id}",
                              daemon=True)
        self._update_form(self._with_node(self._base_form("running")), HEARTBEAT_RETRY)
        hb.start()
        if self.es is not None:
            self.es.start()
        try:
            self._monitor_loop(job)
        finally:
            if self.es is not None:   # its range reports all come before the final state
                self.es.finish(payload_crashed=self.result is None
                               or self.result.exit_code != 0)
            self._hb_stop.set()
            self._hb_wake.set()
            hb.join(timeout=60)   # no heartbeat may overtake the final state
        notify(self.pm, "pilot_payload_finished", job=job, result=self.result)
        if self.es is not None and self.es.error is not None:
            raise self.es.error

    def _event_service_session(self, job: JobSpec):
        """The event-service side of the job (pilot/eventservice): its pipes are made before
        the payload starts, its thread runs next to the monitor loop."""
        from .eventservice.session import EventServiceSession, SessionContext

        assert self.workdir is not None and self.jobdir is not None
        ctx = SessionContext(
            client=self.client, site=self.site, job=job, workdir=self.workdir,
            outdir=self.jobdir / "es_outputs", stage_settings=self._stage_settings(),
            remaining_s=self.cfg.remaining_s, reserve_s=self.cfg.reserve_s,
            stop_requested=lambda: self.kill.requested or (
                self.pilot_stop is not None and self.pilot_stop.requested),
            on_command=lambda commands: self._obey({"command": ",".join(sorted(commands))},
                                                   updates=False),
            on_contact=self._contact, report_deadline=self.cfg.report_deadline)
        self.es = EventServiceSession(ctx, self.cfg.event_service)
        return self.es

    def _contact(self) -> None:
        self.last_heartbeat_ok = time.time()

    def _sandbox(self):
        """The site's sandbox runtime (loaded once per pilot by the caller, or here)."""
        if self.sandbox is None:
            from .sandbox import load

            self.sandbox = load(self.site.sandbox)
        return self.sandbox

    def _sandbox_spec(self, job: JobSpec, argv: list[str], env: dict[str, str],
                      files: dict[str, str]):
        """What the sandbox needs: the inputs outside the work dir (links to a storage element,
        direct-read ``file://`` replicas) read-only; the pilot's files hidden."""
        from urllib.parse import unquote, urlsplit

        from .sandbox import SandboxSpec

        read_only = []
        for where in files.values():
            if where.startswith("file://"):
                read_only.append(Path(unquote(urlsplit(where).path)))
            elif "://" not in where:
                read_only.append(Path(where))      # the sandbox binds a link's target
        hide = [Path(p) for p in self.cfg.hidden_paths] + [self.cfg.workdir_base]
        assert self.workdir is not None
        return SandboxSpec(argv=argv, env=env, workdir=self.workdir, read_only=read_only,
                           hide=hide, image=job.container_name)

    def _monitor_loop(self, job: JobSpec) -> None:
        from .monitoring import JobLimits, MonitorContext, PILOT_FILES

        assert self.payload is not None
        limits = JobLimits.resolve(job, self.site)
        scratch: dict[str, Any] = {}
        ignore = PILOT_FILES | {"pilot_inputs.json", ".es_ranges", ".es_reports"}
        next_check = time.monotonic() + min(self.cfg.monitor_interval_s, 1.0)
        while True:
            res = self.payload.wait(timeout=0.5, step=0.01)
            if res is not None:
                self.result = res
                self.payload.kill_leftovers()
                return
            if self.pilot_stop is not None and self.pilot_stop.requested:
                self.kill.set(self.pilot_stop.code, self.pilot_stop.diag)
            silent = time.time() - self.last_heartbeat_ok
            if self.cfg.lost_heartbeat_s and silent > self.cfg.lost_heartbeat_s:
                self.kill.set(ErrorCode.NO_HEARTBEAT_REACHED,
                              f"no update reached the server for {silent:.0f} s "
                              f"(limit {self.cfg.lost_heartbeat_s:.0f} s)")
            if not self.kill.requested and time.monotonic() >= next_check:
                next_check = time.monotonic() + self.cfg.monitor_interval_s
                sample = self.payload.sample()
                ctx = MonitorContext(job=job, limits=limits, workdir=self.workdir,
                                     payload_start=self.payload.start_time, now=time.time(),
                                     sample=sample, pilot_deadline=self.cfg.deadline,
                                     reserve_s=self.cfg.reserve_s, ignore=frozenset(ignore),
                                     scratch=scratch)
                self._run_monitors(ctx)
            if self.kill.requested:
                log.warning("killing payload of job %s: [%s] %s", job.job_id, self.kill.code,
                            self.kill.diag)
                self.result = self.payload.kill(self.cfg.kill_grace_s)
                return

    def _run_monitors(self, ctx) -> None:
        if self.pm is None:
            return
        try:
            verdict = self.pm.hook.pilot_monitor_check(ctx=ctx)   # firstresult: the first wins
        except Exception:
            log.exception("a monitor plugin failed")
            verdict = None
        try:
            metrics: dict[str, Any] = {}
            # a name two plugins report keeps the first plugin's value, as a verdict does
            for part in reversed(self.pm.hook.pilot_monitor_metrics(ctx=ctx)):
                if isinstance(part, dict):
                    metrics.update(part)
            self.metrics = metrics
        except Exception:
            log.exception("a monitor plugin's metrics failed")
        if verdict is not None:
            self.kill.set(verdict.code, verdict.diag)

    def _judge(self, res: PayloadResult) -> PilotError | None:
        if res.exit_code == 0:
            return None
        if res.exit_code is not None:
            if res.exit_code == 127:
                return PilotError(ErrorCode.TRANSFORM_NOT_FOUND,
                                  "payload exit code 127: command not found")
            return PilotError(ErrorCode.PAYLOAD_FAILED, f"payload exited with code {res.exit_code}")
        return PilotError(ErrorCode.KILL_SIGNAL, f"payload killed by signal {res.signal}")

    # --- heartbeats ---------------------------------------------------------------------------
    def _heartbeat_s(self) -> float:
        return float(self.cfg.heartbeat_s or self.site.limits.heartbeat_s or 1800)

    def _heartbeat_loop(self) -> None:
        """A heartbeat every ``_heartbeat_s``, every ``debug_interval_s`` in debug mode, and one
        at once when debug mode is switched on."""
        while True:
            debugging = self.debug is not None or self.debug_refused
            interval = self.cfg.debug_interval_s if debugging else self._heartbeat_s()
            self._hb_wake.wait(interval)
            self._hb_wake.clear()
            if self._hb_stop.is_set():
                return
            try:
                self._heartbeat()
            except Exception:  # one bad heartbeat must not end them all
                log.exception("job %s: heartbeat failed", self.panda_id)

    def _heartbeat(self) -> None:
        from .nodeinfo import heartbeat_info

        try:
            node = heartbeat_info(self.workdir)
        except Exception:  # node facts are a courtesy, never a reason to miss a heartbeat
            node = {}
        form = heartbeat_form(self._base_form("running"), {**node, **self.metrics}, self.payload)
        request, refused = self.debug, self.debug_refused
        if refused:
            form["debugView"] = json.dumps({"error": f"the pilot refused the debug request: "
                                            f"{refused}", "time": round(time.time(), 3)})
        elif request is not None and self.workdir is not None:
            from .debug.views import view

            form["debugView"] = json.dumps(view(request, self.workdir, self.payload))
        self._update_form(self._with_node(form), HEARTBEAT_RETRY)

    def _with_node(self, form: dict[str, Any]) -> dict[str, Any]:
        """``form`` with the worker node's description (``workerNode``, panda_core.workernode)."""
        from panda_core.workernode import FIELD

        from .nodeinfo import worker_node
        try:
            return {**form, FIELD: worker_node(self.workdir).to_json()}
        except Exception:  # node facts are a courtesy, never a reason to miss an update
            log.exception("job %s: no worker-node information", self.panda_id)
            return form

    def _update(self, state: str) -> None:
        self._update_form(self._base_form(state), HEARTBEAT_RETRY)

    def _update_form(self, form: dict[str, Any], policy: RetryPolicy) -> None:
        try:
            reply = self.client.update_job(form, policy, self.cfg.report_deadline())
        except ServerUnreachable as exc:
            log.warning("job %s: %s update not delivered: %s", self.panda_id, form["state"], exc)
            return
        except Exception as exc:
            log.warning("job %s: %s update refused: %s", self.panda_id, form["state"], exc)
            return
        if try_again(reply.get("StatusCode")):
            log.warning("job %s: %s update not taken, the server says try again: %s",
                        self.panda_id, form["state"], reply.get("errorDialog", ""))
            return
        self.last_heartbeat_ok = time.time()
        self._obey(reply)

    def _obey(self, reply: dict[str, Any], updates: bool = True) -> None:
        """Act on a reply's commands. Debug mode follows the updateJob replies only
        (``updates``): the event service's replies repeat the job's command without the view."""
        commands = server_commands(reply)
        if commands & KILL_COMMANDS:
            log.warning("job %s: the server says %s", self.panda_id, ",".join(sorted(commands)))
            self.kill.set(ErrorCode.KILLED_BY_SERVER, "job killed by the server's command")
            return
        if updates:
            self._debug_mode(reply if "debug" in commands else None)
        if commands - {"debug"}:
            log.info("job %s: server command(s) %s ignored", self.panda_id,
                     ",".join(sorted(commands - {"debug"})))

    def _debug_mode(self, reply: dict[str, Any] | None) -> None:
        """Debug mode on (the reply's ``debug`` command, the view in ``debugView``) or off (a
        reply without it). A request that is not one of the built-in views is refused."""
        if reply is None:
            if self.debug is not None or self.debug_refused:
                log.info("job %s: debug mode off", self.panda_id)
            self.debug, self.debug_refused = None, ""
            return
        from panda_core.debugview import BadDebugRequest, parse_request   # only once asked

        try:
            request = parse_request(reply.get("debugView"))
        except BadDebugRequest as exc:
            # said back in the updates (the person who asked sees why), never acted on
            if not self.debug_refused:
                log.warning("job %s: debug request refused: %s", self.panda_id, exc)
                self._hb_wake.set()
            self.debug, self.debug_refused = None, str(exc)
            return
        self.debug_refused = ""
        if request != self.debug:
            log.info("job %s: debug mode on: %s every %.0f s", self.panda_id,
                     request.to_wire(), self.cfg.debug_interval_s)
            self.debug = request
            self._hb_wake.set()

    def _stage_settings(self):
        from .stage import StageSettings

        return StageSettings.from_site(self.site, self.cfg.transfer_backoff_s,
                                       self.cfg.allowed_programs)

    # --- the end ------------------------------------------------------------------------------
    def _stage_out_outputs(self) -> dict[str, dict]:
        from .stage import stage_out

        assert self.job is not None
        t0 = time.time()
        stored = stage_out(self.job.outputs, self.workdir, self.site,
                           self._stage_settings())
        self.timing["stageout"] = time.time() - t0
        return stored

    def _finish(self, state: str, error: PilotError | None, stored: dict[str, dict]) -> str:
        """Store the log tarball, build the final update, send it or keep it for later."""
        job = self.job
        killed_by_server = error is not None and error.code == ErrorCode.KILLED_BY_SERVER
        if killed_by_server:     # the job is no longer ours to store anything of
            log.info("job %s: killed by the server: nothing is staged out", self.panda_id)
        elif job is not None and job.log is not None and self.workdir is not None \
                and self.workdir.is_dir():
            try:
                stored.update(self._stage_out_log(job))
            except PilotError as exc:
                log.error("job %s: log not stored: %s", self.panda_id, exc)
                if error is None:
                    error, state = exc, "failed"
        form = final_form(self._base_form(state), error, self.result, stored, self.timing,
                          self.start_time)
        if self.es is not None:
            form["nEvents"] = self.es.events
        notify(self.pm, "pilot_stageout_done", job=job, files=stored)
        notify(self.pm, "pilot_job_done", job=job, state=state,
               error_code=error.code if error else 0, error_diag=error.diag if error else "")
        self._save(sf.FINAL_PENDING, final=form)
        if send_final(self.client, form, self.cfg.final_retry, self.cfg.report_deadline()):
            self._save(sf.DONE)
            if not self.cfg.keep_workdirs and self.jobdir is not None:
                shutil.rmtree(self.jobdir, ignore_errors=True)
        else:
            log.error("job %s: final state %s kept in %s for a later attempt", self.panda_id,
                      state, self.jobdir)
        return state

    def _stage_out_log(self, job: JobSpec) -> dict[str, dict]:
        from .logtar import make_log_tarball
        from .stage import stage_out

        assert job.log is not None and self.workdir is not None and self.jobdir is not None
        exclude = {f.lfn for f in job.inputs} | {f.lfn for f in job.outputs}
        logdir = self.jobdir / "log"
        logdir.mkdir(exist_ok=True)
        make_log_tarball(self.workdir, logdir / job.log.lfn, exclude, self.cfg.log_cap_bytes,
                         extra={PILOT_LOG: self.jobdir / PILOT_LOG})
        return stage_out([job.log], logdir, self.site,
                         self._stage_settings())
