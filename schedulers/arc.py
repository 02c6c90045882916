"""The ``arc`` backend: pilots as xRSL jobs on an ARC CE, through A-REX's REST interface 1.0.

ARC's REST interface is plain HTTPS with an X.509 proxy as client certificate, so ``requests`` is
all it takes (no ARC client libraries on the factory host). Every call has a timeout; every
failure becomes a SchedulerError that names the CE and the reason. A batch id is A-REX's job id.

Facts this module relies on (checked against A-REX 6.17): a reply's ``job`` member is an object
for one job and a list for several; per-job ``status-code`` 404 means the CE does not know the
id; REST states lag the job manager by up to a minute or two, so callers poll with patience.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from .base import BatchInfo, BatchState, PilotSpec, PushDriver, SchedulerBackend, SchedulerError

log = logging.getLogger(__name__)

REST_PATH = "/arex/rest/1.0"
ARGV_VAR = "PANDA_ARC_COMMAND"
DELEGATION_RENEW_S = 6 * 3600
# RFC 3820 ProxyCertInfo, policy language id-ppl-inheritAll: a full-rights proxy
PROXY_CERT_INFO_OID = "1.3.6.1.5.5.7.1.14"
PROXY_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")

#: A-REX REST states -> the common set. Stage-in, LRMS queueing and holds count as queued;
#: everything from the payload's start to the end of stage-out counts as running.
ARC_STATES: dict[str, BatchState] = {
    "ACCEPTING": BatchState.QUEUED,
    "ACCEPTED": BatchState.QUEUED,
    "PREPARING": BatchState.QUEUED,
    "PREPARED": BatchState.QUEUED,
    "SUBMITTING": BatchState.QUEUED,
    "QUEUING": BatchState.QUEUED,
    "HELD": BatchState.QUEUED,
    "RUNNING": BatchState.RUNNING,
    "EXITINGLRMS": BatchState.RUNNING,
    "EXECUTED": BatchState.RUNNING,
    "FINISHING": BatchState.RUNNING,
    "FINISHED": BatchState.DONE,
    "FAILED": BatchState.FAILED,
    "KILLING": BatchState.CANCELLED,      # irreversible once asked; the CE finishes it alone
    "KILLED": BatchState.CANCELLED,
    "WIPED": BatchState.UNKNOWN,          # the CE cleaned the job: its end is no longer known
    "OTHER": BatchState.UNKNOWN,
}

FINAL_REST_STATES = frozenset({"FINISHED", "FAILED", "KILLED", "WIPED"})
_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")


def xrsl_quote(value: object) -> str:
    """One xRSL string literal: double quotes, an inner double quote doubled."""
    text = str(value)
    if "\0" in text:
        raise SchedulerError("xRSL values cannot hold NUL bytes")
    return '"' + text.replace('"', '""') + '"'


def xrsl_relation(name: str, *values: object) -> str:
    return f"({name}=" + " ".join(xrsl_quote(v) for v in values) + ")"


def xrsl_list(name: str, rows: list[tuple[object, ...]]) -> str:
    """A relation whose value is a list of lists, e.g. inputFiles or environment."""
    inner = "".join("(" + " ".join(xrsl_quote(v) for v in row) + ")" for row in rows)
    return f"({name}={inner})"


@dataclass
class ArcJob:
    """What A-REX says about one job (``info``): state, exit code, error, the state it failed in."""
    id: str
    state: str | None                     # REST state, None when the CE does not know the id
    exit_code: int | None = None
    error: str = ""
    failed_in: str = ""                   # nordugrid state the job failed in (PREPARING, ...)
    raw: dict = field(default_factory=dict)

    @property
    def batch_state(self) -> BatchState:
        return ARC_STATES.get(self.state or "", BatchState.UNKNOWN)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def normalize_ce(ce: str) -> str:
    """``host``, ``host:port`` or a URL -> the A-REX base URL ``https://host[:port]/arex``."""
    if not ce or not isinstance(ce, str):
        raise SchedulerError("arc backend: option 'ce' (the CE's host or https URL) is required")
    if "://" not in ce:
        ce = "https://" + ce
    parts = urlsplit(ce)
    if parts.scheme != "https" or not parts.hostname:
        raise SchedulerError(f"arc backend: ce {ce!r} is not an https URL or host name")
    path = parts.path.rstrip("/")
    if path.endswith(REST_PATH.removeprefix("/arex")):
        path = path[: -len(REST_PATH.removeprefix("/arex"))]
    return f"https://{parts.netloc}{path or '/arex'}"


