"""The ``htcondor`` backend: pilots as HTCondor jobs through the command-line tools.

``condor_submit -terse`` submits (vanilla universe on the pool's own slots, or the grid universe
to a CE such as an HTCondor-CE or ARC CE); ``condor_q -json`` and, for jobs that left the queue,
``condor_history -json`` report states; ``condor_rm`` cancels. The commands rather than the Python
bindings: the commands exist wherever a schedd is reachable, take the same ``-pool``/``-name``,
and each call runs under a timeout, so a hung schedd costs one timeout and a clear error.
A batch id is ``ClusterId.ProcId``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .base import BatchInfo, BatchState, PilotSpec, SchedulerBackend, SchedulerError

log = logging.getLogger(__name__)

#: JobStatus codes (HTCondor's "magic numbers") -> the common set.
JOB_STATUS: dict[int, BatchState] = {
    0: BatchState.QUEUED,       # unexpanded
    1: BatchState.QUEUED,       # idle
    2: BatchState.RUNNING,      # running
    3: BatchState.CANCELLED,    # removed
    4: BatchState.DONE,         # completed (FAILED when the exit code says so)
    5: BatchState.FAILED,       # held: will not run again without a human; its reason is kept
    6: BatchState.RUNNING,      # transferring output
    7: BatchState.RUNNING,      # suspended
}
ATTRIBUTES = ["ClusterId", "ProcId", "JobStatus", "ExitCode", "ExitBySignal", "ExitSignal",
              "HoldReason", "RemoveReason"]
_BATCH_ID = re.compile(r"^(\d{1,12})\.(\d{1,9})$")
_TERSE = re.compile(r"^\s*(\d+)\.(\d+)\s*-\s*(\d+)\.(\d+)\s*$", re.M)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _submit_value(text: str, what: str) -> str:
    """A value safe inside a submit description: one line, ``$`` kept literal."""
    text = str(text)
    if any(c in text for c in "\n\r\0"):
        raise SchedulerError(f"{what} cannot hold newlines or NUL bytes: {text[:60]!r}")
    return text.replace("$", "$(DOLLAR)")      # $(...) is a submit macro; $(DOLLAR) is a $


def quote_arguments(args: list[str]) -> str:
    """HTCondor's "new syntax": the whole list in double quotes, each argument in single
    quotes, ' doubled inside an argument, " doubled anywhere."""
    parts = []
    for arg in args:
        arg = _submit_value(arg, "pilot argument")
        parts.append("'" + arg.replace("'", "''") + "'")
    return '"' + " ".join(parts).replace('"', '""') + '"'


def quote_environment(env: dict[str, str]) -> str:
    """The environment in the new syntax: "NAME='value' ...", with the same quoting rules."""
    parts = []
    for key, value in sorted(env.items()):
        if not _ENV_NAME.match(key):
            raise SchedulerError(f"pilot environment name {key!r} is not a valid variable name")
        value = _submit_value(value, f"environment value of {key}")
        parts.append(f"{key}='" + value.replace("'", "''") + "'")
    return '"' + " ".join(parts).replace('"', '""') + '"'


def check_batch_id(batch_id: str) -> tuple[int, int]:
    match = _BATCH_ID.match(batch_id) if isinstance(batch_id, str) else None
    if not match:
        raise SchedulerError(f"not an HTCondor job id (ClusterId.ProcId): {batch_id!r}")
    return int(match.group(1)), int(match.group(2))


