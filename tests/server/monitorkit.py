"""A database for the monitor's tests: jobs in every state, with an error of every component,
state histories, files, a retry chain, an archived job, a log tarball on a local storage
element, factories and pilots, operations-history snapshots, an alarm and incidents.

``seed_monitor(tb, se_dir)`` returns the ids the tests look for (:class:`Seeded`).
"""
from __future__ import annotations

import datetime as dt
import io
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, insert, select, update

from server import archivetiers, db
from server.monitor import history
from server.monitor.alarms import Alarms
from server.taskbuffer import TaskBuffer
from dbkit import site_config

STATES = ["defined", "assigned", "activated", "sent", "starting", "running", "holding",
          "transferring", "finished", "failed", "cancelled", "closed"]
#: (component code column, code, diag column, diag) of the failed jobs, one per component
FAILURES = [
    ("pilot_error_code", 1099, "pilot_error_diag", "stage-in failed: no such file in.x"),
    ("exe_error_code", 65, "exe_error_diag", "payload exited with 65"),
    ("dispatcher_error_code", 100, "dispatcher_error_diag", "lost heartbeat: no word for 7200 s"),
    ("ddm_error_code", 100, "ddm_error_diag", "input in.y could not be placed at SE_A"),
    ("task_buffer_error_code", 300, "task_buffer_error_diag", "killed by alice"),
]
PATH_ORDER = ["defined", "assigned", "activated", "sent", "starting", "running", "holding",
              "transferring"]


@dataclass
class Seeded:
    sites: list[str]
    task_ids: list[int]
    by_state: dict[str, int] = field(default_factory=dict)       # state -> a PandaID in it
    failed: dict[str, int] = field(default_factory=dict)         # code column -> PandaID
    with_log: int = 0
    retry: int = 0
    retried: int = 0
    archived: int = 0
    alarm_id: int = 0
    n_jobs: int = 0


def _path_to(state: str) -> list[str]:
    """The states a job went through to reach ``state``."""
    if state in PATH_ORDER:
        return PATH_ORDER[:PATH_ORDER.index(state) + 1]
    if state == "closed":
        return PATH_ORDER[:6] + ["finished", "closed"]
    if state == "cancelled":
        return PATH_ORDER[:3] + ["cancelled"]
    return PATH_ORDER[:6] + ["holding", state]


