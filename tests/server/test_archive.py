"""Archiving old final jobs on SQLite, PostgreSQL and MariaDB, with a hand-moved clock."""
from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import func, select

from dbkit import add_site, history, seed_jobs, stored_files
from server import db
from server.archive import archive_jobs


def _finish(tb, clock, pid):
    job = tb.jobs.get(pid)
    lfns = [f["lfn"] for f in job["files"] if f["type"] != "input"]
    tb.pilots.update(pid, "running", {}, actor="p")
    tb.pilots.update(pid, "finished", {}, actor="p", stored_files=stored_files(lfns),
                    output_endpoint="SE_A")


def _count(tb, table) -> int:
    with tb.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_archive_moves_only_old_final_jobs_and_keeps_them_findable(taskbuffer, clock):
    tb = taskbuffer
    add_site(tb)
    task_id, ids = seed_jobs(tb, "SITE_A", 4, max_attempts=1)
    done, killed, running, queued = ids
    for pid in ids[:3]:
        assert tb.jobs.dispatch("SITE_A", node="wn", actor="p")["panda_id"] == pid
    _finish(tb, clock, done)
    tb.jobs.kill(killed, actor="alice")
    tb.pilots.update(running, "running", {}, actor="p")
    counts_before = tb.tasks.job_counts(task_id)
    files_before = tb.jobs.get(done)["files"]

    clock.advance(minutes=30)
    assert archive_jobs(tb, older_than_s=3600) == 0          # not old enough yet
    clock.advance(hours=1)
    assert archive_jobs(tb, older_than_s=3600) == 2
    assert archive_jobs(tb, older_than_s=3600) == 0          # nothing moves twice

    live = {j["panda_id"] for j in tb.jobs.find(task_id=task_id) if not j.get("archived")}
    with tb.engine.connect() as conn:
        in_live = {r[0] for r in conn.execute(select(db.jobs.c.panda_id))}
        in_archive = {r[0] for r in conn.execute(select(db.jobs_archive.c.panda_id))}
    assert in_live == {running, queued} and in_archive == {done, killed}
    # users' queries still find them, with their files and history
    job = tb.jobs.get(done)
    assert job["archived"] and job["status"] == "finished"
    assert job["files"] == files_before
    assert history(tb, done)[-1] == ("holding", "finished")
    assert tb.jobs.get(killed)["status"] == "cancelled"
    assert {j["panda_id"] for j in tb.jobs.find(task_id=task_id)} == set(ids) >= live
    assert tb.tasks.job_counts(task_id) == counts_before
    assert tb.tasks.job_ids(task_id) == sorted(ids)
    # the live table no longer answers for them: a late heartbeat is told to stop
    assert tb.pilots.update(done, "running", {}, actor="p") == "tobekilled"
    assert tb.jobs.get(done, include_archive=False) is None


def test_archive_in_batches(taskbuffer, clock):
    tb = taskbuffer
    add_site(tb)
    seed_jobs(tb, "SITE_A", 25, status="cancelled")
    clock.advance(days=10)
    assert archive_jobs(tb, older_than_s=86400, batch=10) == 25
    assert _count(tb, db.jobs) == 0 and _count(tb, db.jobs_archive) == 25


def test_archive_rejects_negative_age(taskbuffer):
    with pytest.raises(ValueError):
        archive_jobs(taskbuffer, -1)


def test_panda_db_archive_command(taskbuffer):
    tb = taskbuffer
    add_site(tb)
    seed_jobs(tb, "SITE_A", 3, status="finished")     # "ended" at the fixture clock's 2026-01-01
    seed_jobs(tb, "SITE_A", 2, status="running")
    url = tb.engine.url.render_as_string(hide_password=False)
    run = lambda age: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "panda_wms.cli", "db", "archive", "--older-than", age,
         "--db", url], capture_output=True, text=True, timeout=60)
    res = run("1e10")                                   # older than ~300 years: none
    assert res.returncode == 0 and "archived 0 job(s)" in res.stdout, res.stderr
    res = run("3600")
    assert res.returncode == 0 and "archived 3 job(s)" in res.stdout, res.stderr
    assert _count(tb, db.jobs) == 2 and _count(tb, db.jobs_archive) == 3


@pytest.mark.slow
def test_server_archives_periodically(taskbuffer, tmp_path):
    """``panda server --archive-after S --archive-interval T`` archives by itself."""
    import time

    from dbkit import start_server, stop_server

    tb = taskbuffer
    add_site(tb)
    seed_jobs(tb, "SITE_A", 3, status="failed")
    url = tb.engine.url.render_as_string(hide_password=False)
    server = start_server(tmp_path / "srv", db_url=url,
                          extra=["--archive-after", "60", "--archive-interval", "0.2"])
    try:
        deadline = time.monotonic() + 20
        while _count(tb, db.jobs_archive) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _count(tb, db.jobs_archive) == 3 and _count(tb, db.jobs) == 0, server.log()
    finally:
        stop_server(server)
