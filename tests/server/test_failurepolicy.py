"""The failure policy on every database: retries re-brokered away from the site that failed them
for its own reasons (not for the payload's), sites set to test when they fail too much and back
online when their test jobs pass, and the watcher's 101 and 105."""
from __future__ import annotations

import json

from logic_kit import site, submitter, task
from server.brokerage import Brokerage
from server.failurepolicy import (NO_SITE_LEFT, HealthLimits, Rebrokerage, SiteHealth,
                                  site_failure)
from server.hookspecs import plugin_manager
from server.watcher import Watcher, WatcherLimits

import pytest


@pytest.fixture
def tb(taskbuffer):
    taskbuffer.sites.sync([site("SITE_A"), site("SITE_B", "SE_B")])
    return taskbuffer


def brokerage():
    return Brokerage(plugin_manager(load_entry_points=False).hook)


def run_and_fail(tb, site_name: str, **error) -> int:
    job = tb.jobs.dispatch(site_name, node="wn", actor="pilot")
    assert job is not None, f"no job at {site_name}"
    tb.pilots.update(job["panda_id"], "running", {}, actor="pilot")
    tb.pilots.update(job["panda_id"], "failed", error, actor="pilot")
    return job["panda_id"]


def test_which_failures_are_the_sites():
    assert site_failure({"pilot_error_code": 1099})            # stage-in
    assert site_failure({"pilot_error_code": 1137})            # stage-out
    assert site_failure({"dispatcher_error_code": 100})        # lost heartbeat
    assert site_failure({"pilot_error_code": 1305}) is None    # the payload's own failure
    assert site_failure({"pilot_error_code": 1212}) is None    # out of memory: the payload's
    assert site_failure({}) is None


def retry_of(tb, pid):
    from server import db
    from sqlalchemy import select
    with db.read(tb.engine) as conn:
        return dict(conn.execute(select(db.jobs).where(db.jobs.c.parent_id == pid)).first()
                    ._mapping)


def test_a_retry_after_a_site_failure_is_brokered_elsewhere(tb):
    res = submitter(tb).submit(task(n_jobs=1, max_attempts=3), owner="alice")
    first = tb.jobs.get(res.job_ids[0])["site"]
    other = "SITE_B" if first == "SITE_A" else "SITE_A"
    pid = run_and_fail(tb, first, pilot_error_code=1099)
    retry = retry_of(tb, pid)
    assert retry["status"] == "defined" and retry["site"] is None
    assert json.loads(retry["excluded_sites"]) == [first]
    assert Rebrokerage(tb, brokerage()).process() == {retry["panda_id"]: other}
    assert tb.jobs.get(retry["panda_id"])["status"] == "activated"
    # it fails there too, for the site's reasons: no site is left
    pid2 = run_and_fail(tb, other, pilot_error_code=1137)
    retry2 = retry_of(tb, pid2)
    assert sorted(json.loads(retry2["excluded_sites"])) == ["SITE_A", "SITE_B"]
    assert Rebrokerage(tb, brokerage()).process() == {retry2["panda_id"]: None}
    job = tb.jobs.get(retry2["panda_id"])
    assert job["status"] == "failed" and job["task_buffer_error_code"] == NO_SITE_LEFT
    assert "SITE_A, SITE_B" in job["task_buffer_error_diag"]


def test_a_payload_failure_excludes_no_site(tb):
    res = submitter(tb).submit(task(n_jobs=1), owner="alice")
    first = tb.jobs.get(res.job_ids[0])["site"]
    pid = run_and_fail(tb, first, pilot_error_code=1305, exe_error_code=3)
    retry = retry_of(tb, pid)
    assert json.loads(retry["excluded_sites"]) == []
    assert Rebrokerage(tb, brokerage()).process()[retry["panda_id"]] in ("SITE_A", "SITE_B")


def test_a_batch_of_retries_each_avoids_its_own_excluded_sites(taskbuffer):
    """Retries of one shape are planned together, each skipping its own excluded sites; test
    and offline sites are never used; one with every usable site excluded fails with 301;
    a pass is bounded (``per_pass``) and read in batches."""
    from server import db
    from sqlalchemy import update
    tb = taskbuffer
    tb.sites.sync([site("SITE_A"), site("SITE_B", "SE_B"), site("SITE_C", "SE_C"),
                   site("SITE_T", "SE_T", status="test"),
                   site("SITE_O", "SE_O", status="offline")])
    res = submitter(tb).submit(task(n_jobs=8, max_attempts=5), owner="alice")
    for pid in res.job_ids:
        run_and_fail(tb, tb.jobs.get(pid)["site"], pilot_error_code=1099)
    retries = [retry_of(tb, pid) for pid in res.job_ids]
    exclusions = {r["panda_id"]: json.loads(r["excluded_sites"]) for r in retries}
    assert all(len(ex) == 1 for ex in exclusions.values())
    # some have failed at more sites before: two of the three online ones, or all three
    two, every = retries[0]["panda_id"], retries[1]["panda_id"]
    exclusions[two], exclusions[every] = ["SITE_A", "SITE_B"], ["SITE_A", "SITE_B", "SITE_C"]
    with tb.engine.begin() as conn:
        for pid in (two, every):
            conn.execute(update(db.jobs).where(db.jobs.c.panda_id == pid)
                         .values(excluded_sites=json.dumps(exclusions[pid])))
    first = Rebrokerage(tb, brokerage(), batch=2, per_pass=3).process()
    assert len(first) == 3                                      # bounded
    placed = {**first, **Rebrokerage(tb, brokerage(), batch=2).process()}
    assert sorted(placed) == sorted(exclusions)
    assert placed[every] is None and placed[two] == "SITE_C"
    for pid, chosen in placed.items():
        job = tb.jobs.get(pid)
        if chosen is None:
            assert job["status"] == "failed" and job["task_buffer_error_code"] == NO_SITE_LEFT
            assert "SITE_A, SITE_B, SITE_C" in job["task_buffer_error_diag"]
            assert "SITE_T: status test" in job["task_buffer_error_diag"]
            continue
        assert chosen in ("SITE_A", "SITE_B", "SITE_C") and chosen not in exclusions[pid]
        assert (job["site"], job["status"]) == (chosen, "activated")
    assert Rebrokerage(tb, brokerage()).process() == {}         # nothing waits any more


