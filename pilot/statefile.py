"""One small state file per job, and a lock that says whether its pilot is alive.

The owning pilot holds an exclusive POSIX record lock (``lockf``) on ``.pilot.lock`` for as long
as it lives; the kernel drops it when the pilot dies, however it dies. Record locks, unlike
``flock``, are not inherited by forked children, so a hung copytool process left behind by a dead
pilot does not keep its job dir locked. A later pilot that can take the lock knows the
owner is gone (no pid-reuse guesswork) and may recover the job. The state file is rewritten
atomically (write + rename), so a crash never leaves half a file.

Only the phases that hold what exists nowhere else are forced to disk (``DURABLE``: the
payload's result, a final update the server has not taken). The phases before them are not:
a node that crashes there takes the payload with it, and the server's watcher reclaims the job
as it does for a node that never comes back; their fsyncs cost 1-15 ms each on the way to the
payload on a busy disk (measured, docs/pilot.md "Performance").
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

STATE_FILE = "pilot_state.json"
LOCK_FILE = ".pilot.lock"
JOB_DIR_PREFIX = "panda_job_"
WORK_DIR = "work"          # the payload's folder inside a job dir

# phases, in order
RECEIVED, STAGEIN, RUNNING, STAGEOUT, FINAL_PENDING, DONE = (
    "received", "stagein", "running", "stageout", "final_pending", "done")
#: the phases whose state file is fsynced before it replaces the last one
DURABLE = frozenset({STAGEOUT, FINAL_PENDING})


class JobLock:
    """Exclusive, non-blocking lock on a job dir; released on close or process death."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    """Replace the state file with ``state`` (and the time), through the disk for a ``DURABLE``
    phase."""
    state = {**state, "updated": time.time()}
    tmp = workdir / f".{STATE_FILE}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        if state.get("phase") in DURABLE:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, workdir / STATE_FILE)


def read_state(workdir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_dirs(base: Path) -> list[Path]:
    try:
        return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(JOB_DIR_PREFIX))
    except OSError:
        return []
