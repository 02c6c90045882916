"""The task buffer on SQLite, PostgreSQL and MariaDB: guarded transitions with history, dispatch
exactly once, pilot updates to the end with outputs registered, retries, kill."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from dbkit import add_site, history, out_lfn, seed_jobs, stored_files
from panda_core.states import IllegalTransition
from server import db
from server.taskbuffer import Conflict


def test_legal_transition_records_history_with_time_and_actor(taskbuffer, clock):
    add_site(taskbuffer)
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1, status="defined")
    clock.advance(5)
    with taskbuffer.engine.begin() as conn:
        assert taskbuffer.states.change(conn, pid, "assigned", actor="brokerage")
    clock.advance(7)
    with taskbuffer.engine.begin() as conn:
        assert taskbuffer.states.change(conn, pid, "activated", actor="ddm",
                                        expected=["assigned"])
    rows = taskbuffer.jobs.history(pid)
    assert [(r["old_status"], r["new_status"], r["actor"]) for r in rows] == [
        (None, "defined", "seed"), ("defined", "assigned", "brokerage"),
        ("assigned", "activated", "ddm")]
    assert rows[2]["time"] == clock() and (rows[2]["time"] - rows[1]["time"]).total_seconds() == 7
    job = taskbuffer.jobs.get(pid)
    assert job["status"] == "activated" and job["state_changed"] == clock()


def test_illegal_transition_changes_nothing(taskbuffer, clock):
    add_site(taskbuffer)
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1, status="activated")
    with pytest.raises(IllegalTransition):
        with taskbuffer.engine.begin() as conn:
            taskbuffer.states.change(conn, pid, "finished", actor="x")
    with pytest.raises(IllegalTransition):
        with taskbuffer.engine.begin() as conn:
            taskbuffer.states.change(conn, pid, "nonsense", actor="x")
    assert taskbuffer.jobs.get(pid)["status"] == "activated"
    assert history(taskbuffer, pid) == [(None, "activated")]


def test_guard_on_expected_state(taskbuffer):
    add_site(taskbuffer)
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1, status="activated")
    with taskbuffer.engine.begin() as conn:
        # the caller saw "assigned", the row is "activated": no change, no history
        assert not taskbuffer.states.change(conn, pid, "activated", actor="x",
                                            expected=["assigned"])
    assert history(taskbuffer, pid) == [(None, "activated")]


def test_dispatch_order_and_fit(taskbuffer):
    add_site(taskbuffer)
    _, low = seed_jobs(taskbuffer, "SITE_A", 2, priorities=[500, 500])
    _, big = seed_jobs(taskbuffer, "SITE_A", 1, priority=2000, cores=8, memory_mb=32000)
    _, high = seed_jobs(taskbuffer, "SITE_A", 1, priority=900)
    _, vers = seed_jobs(taskbuffer, "SITE_A", 1, priority=3000, pilot_version="3.7")
    seed_jobs(taskbuffer, "SITE_B", 1, priority=5000)
    # a 4-core pilot without a version: the 8-core and the versioned job do not fit
    got = taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p", cores=4, memory_mb=8000)
    assert got["panda_id"] == high[0] and got["status"] == "sent"
    assert {f["type"] for f in got["files"]} == {"input", "output", "log"}
    got = taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p", cores=4, memory_mb=8000)
    assert got["panda_id"] == low[0]           # equal priority: older PandaID first
    assert taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p", pilot_version="3.7",
                               cores=4)["panda_id"] == vers[0]
    assert taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p", walltime_s=10) is None
    assert taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p")["panda_id"] == big[0]
    assert taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p")["panda_id"] == low[1]
    assert taskbuffer.jobs.dispatch("SITE_A", node="n1", actor="p") is None
    assert history(taskbuffer, big[0]) == [(None, "activated"), ("activated", "sent")]


def test_dispatch_exactly_once_under_threads(taskbuffer):
    add_site(taskbuffer)
    _, ids = seed_jobs(taskbuffer, "SITE_A", 120)
    got: list[int] = []
    lock = threading.Lock()

    def pilot(n: int) -> None:
        while True:
            job = taskbuffer.jobs.dispatch("SITE_A", node=f"node{n}", actor=f"pilot{n}")
            if job is None:
                return
            with lock:
                got.append(job["panda_id"])

    threads = [threading.Thread(target=pilot, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)          # each once, none lost
    with taskbuffer.engine.connect() as conn:
        sent = Counter(r[0] for r in conn.execute(select(db.job_history.c.panda_id).where(
            db.job_history.c.new_status == "sent")))
    assert set(sent) == set(ids) and set(sent.values()) == {1}


def _run_to(taskbuffer, clock, pid, final="finished", stored=None, attempt=1):
    assert taskbuffer.pilots.update(pid, "starting", {}, actor="p", attempt_nr=attempt) == "NULL"
    clock.advance(10)
    assert taskbuffer.pilots.update(pid, "running", {"node": "wn1"}, actor="p") == "NULL"
    clock.advance(60)
    return taskbuffer.pilots.update(pid, final, {"trans_exit_code": 0}, actor="p",
                                   attempt_nr=attempt, stored_files=stored,
                                   output_endpoint="SE_A")


def test_pilot_updates_to_finished_register_outputs(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    job = taskbuffer.jobs.get(pid)
    lfns = [f["lfn"] for f in job["files"] if f["type"] in ("output", "log")]
    stored = stored_files(lfns)
    assert _run_to(taskbuffer, clock, pid, stored=stored) == "NULL"
    job = taskbuffer.jobs.get(pid)
    assert job["status"] == "finished" and job["end_time"] == clock()
    assert (job["end_time"] - job["start_time"]).total_seconds() == 60
    assert history(taskbuffer, pid) == [
        (None, "activated"), ("activated", "sent"), ("sent", "starting"),
        ("starting", "running"), ("running", "holding"), ("holding", "finished")]
    for f in job["files"]:
        if f["type"] in ("output", "log"):
            info = stored[f["lfn"]]
            assert f["status"] == "ready" and f["fsize"] == info["fsize"]
            assert f["checksum"] == f"ad:{info['adler32']}" and f["ddm_endpoint"] == "SE_A"
    out = out_lfn(task_id, 1)
    assert taskbuffer.data.replica_endpoints("test", [out]) == {out: {"SE_A"}}
    assert [f["lfn"] for f in taskbuffer.data.dataset_files("bulk.out")] == [out]
    assert taskbuffer.tasks.get(task_id)["status"] == "done"
    # a late heartbeat for a finished job is told to stop
    assert taskbuffer.pilots.update(pid, "running", {}, actor="p") == "tobekilled"


def test_missing_output_fails_and_retries_until_attempts_run_out(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1, max_attempts=2)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    _run_to(taskbuffer, clock, pid, stored={})          # the pilot stored nothing
    job = taskbuffer.jobs.get(pid)
    assert job["status"] == "failed" and job["pilot_error_code"] == 1165
    retry = [j for j in taskbuffer.jobs.find(task_id=task_id) if j["panda_id"] != pid]
    assert len(retry) == 1
    retry = retry[0]
    assert (retry["status"], retry["attempt_nr"], retry["parent_id"], retry["serial"]) == \
        ("activated", 2, pid, 1)
    # the retry gets fresh output names; it fails too (pilot reports failed): no third attempt
    new = taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p")
    assert new["panda_id"] == retry["panda_id"]
    assert _run_to(taskbuffer, clock, new["panda_id"], final="failed", attempt=2) == "NULL"
    assert taskbuffer.jobs.get(new["panda_id"])["status"] == "failed"
    assert taskbuffer.jobs.count(site="SITE_A") == 2
    assert taskbuffer.tasks.get(task_id)["status"] == "failed"


def test_stale_attempt_and_unknown_job_get_tobekilled(taskbuffer, clock):
    add_site(taskbuffer)
    _, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    assert taskbuffer.pilots.update(pid, "running", {}, actor="p", attempt_nr=7) == "tobekilled"
    assert taskbuffer.pilots.update(pid + 1000, "running", {}, actor="p") == "tobekilled"
    assert taskbuffer.jobs.get(pid)["status"] == "sent"
    with pytest.raises(Conflict):               # running -> starting is not allowed
        taskbuffer.pilots.update(pid, "running", {}, actor="p")
        taskbuffer.pilots.update(pid, "starting", {}, actor="p")


def test_kill_queued_and_running_jobs(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (queued, running) = seed_jobs(taskbuffer, "SITE_A", 2)
    assert taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")["panda_id"] == queued
    # dispatch took the first; swap names so "running" is the one with a pilot
    queued, running = running, queued
    taskbuffer.pilots.update(running, "running", {}, actor="p")
    assert taskbuffer.jobs.kill(queued, actor="alice")
    job = taskbuffer.jobs.get(queued)
    assert job["status"] == "cancelled" and job["command"] is None
    assert taskbuffer.jobs.kill(running, actor="alice")
    job = taskbuffer.jobs.get(running)
    assert job["status"] == "cancelled" and job["command"] == "tobekilled"
    assert job["task_buffer_error_diag"] == "killed by alice"
    # the pilot learns it in its next heartbeat; killing again is a no-op
    assert taskbuffer.pilots.update(running, "running", {}, actor="p") == "tobekilled"
    assert not taskbuffer.jobs.kill(running, actor="alice")
    with pytest.raises(PermissionError):
        _, (other,) = seed_jobs(taskbuffer, "SITE_A", 1, task_id=task_id)
        taskbuffer.jobs.kill(other, actor="bob", owner_check="bob")
    assert history(taskbuffer, running)[-1] == ("running", "cancelled")
    with taskbuffer.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(db.job_history).where(
            db.job_history.c.new_status == "cancelled")).scalar_one()
    assert n == 2


def test_deadlock_victims_are_recognised(taskbuffer, db_backend):
    """A real deadlock between two transactions: the victim's error is one to retry."""
    if db_backend == "sqlite":
        pytest.skip("SQLite has one writer at a time: no deadlocks")
    import threading as th

    from sqlalchemy import text, update
    from sqlalchemy.exc import DBAPIError

    from server.taskbuffer import is_retryable

    add_site(taskbuffer, "SITE_A")
    add_site(taskbuffer, "SITE_B")
    errors: list[Exception] = []
    barrier = th.Barrier(2)

    def lock_both(first: str, second: str) -> None:
        try:
            with taskbuffer.engine.begin() as conn:
                if db_backend == "mysql":
                    conn.execute(text("SET SESSION innodb_lock_wait_timeout = 10"))
                conn.execute(update(db.sites).where(db.sites.c.name == first).values(status="a"))
                barrier.wait(10)
                conn.execute(update(db.sites).where(db.sites.c.name == second).values(status="b"))
        except DBAPIError as exc:
            errors.append(exc)

    threads = [th.Thread(target=lock_both, args=order)
               for order in (("SITE_A", "SITE_B"), ("SITE_B", "SITE_A"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and is_retryable(errors[0])
