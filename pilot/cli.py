"""``panda pilot``: get jobs from the server and run them while the batch slot's wall time lasts.

Only the standard library is imported before the first job is known: requests, psutil, pluggy's
entry-point scan and cryptography are loaded where they are first needed, so the pilot reaches the
payload in a fraction of a second.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from panda_core.siteconfig import PILOT_RESERVE_S

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more minutes, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="panda pilot", description="Run PanDA jobs on this node.")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:25080")
    p.add_argument("--site", required=True, help="site (PanDA queue) name")
    p.add_argument("--walltime", type=float, help="seconds this pilot may run (default: from "
                   "Slurm's SLURM_JOB_END_TIME or squeue, else unlimited)")
    p.add_argument("--workdir", default=os.environ.get("PANDA_PILOT_WORKDIR") or ".",
                   help="base folder for job work dirs; recovery looks here too")
    p.add_argument("--token-file", help="file holding the bearer token (else $PANDA_AUTH_TOKEN)")
    p.add_argument("--max-jobs", type=int, default=0, help="stop after N jobs (0: no limit)")
    p.add_argument("--timefloor", type=_minutes, metavar="MIN",
                   help="take another job only while the pilot has run less than MIN minutes "
                        "(default: the queue description's pilots.timefloor; 0: no floor, "
                        "jobs are taken while wall time remains)")
    p.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default: the "
                   "site's limits.heartbeat_s, 1800)")
    p.add_argument("--queuedata", help="read the queue description from this JSON file")
    p.add_argument("--public-key", help="PEM file of the server's job-signing key, pinned at "
                   "deployment (the factory passes it; `panda token public-key` prints it)")
    p.add_argument("--public-key-fingerprint", metavar="sha256:HEX",
                   help="the server's job-signing key by its fingerprint: the key the server "
                   "serves (or the one-file batch script carries) must have it (`panda token "
                   "public-key --fingerprint`). One of the two "
                   "is required: the pilot never trusts a key only because the server sent it")
    p.add_argument("--ca-bundle", help="CA bundle (file) that the server's https certificate is "
                   "verified against (default: the system's CAs)")
    p.add_argument("--ca-dir", help="folder of hashed CA certificates, for https")
    p.add_argument("--allow-program", action="append", default=[], metavar="PATH",
                   help="a program that a copytool option (xrdcp's `xrdcp`, `xrdfs`) may name; "
                   "repeatable. Without it a copytool runs only the program it finds on PATH")
    p.add_argument("--payload-env", action="append", default=[], metavar="NAME",
                   help="an environment variable (or PREFIX*) the payload gets beyond PATH, HOME, "
                   "LANG, LC_*, TZ, ... and what the pilot sets; repeatable")
    p.add_argument("--stdout-silent", type=float, default=None,
                   help="kill the payload (1502) when its stdout stays silent this many seconds "
                   "(default: the site's limits.stdout_silent_s if set, else off)")
    p.add_argument("--lost-heartbeat", type=float, default=0.0,
                   help="kill the payload (1317) when no heartbeat reached the server for this "
                   "many seconds (default 0: never; the final state is kept and sent later)")
    p.add_argument("--monitor-interval", type=float, default=10.0,
                   help="seconds between monitor checks (default 10)")
    p.add_argument("--debug-interval", type=float, default=30.0,
                   help="seconds between updates while the server has the job in debug mode "
                   "(default 30)")
    p.add_argument("--reserve", type=float, default=float(PILOT_RESERVE_S),
                   help="seconds kept before the wall-time end for stage-out and report")
    p.add_argument("--exit-time", type=_seconds, default=None, metavar="S",
                   help="seconds of the reserve (at most half of it) kept after the last call "
                   "to the server, to exit before the wall time's end: no update or final "
                   "report is retried past wall time minus S (default: a sixth of --reserve, "
                   "10 s of the default 60; the report is kept for a later pilot)")
    p.add_argument("--server-retries", type=int, default=5, help="attempts per server call")
    p.add_argument("--server-backoff", type=float, default=2.0,
                   help="first wait between attempts, doubled each time")
    p.add_argument("--transfer-backoff", type=float, default=1.0)
    p.add_argument("--log-cap-mb", type=float, default=50.0, help="log tarball size cap")
    p.add_argument("--keep-workdirs", action="store_true", help="keep job dirs after the report")
    p.add_argument("--no-recovery", action="store_true", help="do not recover dead pilots' jobs")
    p.add_argument("--es-batch", type=int, default=0, metavar="N",
                   help="event-service jobs: ranges per getEventRanges (default: the job's cores)")
    p.add_argument("--es-poll", type=float, default=10.0, metavar="S",
                   help="event-service jobs: when no range is ready but other jobs hold some, "
                   "ask again after S seconds (default 10)")
    p.add_argument("--log-level", default=None)
    return p.parse_args(argv)


def parse_slurm_time(text: str) -> float | None:
    """Slurm's ``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM`` (``%L`` of squeue) in seconds."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INVALID", "NOT_SET", "N/A"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    days = int(m.group(1) or 0)
    parts = [int(x) for x in m.group(2, 3, 4) if x is not None]
    if m.group(1):
        parts += [0] * (3 - len(parts))
        h, mi, s = parts
    elif len(parts) == 3:
        h, mi, s = parts
    elif len(parts) == 2:
        h, mi, s = 0, parts[0], parts[1]
    else:
        h, mi, s = 0, parts[0], 0
    return days * 86400 + h * 3600 + mi * 60 + s