class ArcRestClient:
    """A-REX REST 1.0 calls: submit, status, info, kill, clean, session files."""

    def __init__(self, ce: str, proxy: str | None = None, ca_dir: str | None = None,
                 timeout_s: float = 30.0) -> None:
        self.base = normalize_ce(ce)
        self.url = self.base + REST_PATH.removeprefix("/arex")
        self.proxy = proxy or os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"
        self.ca_dir = ca_dir or os.environ.get("X509_CERT_DIR") or "/etc/grid-security/certificates"
        self.timeout_s = float(timeout_s)
        self.session = requests.Session()

    def _check_credentials(self) -> None:
        if not os.path.isfile(self.proxy) or not os.access(self.proxy, os.R_OK):
            raise SchedulerError(f"ARC CE {self.base}: proxy {self.proxy} is missing or unreadable "
                                 "(set option 'proxy' or X509_USER_PROXY)")
        if not os.path.exists(self.ca_dir):
            raise SchedulerError(f"ARC CE {self.base}: CA directory {self.ca_dir} does not exist "
                                 "(set option 'ca_dir' or X509_CERT_DIR)")

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One HTTPS call; any transport error or 5xx becomes a SchedulerError naming the CE."""
        self._check_credentials()
        # cert and verify go on every call: a session-level verify loses to REQUESTS_CA_BUNDLE
        kwargs.setdefault("timeout", self.timeout_s)
        try:
            resp = self.session.request(method, self.url + path, cert=self.proxy,
                                        verify=self.ca_dir, **kwargs)
        except requests.Timeout:
            raise SchedulerError(f"ARC CE {self.base}: no answer within {self.timeout_s:g} s "
                                 f"({method} {path})") from None
        except requests.exceptions.SSLError as exc:
            raise SchedulerError(f"ARC CE {self.base}: TLS failed ({exc.__class__.__name__}: "
                                 f"{_short(exc)}); check the proxy and CA directory") from None
        except requests.RequestException as exc:
            raise SchedulerError(f"ARC CE {self.base}: cannot connect ({_short(exc)})") from None
        if resp.status_code in (401, 403):
            raise SchedulerError(f"ARC CE {self.base}: access denied ({resp.status_code}); is the "
                                 "proxy's subject allowed on the CE?")
        if resp.status_code >= 400 and not (resp.status_code == 404 and (
                "/session/" in path or "/diagnose/" in path)):
            raise SchedulerError(f"ARC CE {self.base}: {method} {path} answered "
                                 f"{resp.status_code} {resp.reason}: {resp.text[:300]}")
        return resp

    def _json(self, resp: requests.Response) -> dict:
        try:
            return resp.json()
        except ValueError:
            raise SchedulerError(f"ARC CE {self.base}: reply is not JSON: {resp.text[:200]!r}") from None

    def _jobs_action(self, action: str, ids: list[str]) -> list[dict]:
        for job_id in ids:
            check_job_id(job_id)
        resp = self.request("POST", f"/jobs?action={action}", json={"job": [{"id": i} for i in ids]},
                            headers={"Accept": "application/json"})
        return _as_list(self._json(resp).get("job"))

    def submit(self, xrsl: str) -> str:
        resp = self.request("POST", "/jobs?action=new", data=xrsl.encode(),
                            headers={"Content-Type": "application/xrsl",
                                     "Accept": "application/json"})
        jobs = _as_list(self._json(resp).get("job"))
        if not jobs:
            raise SchedulerError(f"ARC CE {self.base}: submission reply names no job: {resp.text[:200]}")
        job = jobs[0]
        if str(job.get("status-code")) != "201" or not job.get("id"):
            raise SchedulerError(f"ARC CE {self.base} refused the job: {job.get('status-code')} "
                                 f"{job.get('reason', '')}".rstrip())
        return str(job["id"])

    def states(self, ids: list[str]) -> dict[str, str | None]:
        """REST state of each id; None for ids the CE does not know."""
        out: dict[str, str | None] = {i: None for i in ids}
        if not ids:
            return out
        for job in self._jobs_action("status", ids):
            if str(job.get("status-code")) == "200" and job.get("id") in out:
                out[job["id"]] = str(job.get("state"))
        return out

    def info(self, ids: list[str]) -> dict[str, ArcJob]:
        """Full GLUE2 activity info: state, exit code, error text, the state a failure hit."""
        out = {i: ArcJob(i, None) for i in ids}
        if not ids:
            return out
        for job in self._jobs_action("info", ids):
            job_id = job.get("id")
            if job_id not in out or str(job.get("status-code")) != "200":
                continue
            activity = (job.get("info_document") or {}).get("ComputingActivity") or {}
            states = [str(s) for s in _as_list(activity.get("State"))]
            rest = next((s.split(":", 1)[1] for s in states if s.startswith("arcrest:")), None)
            failed_in = ""
            for s in states:    # e.g. nordugrid:FAILED::PREPARING or nordugrid:KILLED::INLRMS
                if s.startswith("nordugrid:") and "::" in s:
                    failed_in = s.split("::", 1)[1]
            if not failed_in:
                restart = [str(s) for s in _as_list(activity.get("RestartState"))]
                failed_in = next((s.split(":", 1)[1] for s in restart
                                  if s.startswith("nordugrid:")), "")
            exit_code = activity.get("ExitCode")
            try:
                exit_code = int(exit_code) if exit_code not in (None, "") else None
            except (TypeError, ValueError):
                exit_code = None
            errors = _as_list(activity.get("Error"))
            out[job_id] = ArcJob(job_id, rest, exit_code, "; ".join(str(e) for e in errors),
                                 failed_in, activity)
        return out

    def delegate(self, lifetime_s: int = 12 * 3600) -> tuple[str, int]:
        """Delegate the proxy to the CE (REST ``delegations``): the CE makes a key and a CSR, we
        sign it with the proxy's key as an RFC 3820 proxy (inherit all). Returns the delegation
        id, to be named in the xRSL ``delegationid``, and the new certificate's serial."""
        import datetime
        import secrets

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        resp = self.request("POST", "/delegations?action=new")
        location = resp.headers.get("Location", "")
        delegation_id = location.rstrip("/").rsplit("/", 1)[-1]
        if resp.status_code != 201 or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", delegation_id):
            raise SchedulerError(f"ARC CE {self.base}: no delegation id in the reply "
                                 f"({resp.status_code}, Location {location!r})")
        try:
            public_key = csr_public_key(resp.content)
            with open(self.proxy, "rb") as fh:
                pem = fh.read()
            chain = x509.load_pem_x509_certificates(pem)
            key = serialization.load_pem_private_key(pem, None)
        except (OSError, ValueError, TypeError) as exc:
            raise SchedulerError(f"ARC CE {self.base}: cannot delegate ({exc})") from None
        issuer = chain[0]
        serial = secrets.randbits(63)
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name(list(issuer.subject.rdns) + [x509.RelativeDistinguishedName(
            [x509.NameAttribute(NameOID.COMMON_NAME, str(serial))])])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
                .public_key(public_key).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(min(issuer.not_valid_after_utc,
                                     now + datetime.timedelta(seconds=lifetime_s)))
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                             False, False), critical=True)
                .add_extension(x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(PROXY_CERT_INFO_OID), PROXY_INHERIT_ALL),
                               critical=True)
                .sign(key, hashes.SHA256()))
        body = cert.public_bytes(serialization.Encoding.PEM) + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in chain)
        self.request("PUT", f"/delegations/{delegation_id}", data=body,
                     headers={"Content-Type": "application/x-pem-file"})
        log.info("delegated proxy to %s as %s", self.base, delegation_id)
        return delegation_id, serial

    def control_state(self, job_id: str) -> tuple[str | None, str]:
        """The job manager's own state (``diagnose/status``, which does not lag like the REST
        state) and, once FINISHED, its failure text (``diagnose/failed``, '' for success)."""
        check_job_id(job_id)
        resp = self.request("GET", f"/jobs/{job_id}/diagnose/status")
        if resp.status_code == 404:
            return None, ""
        state = resp.text.strip() or None
        reason = ""
        if state == "FINISHED":
            failed = self.request("GET", f"/jobs/{job_id}/diagnose/failed")
            reason = failed.text.strip() if failed.status_code == 200 else ""
        return state, reason

    def fresh(self, job: ArcJob) -> ArcJob:
        """``job`` as the job manager sees it now, when it ended but REST does not say so yet."""
        if job.state is None or job.state in FINAL_REST_STATES:
            return job
        state, reason = self.control_state(job.id)
        if state != "FINISHED":
            return job
        if not reason:
            return ArcJob(job.id, "FINISHED", 0, "", "", job.raw)
        lower = reason.lower()
        if "cancel" in lower:
            return ArcJob(job.id, "KILLED", None, reason, "INLRMS", job.raw)
        failed_in = ("PREPARING" if "pre-processing" in lower or "download" in lower else
                     "FINISHING" if "post-processing" in lower or "upload" in lower else
                     "INLRMS" if "lrms" in lower else "")
        # "Failed in data staging" says neither way: the job's log says from where it went to
        # FINISHING (PREPARING: stage-in; INLRMS: the payload or, if it ran fine, stage-out)
        errors = self.request("GET", f"/jobs/{job.id}/diagnose/errors")
        moves = re.findall(r"Job state change (\w+) -> FINISHING", errors.text) \
            if errors.status_code == 200 else []
        if moves and moves[-1] in ("ACCEPTED", "PREPARING"):
            failed_in = "PREPARING"
        elif moves and moves[-1] in ("SUBMIT", "INLRMS") and failed_in != "INLRMS":
            failed_in = "FINISHING"
        exit_code = None
        diag = self.request("GET", f"/jobs/{job.id}/diagnose/diag")
        match = re.search(r"^exitcode=(-?\d+)\s*$", diag.text, re.M) if diag.status_code == 200 else None
        if match:
            exit_code = int(match.group(1))
        return ArcJob(job.id, "FAILED", exit_code, reason, failed_in, job.raw)

    def kill(self, ids: list[str]) -> dict[str, str]:
        """Ask the CE to kill; returns each id's status code (202 queued, 404 unknown, ...)."""
        if not ids:
            return {}
        return {j.get("id"): str(j.get("status-code")) for j in self._jobs_action("kill", ids)}

    def clean(self, ids: list[str]) -> dict[str, str]:
        """Remove finished jobs and their session directories from the CE."""
        if not ids:
            return {}
        return {j.get("id"): str(j.get("status-code")) for j in self._jobs_action("clean", ids)}

    def session_file(self, job_id: str, name: str, max_bytes: int = 1 << 20) -> bytes | None:
        """A file of the job's session directory (e.g. its stdout), None if not there."""
        check_job_id(job_id)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*", name) or ".." in name:
            raise SchedulerError(f"refusing session file name {name!r}")
        resp = self.request("GET", f"/jobs/{job_id}/session/{name}", stream=True)
        if resp.status_code == 404:
            return None
        data = resp.raw.read(max_bytes + 1, decode_content=True)
        resp.close()
        return data[:max_bytes]


