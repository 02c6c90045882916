"""Helpers for the database-layer tests: sites and jobs put straight into the task buffer.

``seed_jobs`` writes thousands of activated jobs (with their files and history rows) in a few
executemany statements, so concurrency tests and benchmarks start in a second, not minutes.
"""
from __future__ import annotations

import asyncio
import json
import uuid
import zlib

from sqlalchemy import func, insert, select

from panda_core.replicas import replica_url
from server import db
from server.taskbuffer import TaskBuffer
from testkit import free_port, start_server, stop_server, wait_http  # noqa: F401 (re-exported)


#: the storage element of every test site (never written to: outputs are only reported)
SE_URL = "file:///nonexistent/se"


def site_config(name: str, se: str = "SE_A", *, cores: int = 8, memory_mb: int = 16000,
                walltime_s: int = 86400, status: str = "online") -> dict:
    """A site config shaped like ``SiteConfig.to_dict()``."""
    url = SE_URL
    return {
        "name": name, "region": "test", "status": status,
        "resources": {"cores": cores, "memory_mb": memory_mb, "max_walltime_s": walltime_s,
                      "max_disk_mb": 20000},
        "scheduler": {"backend": "local", "options": {}},
        "pilots": {"max_queued": 2, "max_running": 100, "rate_per_minute": 60,
                   "walltime_s": walltime_s},
        "storage": {"input": {"name": se, "url": url}, "output": {"name": se, "url": url}},
        "copytools": {"input": {"name": "cp", "options": {}},
                      "output": {"name": "cp", "options": {}}},
        "direct_read": False, "transfer": {"timeout_s": 60, "retries": 1},
        "limits": {"looping_s": 600, "min_free_disk_mb": 100, "max_workdir_mb": 2000,
                   "heartbeat_s": 1800},
    }


def counts_by_group_by(tb: TaskBuffer) -> dict:
    """What the job counters (``tb.counts.read()``) must say: a GROUP BY over the jobs table."""
    j = db.jobs.c
    site = func.coalesce(j.site, "")
    with tb.engine.connect() as conn:
        return {(s, share, status): (n, int(cores)) for s, share, status, n, cores in conn.execute(
            select(site, j.share, j.status, func.count(), func.sum(j.cores))
            .group_by(site, j.share, j.status))}


def add_site(tb: TaskBuffer, name: str = "SITE_A", **kw) -> dict:
    cfg = site_config(name, **kw)
    tb.sites.sync([cfg])
    return cfg


