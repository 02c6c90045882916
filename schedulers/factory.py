"""The pilot factory: keep every online site supplied with just enough pilots.

Like Harvester's submitter, the factory owns policy and nothing else: each cycle it refreshes the
states of the pilots it submitted, asks the server how many jobs wait (activated) at each site,
submits the pilots still missing within the site's limits (max queued, max running, submissions
per minute), stops feeding a site whose pilots keep failing (and says why: log, report, cycle
summary), and reports every pilot to the server. Pilots are remembered in ``--state-dir`` so a
restarted factory keeps tracking the ones it left running.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from panda_core import PILOT_VERSION_PATTERN
from panda_core.client import ApiClient, ClientError, Refused
from panda_core.siteconfig import PILOT_RESERVE_S, SiteConfig
from panda_core.trust import key_fingerprint, normalise_fingerprint

from .base import (FINAL_BATCH_STATES, BatchState, PilotSpec, PushDriver, SchedulerBackend,
                   SchedulerError, backend_class)

log = logging.getLogger(__name__)

STATE_FILE = "factory-pilots.json"
#: how the batch job starts the pilot: ``onefile`` fetches, verifies and runs the server's pilot
#: file (the node needs only python3; schedulers/bootstrap.py), ``installed`` runs this host's
#: ``python -m panda_wms.cli pilot`` (the node must have panda-wms installed)
PILOT_LAUNCHES = ("onefile", "installed")
PILOT_VERSION_TTL_S = 300.0


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


@dataclass
class PilotRecord:
    """One pilot as the factory knows it; ``to_report()`` is what the server receives."""
    batch_id: str
    site: str
    backend: str
    state: str = BatchState.QUEUED.value
    submitted: float = 0.0
    updated: float = 0.0
    exit_code: int | None = None
    reason: str = ""
    workdir: str = ""
    running_since: float | None = None
    unknown_cycles: int = 0
    reported: bool = False        # the server has seen the current state

    @property
    def final(self) -> bool:
        return BatchState(self.state) in FINAL_BATCH_STATES

    def to_report(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "site": self.site, "backend": self.backend,
                "state": self.state, "submitted": iso(self.submitted),
                "updated": iso(self.updated), "exit_code": self.exit_code, "reason": self.reason}


@dataclass
class SiteHealth:
    """Why a site is or is not fed: consecutive failures and the stop that follows them."""
    consecutive_failures: int = 0
    last_failure: str = ""
    disabled_since: float | None = None
    disabled_reason: str = ""
    submit_times: deque = field(default_factory=deque)


@dataclass
class SiteCycle:
    """What one cycle did at one site (the ``--once`` output and the tests read it)."""
    site: str
    activated: int | None = None
    queued: int = 0
    running: int = 0
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    skipped: str = ""             # why nothing was submitted, if that was a decision
    cancelled: int = 0            # queued pilots cancelled because the site stopped taking work
    unfit: str = ""               # why activated jobs do not fit this factory's pilots
    errors: list[str] = field(default_factory=list)


@dataclass
class CycleReport:
    sites: dict[str, SiteCycle] = field(default_factory=dict)
    reported: int = 0
    report_error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Factory:
    """Drive pilots for ``sites`` against the server at ``server_url`` (in-process or as a daemon).

    ``token`` authenticates the factory's own calls (report, activated count); ``pilot_token`` is
    put into each pilot's environment as ``PANDA_AUTH_TOKEN``. ``pilot_args`` are appended to the
    pilot's command line. ``server_key_fingerprint`` pins the server's job-signing key for every
    pilot (a site's ``trust`` section may pin its own), ``ca_file``/``ca_dir`` verify the
    server's https certificate, the factory's own calls and (unless the site names its own) the
    pilots'. A site's ``trust`` also names the programs its copytools may run and the variables
    its payloads get: all of it reaches the pilot on its command line (``pilot_trust_args``). After ``max_failures`` failed pilots in a row a site gets no pilots for
    ``failure_backoff_s``; then one probe pilot is allowed, and a success feeds the site again.
    Pilots needed = activated jobs - queued pilots - pilots running for less than
    ``startup_grace_s`` (they are about to take a job), within the site's limits.
    ``pilot_launch``: ``onefile`` (the batch job fetches and verifies the server's pilot file,
    the node needs only ``node_python``, default the node's ``python3``) or ``installed``
    (``python -m panda_wms.cli pilot`` with this interpreter; panda-wms on every node).
    """

    def __init__(self, server_url: str, sites: list[SiteConfig], *, factory_id: str | None = None,
                 token: str | None = None, pilot_token: str | None = None,
                 state_dir: str | os.PathLike | None = None, pilot_args: list[str] | None = None,
                 max_failures: int = 5, failure_backoff_s: float = 600.0,
                 http_timeout: float = 10.0, keep_final_s: float = 86400.0,
                 startup_grace_s: float = 60.0,
                 server_key_fingerprint: str | None = None,
                 ca_file: str | None = None, ca_dir: str | None = None,
                 clock: Callable[[], float] = time.time,
                 backends: dict[str, SchedulerBackend] | None = None,
                 pilot_launch: str = "installed", node_python: str | None = None) -> None:
        self.server_url = server_url.rstrip("/")
        self.sites = {s.name: s for s in sites}
        self.state_dir = Path(state_dir) if state_dir else Path.cwd() / "panda-factory"
        self.factory_id = factory_id or f"factory@{socket.gethostname()}"
        self.pilot_token = pilot_token
        self.pilot_args = list(pilot_args or [])
        self.max_failures = max_failures
        self.failure_backoff_s = failure_backoff_s
        self.http_timeout = http_timeout
        self.keep_final_s = keep_final_s
        self.startup_grace_s = startup_grace_s
        self.clock = clock
        self.server_key_fingerprint = (normalise_fingerprint(server_key_fingerprint)
                                       if server_key_fingerprint else None)
        self.ca_file, self.ca_dir = ca_file, ca_dir
        if pilot_launch not in PILOT_LAUNCHES:
            raise ValueError(f"pilot_launch must be one of {', '.join(PILOT_LAUNCHES)}, "
                             f"not {pilot_launch!r}")
        self.pilot_launch = pilot_launch
        self.node_python = node_python  # the nodes' python3 for one-file pilots (None: PATH's)
        self._server_pem: str | None = None
        self._pilot_default: tuple[float, str] | None = None
        self.api = ApiClient(self.server_url, token, timeout=http_timeout,
                             user_agent="panda-wms-factory", ca_file=ca_file, ca_dir=ca_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pilots: dict[tuple[str, str], PilotRecord] = {}     # (site, batch id) -> record
        self.health: dict[str, SiteHealth] = {name: SiteHealth() for name in self.sites}
        self._backends: dict[str, SchedulerBackend] = dict(backends or {})
        self._push_drivers: dict[str, PushDriver] = {}
        #: per site: (activated jobs, why some do not fit the pilots), from the last count
        self.unfit: dict[str, tuple[int, str]] = {}
        self._unfit_logged: dict[str, str] = {}
        self._load_state()

    # ------------------------------------------------------------------ persistence
    def _load_state(self) -> None:
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in fields(PilotRecord)}
            for item in data.get("pilots", []):
                rec = PilotRecord(**{k: v for k, v in item.items() if k in known})
                self.pilots[(rec.site, rec.batch_id)] = rec
            for name, h in data.get("health", {}).items():
                if name in self.health:
                    self.health[name] = SiteHealth(
                        consecutive_failures=h.get("consecutive_failures", 0),
                        last_failure=h.get("last_failure", ""),
                        disabled_since=h.get("disabled_since"),
                        disabled_reason=h.get("disabled_reason", ""))
        except (OSError, ValueError, TypeError) as exc:
            bad = path.with_suffix(".corrupt")
            os.replace(path, bad)
            log.error("factory state %s unreadable (%s): moved to %s, starting afresh",
                      path, exc, bad)
            self.pilots.clear()
            return
        log.info("factory state: %d pilot(s) remembered from %s", len(self.pilots), path)

    def save_state(self) -> None:
        path = self.state_dir / STATE_FILE
        data = {"factory": self.factory_id,
                "pilots": [asdict(p) for p in self.pilots.values()],
                "health": {name: {"consecutive_failures": h.consecutive_failures,
                                  "last_failure": h.last_failure,
                                  "disabled_since": h.disabled_since,
                                  "disabled_reason": h.disabled_reason}
                           for name, h in self.health.items()}}
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot save factory state to %s: %s", path, exc.strerror or exc)

    # ------------------------------------------------------------------ helpers
    def backend(self, site: SiteConfig) -> SchedulerBackend:
        """The site's backend, built once from its ``scheduler`` section."""
        if site.name not in self._backends:
            cls = backend_class(site.scheduler.backend)
            options = dict(site.scheduler.options)
            if cls.state_dir_option and cls.state_dir_option not in options:
                options[cls.state_dir_option] = str(self.state_dir / site.scheduler.backend)
            try:
                self._backends[site.name] = cls(**options)
            except TypeError as exc:
                raise SchedulerError(f"bad options for backend {site.scheduler.backend}: "
                                     f"{exc}") from None
        return self._backends[site.name]

    def pilot_command(self, site: SiteConfig) -> list[str]:
        args = ["--server", self.server_url, "--site", site.name,
                "--walltime", str(site.pilots.walltime_s),
                *self.pilot_trust_args(site), *self.pilot_args]
        if self.pilot_launch == "installed":
            return [sys.executable, "-m", "panda_wms.cli", "pilot", *args]
        from .bootstrap import batch_command, raw_key

        fingerprint = self.server_key_for(site)
        if fingerprint is None:
            raise SchedulerError(f"site {site.name}: a one-file pilot needs the server key "
                                 "pinned (trust.server_key_fingerprint, or the factory's "
                                 "--server-key-fingerprint): nothing else verifies its file")
        ca_file, ca_dir = self._pilot_ca(site)
        return batch_command(self.server_url, self.pilot_version(site),
                             raw_key(self.server_pem(), fingerprint), args,
                             ca_file=ca_file, ca_dir=ca_dir)

    def pilot_env(self) -> dict[str, str]:
        """The environment the batch job gets beyond the batch system's own."""
        env = {"PANDA_AUTH_TOKEN": self.pilot_token} if self.pilot_token else {}
        if self.node_python and self.pilot_launch == "onefile":
            env["PANDA_PYTHON"] = self.node_python
        return env

    def pilot_version(self, site: SiteConfig) -> str:
        """The pilot file version the site runs: its pin (``pilots.version``), else the
        server's default, asked at most every PILOT_VERSION_TTL_S seconds."""
        if site.pilots.version:
            return site.pilots.version
        now = self.clock()
        if self._pilot_default is None or now - self._pilot_default[0] > PILOT_VERSION_TTL_S:
            try:
                default = self.api.pilot_files()["default"]
            except ClientError as exc:
                raise SchedulerError(f"no pilot file version from the server: {exc}") from None
            if not re.fullmatch(PILOT_VERSION_PATTERN, default):   # it names a folder on nodes
                raise SchedulerError(f"the server's default pilot version {default[:80]!r} is "
                                     "not a version")
            self._pilot_default = (now, default)
        return self._pilot_default[1]

    def server_pem(self) -> str:
        """The server's job-signing key (PEM), asked once; the caller checks its fingerprint."""
        if self._server_pem is None:
            try:
                self._server_pem = str(self.api.call("system", "get_public_key"))
            except ClientError as exc:
                raise SchedulerError(f"cannot get the server's public key: {exc}") from None
        return self._server_pem

    def _pilot_ca(self, site: SiteConfig) -> tuple[str | None, str | None]:
        """The CA bundle and folder a pilot of ``site`` verifies the server's https with."""
        if site.trust.ca_bundle or site.trust.ca_dir:
            return site.trust.ca_bundle or None, site.trust.ca_dir or None
        return self.ca_file, self.ca_dir

    def server_key_for(self, site: SiteConfig) -> str | None:
        """The fingerprint of the server key the site's pilots pin: the site's own
        (``trust.server_key_fingerprint``, or of the PEM file ``trust.server_public_key``),
        else the factory's; SchedulerError when the site's PEM file is unusable."""
        trust = site.trust
        try:
            if trust.server_key_fingerprint:
                return normalise_fingerprint(trust.server_key_fingerprint)
            if trust.server_public_key:
                return key_fingerprint(Path(trust.server_public_key).read_bytes())
        except (OSError, ValueError) as exc:
            raise SchedulerError(f"site {site.name}: trust.server_public_key: {exc}") from None
        return self.server_key_fingerprint

    def pilot_trust_args(self, site: SiteConfig) -> list[str]:
        """The pilot options that carry what the deployment trusts (docs/security.md)."""
        args: list[str] = []
        fingerprint = self.server_key_for(site)
        if fingerprint:
            args += ["--public-key-fingerprint", fingerprint]
        ca_file, ca_dir = self._pilot_ca(site)
        if ca_file:
            args += ["--ca-bundle", ca_file]
        if ca_dir:
            args += ["--ca-dir", ca_dir]
        for program in site.trust.copytool_programs:
            args += ["--allow-program", program]
        for name in site.trust.payload_env:
            args += ["--payload-env", name]
        return args

    def _api(self, module: str, method: str, refusal: str, http: str = "GET",
             **params: Any) -> Any:
        """``data`` of ``/api/v1/<module>/<method>``; RuntimeError naming the URL on any failure
        (unreachable, no JSON, success false: ``<url><refusal> (HTTP n): message``)."""
        try:
            return self.api.call(module, method, http, **params)
        except Refused as exc:
            raise RuntimeError(f"{exc.url}{refusal} (HTTP {exc.http_status}): "
                               f"{exc.reason}") from None
        except ClientError as exc:
            raise RuntimeError(str(exc)) from None

    def pilot_reserve_s(self) -> float:
        """The reserve our pilots keep (their ``--reserve``, if ``pilot_args`` set one)."""
        args = self.pilot_args
        for i, arg in enumerate(args):
            try:
                if arg == "--reserve" and i + 1 < len(args):
                    return float(args[i + 1])
                if arg.startswith("--reserve="):
                    return float(arg.split("=", 1)[1])
            except ValueError:
                break
        return float(PILOT_RESERVE_S)

    def pilot_fit(self, site: SiteConfig) -> dict[str, int]:
        """What a pilot of ours asks for at ``site``: the batch wall time minus its reserve,
        and the cores and memory the batch job gets (when the site config says)."""
        fit = {"walltime_s": max(1, int(site.pilots.walltime_s - self.pilot_reserve_s()))}
        if site.resources.cores:
            fit["cores"] = site.resources.cores
        if site.resources.memory_mb:
            fit["memory_mb"] = site.resources.memory_mb
        return fit

    def activated_count(self, site: str) -> int:
        """Jobs waiting at ``site`` that our pilots can take (the server's ``fitting`` count
        for :meth:`pilot_fit`; all activated jobs from a server that does not count them);
        those that cannot fit are noted in ``unfit``. RuntimeError naming the URL on failure."""
        config = self.sites.get(site)
        # push mode takes jobs for the CE whatever their size: no pilot's limits apply
        fit = self.pilot_fit(config) if config is not None and not self.is_push(config) else {}
        data = self._api("pilot", "activated_count", f"?site={site} refused", site=site, **fit)
        count = data.get("activated") if isinstance(data, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise RuntimeError(f"{self.server_url}/api/v1/pilot/activated_count?site={site} "
                               f"answered no activated count: {data!r}")
        fitting = data.get("fitting", count)
        if not isinstance(fitting, int) or isinstance(fitting, bool) or not 0 <= fitting <= count:
            fitting = count
        if fitting < count:
            self.unfit[site] = (count, str(data.get("reason") or
                                           f"{count - fitting} activated job(s) do not fit"))
        else:
            self.unfit.pop(site, None)
        return fitting

    def _note_unfit(self, site: str, cycle: SiteCycle) -> None:
        """Say (once per new reason) that jobs wait which no pilot of ours could take."""
        activated, reason = self.unfit.get(site, (0, ""))
        cycle.unfit = reason
        if reason and self._unfit_logged.get(site) != reason:
            log.warning("site %s: %d activated job(s) do not fit the pilots this factory "
                        "sends (wall time %d s minus a %g s reserve, cores, memory): %s; no "
                        "pilots are sent for them", site, activated,
                        self.sites[site].pilots.walltime_s, self.pilot_reserve_s(), reason)
        if reason:
            self._unfit_logged[site] = reason
        else:
            self._unfit_logged.pop(site, None)

    def site_states(self) -> dict[str, dict[str, Any]]:
        """Per site: is the factory feeding it, and if not, why (sent along with each report)."""
        out = {}
        for name, site in self.sites.items():
            health = self.health[name]
            if not site.online:
                why = f"site status is {site.status}"
            else:
                why = health.disabled_reason
            out[name] = {"submitting": site.online and health.disabled_since is None,
                         "reason": why, "consecutive_failures": health.consecutive_failures}
        return out

    def report(self, records: list[PilotRecord]) -> None:
        """POST the pilots to the server; raises RuntimeError naming the URL on failure."""
        self._api("pilot", "report", " refused the report", "POST", factory=self.factory_id,
                  pilots=[r.to_report() for r in records], sites=self.site_states())

    # ------------------------------------------------------------------ one cycle
    def run_once(self) -> CycleReport:
        """Refresh, submit and report once for every site; never raises for one site's trouble."""
        report = CycleReport()
        for site in self.sites.values():
            cycle = report.sites[site.name] = SiteCycle(site.name)
            try:
                self._refresh(site, cycle)
                if site.online and self.is_push(site):
                    self._push(site, cycle)
                elif site.online:
                    self._supply(site, cycle)
                else:
                    if self.is_push(site):      # jobs already on the CE are still followed
                        self.push_driver(site).poll()
                    cycle.skipped = f"site status is {site.status}"
                    # pilots still waiting in the batch system would only find no job: free
                    # the slots; running pilots finish the job they have
                    cycle.cancelled = self._cancel(site, {BatchState.QUEUED.value},
                                                   f"site status is {site.status}")
            except SchedulerError as exc:
                cycle.errors.append(str(exc))
                log.error("site %s: %s", site.name, exc)
            except Exception as exc:          # noqa: BLE001 - one site's bug must not stop all
                cycle.errors.append(f"{type(exc).__name__}: {exc}")
                log.exception("site %s: unexpected error", site.name)
        self._prune()
        pending = [p for p in self.pilots.values() if not p.reported]
        if pending:
            try:
                self.report(pending)
                for p in pending:
                    p.reported = True
                report.reported = len(pending)
            except RuntimeError as exc:
                report.report_error = str(exc)
                log.warning("pilot report failed (will retry next cycle): %s", exc)
        self.save_state()
        return report

    def _refresh(self, site: SiteConfig, cycle: SiteCycle) -> None:
        live = [p for (s, _), p in self.pilots.items() if s == site.name and not p.final]
        if not live:
            return
        infos = self.backend(site).details([p.batch_id for p in live])
        now = self.clock()
        health = self.health[site.name]
        for rec in live:
            info = infos.get(rec.batch_id)
            if info is None:
                continue
            if info.state != BatchState.UNKNOWN:
                rec.unknown_cycles = 0
            else:
                rec.unknown_cycles += 1
                if rec.unknown_cycles < 3:      # a batch system may briefly not list a new job
                    continue
                info.reason = info.reason or "the batch system lost track of this pilot"
            if info.state.value == rec.state and info.exit_code == rec.exit_code:
                continue
            rec.state = (BatchState.FAILED if info.state == BatchState.UNKNOWN
                         else info.state).value
            rec.exit_code, rec.reason = info.exit_code, info.reason or rec.reason
            rec.updated, rec.reported = now, False
            if info.state == BatchState.RUNNING and rec.running_since is None:
                rec.running_since = now
            if info.state == BatchState.DONE:
                cycle.finished += 1
                self._succeeded(site, health)
            elif rec.state == BatchState.FAILED.value:
                cycle.failed += 1
                self._failed(site, health, f"pilot {rec.batch_id} failed: "
                             f"{rec.reason or f'exit code {rec.exit_code}'}")

    def _succeeded(self, site: SiteConfig, health: SiteHealth) -> None:
        if health.disabled_since is not None:
            log.info("site %s: a pilot succeeded again: submitting resumes", site.name)
        health.consecutive_failures, health.disabled_since, health.disabled_reason = 0, None, ""

    def _failed(self, site: SiteConfig, health: SiteHealth, why: str) -> None:
        health.consecutive_failures += 1
        health.last_failure = why
        if health.consecutive_failures >= self.max_failures:
            first = health.disabled_since is None
            health.disabled_since = self.clock()
            health.disabled_reason = (f"{health.consecutive_failures} pilots in a row failed; "
                                      f"last: {why}")
            if first:
                log.error("site %s: stopped submitting pilots: %s (retry with one pilot in "
                          "%.0f s)", site.name, health.disabled_reason, self.failure_backoff_s)

    def _supply(self, site: SiteConfig, cycle: SiteCycle) -> None:
        mine = [p for (s, _), p in self.pilots.items() if s == site.name and not p.final]
        cycle.queued = sum(p.state in (BatchState.QUEUED.value, BatchState.UNKNOWN.value)
                           for p in mine)
        cycle.running = sum(p.state == BatchState.RUNNING.value for p in mine)
        health = self.health[site.name]
        now = self.clock()
        # a pilot that started only just now has probably not asked for its job yet
        starting = sum(p.state == BatchState.RUNNING.value and p.running_since is not None
                       and now - p.running_since < self.startup_grace_s for p in mine)
        probe = False
        if health.disabled_since is not None:
            if now - health.disabled_since < self.failure_backoff_s:
                cycle.skipped = f"not submitting: {health.disabled_reason}"
                return
            probe = True                       # the back-off is over: one pilot tests the site
        try:
            cycle.activated = self.activated_count(site.name)
        except RuntimeError as exc:
            cycle.errors.append(str(exc))
            cycle.skipped = "no activated count from the server"
            log.warning("site %s: %s", site.name, exc)
            return
        self._note_unfit(site.name, cycle)
        limits = site.pilots
        while health.submit_times and now - health.submit_times[0] >= 60:
            health.submit_times.popleft()
        wanted = min(cycle.activated - cycle.queued - starting,
                     limits.max_queued - cycle.queued,
                     limits.max_running - cycle.queued - cycle.running,
                     limits.rate_per_minute - len(health.submit_times))
        if probe:
            if cycle.queued + cycle.running > 0:
                cycle.skipped = "waiting for the probe pilot"
                return
            wanted = min(wanted, 1)
        if wanted <= 0:
            if cycle.activated == 0 and cycle.unfit:
                cycle.skipped = f"no activated job fits the pilots: {cycle.unfit}"
            elif cycle.activated == 0:
                cycle.skipped = "no activated jobs"
            elif len(health.submit_times) >= limits.rate_per_minute:
                cycle.skipped = f"rate limit of {limits.rate_per_minute} per minute reached"
            else:
                cycle.skipped = "site limits reached (max_queued/max_running)"
            return
        backend = self.backend(site)
        for _ in range(wanted):
            workdir = self.state_dir / "pilots" / site.name / f"{int(now * 1000)}-{os.urandom(3).hex()}"
            spec = PilotSpec(site=site.name, command=self.pilot_command(site),
                             walltime_s=site.pilots.walltime_s, cores=site.resources.cores,
                             memory_mb=site.resources.memory_mb, workdir=str(workdir),
                             name=f"pilot-{site.name}"[:64],
                             env=self.pilot_env())
            try:
                batch_id = backend.submit(spec)
            except SchedulerError as exc:
                cycle.errors.append(f"submit failed: {exc}")
                log.error("site %s: pilot submission failed: %s", site.name, exc)
                self._failed(site, health, f"submission failed: {exc}")
                break
            health.submit_times.append(now)
            self.pilots[(site.name, batch_id)] = PilotRecord(
                batch_id=batch_id, site=site.name, backend=site.scheduler.backend,
                submitted=now, updated=now, workdir=str(workdir))
            cycle.submitted += 1
            cycle.queued += 1
            if probe:
                health.disabled_since = now    # the probe restarts the back-off clock
                break
        if cycle.submitted:
            log.info("site %s: submitted %d pilot(s) (%d activated job(s), %d queued, "
                     "%d running)", site.name, cycle.submitted, cycle.activated,
                     cycle.queued, cycle.running)

    # ------------------------------------------------------------------ push mode
    @staticmethod
    def is_push(site: SiteConfig) -> bool:
        """Push mode (no pilot; the factory takes the jobs, the backend runs them): the site asks
        for it with ``push: true`` and its backend ``supports_push``."""
        return (bool(site.scheduler.options.get("push"))
                and backend_class(site.scheduler.backend).supports_push)

    def push_driver(self, site: SiteConfig) -> PushDriver:
        """The site's push driver; its jobs in flight live in ``<state dir>/push/<site>``."""
        driver = self._push_drivers.get(site.name)
        if driver is None:
            driver = backend_class(site.scheduler.backend).push_driver(
                site.to_dict(), self.server_url, self.pilot_token or "",
                self.state_dir / "push" / site.name)
            self._push_drivers[site.name] = driver
        return driver

    def _push(self, site: SiteConfig, cycle: SiteCycle) -> None:
        """Follow the site's jobs on the CE, then take more jobs within the site's limits:
        at most ``max_running`` on the CE, ``max_queued`` new ones per cycle, the rate."""
        driver = self.push_driver(site)
        driver.poll()
        in_flight = sum(t.final is None for t in driver.tracked())
        cycle.running = in_flight
        health = self.health[site.name]
        now = self.clock()
        try:
            cycle.activated = self.activated_count(site.name)
        except RuntimeError as exc:
            cycle.errors.append(str(exc))
            cycle.skipped = "no activated count from the server"
            return
        limits = site.pilots
        while health.submit_times and now - health.submit_times[0] >= 60:
            health.submit_times.popleft()
        wanted = min(cycle.activated, limits.max_queued, limits.max_running - in_flight,
                     limits.rate_per_minute - len(health.submit_times))
        if wanted <= 0:
            cycle.skipped = ("no activated jobs" if cycle.activated == 0 else
                             "site limits reached (max_queued/max_running/rate)")
            return
        taken = driver.fetch_and_submit(wanted)
        health.submit_times.extend([now] * len(taken))
        cycle.submitted = len(taken)
        if taken:
            log.info("site %s: %d job(s) pushed to the ARC CE: %s", site.name, len(taken),
                     ", ".join(map(str, taken)))

    def _prune(self) -> None:
        """Forget final pilots the server has seen once they are older than ``keep_final_s``,
        and remove their work dirs (the pilot's log stays there until then)."""
        now = self.clock()
        pilots_root = (self.state_dir / "pilots").resolve()
        for key, rec in list(self.pilots.items()):
            if rec.final and rec.reported and now - rec.updated > self.keep_final_s:
                del self.pilots[key]
                workdir = Path(rec.workdir).resolve() if rec.workdir else None
                if workdir and workdir.is_relative_to(pilots_root) and workdir != pilots_root:
                    shutil.rmtree(workdir, ignore_errors=True)

    def update_sites(self, sites: list[SiteConfig]) -> None:
        """Take new site configs (a sysadmin edited them). A site that disappeared is kept as
        offline so its pilots are still followed to their end; a changed scheduler section gets
        a new backend."""
        new = {s.name: s for s in sites}
        for name, old in self.sites.items():
            if name not in new:
                if old.status != "offline":
                    log.info("site %s: no longer configured: no new pilots", name)
                new[name] = replace(old, status="offline")
            elif new[name].scheduler != old.scheduler:
                self._backends.pop(name, None)
                self._push_drivers.pop(name, None)
        for name in new:
            self.health.setdefault(name, SiteHealth())
        self.sites = new

    # ------------------------------------------------------------------ daemon
    def run(self, stop_event: threading.Event, interval: float = 60.0,
            reload: Callable[[], list[SiteConfig] | None] | None = None) -> None:
        """Cycle every ``interval`` seconds until ``stop_event`` is set; then save and report.

        ``reload``, if given, is called before each cycle; a list it returns replaces the sites.
        """
        log.info("factory %s: %d site(s), server %s, every %.0f s", self.factory_id,
                 len(self.sites), self.server_url, interval)
        while not stop_event.is_set():
            try:
                if reload is not None:
                    sites = reload()
                    if sites is not None:
                        self.update_sites(sites)
                self.run_once()
            except Exception:                  # noqa: BLE001 - a daemon logs and carries on
                log.exception("factory cycle failed")
            stop_event.wait(interval)
        self.shutdown()

    def cancel_all(self) -> None:
        """Cancel every pilot still queued or running (``--cancel-on-exit``)."""
        for site in self.sites.values():
            self._cancel(site, {BatchState.QUEUED.value, BatchState.RUNNING.value},
                         "cancelled at factory shutdown")

    def _cancel(self, site: SiteConfig, states: set[str], reason: str) -> int:
        """Cancel the site's live pilots in ``states``; returns how many were cancelled."""
        live = [p for (s, _), p in self.pilots.items()
                if s == site.name and not p.final and p.state in states]
        if not live:
            return 0
        try:
            self.backend(site).cancel([p.batch_id for p in live])
        except SchedulerError as exc:
            log.error("site %s: cancel failed: %s", site.name, exc)
            return 0
        now = self.clock()
        for rec in live:
            rec.state, rec.reason = BatchState.CANCELLED.value, reason
            rec.updated, rec.reported = now, False
        log.info("site %s: cancelled %d pilot(s): %s", site.name, len(live), reason)
        return len(live)

    def shutdown(self) -> None:
        """Save the pilots and send a last report (best effort), so a restart loses nothing."""
        pending = [p for p in self.pilots.values() if not p.reported]
        if pending:
            try:
                self.report(pending)
                for p in pending:
                    p.reported = True
            except RuntimeError as exc:
                log.warning("last pilot report failed: %s", exc)
        self.save_state()
        log.info("factory %s stopped; %d pilot(s) remembered in %s", self.factory_id,
                 len(self.pilots), self.state_dir)
