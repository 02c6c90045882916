"""Helpers for the watcher, shares, data-service, event-range and brokerage tests.

Site configs shaped like ``SiteConfig.to_dict()``, task descriptions, submission through the
real submitter and brokerage, replicas written where ``replica_url`` puts them, and a clock that
moves by hand (for the benchmark; tests use conftest's ``clock`` and ``taskbuffer`` fixtures).
"""
from __future__ import annotations

import datetime as dt
import zlib
from pathlib import Path

from panda_core.replicas import replica_url
from server.brokerage import Brokerage
from server.hookspecs import plugin_manager
from server.submission import TaskSubmitter
from server.taskbuffer import TaskBuffer


class ManualClock:
    """A clock that only moves when the test says so (naive UTC, like the database)."""

    def __init__(self, start: dt.datetime = dt.datetime(2026, 1, 1, 12, 0, 0)):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw) -> dt.datetime:
        self.now += dt.timedelta(**kw)
        return self.now


def site(name: str, se: str = "SE_A", se_url: str = "file:///nonexistent", *, status="online",
         cores=4, memory_mb=4000, walltime_s=7200, disk_mb=20000, max_running=10,
         out_se: str | None = None, out_url: str | None = None) -> dict:
    return {
        "name": name, "region": "test", "status": status,
        "resources": {"cores": cores, "memory_mb": memory_mb, "max_walltime_s": walltime_s,
                      "max_disk_mb": disk_mb},
        "scheduler": {"backend": "local", "options": {}},
        "pilots": {"max_queued": 2, "max_running": max_running, "rate_per_minute": 60,
                   "walltime_s": walltime_s},
        "storage": {"input": {"name": se, "url": se_url},
                    "output": {"name": out_se or se, "url": out_url or se_url}},
        "copytools": {"input": {"name": "cp", "options": {}},
                      "output": {"name": "cp", "options": {}}},
        "direct_read": False, "transfer": {"timeout_s": 60, "retries": 1},
        "limits": {"looping_s": 600, "min_free_disk_mb": 100, "max_workdir_mb": 2000,
                   "heartbeat_s": 60},
    }


def submitter(tb: TaskBuffer, pm=None) -> TaskSubmitter:
    pm = pm or plugin_manager(load_entry_points=False)
    return TaskSubmitter(tb, Brokerage(pm.hook))


def task(name: str = "t", n_jobs: int | None = 2, **kw) -> dict:
    t = {"name": name, "scope": "s", "transformation": "/bin/true", "max_attempts": 2,
         "resources": {"cores": 1, "memory_mb": 100, "walltime_s": 60}}
    if n_jobs:
        t["n_jobs"] = n_jobs
    t.update(kw)
    return t


def put_file(se_root: Path, scope: str, lfn: str, data: bytes) -> dict:
    """Write a replica below a file:// storage element; returns its dataset-file record."""
    path = Path(replica_url(str(se_root), scope, lfn))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"lfn": lfn, "fsize": len(data), "checksum": f"ad:{zlib.adler32(data):08x}"}