def add_job(conn, now: dt.datetime, *, task_id: int, serial: int, status: str, site: str | None,
            owner: str = "alice", table=db.jobs, age_min: float = 30, **extra) -> int:
    """One job that reached ``status`` ``age_min`` minutes ago, with its history and files."""
    path = _path_to(status)
    t0 = now - dt.timedelta(minutes=age_min + 10 * len(path))
    times = [t0 + dt.timedelta(minutes=10 * i) for i in range(len(path))]
    started = next((times[i] for i, s in enumerate(path) if s == "running"), None)
    final = status in ("finished", "failed", "cancelled", "closed")
    values = {
        "task_id": task_id, "serial": serial, "attempt_nr": 1, "max_attempts": 3,
        "parent_id": None, "status": status, "site": site, "owner": owner,
        "prod_source_label": "managed", "share": "production", "priority": 1000,
        "current_priority": 1000, "transformation": "/bin/sh", "job_pars": "-c true",
        "cores": 1, "memory_mb": 1000, "walltime_s": 600, "disk_mb": 100,
        "creation_time": t0, "modification_time": times[-1], "state_changed": times[-1],
        "start_time": started, "end_time": times[-1] if final else None,
        "heartbeat_time": times[-1], "pilot_error_code": 0, "exe_error_code": 0,
        "dispatcher_error_code": 0, "ddm_error_code": 0, "task_buffer_error_code": 0,
        "working_group": "AP_MC", "node": "wn01.example.org",
        "cpu_consumption_time": 420.0 if started and final else None,
        "max_rss": 512000 if started else None, **extra}
    archived = table is db.jobs_archive
    if archived:                        # archived whole: its history and files too
        values["panda_id"] = extra.get("panda_id")
        values["archived_at"] = now
    panda_id = conn.execute(insert(table).values(**values)).inserted_primary_key[0]
    history_rows = [
        {"panda_id": panda_id, "old_status": path[i - 1] if i else None, "new_status": s,
         "time": times[i], "actor": "seed"} for i, s in enumerate(path)]
    file_rows = [
        {"panda_id": panda_id, "task_id": task_id, "type": "input", "scope": "test",
         "lfn": f"in.{task_id}.{serial:06d}", "dataset": "test.in", "guid": str(uuid.uuid4()),
         "fsize": 100, "checksum": "ad:00000001", "status": "ready", "ddm_endpoint": None},
        {"panda_id": panda_id, "task_id": task_id, "type": "output", "scope": "test",
         "lfn": f"out.{task_id}.{serial:06d}", "dataset": "test.out",
         "guid": str(uuid.uuid4()), "fsize": None, "checksum": None, "status": "defined",
         "ddm_endpoint": None},
        {"panda_id": panda_id, "task_id": task_id, "type": "log", "scope": "test",
         "lfn": f"log.{task_id}.{serial:06d}.1.tgz", "dataset": "test.log",
         "guid": str(uuid.uuid4()), "fsize": None, "checksum": None, "status": "defined",
         "ddm_endpoint": None}]
    if not archived:
        conn.execute(insert(db.job_history), history_rows)
        conn.execute(insert(db.files), file_rows)
        return int(panda_id)
    # archive rows keep the ids the live tables gave them: ask the live tables for ids
    for live, tier, rows in ((db.job_history, db.job_history_archive, history_rows),
                             (db.files, db.files_archive, file_rows)):
        for r in rows:
            row_id = conn.execute(insert(live).values(**r)).inserted_primary_key[0]
            conn.execute(delete(live).where(live.c.row_id == row_id))
            conn.execute(insert(tier).values(**r, row_id=row_id, archived_at=now))
    return int(panda_id)


