"""The ``local`` backend: pilots as processes on this host, a tiny batch system of its own.

Each pilot runs in its own session (so cancel can kill its whole process group) under ``/bin/sh``,
which records the pilot's exit code in a file when it ends. Everything about a pilot (pid, process
start time, exit code) lives in a state directory, so a restarted factory still knows its pilots:
a pid is trusted only when the process's start time matches the one recorded, never after pid
reuse. At most ``slots`` pilots run at once; the others wait as ``queued`` and start on a later
``submit``/``status`` call, as in a batch system.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil

from .base import BatchInfo, BatchState, PilotSpec, SchedulerBackend, SchedulerError

log = logging.getLogger(__name__)

# sh runs the pilot and writes its exit code atomically; "$@" is the pilot's argv, never re-parsed.
_WRAPPER = 'rc=0; "$@" || rc=$?; printf "%s\\n" "$rc" > exit_code.tmp && mv exit_code.tmp exit_code'
WALLTIME_GRACE_S = 30


def default_state_dir() -> Path:
    base = os.environ.get("PANDA_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "panda-wms")
    return Path(base) / "local-pilots"


class LocalBackend(SchedulerBackend):
    """Options: ``slots`` (pilots running at once, default the number of CPUs), ``state_dir``,
    ``kill_grace_s`` (SIGTERM to SIGKILL on cancel), ``enforce_walltime`` (default true),
    ``keep_final_s`` (records of ended pilots, and work dirs inside the state dir, are removed
    after this long; default a day)."""

    name = "local"
    state_dir_option = "state_dir"

    def __init__(self, slots: int | None = None, state_dir: str | None = None,
                 kill_grace_s: float = 5.0, enforce_walltime: bool = True,
                 keep_final_s: float = 86400.0, **options) -> None:
        super().__init__(slots=slots, state_dir=state_dir, **options)
        if options:
            raise SchedulerError(f"local backend: unknown option(s) {', '.join(sorted(options))}")
        try:
            self.slots = int(slots) if slots else (os.cpu_count() or 1)
            self.kill_grace_s = float(kill_grace_s)
            self.keep_final_s = float(keep_final_s)
        except (TypeError, ValueError):
            raise SchedulerError("local backend: slots, kill_grace_s and keep_final_s must be "
                                 f"numbers (got {slots!r}, {kill_grace_s!r}, "
                                 f"{keep_final_s!r})") from None
        if self.slots < 1:
            raise SchedulerError(f"local backend: slots must be at least 1, got {slots!r}")
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.enforce_walltime = bool(enforce_walltime)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SchedulerError(f"local backend: cannot create state dir {self.state_dir}: "
                                 f"{exc.strerror or exc}") from None
        self._children: dict[str, subprocess.Popen] = {}   # reaped here so no zombies remain

    # ------------------------------------------------------------------ state files
    def _record_path(self, batch_id: str) -> Path:
        if not batch_id.startswith("local-") or not batch_id[6:].isalnum():
            raise SchedulerError(f"not a local batch id: {batch_id!r}")
        return self.state_dir / f"{batch_id}.json"

    def _read(self, batch_id: str) -> dict | None:
        try:
            return json.loads(self._record_path(batch_id).read_text())
        except (OSError, ValueError):
            return None

    def _write(self, record: dict) -> None:
        path = self._record_path(record["batch_id"])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # holds the pilot's env
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)

    def _records(self) -> list[dict]:
        out = []
        for path in sorted(self.state_dir.glob("local-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("ignoring unreadable pilot record %s", path)
        return out

    @contextmanager
    def _locked(self):
        """One process at a time decides which queued pilot starts (factories may share a dir)."""
        with open(self.state_dir / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ the contract
    def submit(self, spec: PilotSpec) -> str:
        if not spec.command:
            raise SchedulerError("local backend: empty pilot command")
        batch_id = f"local-{uuid.uuid4().hex[:16]}"
        workdir = Path(spec.workdir) if spec.workdir else self.state_dir / batch_id
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SchedulerError(f"local backend: cannot create work dir {workdir}: "
                                 f"{exc.strerror or exc}") from None
        record = {"batch_id": batch_id, "site": spec.site, "name": spec.name,
                  "command": list(spec.command), "env": dict(spec.env), "workdir": str(workdir),
                  "walltime_s": spec.walltime_s, "state": "queued", "submitted": time.time(),
                  "pid": None, "create_time": None, "started": None, "exit_code": None,
                  "reason": ""}
        with self._locked():
            self._write(record)
            self._schedule()
        log.info("local pilot %s submitted for %s (work dir %s)", batch_id, spec.site, workdir)
        return batch_id

    def status(self, batch_ids: list[str]) -> dict[str, BatchState]:
        return {bid: info.state for bid, info in self.details(batch_ids).items()}

    def details(self, batch_ids: list[str]) -> dict[str, BatchInfo]:
        with self._locked():
            self._schedule()
            out = {}
            for bid in batch_ids:
                try:
                    record = self._read(bid)
                except SchedulerError:
                    record = None
                out[bid] = (BatchInfo(BatchState(record["state"]), record.get("exit_code"),
                                      record.get("reason", ""))
                            if record else BatchInfo(BatchState.UNKNOWN, None, "no such pilot"))
            return out

    def cancel(self, batch_ids: list[str]) -> None:
        with self._locked():
            for bid in batch_ids:
                record = self._read(bid)
                if record is None or record["state"] in ("done", "failed", "cancelled"):
                    continue
                if record["state"] == "running":
                    self._kill(record)
                record.update(state="cancelled", reason="cancelled by the factory")
                record.pop("env", None)
                self._write(record)
                log.info("local pilot %s cancelled", bid)
            self._schedule()

    # ------------------------------------------------------------------ the tiny batch system
    def _alive(self, record: dict) -> bool:
        """Is the recorded process still this pilot (same pid *and* same start time)?"""
        child = self._children.get(record["batch_id"])
        if child is not None and child.poll() is not None:
            self._children.pop(record["batch_id"], None)
            return False
        try:
            proc = psutil.Process(record["pid"])
            return (abs(proc.create_time() - record["create_time"]) < 0.01
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except (psutil.Error, TypeError):
            return False

    def _kill(self, record: dict) -> None:
        """SIGTERM the pilot's process group, SIGKILL what is left after the grace time."""
        if not self._alive(record):
            return
        pgid = record["pid"]            # own session: the group id is the wrapper's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.kill_grace_s
        while time.monotonic() < deadline and self._alive(record):
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child = self._children.pop(record["batch_id"], None)
        if child is not None:
            child.wait()

    def _refresh(self, record: dict) -> bool:
        """Update a running record from its process and exit-code file; True if it changed."""
        exit_file = Path(record["workdir"]) / "exit_code"
        if self._alive(record):
            limit = record.get("walltime_s") or 0
            if (self.enforce_walltime and limit and record.get("started")
                    and time.time() - record["started"] > limit + WALLTIME_GRACE_S):
                self._kill(record)
                record.update(state="failed", reason=f"wall time of {limit} s exceeded")
                return True
            return False
        code = None
        try:
            code = int(exit_file.read_text().strip())
        except (OSError, ValueError):
            pass
        if code is None:
            record.update(state="failed", reason="pilot process vanished without an exit code")
        else:
            record.update(exit_code=code, state="done" if code == 0 else "failed",
                          reason="" if code == 0 else f"pilot exited with code {code}")
        return True

    def _schedule(self) -> None:
        """Refresh running pilots, then start queued ones while slots are free (lock held)."""
        records = self._records()
        running = 0
        now = time.time()
        for record in records:
            if record["state"] in ("done", "failed", "cancelled"):
                self._forget_if_old(record, now)
            elif record["state"] == "running":
                if self._refresh(record):
                    record.pop("env", None)
                    self._write(record)
                else:
                    running += 1
        for record in sorted((r for r in records if r["state"] == "queued"),
                             key=lambda r: r["submitted"]):
            if running >= self.slots:
                break
            self._start(record)
            running += record["state"] == "running"

    def _forget_if_old(self, record: dict, now: float) -> None:
        path = self._record_path(record["batch_id"])
        try:
            if now - path.stat().st_mtime <= self.keep_final_s:
                return
            path.unlink()
        except OSError:
            return
        workdir = Path(record["workdir"]).resolve()
        root = self.state_dir.resolve()
        if workdir != root and workdir.is_relative_to(root):
            shutil.rmtree(workdir, ignore_errors=True)

    def _start(self, record: dict) -> None:
        workdir = Path(record["workdir"])
        env = {**os.environ, **record.get("env", {}), "PANDA_BATCH_ID": record["batch_id"]}
        try:
            with open(workdir / "pilot.log", "ab") as logf:
                child = subprocess.Popen(["/bin/sh", "-c", _WRAPPER, "sh", *record["command"]],
                                         cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as exc:
            record.update(state="failed", reason=f"cannot start the pilot: {exc.strerror or exc}")
            record.pop("env", None)
            self._write(record)
            log.error("local pilot %s could not start: %s", record["batch_id"], exc)
            return
        self._children[record["batch_id"]] = child
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:
            create_time = None
        record.update(state="running", pid=child.pid, create_time=create_time, started=time.time())
        record.pop("env", None)          # the token is no longer needed on disk once started
        self._write(record)
        log.info("local pilot %s started as pid %d", record["batch_id"], child.pid)
