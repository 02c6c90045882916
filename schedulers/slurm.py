"""The ``slurm`` backend: pilots as Slurm batch jobs through sbatch, squeue, sacct and scancel.

Every command runs under a timeout (a hung slurmctld must not hang the factory). The pilot's
environment (its token included) reaches the job through sbatch's own environment with
``--export=ALL``, never through a command line where ``ps`` would show it; the batch script is
given on stdin and runs the pilot with ``exec`` so Slurm's signals (SIGTERM at the wall time) reach
the pilot itself. States come from squeue while Slurm still holds the job; exit codes, and states
of jobs squeue has forgotten, come from sacct (from the accounting database, or with ``-c`` from
the job completion log when no accounting daemon runs).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import uuid
from pathlib import Path

from .base import BatchInfo, BatchState, PilotSpec, SchedulerBackend, SchedulerError

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^\d+(_\d+)?$")

# Slurm's job states (squeue %T and sacct State, "CANCELLED by 0" cut to its first word).
STATE_MAP: dict[str, BatchState] = {
    **dict.fromkeys(["PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                     "RESV_DEL_HOLD"], BatchState.QUEUED),
    **dict.fromkeys(["RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING",
                     "SUSPENDED", "STOPPED"], BatchState.RUNNING),
    "COMPLETED": BatchState.DONE,
    **dict.fromkeys(["FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                     "PREEMPTED", "SPECIAL_EXIT", "REVOKED"], BatchState.FAILED),
    "CANCELLED": BatchState.CANCELLED,
}


def map_state(slurm_state: str) -> BatchState:
    word = slurm_state.strip().split(" ")[0].rstrip("+").upper()
    return STATE_MAP.get(word, BatchState.UNKNOWN)


def format_walltime(seconds: int) -> str:
    """Slurm's ``D-HH:MM:SS``, rounded up to whole minutes (Slurm's own granularity)."""
    minutes = max(1, -(-int(seconds) // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:00"


def parse_exit_code(text: str) -> tuple[int | None, int]:
    """sacct's ``exit:signal`` -> (exit code, signal)."""
    try:
        code, _, sig = text.strip().partition(":")
        return int(code), int(sig or 0)
    except ValueError:
        return None, 0


class CommandTimeout(SchedulerError):
    """A Slurm command did not answer in time (it was killed)."""