def _tarball(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("log/payload.stdout", "hello from the payload\nline 2\n"),
                           ("log/payload.stderr", "a warning on stderr\n"),
                           ("log/pilot.log", "2026-01-01 INFO pilot: job started\n"),
                           ("log/work/result.txt", "42\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def seed_monitor(tb: TaskBuffer, se_dir: Path) -> Seeded:
    now = tb.clock()
    se_url = f"file://{se_dir}"
    cfgs = []
    for name, status, region in (("SITE_A", "online", "EU"), ("SITE_B", "offline", "US"),
                                 ("SITE_C", "test", "EU")):
        cfg = site_config(name, f"SE_{name[-1]}", status=status)
        cfg["region"] = region
        for role in ("input", "output"):
            cfg["storage"][role]["url"] = se_url
        cfgs.append(cfg)
    tb.sites.sync(cfgs)
    seeded = Seeded(sites=[c["name"] for c in cfgs], task_ids=[])
    archivetiers.ensure_months(tb.engine, now)        # the archive month of the seeded job
    with tb.engine.begin() as conn:
        t1 = tb.tasks.insert(conn, name="mc.sim", owner="alice", params={"name": "mc.sim"},
                             priority=1000, share="production", site="SITE_A", max_attempts=3)
        t2 = tb.tasks.insert(conn, name="user.bob.ana", owner="bob", params={"name": "ana"},
                             priority=900, share="analysis", site=None, max_attempts=3)
        tb.tasks.set_status(conn, t1, "running")
        tb.tasks.set_status(conn, t2, "ready")
        seeded.task_ids = [t1, t2]
        serial = 0
        for state in STATES:
            serial += 1
            seeded.by_state[state] = add_job(conn, now, task_id=t1, serial=serial, status=state,
                                             site="SITE_A" if state != "defined" else None)
        for code_col, code, diag_col, diag in FAILURES:
            serial += 1
            seeded.failed[code_col] = add_job(conn, now, task_id=t1, serial=serial,
                                              status="failed", site="SITE_A",
                                              **{code_col: code, diag_col: diag})
        # a retry chain: attempt 1 failed (lost heartbeat), attempt 2 running
        serial += 1
        seeded.retried = add_job(conn, now, task_id=t1, serial=serial, status="failed",
                                 site="SITE_A", age_min=90, dispatcher_error_code=100,
                                 dispatcher_error_diag="lost heartbeat (attempt 1)")
        seeded.retry = add_job(conn, now, task_id=t1, serial=serial, status="running",
                               site="SITE_A", attempt_nr=2, parent_id=seeded.retried)
        # bob's analysis jobs: waiting for data (no site) and activated at an offline site
        for i in range(3):
            add_job(conn, now, task_id=t2, serial=i + 1, status="assigned", site=None,
                    owner="bob", share="analysis", prod_source_label="user", cores=8,
                    memory_mb=64000, age_min=60 * 30)
        for i in range(2):
            add_job(conn, now, task_id=t2, serial=10 + i, status="activated", site="SITE_B",
                    owner="bob", share="analysis", prod_source_label="user", age_min=60 * 30)
        # an old job, archived
        seeded.archived = 10**9
        add_job(conn, now, task_id=t1, serial=999, status="finished", site="SITE_A",
                table=db.jobs_archive, panda_id=seeded.archived, age_min=60 * 24 * 5)
        # the finished job's log tarball on the storage element
        fin = seeded.by_state["finished"]
        lfn = f"log.{t1}.{STATES.index('finished') + 1:06d}.1.tgz"
        _tarball(se_dir / "test" / lfn)
        conn.execute(insert(db.replicas).values(scope="test", lfn=lfn, ddm_endpoint="SE_A",
                                                surl=f"{se_url}/test/{lfn}", created=now))
        conn.execute(update(db.files).where(db.files.c.panda_id == fin,
                                            db.files.c.type == "log").values(status="ready"))
        seeded.with_log = fin
        # factories and pilots
        conn.execute(insert(db.factories).values(
            name="fac-1", last_seen=now, actor="factory-host-1",
            site_status={"SITE_A": {"submitting": True},
                         "SITE_B": {"submitting": False, "reason": "5 pilots failed in a row",
                                    "consecutive_failures": 5}}))
        conn.execute(insert(db.pilots), [
            {"factory": "fac-1", "batch_id": str(100 + i), "site": "SITE_A", "backend": "local",
             "state": st, "submitted": now - dt.timedelta(minutes=30), "updated": now,
             "exit_code": 0 if st == "done" else None}
            for i, st in enumerate(["running", "running", "queued", "done"])])
        conn.execute(insert(db.incidents), [
            {"time": now - dt.timedelta(minutes=5), "component": "server.watcher",
             "level": "WARNING", "message": f"job {seeded.retried}: lost heartbeat",
             "site": "SITE_A", "panda_id": seeded.retried, "host": "h1", "suppressed": 0},
            {"time": now - dt.timedelta(minutes=3), "component": "server.dataservice",
             "level": "ERROR", "message": "input in.y could not be placed at SE_A",
             "site": "SITE_A", "panda_id": None, "host": "h1", "suppressed": 2}])
    with db.read(tb.engine) as conn:
        seeded.n_jobs = sum(conn.execute(select(func.count()).select_from(t)).scalar()
                            for t in (db.jobs, db.jobs_archive))
    seeded.alarm_id = Alarms(tb).raise_alarm(
        "api:test:SITE_B", "SITE_B pilots fail", severity="critical", source="api",
        message="5 pilots failed in a row", site="SITE_B", raised_by="factory-host-1")["alarm_id"]
    _snapshots(tb)
    return seeded


def _snapshots(tb: TaskBuffer) -> None:
    """Operations-history snapshots over the last day (the clock moved back, then forward)."""
    real = tb.clock
    end = real()
    try:
        for hours_ago in (20, 12, 6, 1):
            at = end - dt.timedelta(hours=hours_ago)
            tb.clock = lambda at=at: at
            history.take_snapshot(tb, 900)
    finally:
        tb.clock = real
