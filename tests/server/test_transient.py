"""Issue 13, point 3: a transient database failure loses no job result.

Against a real ``panda server`` on PostgreSQL (hot path and general path) and MariaDB whose
backends the test kills mid-job (``pg_terminate_backend``, ``KILL CONNECTION``): the server
retries, the job's final update is applied, its outputs registered and its task settled. A
database that stays away gets StatusCode 10 (pilot protocol) and 503 with Retry-After (API),
and the same final update, re-sent later, lands. The watcher settles a task whose jobs all
ended but whose status did not follow (the kill -9 window), in a running server too.
"""
from __future__ import annotations

import json
import sqlite3
import uuid
import zlib

import pytest
import requests
from sqlalchemy import create_engine, insert, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from dbkit import add_site, seed_jobs, start_server, stop_server
from panda_core.replicas import replica_url
from server import db
from server.transient import is_transient, retrying
from server.watcher import Watcher
from testkit import wait_for

SE_URL = "file:///nonexistent/se"     # dbkit.site_config's storage element


def _admin(url: str):
    u = make_url(url)
    admin = u.set(database="postgres" if u.get_backend_name() == "postgresql" else "")
    return create_engine(admin, isolation_level="AUTOCOMMIT"), u.database


def kill_backends(url: str) -> int:
    """Kill every connection to the database of ``url`` (the server's); how many."""
    admin, name = _admin(url)
    try:
        with admin.connect() as conn:
            if admin.dialect.name == "postgresql":
                return len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name}).all())
            ids = conn.execute(text(
                "SELECT id FROM information_schema.processlist WHERE db = :d "
                "AND id <> CONNECTION_ID()"), {"d": name}).scalars().all()
            for i in ids:
                try:
                    conn.execute(text(f"KILL CONNECTION {int(i)}"))
                except DBAPIError:        # it ended meanwhile
                    pass
            return len(ids)
    finally:
        admin.dispose()


def allow_connections(url: str, allowed: bool) -> None:
    """PostgreSQL: let no one (superusers included) connect to the database, or again."""
    admin, name = _admin(url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS '
                              f'{"true" if allowed else "false"}'))
    finally:
        admin.dispose()


def final_form(job: dict, site: str) -> dict:
    """A pilot's final updateJob for a job of ``getJob``: its outputs stored on the site's SE."""
    stored = {}
    for lfn in job["outFiles"].split(","):
        stored[lfn] = {"guid": str(uuid.uuid4()), "fsize": len(lfn),
                       "adler32": f"{zlib.adler32(lfn.encode()):08x}",
                       "surl": replica_url(SE_URL, "test", lfn)}
    return {"jobId": job["PandaID"], "state": "finished", "attemptNr": job["attemptNr"],
            "siteName": site, "transExitCode": 0, "xml": json.dumps(stored)}


