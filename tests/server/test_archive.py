"""Archiving old final jobs on SQLite, PostgreSQL and MariaDB, with a hand-moved clock."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from dbkit import add_site, history, seed_jobs, stored_files
from server import archivetiers, db
from server.archive import archive_jobs, keep_from, prune_archive


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


def _rows(tb, table, pids) -> int:
    with tb.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)
                            .where(table.c.panda_id.in_(list(pids)))).scalar_one()


def test_files_and_history_move_with_their_job(taskbuffer, clock):
    tb = taskbuffer
    add_site(tb)
    _task, ids = seed_jobs(tb, "SITE_A", 3, status="finished")
    _task, live = seed_jobs(tb, "SITE_A", 1, status="running")
    before = {pid: (tb.jobs.get(pid)["files"], tb.jobs.history(pid)) for pid in ids}
    clock.advance(days=2)
    assert archive_jobs(tb, older_than_s=86400) == 3
    # nothing of them is left in the live tables, and all of it is in the archive tier
    for live_table, archive in db.ARCHIVE_TIERS:
        assert _rows(tb, live_table, ids) == 0
        assert _rows(tb, archive, ids) == {"jobs": 3, "files": 9, "job_history": 3}[
            live_table.name]
        assert _rows(tb, live_table, live) > 0 and _rows(tb, archive, live) == 0
    with tb.engine.connect() as conn:
        stamps = set(conn.execute(select(db.files_archive.c.archived_at)).scalars())
    assert stamps == {clock()}
    for pid in ids:
        job = tb.jobs.get(pid)
        assert job["archived"] and job["archived_at"] == clock()
        assert (job["files"], tb.jobs.history(pid)) == before[pid]
    assert not tb.jobs.get(live[0])["archived"] and len(tb.jobs.get(live[0])["files"]) == 3


def test_an_interrupted_batch_loses_nothing(taskbuffer, clock):
    """A batch that fails once it has copied and deleted everything, before its commit, is
    rolled back whole: the jobs, files and history are all live again, none in the archive.
    (PostgreSQL moves a batch in one statement, the others in several: the failure comes
    after the statement that deletes the jobs, the last one of a batch on every database.)"""
    from sqlalchemy import event

    tb = taskbuffer
    add_site(tb)
    _task, ids = seed_jobs(tb, "SITE_A", 4, status="failed")
    clock.advance(days=2)

    def crash(conn, cursor, statement, parameters, context, executemany):
        if "DELETE FROM jobs " in statement:
            raise RuntimeError("database went away")
    event.listen(tb.engine, "after_cursor_execute", crash)
    try:
        with pytest.raises(RuntimeError):
            archive_jobs(tb, older_than_s=3600, batch=2)
    finally:
        event.remove(tb.engine, "after_cursor_execute", crash)
    for live_table, archive in db.ARCHIVE_TIERS:
        assert _rows(tb, archive, ids) == 0 and _rows(tb, live_table, ids) > 0
    assert archive_jobs(tb, older_than_s=3600, batch=3) == 4          # the next run carries on
    for live_table, archive in db.ARCHIVE_TIERS:
        assert _rows(tb, live_table, ids) == 0
    assert [len(tb.jobs.get(p)["files"]) for p in ids] == [3] * 4


def _assert_moved_once(tb, ids) -> None:
    """Every job of ``ids`` is in the archive once, with its 3 files and 1 history row, and
    nothing of it is left live."""
    for live_table, archive in db.ARCHIVE_TIERS:
        assert _rows(tb, live_table, ids) == 0, live_table.name
        with db.read(tb.engine) as conn:
            per_job = dict(conn.execute(
                select(archive.c.panda_id, func.count()).where(archive.c.panda_id.in_(ids))
                .group_by(archive.c.panda_id)).all())
        want = {"jobs": 1, "files": 3, "job_history": 1}[live_table.name]
        assert per_job == {pid: want for pid in ids}, live_table.name


def test_archive_skips_jobs_another_transaction_holds(taskbuffer, clock):
    """Jobs locked by another transaction (another archiver's batch) are skipped, not waited
    for and not moved twice; the next pass moves them."""
    tb = taskbuffer
    if not tb.skip_locked:
        pytest.skip("SQLite has one writer at a time: no row locks to skip")
    add_site(tb)
    _task, ids = seed_jobs(tb, "SITE_A", 6, status="finished")
    # live rows enough that MariaDB finds the batch's rows by key, not by a scan that would
    # wait for every locked row of a tiny table
    seed_jobs(tb, "SITE_A", 300, status="running")
    clock.advance(days=2)
    held = ids[:2]
    holder = tb.engine.connect()
    try:
        holder.begin()
        # a range of the primary key: with IN, MariaDB scans (and locks) a whole small table
        assert holder.execute(select(db.jobs.c.panda_id).where(
            db.jobs.c.panda_id.between(held[0], held[-1])).with_for_update()
        ).scalars().all() == held
        assert archive_jobs(tb, older_than_s=3600, batch=10) == 4
        assert _rows(tb, db.jobs, held) == 2 and _rows(tb, db.jobs_archive, held) == 0
    finally:
        holder.rollback()
        holder.close()
    assert archive_jobs(tb, older_than_s=3600, batch=10) == 2
    _assert_moved_once(tb, ids)


def test_two_archivers_at_once_move_each_job_once(taskbuffer, clock):
    """Two archivers racing over the same jobs in small batches: each job, file and history
    row ends in the archive exactly once, and the two counts add up."""
    import threading

    tb = taskbuffer
    add_site(tb)
    _task, ids = seed_jobs(tb, "SITE_A", 120, status="finished")
    _task, more = seed_jobs(tb, "SITE_A", 80, status="failed")
    clock.advance(days=2)
    start, counts, errors = threading.Barrier(2), [], []

    def run() -> None:
        try:
            start.wait()
            counts.append(archive_jobs(tb, older_than_s=3600, batch=7))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sum(counts) == 200, (errors, counts)
    _assert_moved_once(tb, ids + more)


def test_retention_drops_old_months(taskbuffer, clock):
    """Jobs archived in January are dropped (a partition drop on PostgreSQL and MariaDB) once
    January is more than the retention old; February's stay."""
    tb = taskbuffer
    add_site(tb)
    _task, january = seed_jobs(tb, "SITE_A", 2, status="finished")
    clock.advance(days=1)
    assert archive_jobs(tb, older_than_s=3600) == 2                    # archived 2026-01-02
    clock.advance(days=31)
    _task, february = seed_jobs(tb, "SITE_A", 2, status="cancelled")
    clock.advance(days=1)
    assert archive_jobs(tb, older_than_s=3600) == 2                    # archived 2026-02-03
    assert prune_archive(tb, None) == 0                                # default: keep all
    clock.advance(days=40)                                             # 2026-03-15
    assert keep_from(clock(), 1) == dt.date(2026, 2, 1)
    dropped = prune_archive(tb, 1)
    with tb.engine.connect() as conn:
        partitions = {t: archivetiers.existing_months(conn, t) for t in archivetiers.TABLES}
    if tb.engine.dialect.name == "sqlite":
        assert dropped == 2 + 6 + 2                                    # jobs, files, history
    else:
        assert dropped == 3                                            # one month of 3 tables
        assert all(dt.date(2026, 1, 1) not in months
                   and dt.date(2026, 2, 1) in months
                   for months in partitions.values()), partitions
    assert all(tb.jobs.get(p) is None and tb.jobs.history(p) == [] for p in january)
    assert all(tb.jobs.get(p)["archived"] and len(tb.jobs.get(p)["files"]) == 3
               for p in february)
    assert prune_archive(tb, 1) == 0                                   # nothing more to drop
    with pytest.raises(ValueError):
        prune_archive(tb, 0)
    # archiving goes on after a drop, in the month of the clock
    _task, march = seed_jobs(tb, "SITE_A", 1, status="finished")
    clock.advance(days=1)
    assert archive_jobs(tb, older_than_s=3600) == 1 and tb.jobs.get(march[0])["archived"]


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
    res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "db", "archive", "--older-than",
                          "3600", "--retention-months", "0", "--db", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "must be >= 1" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "db", "archive", "--older-than",
                          "3600", "--retention-months", "12", "--db", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "dropped 0 archive" in res.stdout, res.stderr


def test_server_refuses_a_bad_retention():
    res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server",
                          "--archive-retention-months", "-3"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "must be >= 1" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_server_archives_periodically(taskbuffer, tmp_path):
    """``panda server --archive-after S --archive-interval T`` archives by itself."""
    import time

    from dbkit import start_server, stop_server

    from panda_core.client import ApiClient

    tb = taskbuffer
    add_site(tb)
    _task, ids = seed_jobs(tb, "SITE_A", 3, status="failed")
    files = {f["lfn"] for f in tb.jobs.get(ids[0])["files"]}
    url = tb.engine.url.render_as_string(hide_password=False)
    server = start_server(tmp_path / "srv", db_url=url,
                          extra=["--archive-after", "60", "--archive-interval", "0.2",
                                 "--archive-retention-months", "120"])
    try:
        deadline = time.monotonic() + 20
        while _count(tb, db.jobs_archive) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _count(tb, db.jobs_archive) == 3 and _count(tb, db.jobs) == 0, server.log()
        # the API reads across tiers: the job with its files, and its history
        api = ApiClient(server.url, server.token("admin"))
        [job] = api.call("job", "get_description_incl_archive", job_ids=str(ids[0]))
        assert job["archived"] and job["jobStatus"] == "failed"
        assert {f["lfn"] for f in job["Files"]} == files
        assert api.call("job", "get_description", job_ids=str(ids[0])) == [None]
        assert [h["new_status"] for h in api.call("job", "get_history", job_id=ids[0])] == \
            ["failed"]
        assert _count(tb, db.files_archive) == 9 and _count(tb, db.files) == 0
    finally:
        stop_server(server)


def test_migration_moves_the_old_archive_into_the_tiers_and_back(fresh_db_url, clock):
    """0020 rebuilds an existing jobs_archive (partitioned on PostgreSQL/MariaDB) with its rows
    and moves the files and history of archived jobs over; the downgrade moves them back."""
    from sqlalchemy import inspect, text

    from server.taskbuffer import TaskBuffer

    engine = db.make_engine(fresh_db_url, pool_size=1)
    try:
        db.upgrade_schema(engine, "0019_data_owners")
        tb = TaskBuffer(engine, clock=clock)
        add_site(tb)
        _task, live = seed_jobs(tb, "SITE_A", 1, status="running")
        _task, old = seed_jobs(tb, "SITE_A", 2, status="finished")      # the newest PandaIDs
        names = ", ".join(c["name"] for c in inspect(engine).get_columns("jobs"))
        with engine.begin() as conn:                     # what the old archiver did
            conn.execute(text(f"INSERT INTO jobs_archive ({names}) SELECT {names} FROM jobs "
                              f"WHERE panda_id IN ({old[0]}, {old[1]})"))
            conn.execute(text(f"DELETE FROM jobs WHERE panda_id IN ({old[0]}, {old[1]})"))
        db.upgrade_schema(engine)
        for live_table, archive in db.ARCHIVE_TIERS:
            assert _rows(tb, live_table, old) == 0 and _rows(tb, archive, old) > 0
            assert _rows(tb, archive, live) == 0
        job = tb.jobs.get(old[0])
        assert job["archived"] and job["archived_at"] == job["state_changed"]
        assert len(job["files"]) == 3 and [h["new_status"] for h in tb.jobs.history(old[0])] \
            == ["finished"]
        with engine.connect() as conn:
            months = archivetiers.existing_months(conn, "files_archive")
        assert engine.dialect.name == "sqlite" or archivetiers.month_start(clock()) in months
        # no PandaID is handed out twice, not even on SQLite once the newest ones are archived
        assert archive_jobs(tb, 0) == 0                  # the running job stays live
        _task, new = seed_jobs(tb, "SITE_A", 1, status="activated")
        assert new[0] > max(old + live)

        from alembic import command

        cfg = db.alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0019_data_owners")
        assert db.current_revision(engine) == "0019_data_owners"
        assert "archived_at" not in {c["name"] for c in inspect(engine).get_columns(
            "jobs_archive")}
        assert not {"files_archive", "job_history_archive"} & set(inspect(engine)
                                                                  .get_table_names())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM jobs_archive")).scalar() == 2
            assert conn.execute(text("SELECT COUNT(*) FROM files")).scalar() == 12
        db.upgrade_schema(engine)
        assert len(tb.jobs.get(old[1])["files"]) == 3
    finally:
        engine.dispose()


def test_monitor_reads_across_tiers(taskbuffer, clock):
    """The monitor's job page and task page show an archived job with its files and history."""
    from server.monitor.jobpage import job_page
    from server.monitor.tasksview import datasets

    tb = taskbuffer
    add_site(tb)
    task_id, ids = seed_jobs(tb, "SITE_A", 3, status="finished")
    page_before = job_page(tb, ids[0])
    sets_before = datasets(tb, task_id)
    clock.advance(days=1)
    assert archive_jobs(tb, older_than_s=3600, batch=2) == 3
    page = job_page(tb, ids[0])
    assert page["job"]["archived"] and page["files"] == page_before["files"]
    assert [h["new_status"] for h in page["history"]] == \
        [h["new_status"] for h in page_before["history"]] == ["finished"]
    assert datasets(tb, task_id) == sets_before and sum(d["files"] for d in sets_before) == 9


def test_retention_waits_not_for_a_long_reader(taskbuffer, clock):
    """A reader holding an old month does not make the drop queue every other reader behind
    it: the drop gives up after its lock timeout and the next pass drops the month."""
    tb = taskbuffer
    if tb.engine.dialect.name == "sqlite":
        pytest.skip("no partitions on SQLite: bounded DELETEs take no table lock")
    add_site(tb)
    _task, ids = seed_jobs(tb, "SITE_A", 1, status="finished")
    clock.advance(days=1)
    assert archive_jobs(tb, older_than_s=3600) == 1
    clock.advance(days=90)
    reader = tb.engine.connect()
    try:
        reader.begin()
        assert reader.execute(select(db.jobs_archive.c.panda_id)).scalars().all() == ids
        archivetiers.drop_months_before(tb.engine, keep_from(clock(), 1), lock_timeout_s=1)
        with tb.engine.connect() as conn:
            assert archivetiers.month_start(clock() - dt.timedelta(days=90)) \
                in archivetiers.existing_months(conn, "jobs_archive")
    finally:
        reader.rollback()
        reader.close()
    assert prune_archive(tb, 1) >= 1 and tb.jobs.get(ids[0]) is None
