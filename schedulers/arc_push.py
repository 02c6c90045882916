"""ARC push mode: the factory takes jobs from the server and ARC runs them without a pilot.

The driver speaks the pilot protocol on the job's behalf: ``getJob`` as a pilot would, then an
xRSL job whose ``inputFiles`` ARC downloads from the site's input storage element and whose
``outputFiles`` (the log tarball included) ARC uploads to the output one, so ARC does every
transfer. It reports ``starting`` on submission, ``running`` when ARC runs the payload (and a
heartbeat every ``heartbeat_s``), then ``finished`` with the stored files (sizes and adler32
read back from the storage element) or ``failed`` with a pilot error code.

Every job in flight is a small JSON file in ``state_dir`` written before the server is told
anything, so a restarted factory picks its jobs up again; a final report the server did not
take is retried on the next ``poll``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from panda_core.client import ClientError, PilotClient, try_again
from panda_core.errorcodes import CodedError, ErrorCode, error_text
from panda_core.replicas import replica_url
from panda_core.retry import RetryPolicy
from panda_core.wire import WireError, decode_job

from .arc import ArcBackend, ArcJob, job_xrsl
from .base import SchedulerError

log = logging.getLogger(__name__)

#: schemes A-REX's data staging can read and write (a file:// SE is invisible to the CE)
STAGING_SCHEMES = ("http", "https", "davs", "root", "gsiftp", "srm", "s3")

# Runs in ARC's session directory: the payload, its exit code, and the log tarball that PanDA
# expects next to the outputs. "$@" is the payload's argv, never re-parsed.
WRAPPER = ('"$@" >payload.stdout 2>payload.stderr </dev/null; rc=$?; '
           'printf "%s\\n" "$rc" >payload.exitcode; '
           'if [ -n "$PANDA_LOG_FILE" ]; then '
           'tar czf "$PANDA_LOG_FILE" payload.stdout payload.stderr payload.exitcode; fi; '
           'exit "$rc"')


#: a job that cannot be turned into an ARC job, with the pilot error code to report it by
BadJob = CodedError


@dataclass
class PushFile:
    lfn: str
    scope: str
    url: str
    guid: str = ""


@dataclass
class PushJob:
    """The parts of a getJob reply push mode needs."""
    panda_id: int
    attempt_nr: int
    transformation: str
    job_pars: str
    inputs: list[PushFile]
    outputs: list[PushFile]
    log: PushFile | None
    walltime_s: int
    memory_mb: int
    cores: int

    def argv(self) -> list[str]:
        try:
            return [self.transformation] + shlex.split(self.job_pars)
        except ValueError as exc:
            raise BadJob(ErrorCode.BAD_JOB_SPEC, f"jobPars cannot be split: {exc}") from None


#: names ARC's session directory holds besides the job's own files
RESERVED_NAMES = frozenset({"payload.stdout", "payload.stderr", "payload.exitcode", "arc.out",
                            "arc.err"})


def parse_job(raw: dict, input_se: str, output_se: str) -> PushJob:
    """Turn a getJob reply into a PushJob (``panda_core.wire`` decodes it); hostile names and
    missing fields raise BadJob."""
    try:
        spec = decode_job(raw)
    except WireError as exc:
        raise BadJob(exc.code, exc.diag) from None
    if RESERVED_NAMES & {f.lfn for f in spec.files}:
        raise BadJob(ErrorCode.BAD_JOB_SPEC, "a file name is reserved by push mode")

    def push_file(f, se: str, guid: str) -> PushFile:
        return PushFile(f.lfn, f.scope, replica_url(se, f.scope, f.lfn), guid)

    log_file = spec.log and push_file(spec.log, output_se, spec.log.guid or str(uuid.uuid4()))
    return PushJob(panda_id=spec.panda_id, attempt_nr=spec.attempt_nr,
                   transformation=spec.transformation, job_pars=spec.job_pars,
                   inputs=[push_file(f, input_se, f.guid) for f in spec.inputs],
                   outputs=[push_file(f, output_se, str(uuid.uuid4())) for f in spec.outputs],
                   log=log_file, walltime_s=spec.max_walltime_s or 3600,
                   memory_mb=spec.max_rss_mb or 2000, cores=spec.core_count)


def push_xrsl(job: PushJob, backend: ArcBackend) -> str:
    """The xRSL that makes ARC stage the job's inputs, run it, and store its outputs and log."""
    env = {"PANDA_ID": str(job.panda_id)}
    outputs = [(f.lfn, f.url) for f in job.outputs]
    if job.log:
        env["PANDA_LOG_FILE"] = job.log.lfn
        # preserve=yes: ARC uploads the log even when the payload failed
        outputs.append((job.log.lfn, arc_url_option(job.log.url, "preserve=yes")))
    return job_xrsl(["/bin/sh", "-c", WRAPPER, "panda-push", *job.argv()],
                    name=f"panda-{job.panda_id}", walltime_s=job.walltime_s, cores=job.cores,
                    memory_mb=job.memory_mb, env=env, stdout="arc.out", stderr="arc.err",
                    input_files=[(f.lfn, f.url) for f in job.inputs], output_files=outputs,
                    queue=backend.queue, runtime_environments=backend.runtime_environments,
                    extra_xrsl=backend.extra_xrsl)