def _der_items(data: bytes, pos: int, end: int):
    """(tag, start, content start, end) of each DER item between ``pos`` and ``end``."""
    while pos < end:
        tag, length, header = data[pos], data[pos + 1], 2
        if length & 0x80:
            n = length & 0x7F
            length, header = int.from_bytes(data[pos + 2:pos + 2 + n], "big"), 2 + n
        yield tag, pos, pos + header, pos + header + length
        pos += header + length


def csr_public_key(pem: bytes):
    """The public key of a PEM CSR. A-REX's CSRs say version 2, which ``cryptography`` refuses
    to load, so the SubjectPublicKeyInfo is taken out of the DER directly."""
    import base64

    from cryptography.hazmat.primitives.serialization import load_der_public_key

    lines = [line for line in pem.strip().splitlines() if line and not line.startswith(b"-----")]
    try:
        der = base64.b64decode(b"".join(lines), validate=True)
        _, _, body, end = next(_der_items(der, 0, len(der)))          # CertificationRequest
        _, _, info, info_end = next(_der_items(der, body, end))        # CertificationRequestInfo
        items = list(_der_items(der, info, info_end))   # version, subject, SPKI, attributes
        _, start, _, stop = items[2]
        return load_der_public_key(der[start:stop])
    except (ValueError, IndexError, StopIteration) as exc:
        raise ValueError(f"not a certificate request: {exc}") from None


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise SchedulerError(f"not an ARC job id: {job_id!r}")
    return job_id


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