class Pilot:
    def __init__(self, server, site: str):
        self.url, self.site = server.url, site
        self.s = requests.Session()
        self.s.headers.update({"Accept": "application/json", "Authorization":
                               f"Bearer {server.token('pilot', 'p1', site=site)}"})

    def call(self, method: str, form: dict) -> dict:
        reply = self.s.post(f"{self.url}/server/panda/{method}", data=form, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def get_job(self) -> dict:
        job = self.call("getJob", {"siteName": self.site, "node": "wn1"})
        assert job["StatusCode"] == 0, job
        return job

    def running(self, job: dict) -> dict:
        return self.call("updateJob", {"jobId": job["PandaID"], "state": "running",
                                       "attemptNr": job["attemptNr"], "siteName": self.site})


def _job_and_task(tb, panda_id: int, task_id: int) -> tuple[str, str, list]:
    tb.engine.dispose()                 # the test's own connections were killed too
    job = tb.jobs.get(panda_id)
    outs = [f["status"] for f in job["files"] if f["type"] in ("output", "log")]
    return job["status"], tb.tasks.get(task_id)["status"], outs


# ---------------------------------------------------------------------- classification
def test_real_driver_failures_are_told_from_refusals(taskbuffer):
    engine = taskbuffer.engine
    if engine.dialect.name == "sqlite":
        assert is_transient(OperationalError("BEGIN", {}, sqlite3.OperationalError(
            "database is locked")))
    else:
        with engine.connect() as conn:              # a connection the database then kills
            conn.execute(text("SELECT 1"))
            kill_backends(str(engine.url.render_as_string(hide_password=False)))
            with pytest.raises(DBAPIError) as killed:
                conn.execute(text("SELECT 1"))
        assert is_transient(killed.value)
        # the pool was dropped whole (db.make_engine's handle_error): the next connection is
        # a new one, whichever pooled ones the kill hit too
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 2")).scalar() == 2
    row = {"name": "SITE_T", "status": "online", "config": {}, "updated": taskbuffer.clock()}
    with pytest.raises(IntegrityError) as dup:     # a refusal: never retried
        with engine.begin() as conn:
            conn.execute(insert(db.sites).values(**row))
            conn.execute(insert(db.sites).values(**row))
    assert not is_transient(dup.value)
    calls = []

    def refused():
        calls.append(1)
        raise dup.value
    with pytest.raises(IntegrityError):
        retrying(refused)
    assert len(calls) == 1
    assert not is_transient(ValueError("bug")) and not is_transient(None)


# ---------------------------------------------------------------------- against a server
KILLABLE = [pytest.param("postgresql", [], id="postgresql-hot", marks=pytest.mark.postgres),
            pytest.param("postgresql", ["--no-hot-path"], id="postgresql-general",
                         marks=pytest.mark.postgres),
            pytest.param("mysql", [], id="mysql", marks=pytest.mark.mysql)]


@pytest.mark.parametrize("backend, extra", KILLABLE)
def test_backends_killed_mid_job_lose_nothing(backend, extra, db_backend, taskbuffer, tmp_path):
    if db_backend != backend:
        pytest.skip(f"runs on {backend}")
    tb = taskbuffer
    add_site(tb, "SITE_K")
    task_id, (pid,) = seed_jobs(tb, "SITE_K", 1, max_attempts=1)
    url = tb.engine.url.render_as_string(hide_password=False)
    server = start_server(tmp_path / "srv", db_url=url, extra=["--threads", "2", *extra])
    try:
        pilot = Pilot(server, "SITE_K")
        job = pilot.get_job()
        assert kill_backends(url) >= 1            # every connection the server holds
        assert pilot.running(job) == {"StatusCode": 0, "command": "NULL"}
        assert kill_backends(url) >= 1
        assert pilot.call("updateJob", final_form(job, "SITE_K")) == {"StatusCode": 0,
                                                                       "command": "NULL"}
        assert _job_and_task(tb, pid, task_id) == ("finished", "done", ["ready", "ready"])
        assert kill_backends(url) >= 1            # and the API's reads survive it too
        reply = requests.get(f"{server.url}/api/v1/task/get_status", timeout=30,
                             params={"task_id": task_id}).json()
        assert reply == {"success": True, "message": "", "data": "done"}
        log = server.log()
        assert "transient" in log
        assert "internal server error" not in log and "Traceback" not in log
    finally:
        stop_server(server)


@pytest.mark.postgres
def test_database_away_answers_try_again_then_the_resent_report_lands(db_backend, taskbuffer,
                                                                      tmp_path):
    if db_backend != "postgresql":
        pytest.skip("runs on postgresql (ALLOW_CONNECTIONS)")
    tb = taskbuffer
    add_site(tb, "SITE_K")
    task_id, (pid,) = seed_jobs(tb, "SITE_K", 1, max_attempts=1)
    url = tb.engine.url.render_as_string(hide_password=False)
    server = start_server(tmp_path / "srv", db_url=url, extra=["--threads", "2"])
    tb.engine.dispose()
    try:
        pilot = Pilot(server, "SITE_K")
        job = pilot.get_job()
        assert pilot.running(job)["StatusCode"] == 0
        allow_connections(url, False)
        try:
            kill_backends(url)
            final = final_form(job, "SITE_K")
            reply = pilot.call("updateJob", final)
            assert reply["StatusCode"] == 10, reply            # try again: nothing applied
            assert "temporarily unavailable" in reply["errorDialog"]
            api = requests.get(f"{server.url}/api/v1/task/get_status", timeout=30,
                               params={"task_id": task_id})
            assert api.status_code == 503 and api.headers["Retry-After"] == "5"
            assert api.json()["success"] is False
            assert "temporarily unavailable" in api.json()["message"]
        finally:
            allow_connections(url, True)
        # the pilot kept its report and sends it again: it lands once
        assert pilot.call("updateJob", final) == {"StatusCode": 0, "command": "NULL"}
        assert _job_and_task(tb, pid, task_id) == ("finished", "done", ["ready", "ready"])
        log = server.log()
        assert "answered 'try again'" in log and "answered 503" in log
        assert "Traceback" not in log
    finally:
        allow_connections(url, True)
        stop_server(server)


# ---------------------------------------------------------------------- the kill -9 window
def test_watcher_settles_a_task_whose_jobs_all_ended(taskbuffer, monkeypatch):
    tb = taskbuffer
    add_site(tb)
    task_id, (pid,) = seed_jobs(tb, "SITE_A", 1, max_attempts=1, status="running")
    with tb.engine.begin() as conn:
        tb.tasks.set_status(conn, task_id, "running")

    def lost(task):      # the database went away right after the job's update committed
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked"))
    monkeypatch.setattr(tb.tasks, "after_job_end", lost)
    monkeypatch.setattr("server.transient.RETRY_DELAYS_S", (0.0,))
    outs = [f["lfn"] for f in tb.jobs.get(pid)["files"] if f["type"] in ("output", "log")]
    stored = {lfn: {"guid": str(uuid.uuid4()), "fsize": 1, "adler32": "00000001",
                    "surl": replica_url(SE_URL, "test", lfn)} for lfn in outs}
    assert tb.pilots.update(pid, "finished", {}, actor="p", stored_files=stored) == "NULL"
    assert _job_and_task(tb, pid, task_id)[:2] == ("finished", "running")
    monkeypatch.undo()
    report = Watcher(tb).check()
    assert report.repaired == [task_id]
    assert tb.tasks.get(task_id)["status"] == "done"
    assert Watcher(tb).check().repaired == []            # settled once, then left alone


@pytest.mark.postgres
def test_running_server_repairs_a_task_left_running(db_backend, taskbuffer, tmp_path):
    """The state kill -9 leaves (3 of 3 runs on PostgreSQL in the report): every job final,
    the task still running; the server's watcher settles it."""
    if db_backend != "postgresql":
        pytest.skip("runs on postgresql (the unit test above covers every database)")
    tb = taskbuffer
    add_site(tb, "SITE_K")
    task_id, pids = seed_jobs(tb, "SITE_K", 2, max_attempts=1)
    with tb.engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.task_id == task_id)
                     .values(status="finished"))
        tb.tasks.set_status(conn, task_id, "running")
    url = tb.engine.url.render_as_string(hide_password=False)
    server = start_server(tmp_path / "srv", db_url=url, extra=["--watcher-interval", "0.2"])
    try:
        wait_for(lambda: requests.get(f"{server.url}/api/v1/task/get_status", timeout=10,
                                      params={"task_id": task_id}).json()["data"] == "done",
                 "the watcher's repair", timeout=20)
        assert "every job had ended but the task stayed running" in server.log()
    finally:
        stop_server(server)