def batch_deadline(env: dict[str, str], now: float) -> float | None:
    """When the batch slot ends, from Slurm's environment or ``squeue`` (None: unknown)."""
    end = env.get("SLURM_JOB_END_TIME")
    if end and end.isdigit():
        log.info("wall time from SLURM_JOB_END_TIME: %.0f s left", float(end) - now)
        return float(end)
    job_id = env.get("SLURM_JOB_ID")
    if job_id and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        left = parse_slurm_time(out.splitlines()[0] if out.strip() else "")
        if left is not None:
            log.info("wall time from squeue (job %s): %.0f s left", job_id, left)
        return None if left is None else now + left
    return None


def wipe_env_value(name: str) -> None:
    """Zero ``name``'s value in the process's original environment block.

    Removing it from ``os.environ`` keeps it from children, but ``/proc/<pid>/environ`` (readable
    by the payload, same user) shows that block as it was at exec time.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        libc.getenv.argtypes = [ctypes.c_char_p]
        libc.strlen.restype = ctypes.c_size_t
        libc.strlen.argtypes = [ctypes.c_void_p]
        ptr = libc.getenv(name.encode())
        if ptr:
            ctypes.memset(ptr, 0, libc.strlen(ptr))
    except (OSError, AttributeError):  # no libc to talk to: the pop below still protects children
        log.debug("could not wipe %s from the environment block", name)


def read_token(path: str | None) -> str | None:
    token = os.environ.get("PANDA_AUTH_TOKEN")
    if token is not None:
        wipe_env_value("PANDA_AUTH_TOKEN")
        os.environ.pop("PANDA_AUTH_TOKEN", None)   # never left where a child could see it
    if path:
        token = Path(path).read_text().strip()
    return token or None


def past_timefloor(n_jobs: int, elapsed_s: float, timefloor_min: float) -> bool:
    """PanDA's timefloor (minutes, from the queue description): after a job, a pilot asks for
    another only while it has run less than that. 0 means no floor: our pilot then keeps
    taking jobs while its wall time lasts (pilot 3 would take one)."""
    return n_jobs > 0 and timefloor_min > 0 and elapsed_s >= timefloor_min * 60


def job_request(cfg, site, node: dict, remaining: float | None) -> dict:
    """The getJob form (PanDA's names plus our pilotVersion, cores, remainingWalltime, and a
    fresh ``pilotNonce`` that the server signs into the spec it sends back)."""
    import secrets

    from .job import __version__

    cores = site.resources.cores or node["cores"]
    form = {"siteName": site.name, "computingElement": site.name, "prodSourceLabel": "managed",
            "node": node["node"], "cpu": node["cpu"], "mem": node["mem"],
            "diskSpace": node["diskSpace"], "resourceType": "MCORE" if int(cores) > 1 else "SCORE",
            "pilotVersion": __version__, "cores": cores, "pilotID": f"{node['node']}:{os.getpid()}",
            "pilotNonce": secrets.token_urlsafe(18)}
    if remaining is not None:
        form["remainingWalltime"] = int(remaining - cfg.reserve_s)
    if cfg.batch_id:
        form["batchID"] = cfg.batch_id
    return form


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from panda_core.logs import setup_logging

    setup_logging(args.log_level)
    started = time.time()
    from panda_core.client import ClientError, PilotClient, ProtocolError
    from panda_core.retry import RetryPolicy

    from panda_core.wire import Dispatch

    from .errors import ErrorCode, PilotError
    from .eventservice import EventServiceSettings
    from .job import JobRun, KillRequest, PilotConfig, pilot_version

    log.info("pilot %s on Python %s (%s)", pilot_version(), sys.version.split()[0],
             sys.executable)

    walltime = args.walltime
    deadline = started + walltime if walltime else batch_deadline(dict(os.environ), started)
    retry = RetryPolicy(attempts=max(1, args.server_retries), backoff_s=args.server_backoff)
    cfg = PilotConfig(server=args.server, site=args.site, workdir_base=Path(args.workdir).resolve(),
                      deadline=deadline, reserve_s=args.reserve, exit_s=args.exit_time,
                      heartbeat_s=args.heartbeat,
                      monitor_interval_s=args.monitor_interval, max_jobs=args.max_jobs,
                      lost_heartbeat_s=args.lost_heartbeat,
                      server_retry=retry, final_retry=retry,
                      transfer_backoff_s=args.transfer_backoff,
                      log_cap_bytes=int(args.log_cap_mb * 2**20), keep_workdirs=args.keep_workdirs,
                      batch_id=(os.environ.get("SLURM_JOB_ID")
                                or os.environ.get("PANDA_BATCH_ID", "")),
                      allowed_programs=frozenset(args.allow_program),
                      payload_env=tuple(args.payload_env),
                      debug_interval_s=max(0.1, args.debug_interval),
                      hidden_paths=tuple(str(Path(p).resolve()) for p in
                                         (args.token_file, args.queuedata) if p),
                      event_service=EventServiceSettings(batch=max(0, args.es_batch),
                                                         poll_s=max(0.1, args.es_poll)))
    try:
        pinned = pinned_key(args)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        token = read_token(args.token_file)
    except OSError as exc:
        log.error("cannot read the token file: %s", exc)
        return EXIT_USAGE
    try:
        client = PilotClient(args.server, token, retry=retry, user_agent="panda-wms-pilot",
                             ca_file=args.ca_bundle, ca_dir=args.ca_dir)
    except ClientError as exc:
        log.error("%s", exc)
        return EXIT_USAGE

    stop = KillRequest()

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        code = getattr(ErrorCode, name, ErrorCode.KILL_SIGNAL)
        log.warning("pilot received %s: stopping", name)
        stop.set(code, f"pilot received {name}")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGXCPU):
        signal.signal(sig, on_signal)

    pm = None
    try:
        cfg.workdir_base.mkdir(parents=True, exist_ok=True)
        from .site import load_queuedata_file, site_from_queuedata
        queuedata = (load_queuedata_file(args.queuedata) if args.queuedata
                     else client.queuedata(args.site))
        site = site_from_queuedata(queuedata, args.site)
        if args.stdout_silent is not None:
            site.limits.stdout_silent_s = args.stdout_silent
        from .plugins import make_manager
        from .signature import Trust
        pm = make_manager()
        trust = Trust(client.public_key, queuedata, args.site, local=bool(args.queuedata),
                      **pinned)
        if not args.no_recovery:
            recover(cfg, client, pm, site, trust)
        sandbox = payload_sandbox(site, cfg.workdir_base)
    except (PilotError, ProtocolError, OSError) as exc:
        log.error("pilot cannot start: %s", exc)
        return EXIT_ERROR

    from .nodeinfo import node_info
    n_jobs = 0
    rc = EXIT_OK
    while not stop.requested and (cfg.max_jobs <= 0 or n_jobs < cfg.max_jobs):
        floor_min = args.timefloor if args.timefloor is not None else site.pilots.timefloor
        if past_timefloor(n_jobs, time.time() - started, floor_min):
            log.info("ran %.0f s, past the queue's timefloor of %g min: no new job after %d",
                     time.time() - started, floor_min, n_jobs)
            break
        remaining = cfg.remaining_s()
        if remaining is not None and remaining <= cfg.reserve_s * 2:
            log.info("%.0f s of wall time left: no new job", remaining)
            break
        form = job_request(cfg, site, node_info(cfg.workdir_base), remaining)
        try:
            raw = client.get_job(form, cfg.report_deadline())
        except (PilotError, ProtocolError) as exc:
            log.error("getJob failed: %s", exc)
            rc = EXIT_ERROR
            break
        if raw is None:
            log.info("the server has no job for %s%s", site.name,
                     f": {client.no_job_reason}" if client.no_job_reason else "")
            break
        try:
            verifier = trust.verifier()
        except (PilotError, ProtocolError) as exc:
            log.error("no key to check job signatures with: %s", exc)
            refuse(client, cfg, site, raw, ErrorCode.BAD_SIGNATURE,
                   f"no key to check the job's signature with: {exc}", form)
            rc = EXIT_ERROR
            break
        try:
            trust.check_queuedata()
        except PilotError as exc:
            log.error("the queue description is not the server's: %s", exc)
            refuse(client, cfg, site, raw, ErrorCode.BAD_SIGNATURE, str(exc.diag), form)
            rc = EXIT_ERROR
            break
        log.info("got job %s", raw.get("PandaID"))
        expected = Dispatch(site=site.name, pilot_id=form["pilotID"], nonce=form["pilotNonce"])
        state = JobRun(cfg, client, site, pm, raw, verifier, stop, expected, sandbox).run()
        log.info("job %s ended: %s", raw.get("PandaID"), state)
        n_jobs += 1

    if not args.no_recovery:  # our own final states the server missed: one more try
        recover(cfg, client, pm, site, trust)
    log.info("pilot done: %d job(s) in %.1f s", n_jobs, time.time() - started)
    return rc


def payload_sandbox(site, base: Path):
    """The site's sandbox runtime, tried on this node before any job is asked for: a node that
    cannot run it takes no job (it would fail every one). Raises PilotError (SandboxError)
    saying why."""
    from .sandbox import ready

    sandbox = ready(site.sandbox, base)
    if site.sandbox.runtime != "none":
        log.info("payloads run in the %s sandbox (network %s)", site.sandbox.runtime,
                 "on" if site.sandbox.network else "off")
    return sandbox


def pinned_key(args: argparse.Namespace) -> dict:
    """The server key pinned on the command line: ``pem`` and/or ``fingerprint`` for Trust;
    ValueError when neither is given (the pilot never trusts a key only because the server sent
    it) or the fingerprint is malformed, OSError when the PEM file cannot be read."""
    from panda_core.trust import normalise_fingerprint

    if not args.public_key and not args.public_key_fingerprint:
        raise ValueError("no pinned server key: give --public-key FILE or "
                         "--public-key-fingerprint sha256:HEX (the factory passes one; "
                         "`panda token public-key` prints them)")
    pinned: dict = {}
    if args.public_key:
        pinned["pem"] = Path(args.public_key).read_bytes()
    if args.public_key_fingerprint:
        pinned["fingerprint"] = normalise_fingerprint(args.public_key_fingerprint)
    if "pem" not in pinned:
        carried = bootstrap_key(pinned["fingerprint"])
        if carried is not None:
            pinned["pem"] = carried
    return pinned


#: the server key's 32 bytes in hex, set by the one-file pilot's batch script
#: (schedulers/bootstrap_node.py), which verified the pilot file with them
BOOTSTRAP_KEY_ENV = "PANDA_PILOT_SERVER_KEY"


def bootstrap_key(fingerprint: str) -> bytes | None:
    """The PEM of the key the batch script verified this pilot's file with, if it has the
    pinned ``fingerprint``: a key that has it is the pinned key wherever it came from, so it
    need not be fetched from the server (one round trip before the first job, and a request
    per pilot at the server). None when there is none or it is not the pinned key (the pilot
    then fetches the server's, as before)."""
    from panda_core.trust import key_fingerprint, raw_key_pem

    text = os.environ.get(BOOTSTRAP_KEY_ENV, "")
    if not text:
        return None
    try:
        pem = raw_key_pem(bytes.fromhex(text))
    except ValueError:
        log.warning("$%s is not a key (64 hex digits): the server's key is fetched instead",
                    BOOTSTRAP_KEY_ENV)
        return None
    if key_fingerprint(pem) != fingerprint:
        log.warning("the key the batch script carries (%s) is not the pinned %s: the server's "
                    "key is fetched instead", key_fingerprint(pem), fingerprint)
        return None
    return pem.encode()


def recover(cfg, client, pm, site, trust) -> None:
    """Finish dead pilots' jobs below the work dir base, once the queue description they are
    staged out by is known to be the server's (nothing to recover: nothing is checked)."""
    from panda_core.client import ProtocolError

    from .errors import PilotError
    from .recovery import recover_all
    from .statefile import job_dirs

    if not job_dirs(cfg.workdir_base):
        return
    try:
        trust.check_queuedata()
    except (PilotError, ProtocolError) as exc:
        log.error("recovery skipped, the job dirs stay for a later pilot: %s", exc)
        return
    recovered = recover_all(cfg.workdir_base, client, pm, cfg.keep_workdirs, cfg.final_retry,
                            site, cfg.allowed_programs, cfg.report_deadline())
    if recovered:
        log.info("recovered jobs: %s", ", ".join(recovered))


def refuse(client, cfg, site, raw: dict, code: int, diag: str,
           getjob: dict | None = None) -> None:
    """Report a job the pilot will not run as failed, so the server can retry it elsewhere;
    with the pilotID and pilotNonce of the ``getjob`` form that got it (the server takes
    updates of a job only from the pilot that holds it)."""
    from .errors import diag_limit
    from .report import send_final

    form = {"jobId": raw.get("PandaID"), "state": "failed", "siteName": site.name,
            "node": cfg.node, "attemptNr": raw.get("attemptNr", 1), "pilotErrorCode": int(code),
            "pilotErrorDiag": diag_limit(diag)}
    for key in ("pilotID", "pilotNonce"):
        if (getjob or {}).get(key):
            form[key] = getjob[key]
    send_final(client, form, cfg.final_retry, cfg.report_deadline())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