def job_xrsl(command: list[str], *, name: str, walltime_s: int, cores: int = 1,
             memory_mb: int = 2000, env: dict[str, str] | None = None,
             stdout: str = "pilot.out", stderr: str = "pilot.err",
             input_files: list[tuple[str, str]] | None = None,
             output_files: list[tuple[str, str]] | None = None, queue: str | None = None,
             runtime_environments: list[str] | None = None, extra_xrsl: str = "") -> str:
    """An xRSL job: argv, environment, resources, files ARC stages in and out.

    ``input_files``/``output_files`` are (name in the session dir, URL) pairs; an empty URL in
    ``output_files`` keeps the file on the CE. stdout and stderr are always kept.
    """
    if not command:
        raise SchedulerError("job has an empty command")
    cores = max(1, int(cores))
    argv, env = list(command), dict(env or {})
    if any(c in arg for arg in argv for c in "$`"):
        # A-REX's job script puts each argument in double quotes, escaping only " and \\, so
        # the script's shell expands $ and `. Such an argv travels in an environment variable
        # (exported single-quoted) that the script's own expansion hands over as one word.
        env[ARGV_VAR] = "exec " + shlex.join(argv)
        argv = ["/bin/sh", "-c", "$" + ARGV_VAR]
    parts = ["&", xrsl_relation("executable", argv[0])]
    if len(argv) > 1:
        parts.append(xrsl_relation("arguments", *argv[1:]))
    outputs = [(stdout, ""), (stderr, "")] + list(output_files or [])
    parts += [
        xrsl_relation("jobname", name),
        xrsl_relation("stdout", stdout),
        xrsl_relation("stderr", stderr),
        xrsl_relation("gmlog", "gmlog"),
        xrsl_list("outputFiles", outputs),
        xrsl_relation("walltime", max(1, math.ceil(walltime_s / 60))),   # minutes
        xrsl_relation("count", cores),
        xrsl_relation("memory", max(1, math.ceil(memory_mb / cores))),   # MB per core
    ]
    if input_files:
        parts.append(xrsl_list("inputFiles", list(input_files)))
    if env:
        for key in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise SchedulerError(f"environment name {key!r} is not a valid variable name")
        parts.append(xrsl_list("environment", sorted(env.items())))
    if queue:
        parts.append(xrsl_relation("queue", queue))
    for rte in runtime_environments or []:
        parts.append(xrsl_relation("runtimeenvironment", rte))
    if extra_xrsl:
        parts.append(extra_xrsl)
    return "".join(parts)


