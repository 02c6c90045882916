"""The watcher with a controllable clock: lost heartbeats, silent pilots, stuck jobs, retries,
and two watchers at once never failing a job twice."""
from __future__ import annotations

import threading

import pytest

from logic_kit import site, submitter, task
from server.db import make_engine
from server.taskbuffer import TaskBuffer
from server.watcher import Watcher, WatcherLimits

SITE = "W_SITE"


@pytest.fixture
def tb(taskbuffer):
    taskbuffer.sites.sync([site(SITE)])
    return taskbuffer


def start_jobs(tb, n=1, state="running", **kw):
    res = submitter(tb).submit(task(n_jobs=n, site=SITE, **kw), owner="alice")
    ids = []
    for _ in range(n):
        job = tb.jobs.dispatch(SITE, node="wn", actor="pilot")
        if state != "sent":
            tb.pilots.update(job["panda_id"], state, {}, actor="pilot")
        ids.append(job["panda_id"])
    return res.task_id, ids


def test_lost_heartbeat_fails_with_100_and_retries(tb, clock):
    task_id, [pid] = start_jobs(tb)
    w = Watcher(tb)
    clock.advance(hours=5, minutes=59)
    assert w.check().failed == {}
    tb.pilots.update(pid, "running", {}, actor="pilot")      # a heartbeat resets the count
    clock.advance(hours=5)
    assert w.check().failed == {}
    assert tb.jobs.get(pid)["status"] == "running"
    clock.advance(hours=1, seconds=1)
    report = w.check()
    assert report.failed == {pid: 100}
    job = tb.jobs.get(pid)
    assert job["status"] == "failed"
    assert job["dispatcher_error_code"] == 100
    assert "lost heartbeat" in job["dispatcher_error_diag"]
    assert "limit 21600 s" in job["dispatcher_error_diag"]
    assert job["end_time"] == clock.now
    assert tb.jobs.history(pid)[-1]["actor"] == "watcher"
    retry = tb.jobs.get(report.retries[pid])
    assert (retry["status"], retry["attempt_nr"], retry["parent_id"]) == ("activated", 2, pid)
    # the pilot that comes back is told to kill its payload
    assert tb.pilots.update(pid, "running", {}, actor="pilot") == "tobekilled"
    # a second pass finds nothing more
    assert w.check().failed == {}


def test_sent_but_never_started_fails_with_102(tb, clock):
    _, [pid] = start_jobs(tb, state="sent")
    w = Watcher(tb, WatcherLimits(sent_s=1800))
    clock.advance(minutes=29)
    assert w.check().failed == {}
    clock.advance(minutes=2)
    report = w.check()
    assert report.failed == {pid: 102}
    assert tb.jobs.get(pid)["dispatcher_error_code"] == 102
    assert tb.jobs.get(report.retries[pid])["status"] == "activated"


@pytest.mark.parametrize("state,code,limit", [("holding", 103, "holding_s"),
                                              ("transferring", 104, "transferring_s")])
def test_stuck_holding_and_transferring_are_released(tb, clock, state, code, limit):
    _, [pid] = start_jobs(tb, state=state)
    w = Watcher(tb, WatcherLimits(**{limit: 3600}))
    clock.advance(minutes=59)
    assert w.check().failed == {}
    clock.advance(minutes=2)
    report = w.check()
    assert report.failed == {pid: code}
    assert pid in report.retries


def test_no_retry_when_attempts_are_used_up(tb, clock):
    task_id, [pid] = start_jobs(tb, max_attempts=1)
    clock.advance(hours=7)
    report = Watcher(tb).check()
    assert report.failed == {pid: 100} and report.retries == {}
    assert tb.tasks.get(task_id)["status"] == "failed"


def test_limits_are_configurable_and_zero_disables(tb, clock):
    _, [pid] = start_jobs(tb)
    clock.advance(minutes=11)
    assert Watcher(tb, WatcherLimits(heartbeat_s=0)).check().failed == {}
    assert Watcher(tb, WatcherLimits(heartbeat_s=600)).check().failed == {pid: 100}


def test_jobs_in_other_states_are_left_alone(tb, clock):
    _, [done] = start_jobs(tb)
    tb.pilots.update(done, "finished", {}, actor="pilot")
    submitter(tb).submit(task(n_jobs=2, site=SITE), owner="alice")   # activated
    clock.advance(days=30)
    assert Watcher(tb).check().failed == {}
    assert tb.jobs.count(status="activated") == 2
    assert tb.jobs.get(done)["status"] == "finished"


def test_two_watchers_never_fail_a_job_twice(tb, clock, tmp_path):
    _, ids = start_jobs(tb, n=40)
    clock.advance(hours=7)
    # a second "server process": its own engine on the same database
    other = TaskBuffer(make_engine(tb.engine.url.render_as_string(hide_password=False)), clock=clock)
    reports = []
    barrier = threading.Barrier(2)

    def run(t):
        barrier.wait()
        reports.append(Watcher(t, batch=1000).check())

    threads = [threading.Thread(target=run, args=(t,)) for t in (tb, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [pid for r in reports for pid in r.failed]
    assert sorted(failed) == sorted(ids)                 # each once, by one of them
    retries = [r for rep in reports for r in rep.retries.values()]
    assert len(retries) == len(set(retries)) == 40
    for pid in ids:
        hist = [h for h in tb.jobs.history(pid) if h["new_status"] == "failed"]
        assert len(hist) == 1
    assert tb.jobs.count(status="activated") == 40
    other.engine.dispose()