class SlurmBackend(SchedulerBackend):
    """Options: ``partition``, ``account``, ``qos``, ``extra_args`` (list of sbatch arguments),
    ``command_timeout_s`` (default 30), ``bin_dir`` (where the Slurm commands are),
    ``slurm_conf`` (sets SLURM_CONF for the commands), ``sacct`` (true: use sacct for exit codes
    and forgotten jobs; default true)."""

    name = "slurm"

    def __init__(self, partition: str = "", account: str = "", qos: str = "",
                 extra_args: list[str] | None = None, command_timeout_s: float = 30,
                 bin_dir: str = "", slurm_conf: str = "", sacct: bool = True, **options) -> None:
        super().__init__(partition=partition, account=account, qos=qos, extra_args=extra_args,
                         command_timeout_s=command_timeout_s, bin_dir=bin_dir,
                         slurm_conf=slurm_conf, sacct=sacct, **options)
        if options:
            raise SchedulerError(f"slurm backend: unknown option(s) {', '.join(sorted(options))}")
        if extra_args is not None and not (isinstance(extra_args, list)
                                           and all(isinstance(a, str) for a in extra_args)):
            raise SchedulerError("slurm backend: extra_args must be a list of strings")
        self.partition, self.account, self.qos = partition, account, qos
        self.extra_args = list(extra_args or [])
        try:
            self.timeout = float(command_timeout_s)
        except (TypeError, ValueError):
            raise SchedulerError(f"slurm backend: command_timeout_s must be a number, got "
                                 f"{command_timeout_s!r}") from None
        self.bin_dir = bin_dir
        self.slurm_conf = slurm_conf
        self.use_sacct = bool(sacct)
        self._sacct_completion_log = False   # learned: no accounting daemon -> sacct -c

    # ------------------------------------------------------------------ running commands
    def _run(self, argv: list[str], stdin: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bin_dir, argv[0]) if self.bin_dir else argv[0], *argv[1:]]
        full_env = {**os.environ, **(env or {})}
        if self.slurm_conf:
            full_env["SLURM_CONF"] = self.slurm_conf
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=full_env,
                                    start_new_session=True)
        except FileNotFoundError:
            raise SchedulerError(f"{cmd[0]} not found: is Slurm installed here "
                                 f"(PATH={full_env.get('PATH', '')})?") from None
        except OSError as exc:
            raise SchedulerError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
        try:
            out, err = proc.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # the command and anything it started
            except ProcessLookupError:
                pass
            proc.communicate()
            raise CommandTimeout(f"{argv[0]} did not answer within {self.timeout:g} s "
                                 "(is slurmctld up?)") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    @staticmethod
    def _complain(argv: list[str], res: subprocess.CompletedProcess) -> SchedulerError:
        text = (res.stderr or res.stdout or "").strip().replace("\n", " | ")[:500]
        return SchedulerError(f"{argv[0]} failed with exit code {res.returncode}: {text}")

    # ------------------------------------------------------------------ submit
    def batch_script(self, spec: PilotSpec) -> str:
        """The job script: exec the pilot's argv, each word quoted for the shell."""
        return ("#!/bin/sh\n# panda-wms pilot for site " + shlex.quote(spec.site) + "\n"
                "exec " + shlex.join(spec.command) + "\n")

    def sbatch_args(self, spec: PilotSpec) -> list[str]:
        workdir = Path(spec.workdir) if spec.workdir else Path.cwd()
        args = ["sbatch", "--parsable", f"--job-name={spec.name}",
                f"--time={format_walltime(spec.walltime_s)}", "--nodes=1", "--ntasks=1",
                f"--cpus-per-task={int(spec.cores)}", f"--mem={int(spec.memory_mb)}M",
                f"--chdir={workdir}", f"--output={workdir / 'pilot-%j.out'}", "--export=ALL"]
        for flag, value in (("partition", self.partition), ("account", self.account),
                            ("qos", self.qos)):
            if value:
                args.append(f"--{flag}={value}")
        return args + self.extra_args

    def submit(self, spec: PilotSpec) -> str:
        if not spec.command:
            raise SchedulerError("slurm backend: empty pilot command")
        if spec.workdir:
            try:
                Path(spec.workdir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SchedulerError(f"slurm backend: cannot create work dir {spec.workdir}: "
                                     f"{exc.strerror or exc}") from None
        tag = f"panda-wms:{uuid.uuid4().hex}"
        argv = self.sbatch_args(spec) + [f"--comment={tag}"]
        try:
            res = self._run(argv, stdin=self.batch_script(spec), env=spec.env)
        except CommandTimeout as exc:
            # slurmctld may have accepted the job before sbatch hung: find it by its tag
            found = self._find_tagged(tag)
            if found:
                log.warning("sbatch hung but Slurm has the job: %s (%s)", found, exc)
                return found
            raise
        if res.returncode != 0:
            raise self._complain(argv, res)
        batch_id = res.stdout.strip().split(";")[0]
        if not _JOB_ID.match(batch_id):
            raise SchedulerError(f"sbatch answered {res.stdout.strip()!r}, not a job id")
        log.info("slurm job %s submitted for %s", batch_id, spec.site)
        return batch_id

    def _find_tagged(self, tag: str) -> str | None:
        """The id of the job whose comment is ``tag``, if Slurm has it (best effort)."""
        try:
            res = self._run(["squeue", "-h", "-a", "-t", "all", "-o", "%i|%k"])
        except SchedulerError:
            return None
        for line in res.stdout.splitlines():
            job_id, _, comment = line.strip().partition("|")
            if comment == tag and _JOB_ID.match(job_id):
                return job_id
        return None

    # ------------------------------------------------------------------ status
    def status(self, batch_ids: list[str]) -> dict[str, BatchState]:
        return {bid: info.state for bid, info in self.details(batch_ids).items()}

    def details(self, batch_ids: list[str]) -> dict[str, BatchInfo]:
        out = {bid: BatchInfo(BatchState.UNKNOWN, None, "not a Slurm job id")
               for bid in batch_ids if not _JOB_ID.match(str(bid))}
        ids = [bid for bid in batch_ids if bid not in out]
        if not ids:
            return out
        known = self._squeue(ids)
        ask_sacct = [bid for bid in ids
                     if bid not in known or known[bid].state in (BatchState.DONE,
                                                                  BatchState.FAILED,
                                                                  BatchState.CANCELLED)]
        accounted = self._sacct(ask_sacct) if ask_sacct and self.use_sacct else {}
        for bid in ids:
            if bid in accounted:
                info = accounted[bid]
                if bid in known and not info.reason:
                    info.reason = known[bid].reason
                out[bid] = info
            elif bid in known:
                out[bid] = known[bid]
            else:
                out[bid] = BatchInfo(BatchState.UNKNOWN, None, "Slurm does not know this job")
        return out

    def _squeue(self, ids: list[str]) -> dict[str, BatchInfo]:
        argv = ["squeue", "-h", "-a", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"]
        res = self._run(argv)
        if res.returncode != 0:
            if "Invalid job id" in (res.stderr + res.stdout):
                return {}                  # none of them is known any more
            raise self._complain(argv, res)
        known = {}
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[0] in ids:
                reason = parts[2] if len(parts) > 2 and parts[2] not in ("None", "(null)") else ""
                known[parts[0]] = BatchInfo(map_state(parts[1]), None, reason)
        return known

    def _sacct(self, ids: list[str]) -> dict[str, BatchInfo]:
        """Final state and exit code from sacct; empty when sacct cannot tell (logged)."""
        fmt = ["-n", "-P", "-j", ",".join(ids), "-o", "JobID,State,ExitCode"]
        argv = ["sacct", "-c", *fmt] if self._sacct_completion_log else ["sacct", "-X", *fmt]
        res = self._run(argv)
        if res.returncode != 0 and "accounting storage is disabled" in (res.stderr + res.stdout):
            self._sacct_completion_log = True
            argv = ["sacct", "-c", *fmt]
            res = self._run(argv)
        if res.returncode != 0:
            log.warning("%s", self._complain(argv, res))
            return {}
        found = {}
        for line in res.stdout.splitlines():        # the last line of a job wins (requeues)
            parts = line.strip().split("|")
            if len(parts) < 3 or parts[0] not in ids:
                continue
            state = map_state(parts[1])
            code, sig = parse_exit_code(parts[2])
            reason = ""
            if sig:
                reason = f"killed by signal {sig}"
            elif state == BatchState.FAILED:
                reason = f"Slurm state {parts[1].strip()}, exit code {code}"
            found[parts[0]] = BatchInfo(state, code, reason)
        return found

    # ------------------------------------------------------------------ cancel
    def cancel(self, batch_ids: list[str]) -> None:
        bad = [bid for bid in batch_ids if not _JOB_ID.match(str(bid))]
        if bad:
            raise SchedulerError(f"not Slurm job ids: {', '.join(map(repr, bad))}")
        if not batch_ids:
            return
        argv = ["scancel", *batch_ids]
        res = self._run(argv)
        if res.returncode != 0 and "Invalid job id" not in (res.stderr + res.stdout):
            raise self._complain(argv, res)
        log.info("slurm jobs cancelled: %s", ", ".join(batch_ids))