def pilot_xrsl(spec: PilotSpec, queue: str | None = None,
               runtime_environments: list[str] | None = None, extra_xrsl: str = "") -> str:
    """The xRSL of one pilot: its argv, environment and resources; stdout/err kept on the CE."""
    if not spec.command:
        raise SchedulerError("pilot spec has an empty command")
    return job_xrsl(spec.command, name=spec.name, walltime_s=spec.walltime_s, cores=spec.cores,
                    memory_mb=spec.memory_mb, env=spec.env, queue=queue,
                    runtime_environments=runtime_environments, extra_xrsl=extra_xrsl)


class ArcBackend(SchedulerBackend):
    """Options: ``ce`` (CE host or A-REX URL, required), ``proxy``, ``ca_dir``, ``queue``,
    ``runtime_environments``, ``extra_xrsl``, ``timeout_s``, ``push`` (push mode, read by the
    factory), ``clean_finished``, ``fast_states``, ``delegate``. See docs/arc.md."""

    name = "arc"
    supports_push = True

    def __init__(self, ce: str = "", proxy: str | None = None, ca_dir: str | None = None,
                 queue: str | None = None, runtime_environments: list[str] | None = None,
                 extra_xrsl: str = "", timeout_s: float = 30.0, push: bool = False,
                 clean_finished: bool = False, fast_states: bool = False,
                 delegate: bool = False, **options) -> None:
        super().__init__(ce=ce, proxy=proxy, ca_dir=ca_dir, queue=queue, push=push, **options)
        if options:
            raise SchedulerError(f"arc backend: unknown option(s) {', '.join(sorted(options))}")
        if isinstance(runtime_environments, str):
            runtime_environments = [runtime_environments]
        self.client = ArcRestClient(ce, proxy, ca_dir, timeout_s)
        self.queue = queue or None
        self.runtime_environments = list(runtime_environments or [])
        self.extra_xrsl = extra_xrsl or ""
        self.push = bool(push)
        self.clean_finished = bool(clean_finished)
        self.fast_states = bool(fast_states)
        self.delegate = bool(delegate)
        self._delegation: tuple[str, float] | None = None    # (id, when made)

    @classmethod
    def push_driver(cls, site_config: dict[str, Any], server_url: str, token: str,
                    state_dir: Path) -> PushDriver:
        """The site's ``ArcPushDriver`` (schedulers/arc_push.py): ARC stages the data and runs
        the jobs."""
        from .arc_push import ArcPushDriver

        options = {k: v for k, v in site_config["scheduler"]["options"].items() if k != "push"}
        config = {**site_config, "scheduler": {"backend": cls.name, "options": options}}
        return ArcPushDriver.from_site(config, server_url, token, state_dir)

    def delegation_xrsl(self) -> str:
        """``(delegationid=...)`` for the next job when delegating; a delegation is made once
        and renewed after half its 12 h lifetime."""
        if not self.delegate:
            return ""
        if self._delegation is None or time.time() - self._delegation[1] > DELEGATION_RENEW_S:
            delegation_id, _ = self.client.delegate()
            self._delegation = (delegation_id, time.time())
        return xrsl_relation("delegationid", self._delegation[0])

    def submit(self, spec: PilotSpec) -> str:
        xrsl = pilot_xrsl(spec, self.queue, self.runtime_environments,
                          self.extra_xrsl + self.delegation_xrsl())
        job_id = self.client.submit(xrsl)
        log.info("submitted pilot %s for %s to %s as %s", spec.name, spec.site, self.client.base,
                 job_id)
        return job_id

    def submit_xrsl(self, xrsl: str) -> str:
        """Submit a ready xRSL description (push mode builds its own)."""
        return self.client.submit(xrsl + self.delegation_xrsl())

    def jobs(self, batch_ids: list[str]) -> dict[str, ArcJob]:
        """``info`` of each job; with ``fast_states``, ended jobs are seen without REST's lag."""
        jobs = self.client.info(list(batch_ids))
        if self.fast_states:
            jobs = {i: self.client.fresh(j) for i, j in jobs.items()}
        return jobs

    def status(self, batch_ids: list[str]) -> dict[str, BatchState]:
        states = self.client.states(list(batch_ids))
        if self.fast_states:
            for job_id, state in states.items():
                if state is not None and state not in FINAL_REST_STATES:
                    states[job_id] = self.client.fresh(ArcJob(job_id, state)).state
        out = {i: ARC_STATES.get(s or "", BatchState.UNKNOWN) for i, s in states.items()}
        if self.clean_finished:
            done = [i for i, s in out.items() if s in (BatchState.DONE, BatchState.FAILED,
                                                       BatchState.CANCELLED)
                    and states[i] != "KILLING"]
            if done:
                self._clean(done)
        return out

    def details(self, batch_ids: list[str]) -> dict[str, BatchInfo]:
        out: dict[str, BatchInfo] = {}
        for job_id, job in self.jobs(list(batch_ids)).items():
            out[job_id] = BatchInfo(job.batch_state, job.exit_code, job.error)
        return out

    def cancel(self, batch_ids: list[str]) -> None:
        codes = self.client.kill(list(batch_ids))
        bad = {i: c for i, c in codes.items() if c not in ("200", "201", "202", "404", "409")}
        if bad:
            raise SchedulerError(f"ARC CE {self.client.base} did not accept kill for "
                                 + ", ".join(f"{i} ({c})" for i, c in bad.items()))
        log.info("asked %s to kill %d job(s)", self.client.base, len(batch_ids))

    def _clean(self, ids: list[str]) -> None:
        try:
            self.client.clean(ids)
        except SchedulerError as exc:
            log.warning("could not clean finished jobs on %s: %s", self.client.base, exc)
