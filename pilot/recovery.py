"""Finish the bookkeeping of jobs whose pilot died on this node.

A later pilot started with the same ``--workdir`` base looks at every job dir. If it can take the
dir's lock, the pilot that owned it is dead. Then, by the phase in the state file:
- final update kept on disk: send it;
- payload ended (the wrapper wrote its exit code): stage out outputs (exit 0) and the log, report;
- payload still running (orphaned, in its own session): left alone, the dir is retried later;
- pilot died before the payload ran: report failed (RECOVERED_LOST) with the log.
The work dir is removed once the server has the final state.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from panda_core.client import PilotClient
from panda_core.retry import RetryPolicy
from panda_core.siteconfig import SiteConfig
from panda_core.wire import decode_job

from . import statefile as sf
from .errors import ErrorCode, PilotError
from .payload import EXIT_FILE, PayloadResult
from .site import site_from_queuedata

log = logging.getLogger(__name__)


def _payload_alive(info: dict[str, Any] | None) -> bool:
    """Is the payload wrapper recorded in the state still running (same pid, same start)?"""
    if not info or not info.get("pid"):
        return False
    import psutil

    try:
        p = psutil.Process(int(info["pid"]))
        return (p.status() != psutil.STATUS_ZOMBIE
                and abs(p.create_time() - float(info.get("start", 0))) < 2.0)
    except (psutil.Error, ValueError, TypeError):
        return False


def _exit_code(workdir: Path) -> int | None:
    try:
        return int((workdir / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def recover_all(base: Path, client: PilotClient, pm=None, keep: bool = False,
                policy: RetryPolicy | None = None, site: SiteConfig | None = None,
                allowed_programs: frozenset[str] = frozenset(),
                deadline: float | None = None) -> list[str]:
    """Recover every dead pilot's job dir below ``base``; return the PandaIDs whose final state
    reached the server. ``site``: this pilot's own queue description, used (with its copytool
    secrets, which state files never hold) for jobs of the same site; ``allowed_programs``: the
    programs copytool options may name (``--allow-program``); ``deadline``: the recovering
    pilot's ``report_deadline()``, which no final update it sends for them reaches past."""
    done = []
    for tmp in base.glob(f".{sf.JOB_DIR_PREFIX}*.creating"):   # a pilot died making a job dir
        lock = sf.JobLock(tmp)
        try:
            if lock.acquire():
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
        finally:
            lock.release()
    for wd in sf.job_dirs(base):
        lock = sf.JobLock(wd)
        try:
            if not lock.acquire():
                continue               # its pilot is alive
        except OSError as exc:
            log.warning("recovery: cannot lock %s: %s", wd, exc)
            continue
        try:
            pid = recover_one(wd, client, pm, keep, policy, site, allowed_programs, deadline)
            if pid:
                done.append(pid)
        except Exception:
            log.exception("recovery of %s failed; it stays for a later pilot", wd)
        finally:
            lock.release()
    return done


def recover_one(wd: Path, client: PilotClient, pm=None, keep: bool = False,
                policy: RetryPolicy | None = None, own_site: SiteConfig | None = None,
                allowed_programs: frozenset[str] = frozenset(),
                deadline: float | None = None) -> str | None:
    from .job import JobRun, PilotConfig
    from .report import send_final

    policy = policy or RetryPolicy(attempts=3, backoff_s=2)
    state = sf.read_state(wd)
    if state is None:
        log.warning("recovery: %s has no readable state file; removed", wd)
        if not keep:
            shutil.rmtree(wd, ignore_errors=True)
        return None
    raw = state.get("job") or {}
    panda_id = str(raw.get("PandaID", "?"))
    phase = state.get("phase")
    if state.get("server") and state["server"].rstrip("/") != client.url:
        log.info("recovery: job %s belongs to server %s, not %s; left", panda_id, state["server"],
                 client.url)
        return None
    log.info("recovery: job %s of dead pilot %s found in phase %s", panda_id,
             state.get("pilot_pid"), phase)

    if phase == sf.DONE:      # reported; kept on purpose (--keep-workdirs): not ours to remove
        return None
    if phase == sf.FINAL_PENDING and state.get("final"):
        if not send_final(client, state["final"], policy, deadline):
            return None
        sf.write_state(wd, {**state, "phase": sf.DONE})
        if not keep:
            shutil.rmtree(wd, ignore_errors=True)
        return panda_id
    if phase in (sf.RUNNING, sf.STAGEOUT) and _payload_alive(state.get("payload")):
        log.info("recovery: payload of job %s is still running; left for later", panda_id)
        return None

    if own_site is not None and own_site.name == state.get("site_name"):
        site = own_site
    else:
        site = site_from_queuedata({"panda_wms": state.get("site") or {}},
                                   state.get("site_name", ""))
    # the recovering pilot's report deadline is this run's (exit_s 0: it is already net)
    cfg = PilotConfig(server=client.url, site=site.name, workdir_base=wd.parent,
                      deadline=deadline, exit_s=0.0, keep_workdirs=keep, final_retry=policy,
                      allowed_programs=allowed_programs)
    run = JobRun(cfg, client, site, pm, raw)
    run.jobdir = wd
    run.workdir = wd / sf.WORK_DIR
    run.state = state
    run.start_time = float(state.get("started") or 0) or run.start_time
    try:
        run.job = decode_job(raw)
    except PilotError as exc:
        run._finish("failed", exc, {})
        return panda_id if _delivered(wd) else None

    rc = _exit_code(run.workdir) if phase in (sf.RUNNING, sf.STAGEOUT) else None
    error: PilotError | None = None
    stored: dict[str, dict] = {}
    decided = state.get("error") if phase == sf.STAGEOUT else None
    if phase == sf.STAGEOUT and state.get("result"):
        run.result = PayloadResult(**state["result"])     # the dead pilot's full record
    elif rc is not None:
        info = state.get("payload") or {}
        run.result = PayloadResult(exit_code=rc, signal=None, cpu_s=0.0, max_rss_kb=0,
                                   max_pss_kb=0, start=float(info.get("start") or run.start_time),
                                   end=(run.workdir / EXIT_FILE).stat().st_mtime)
    if decided:   # the dead pilot had already judged the job (e.g. a monitor killed the payload)
        error = PilotError(int(decided.get("code", ErrorCode.GENERAL)),
                           str(decided.get("diag", "")))
    elif run.result is None:
        error = PilotError(ErrorCode.RECOVERED_LOST,
                           f"pilot {state.get('pilot_pid')} died in phase {phase}; "
                           "the payload's end was not recorded")
    else:
        error = run._judge(run.result)
    if error is None:
        try:
            stored = run._stage_out_outputs()
        except PilotError as exc:
            error = exc
            stored = getattr(exc, "stored", {}) or {}
    state_name = "failed" if error else "finished"
    log.info("recovery: job %s -> %s", panda_id, state_name)
    run._finish(state_name, error, stored)
    return panda_id if _delivered(wd) else None


def _delivered(wd: Path) -> bool:
    """The final state reached the server: the dir is gone, or kept with phase ``done``."""
    state = sf.read_state(wd)
    return state is None or state.get("phase") == sf.DONE