def test_a_plan_skips_excluded_sites_and_says_when_none_is_left():
    from server.brokerage import Candidate, TaskPlan
    plan = TaskPlan([Candidate("A", {}, 1.0), Candidate("B", {}, 1.0),
                     Candidate("C", {"storage": {"input": {"name": "SE_C"}}}, 1.0)], [])
    got = [plan.site_for([], {}, exclude={"A"}) for _ in range(4)]
    assert sorted(got) == ["B", "B", "C", "C"]                  # spread over the others
    assert plan.site_for([], {}) == "A"                         # A was set aside, not lost
    # locality never brings a job to a site it excludes
    assert plan.site_for(["f"], {"f": {"SE_C"}}, exclude={"C"}) in ("A", "B")
    with pytest.raises(LookupError):
        plan.site_for([], {}, exclude={"A", "B", "C"})
    assert plan.site_for([], {}) in ("A", "B", "C")             # the heap is whole again


def test_a_task_pinned_to_a_site_retries_there(tb):
    res = submitter(tb).submit(task(n_jobs=1, site="SITE_A"), owner="alice")
    pid = run_and_fail(tb, "SITE_A", pilot_error_code=1099)
    retry = retry_of(tb, pid)
    assert (retry["status"], retry["site"]) == ("activated", "SITE_A")
    assert res.task_id


def test_a_failing_site_is_set_to_test_then_back_online(tb):
    limits = HealthLimits(min_jobs=3, threshold=0.5, test_jobs=2, test_successes=2)
    sub = submitter(tb)
    health = SiteHealth(tb, sub, limits)
    sub.submit(task(n_jobs=3, site="SITE_A", max_attempts=1), owner="alice")
    for _ in range(3):
        run_and_fail(tb, "SITE_A", pilot_error_code=1137)
    changes = health.check()
    assert changes["SITE_A"].startswith("test: 3 of 3 jobs")
    row = next(s for s in tb.sites.all() if s["name"] == "SITE_A")
    assert row["status"] == "test" and "site reasons" in row["status_reason"]
    assert row["configured_status"] == "online"
    # brokerage now sends it test jobs only
    res = sub.submit(task(n_jobs=2), owner="bob")
    assert {tb.jobs.get(i)["site"] for i in res.job_ids} == {"SITE_B"}
    # the test jobs the policy sent are waiting at SITE_A; they pass
    for _ in range(2):
        job = tb.jobs.dispatch("SITE_A", node="wn", actor="pilot", prod_source_label="test")
        assert job is not None and job["prod_source_label"] == "test"
        tb.pilots.update(job["panda_id"], "running", {}, actor="pilot")
        tb.pilots.update(job["panda_id"], "finished", {}, actor="pilot")
    assert health.check() == {"SITE_A": "online"}
    assert next(s for s in tb.sites.all() if s["name"] == "SITE_A")["status"] == "online"
    # a config sync does not erase an automatic status, and it did not set one either
    tb.sites.sync([site("SITE_A")])
    assert next(s for s in tb.sites.all() if s["name"] == "SITE_A")["status"] == "online"


def test_a_healthy_site_with_payload_failures_stays_online(tb):
    health = SiteHealth(tb, submitter(tb), HealthLimits(min_jobs=3))
    submitter(tb).submit(task(n_jobs=3, site="SITE_A", max_attempts=1), owner="alice")
    for _ in range(3):
        run_and_fail(tb, "SITE_A", pilot_error_code=1305)
    assert health.check() == {}


def test_watcher_105_for_a_job_running_far_beyond_its_wall_time(tb, clock):
    submitter(tb).submit(task(n_jobs=1, site="SITE_A"), owner="alice")
    job = tb.jobs.dispatch("SITE_A", node="wn", actor="pilot")
    tb.pilots.update(job["panda_id"], "running", {}, actor="pilot")
    w = Watcher(tb, WatcherLimits(overrun_factor=2.0, overrun_grace_s=600))
    for _ in range(4):                       # heartbeats keep coming: not a lost heartbeat
        clock.advance(seconds=30)
        tb.pilots.update(job["panda_id"], "running", {}, actor="pilot")
    assert w.check().failed == {}
    clock.advance(seconds=2 * 60 + 600)      # wall time 60 s: 2 x 60 + 600 s have passed
    tb.pilots.update(job["panda_id"], "running", {}, actor="pilot")
    report = w.check()
    assert report.failed == {job["panda_id"]: 105}
    assert "wall time" in tb.jobs.get(job["panda_id"])["dispatcher_error_diag"]


def test_watcher_101_for_a_recovered_job_left_in_holding(tb, clock):
    submitter(tb).submit(task(n_jobs=1, site="SITE_A"), owner="alice")
    job = tb.jobs.dispatch("SITE_A", node="wn", actor="pilot")
    tb.pilots.update(job["panda_id"], "holding", {"pilot_error_code": 1504}, actor="pilot")
    clock.advance(hours=7)
    report = Watcher(tb).check()
    assert report.failed == {job["panda_id"]: 101}
    assert "recovery failed" in tb.jobs.get(job["panda_id"])["dispatcher_error_diag"]