@dataclass
class Tracked:
    """One job in flight, as persisted in the state directory."""
    panda_id: int
    attempt_nr: int
    arc_id: str
    reported: str = "starting"            # last state the server took
    submitted: float = field(default_factory=time.time)
    last_update: float = field(default_factory=time.time)
    outputs: list[dict] = field(default_factory=list)   # PushFile dicts, log last
    kill_requested: bool = False
    final: dict | None = None             # final updateJob form not yet taken by the server


class ServerError(RuntimeError):
    """The server could not be reached or refused; the job stays in the state dir."""


class Refused(ServerError):
    """The server answered with a non-zero StatusCode."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code

    @property
    def permanent(self) -> bool:
        """Asking again gets the same answer: every StatusCode but "try again" (10), the rule
        the pilot's final report follows too (``panda_core.client.try_again``)."""
        return not try_again(self.status_code)


class SEUnavailable(ServerError):
    """The storage element could not be asked about the outputs now; the job waits a poll."""


class ArcPushDriver:
    """Takes jobs for one site from the server and runs them on its ARC CE without a pilot."""

    def __init__(self, backend: ArcBackend, server_url: str, token: str, site: str,
                 input_se: str, output_se: str, state_dir: str | os.PathLike,
                 heartbeat_s: float = 1800.0, timeout_s: float = 30.0,
                 se_token: str | None = None, clean_finished: bool = True) -> None:
        for what, url in (("input", input_se), ("output", output_se)):
            if urlsplit(url).scheme not in STAGING_SCHEMES:
                raise SchedulerError(f"ARC push mode: the {what} storage element {url!r} is not "
                                     f"reachable by the CE (schemes: {', '.join(STAGING_SCHEMES)})")
        self.backend = backend
        self.server = PilotClient(server_url, token, user_agent="panda-wms-arc-push",
                                  retry=RetryPolicy(attempts=1, timeout_s=timeout_s))
        self.site = site
        self.input_se, self.output_se = input_se, output_se
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.heartbeat_s = float(heartbeat_s)
        self.timeout_s = float(timeout_s)
        self.se_token = se_token
        self.clean_finished = clean_finished
        self.node = urlsplit(backend.client.base).hostname or "arc"

    @classmethod
    def from_site(cls, site_config: dict, server_url: str, token: str,
                  state_dir: str | os.PathLike, **kwargs) -> "ArcPushDriver":
        """Build from a site config dict (``SiteConfig.to_dict()``) whose backend is arc."""
        sched = site_config.get("scheduler") or {}
        options = dict(sched.get("options") or {})
        backend = ArcBackend(**options)
        storage = site_config.get("storage") or {}
        limits = site_config.get("limits") or {}
        kwargs.setdefault("heartbeat_s", limits.get("heartbeat_s", 1800))
        return cls(backend, server_url, token, site_config["name"],
                   (storage.get("input") or {}).get("url", ""),
                   (storage.get("output") or {}).get("url", ""), state_dir, **kwargs)

    # ------------------------------------------------------------------ state files
    def _path(self, panda_id: int) -> Path:
        return self.state_dir / f"{int(panda_id)}.json"

    def _save(self, t: Tracked) -> None:
        tmp = self._path(t.panda_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(t)))
        os.replace(tmp, self._path(t.panda_id))

    def tracked(self) -> list[Tracked]:
        out = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                out.append(Tracked(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("unreadable push state %s (%s): left in place", path, exc)
        return out

    # ------------------------------------------------------------------ protocol
    def _call(self, method: str, form: dict[str, Any]) -> dict:
        try:
            return self.server.post(method, {k: v for k, v in form.items() if v is not None})
        except ClientError as exc:
            raise ServerError(f"{method}: {exc}") from None

    def _update(self, t: Tracked, state: str, **extra: Any) -> str:
        form = {"jobId": t.panda_id, "state": state, "attemptNr": t.attempt_nr,
                "siteName": self.site, "node": self.node, "batchID": t.arc_id,
                "schedulerID": "arc-push", "pilotID": f"arc-push|{t.arc_id}",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **extra}
        reply = self._call("updateJob", form)
        if reply.get("StatusCode") not in (0, "0"):
            try:
                code = int(reply.get("StatusCode"))
            except (TypeError, ValueError):
                code = None
            raise Refused(f"updateJob {t.panda_id} {state}: StatusCode "
                          f"{reply.get('StatusCode')}: {reply.get('errorDialog', '')}", code)
        return str(reply.get("command") or "NULL")

    def _fail_unsubmitted(self, raw: dict, code: int, diag: str) -> None:
        """Report a job we took but could not submit, so the server can retry it elsewhere."""
        try:
            t = Tracked(int(raw.get("PandaID")), int(raw.get("attemptNr") or 1), "")
        except (TypeError, ValueError):
            log.error("job without a usable PandaID from the server: %s", diag)
            return
        t.final = {"state": "failed", "pilotErrorCode": code, "pilotErrorDiag": diag[:250]}
        self._save(t)
        self._deliver_final(t)

    def fetch_and_submit(self, n_jobs: int = 1) -> list[int]:
        """Take up to ``n_jobs`` jobs from the server and submit each to the CE."""
        submitted = []
        for _ in range(max(0, n_jobs)):
            reply = self._call("getJob", {
                "siteName": self.site, "computingElement": self.backend.client.base,
                "node": self.node, "prodSourceLabel": "managed", "cpu": 0, "mem": 0,
                "diskSpace": 0, "workingGroup": "", "jobType": "managed",
                "resourceType": "SCORE", "harvester_id": "arc-push"})
            code = reply.get("StatusCode")
            if code in (20, "20"):
                break
            if code not in (0, "0"):
                raise ServerError(f"getJob: StatusCode {code}: {reply.get('errorDialog', '')}")
            try:
                job = parse_job(reply, self.input_se, self.output_se)
                xrsl = push_xrsl(job, self.backend)
            except BadJob as exc:
                log.error("job %s refused: %s", reply.get("PandaID"), exc)
                self._fail_unsubmitted(reply, exc.code, exc.diag)
                continue
            except SchedulerError as exc:
                self._fail_unsubmitted(reply, ErrorCode.BAD_JOB_SPEC, str(exc))
                continue
            try:
                arc_id = self.backend.submit_xrsl(xrsl)
            except SchedulerError as exc:
                log.error("ARC refused job %s: %s", job.panda_id, exc)
                self._fail_unsubmitted(reply, ErrorCode.GENERAL, f"ARC submission failed: {exc}")
                continue
            t = Tracked(job.panda_id, job.attempt_nr, arc_id,
                        outputs=[asdict(f) for f in job.outputs] + ([asdict(job.log)] if job.log else []))
            self._save(t)       # before telling the server: a crash now loses nothing
            log.info("job %s submitted to %s as %s", job.panda_id, self.backend.client.base, arc_id)
            try:
                command = self._update(t, "starting", startTime=int(time.time()))
                t.last_update = time.time()
                self._save(t)
                self._handle_command(t, command)
            except ServerError as exc:
                log.warning("job %s: %s (will retry)", job.panda_id, exc)
            submitted.append(job.panda_id)
        return submitted

    def _handle_command(self, t: Tracked, command: str) -> None:
        if "tobekilled" in command.split(",") and not t.kill_requested:
            log.info("server asks to kill job %s: killing ARC job %s", t.panda_id, t.arc_id)
            try:
                self.backend.cancel([t.arc_id])
                t.kill_requested = True
                self._save(t)
            except SchedulerError as exc:
                log.warning("could not kill ARC job %s: %s", t.arc_id, exc)

    # ------------------------------------------------------------------ tracking
    def poll(self) -> dict[int, str]:
        """Follow every tracked job on the CE and report to the server; returns PandaID -> the
        state last reported (``finished``/``failed`` once the server took the final report)."""
        tracked = self.tracked()
        result: dict[int, str] = {}
        pending_final = [t for t in tracked if t.final is not None]
        live = [t for t in tracked if t.final is None]
        for t in pending_final:
            result[t.panda_id] = self._deliver_final(t)
        if not live:
            return result
        infos = self.backend.jobs([t.arc_id for t in live])
        for t in live:
            job = infos.get(t.arc_id) or ArcJob(t.arc_id, None)
            try:
                result[t.panda_id] = self._follow(t, job)
            except ServerError as exc:
                log.warning("job %s: %s (will retry)", t.panda_id, exc)
                result[t.panda_id] = t.reported
        return result

    def _follow(self, t: Tracked, job: ArcJob) -> str:
        state = job.state
        if state in ("FINISHED", "FAILED", "KILLED") or state in (None, "WIPED"):
            t.final = self._final_form(t, job)
            self._save(t)
            return self._deliver_final(t)
        if state in ("RUNNING", "EXITINGLRMS", "EXECUTED", "FINISHING") and t.reported == "starting":
            command = self._update(t, "running")
            t.reported, t.last_update = "running", time.time()
            self._save(t)
            self._handle_command(t, command)
        elif time.time() - t.last_update >= self.heartbeat_s:
            command = self._update(t, t.reported)
            t.last_update = time.time()
            self._save(t)
            self._handle_command(t, command)
        return t.reported

    def _final_form(self, t: Tracked, job: ArcJob) -> dict:
        now = int(time.time())
        form: dict[str, Any] = {"endTime": now}
        if job.exit_code is not None:
            form["transExitCode"] = job.exit_code
            form["exeErrorCode"] = job.exit_code
        if job.state == "FINISHED":
            try:
                stored = self._stored_files(t)
            except BadJob as exc:
                return {**form, "state": "failed", "pilotErrorCode": exc.code,
                        "pilotErrorDiag": exc.diag[:250]}
            return {**form, "state": "finished", "pilotErrorCode": 0, "transExitCode": 0,
                    "xml": json.dumps(stored)}
        code, diag = self._failure(t, job)
        form.update({"state": "failed", "pilotErrorCode": int(code),
                     "pilotErrorDiag": diag[:250],
                     "jobMetrics": f"pilotErrorText={error_text(code).replace(' ', '_')}"})
        if job.state == "FAILED" and job.exit_code:
            form["exeErrorDiag"] = f"exit code {job.exit_code}"
        return form

    def _failure(self, t: Tracked, job: ArcJob) -> tuple[int, str]:
        why = job.error or "no reason given by the CE"
        if job.state is None or job.state == "WIPED":
            return ErrorCode.GENERAL, f"ARC CE no longer knows job {t.arc_id}"
        if job.state == "KILLED":
            if t.kill_requested:
                return ErrorCode.KILLED_BY_SERVER, "killed by the server"
            return ErrorCode.GENERAL, f"ARC job killed on the CE: {why}"
        stage = job.failed_in.upper()
        if stage.startswith("PREPARING") or "download" in why.lower() or "pre-processing" in why:
            return ErrorCode.STAGEIN_FAILED, f"ARC stage-in failed: {why}"
        if stage.startswith("FINISHING") or "upload" in why.lower() or "post-processing" in why:
            return ErrorCode.STAGEOUT_FAILED, f"ARC stage-out failed: {why}"
        if job.exit_code not in (None, 0):
            return ErrorCode.PAYLOAD_FAILED, f"payload exited with code {job.exit_code}"
        return ErrorCode.GENERAL, f"ARC job failed: {why}"

    def _stored_files(self, t: Tracked) -> dict[str, dict]:
        """Size and adler32 of every output as the storage element holds it."""
        stored = {}
        for f in t.outputs:
            size, adler = self._se_file(f["url"])
            stored[f["lfn"]] = {"guid": f["guid"], "fsize": size, "adler32": adler, "surl": f["url"]}
        return stored

    def _se_file(self, url: str) -> tuple[int, str]:
        headers = {"Want-Digest": "adler32"}
        if self.se_token:
            headers["Authorization"] = f"Bearer {self.se_token}"
        try:
            resp = requests.head(url, headers=headers, timeout=self.timeout_s)
            if resp.status_code == 404:
                raise BadJob(ErrorCode.NO_SUCH_FILE, f"output {url} is not on the storage element")
            resp.raise_for_status()
            size = int(resp.headers.get("Content-Length", "-1"))
            digest = _adler_from_digest(resp.headers.get("Digest", ""))
            if digest and size >= 0:
                return size, digest
            # no Digest header: read the stored bytes back and sum them
            with requests.get(url, headers=headers, stream=True, timeout=self.timeout_s) as got:
                got.raise_for_status()
                value, total = 1, 0
                for chunk in got.iter_content(1 << 20):
                    value = zlib.adler32(chunk, value)
                    total += len(chunk)
            return total, f"{value & 0xffffffff:08x}"
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code < 500:
                raise BadJob(ErrorCode.STAGEOUT_FAILED,
                             f"cannot verify output {url} on the storage element: {exc}") from None
            raise SEUnavailable(f"storage element cannot tell about {url} now: {exc}") from None
        except requests.RequestException as exc:
            # the SE is down or slow: the outputs ARC stored may be fine, so ask again later
            raise SEUnavailable(f"storage element unreachable for {url}: {exc}") from None

    def _deliver_final(self, t: Tracked) -> str:
        assert t.final is not None
        extra = {k: v for k, v in t.final.items() if k != "state"}
        try:
            self._update(t, t.final["state"], **extra)
            log.info("job %s reported %s", t.panda_id, t.final["state"])
        except Refused as exc:
            if not exc.permanent:
                log.error("job %s: server refused the final report: %s (kept for the next poll)",
                          t.panda_id, exc)
                return t.reported
            # the server answered and said no: asking again would get the same answer
            log.error("job %s: server refused the final report: %s (dropped)", t.panda_id, exc)
        except ServerError as exc:
            log.warning("job %s: final report not taken: %s (kept for the next poll)",
                        t.panda_id, exc)
            return t.reported
        try:
            self._path(t.panda_id).unlink()
        except FileNotFoundError:
            pass
        if self.clean_finished and t.arc_id:
            try:
                self.backend.client.clean([t.arc_id])
            except SchedulerError as exc:
                log.warning("could not clean ARC job %s: %s", t.arc_id, exc)
        return t.final["state"]

    def run(self, stop, max_running: int = 10, interval_s: float = 30.0) -> None:
        """Daemon loop: keep up to ``max_running`` jobs on the CE until ``stop`` (an Event) is set."""
        while not stop.is_set():
            try:
                states = self.poll()
                active = sum(1 for s in states.values() if s not in ("finished", "failed"))
                if active < max_running:
                    self.fetch_and_submit(max_running - active)
            except (ServerError, SchedulerError) as exc:
                log.warning("push cycle for %s: %s", self.site, exc)
            stop.wait(interval_s)


def arc_url_option(url: str, option: str) -> str:
    """ARC's URL options go between the host and the path: ``http://host:port;opt=val/path``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc};{option}{parts.path}" + (
        f"?{parts.query}" if parts.query else "")


def _adler_from_digest(header: str) -> str | None:
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() == "adler32" and re.fullmatch(r"[0-9a-fA-F]{1,8}", value or ""):
            return value.lower().zfill(8)
    return None