class HTCondorBackend(SchedulerBackend):
    """Options: ``pool``, ``schedd``, ``universe`` (vanilla | grid), ``grid_resource``,
    ``x509_proxy``, ``requirements``, ``accounting_group``, ``extra_submit`` (mapping of more
    submit commands), ``log_dir``, ``condor_bin``, ``command_timeout_s``. See docs/htcondor.md."""

    name = "htcondor"

    def __init__(self, pool: str | None = None, schedd: str | None = None,
                 universe: str = "vanilla", grid_resource: str | None = None,
                 x509_proxy: str | None = None, requirements: str | None = None,
                 accounting_group: str | None = None, extra_submit: dict | None = None,
                 log_dir: str | None = None, condor_bin: str | None = None,
                 command_timeout_s: float = 60.0, **options) -> None:
        super().__init__(pool=pool, schedd=schedd, universe=universe,
                         grid_resource=grid_resource, **options)
        if options:
            raise SchedulerError(f"htcondor backend: unknown option(s) {', '.join(sorted(options))}")
        universe = (universe or "vanilla").lower()
        if universe not in ("vanilla", "grid"):
            raise SchedulerError(f"htcondor backend: universe must be vanilla or grid, not {universe!r}")
        if universe == "grid" and not grid_resource:
            raise SchedulerError("htcondor backend: the grid universe needs option 'grid_resource' "
                                 "(e.g. 'condor ce.example.org ce.example.org:9619' or "
                                 "'arc https://ce.example.org/arex')")
        self.pool, self.schedd = pool or None, schedd or None
        self.universe, self.grid_resource = universe, grid_resource
        self.x509_proxy, self.requirements = x509_proxy, requirements
        self.accounting_group = accounting_group
        self.extra_submit = dict(extra_submit or {})
        for key in self.extra_submit:
            if not re.fullmatch(r"\+?[A-Za-z_][A-Za-z0-9_.]*", str(key)) or str(key).lower() == "queue":
                raise SchedulerError(f"htcondor backend: extra_submit key {key!r} is not a submit command")
        self.log_dir = Path(log_dir) if log_dir else None
        self.condor_bin = condor_bin
        self.timeout_s = float(command_timeout_s)

    # ------------------------------------------------------------------ commands
    def _tool(self, name: str) -> str:
        path = os.path.join(self.condor_bin, name) if self.condor_bin else shutil.which(name)
        if not path or not os.access(path, os.X_OK):
            where = self.condor_bin or "PATH"
            raise SchedulerError(f"htcondor backend: {name} not found in {where}")
        return path

    def _where(self) -> list[str]:
        args = []
        if self.pool:
            args += ["-pool", self.pool]
        if self.schedd:
            args += ["-name", self.schedd]
        return args

    def _run(self, name: str, args: list[str], ok_codes: tuple[int, ...] = (0,)
             ) -> subprocess.CompletedProcess:
        cmd = [self._tool(name), *args]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SchedulerError(f"{name} did not answer within {self.timeout_s:g} s "
                                 f"(schedd {self.schedd or 'local'}, pool {self.pool or 'default'})"
                                 ) from None
        except OSError as exc:
            raise SchedulerError(f"cannot run {name}: {exc}") from None
        if res.returncode not in ok_codes:
            why = (res.stderr.strip() or res.stdout.strip() or "no output")[-500:]
            raise SchedulerError(f"{name} failed (exit {res.returncode}): {why}")
        return res

    # ------------------------------------------------------------------ submit
    def submit_description(self, spec: PilotSpec, log_dir: Path) -> str:
        """The submit description of one pilot (one job, ``queue 1``)."""
        if not spec.command:
            raise SchedulerError("pilot spec has an empty command")
        cores = max(1, int(spec.cores))
        walltime_s = max(1, int(spec.walltime_s))
        logs = _submit_value(str(log_dir), "log dir")
        lines = {
            "universe": self.universe,
            "executable": _submit_value(spec.command[0], "pilot executable"),
            "transfer_executable": "false",
            "batch_name": _submit_value(spec.name, "pilot name"),
            "output": f"{logs}/pilot.$(ClusterId).$(ProcId).out",
            "error": f"{logs}/pilot.$(ClusterId).$(ProcId).err",
            "log": f"{logs}/pilot.$(ClusterId).log",
            "+PandaSite": f'"{_submit_value(spec.site, "site")}"',
        }
        if len(spec.command) > 1:
            lines["arguments"] = quote_arguments(spec.command[1:])
        if spec.env:
            lines["environment"] = quote_environment(spec.env)
        if spec.workdir:
            lines["initialdir"] = _submit_value(spec.workdir, "pilot workdir")
        if self.universe == "grid":
            lines["grid_resource"] = _submit_value(self.grid_resource, "grid_resource")
            # what HTCondor-CE and ARC CE routes read for the remote batch job
            lines["+maxWallTime"] = str(math.ceil(walltime_s / 60))
            lines["+xcount"] = str(cores)
            lines["+maxMemory"] = str(int(spec.memory_mb))
            if self.x509_proxy:
                lines["x509userproxy"] = _submit_value(self.x509_proxy, "x509_proxy")
        else:
            lines["request_cpus"] = str(cores)
            lines["request_memory"] = str(int(spec.memory_mb))
            # HTCondor has no wall-time limit of its own: remove a pilot running too long
            lines["periodic_remove"] = (f"(JobStatus == 2) && "
                                        f"((time() - EnteredCurrentStatus) > {walltime_s})")
        if self.requirements:
            lines["requirements"] = _submit_value(self.requirements, "requirements")
        if self.accounting_group:
            lines["accounting_group"] = _submit_value(self.accounting_group, "accounting_group")
        for key, value in self.extra_submit.items():
            lines[str(key)] = _submit_value(str(value), f"extra_submit {key}")
        return "".join(f"{k} = {v}\n" for k, v in lines.items()) + "queue 1\n"

    def submit(self, spec: PilotSpec) -> str:
        log_dir = self.log_dir or Path(spec.workdir or tempfile.gettempdir()) / "condor-pilots"
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SchedulerError(f"htcondor backend: cannot create log dir {log_dir}: {exc}") from None
        if spec.workdir:
            try:     # condor_submit refuses an initialdir that does not exist
                Path(spec.workdir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SchedulerError(f"htcondor backend: cannot create pilot workdir "
                                     f"{spec.workdir}: {exc}") from None
        description = self.submit_description(spec, log_dir)
        fd, path = tempfile.mkstemp(prefix="pilot-", suffix=".sub", dir=log_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(description)
            res = self._run("condor_submit", ["-terse", *self._where(), path])
        finally:
            os.unlink(path)
        match = _TERSE.search(res.stdout)
        if not match:
            raise SchedulerError(f"condor_submit gave no job id: {res.stdout.strip()[:200]!r}")
        batch_id = f"{match.group(1)}.{match.group(2)}"
        log.info("submitted pilot %s for %s as HTCondor job %s", spec.name, spec.site, batch_id)
        return batch_id

    # ------------------------------------------------------------------ status
    @staticmethod
    def _constraint(ids: list[tuple[int, int]]) -> str:
        return " || ".join(f"(ClusterId == {c} && ProcId == {p})" for c, p in ids)

    def _query(self, tool: str, ids: list[tuple[int, int]]) -> list[dict]:
        args = [*self._where(), "-json", "-attributes", ",".join(ATTRIBUTES),
                "-constraint", self._constraint(ids)]
        if tool == "condor_history":
            args += ["-match", str(len(ids))]
        out = self._run(tool, args).stdout.strip()
        if not out:
            return []              # no job matched: the tools print nothing at all
        try:
            ads = json.loads(out)
        except ValueError:
            raise SchedulerError(f"{tool} -json printed something that is not JSON: {out[:200]!r}") from None
        if not isinstance(ads, list):
            raise SchedulerError(f"{tool} -json did not print a list of job ads")
        return [ad for ad in ads if isinstance(ad, dict)]

    @staticmethod
    def _info(ad: dict) -> BatchInfo:
        status = ad.get("JobStatus")
        state = JOB_STATUS.get(status, BatchState.UNKNOWN) if isinstance(status, int) else BatchState.UNKNOWN
        exit_code = ad.get("ExitCode") if isinstance(ad.get("ExitCode"), int) else None
        reason = ""
        if status == 4:
            if ad.get("ExitBySignal") is True:
                state, reason = BatchState.FAILED, f"killed by signal {ad.get('ExitSignal')}"
                exit_code = 128 + int(ad.get("ExitSignal") or 0)
            elif exit_code not in (None, 0):
                state, reason = BatchState.FAILED, f"exit code {exit_code}"
        elif status == 5:
            reason = f"held: {ad.get('HoldReason') or 'no reason given'}"
        elif status == 3:
            reason = f"removed: {ad.get('RemoveReason') or 'no reason given'}"
        return BatchInfo(state, exit_code, reason)

    def details(self, batch_ids: list[str]) -> dict[str, BatchInfo]:
        parsed = {bid: check_batch_id(bid) for bid in batch_ids}
        out = {bid: BatchInfo(BatchState.UNKNOWN) for bid in batch_ids}
        if not parsed:
            return out
        by_id = {(c, p): bid for bid, (c, p) in parsed.items()}
        for ad in self._query("condor_q", list(by_id)):
            key = (ad.get("ClusterId"), ad.get("ProcId"))
            if key in by_id:
                out[by_id.pop(key)] = self._info(ad)
        if by_id:    # completed and removed jobs leave the queue for the history
            for ad in self._query("condor_history", list(by_id)):
                key = (ad.get("ClusterId"), ad.get("ProcId"))
                if key in by_id:
                    out[by_id.pop(key)] = self._info(ad)
        return out

    def status(self, batch_ids: list[str]) -> dict[str, BatchState]:
        return {bid: info.state for bid, info in self.details(batch_ids).items()}

    # ------------------------------------------------------------------ cancel
    def cancel(self, batch_ids: list[str]) -> None:
        for bid in batch_ids:
            check_batch_id(bid)
        if not batch_ids:
            return
        res = self._run("condor_rm", [*self._where(), *batch_ids], ok_codes=(0, 1))
        if res.returncode == 1:
            # exit 1 also when some ids had already left the queue: fine, unless another reason
            text = (res.stdout + res.stderr).lower()
            lines = [l for l in text.splitlines() if l.strip()
                     and "marked for removal" not in l and "not found" not in l
                     and "couldn't find/remove" not in l and "already" not in l]
            if lines:
                raise SchedulerError(f"condor_rm failed: {(res.stderr or res.stdout).strip()[-500:]}")
        log.info("asked HTCondor to remove %d job(s)", len(batch_ids))