def seed_jobs(tb: TaskBuffer, site: str, n: int, *, task_name: str = "bulk",
              owner: str = "alice", priority: int = 1000, priorities: list[int] | None = None,
              max_attempts: int = 3, status: str = "activated", cores: int = 1,
              memory_mb: int = 1000, walltime_s: int = 600, pilot_version: str | None = None,
              task_id: int | None = None) -> tuple[int, list[int]]:
    """Create a task (unless ``task_id``) with ``n`` jobs in ``status`` at ``site``.

    Each job has one input, one output and one log file, and one history row (None -> status).
    Returns (task_id, PandaIDs in serial order).
    """
    now = tb.clock()
    with tb.engine.begin() as conn:
        if task_id is None:
            task_id = tb.tasks.insert(conn, name=task_name, owner=owner, params={"name": task_name},
                                     priority=priority, share="production", site=site,
                                     max_attempts=max_attempts)
            tb.tasks.set_status(conn, task_id, "ready")
        first = conn.execute(select(db.jobs.c.serial).where(db.jobs.c.task_id == task_id)
                             .order_by(db.jobs.c.serial.desc()).limit(1)).scalar() or 0
        rows = []
        for i in range(n):
            serial = first + i + 1
            prio = priorities[i] if priorities else priority
            rows.append({
                "task_id": task_id, "serial": serial, "attempt_nr": 1,
                "max_attempts": max_attempts, "parent_id": None, "status": status,
                "site": site, "owner": owner, "prod_source_label": "managed",
                "share": "production", "priority": prio, "current_priority": prio,
                "transformation": "/bin/sh", "job_pars": f"-c 'echo {serial}'",
                "cores": cores, "memory_mb": memory_mb, "walltime_s": walltime_s,
                "disk_mb": 100, "pilot_version": pilot_version, "transfer_type": None,
                "command": None, "creation_time": now, "modification_time": now,
                "state_changed": now, "pilot_error_code": 0, "exe_error_code": 0,
                "dispatcher_error_code": 0, "task_buffer_error_code": 0})
        if rows:
            conn.execute(insert(db.jobs), rows)
        ids = [r[0] for r in conn.execute(
            select(db.jobs.c.panda_id).where(db.jobs.c.task_id == task_id,
                                             db.jobs.c.serial > first)
            .order_by(db.jobs.c.serial))]
        if ids:
            conn.execute(insert(db.job_history), [
                {"panda_id": pid, "old_status": None, "new_status": status, "time": now,
                 "actor": "seed"} for pid in ids])
            files = []
            for pid, row in zip(ids, rows):
                serial = row["serial"]
                files += [
                    _file(pid, task_id, "input", f"in.{task_id}.{serial:06d}", f"{task_name}.in",
                          "ready", fsize=10, checksum="ad:00000001"),
                    _file(pid, task_id, "output", out_lfn(task_id, serial), f"{task_name}.out",
                          "defined"),
                    _file(pid, task_id, "log", f"log.{task_id}.{serial:06d}.1.tgz",
                          f"{task_name}.out", "defined"),
                ]
            conn.execute(insert(db.files), files)
    return task_id, ids


def out_lfn(task_id: int, serial: int) -> str:
    return f"out.{task_id}.{serial:06d}"


def _file(pid: int, task_id: int, ftype: str, lfn: str, dataset: str, status: str,
          fsize: int | None = None, checksum: str | None = None) -> dict:
    return {"panda_id": pid, "task_id": task_id, "type": ftype, "scope": "test", "lfn": lfn,
            "dataset": dataset, "guid": str(uuid.uuid4()), "fsize": fsize, "checksum": checksum,
            "status": status, "ddm_endpoint": None}


def stored_files(lfns: list[str]) -> dict[str, dict]:
    """What a pilot reports in the final updateJob's ``xml`` for files it stored (at the SURL
    the server computes: another one counts as not stored)."""
    out = {}
    for lfn in lfns:
        data = lfn.encode()
        out[lfn] = {"guid": str(uuid.uuid4()), "fsize": len(data),
                    "adler32": f"{zlib.adler32(data):08x}", "surl": replica_url(SE_URL, "test", lfn)}
    return out


def stored_xml(lfns: list[str]) -> str:
    return json.dumps(stored_files(lfns))


class BlockingDispatcher:
    """A ``Dispatcher`` for plain test code: each protocol call runs to its end on an event
    loop of its own, the blocking work in that loop's thread pool (as in the server)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.tb, self.keys, self.job_chooser = dispatcher.tb, dispatcher.keys, dispatcher.job_chooser

    def get_job(self, form: dict, identity=None) -> dict:
        return asyncio.run(self.dispatcher.get_job(form, identity))

    def update_job(self, form: dict, identity=None) -> dict:
        return asyncio.run(self.dispatcher.update_job(form, identity))

    def get_status(self, form: dict, identity=None) -> dict:
        return asyncio.run(self.dispatcher.get_status(form, identity))

    def get_event_ranges(self, form: dict, identity=None) -> dict:
        return asyncio.run(self.dispatcher.get_event_ranges(form, identity))

    def update_event_ranges(self, form: dict, identity=None) -> dict:
        return asyncio.run(self.dispatcher.update_event_ranges(form, identity))


def history(tb: TaskBuffer, panda_id: int) -> list[tuple[str | None, str]]:
    return [(h["old_status"], h["new_status"]) for h in tb.jobs.history(panda_id)]
