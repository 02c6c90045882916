"""Quotas on every database: a submission past a user's or a group's jobs-per-day quota, or
while the user's running quota is full, is refused with the numbers; at dispatch an over-quota
user's waiting jobs yield to everyone else's; usage and settings through the API with roles."""
from __future__ import annotations

import json

import pytest

from logic_kit import site, submitter, task
from server.hookspecs import plugin_manager
from server.quotas import QuotaExceeded, QuotaPolicy, Quotas
from server.shares import recompute_priorities


@pytest.fixture
def tb(taskbuffer):
    taskbuffer.sites.sync([site("Q_SITE", max_running=100)])
    return taskbuffer


def test_jobs_per_day_quota_refuses_with_the_numbers(tb):
    Quotas(tb).set("user", "alice", None, 5)
    sub = submitter(tb)
    sub.submit(task(n_jobs=3, site="Q_SITE"), owner="alice")
    with pytest.raises(QuotaExceeded, match=r"alice submitted 3 jobs in the last 24 h; 3 more "
                                            r"would pass the quota of 5 per day"):
        sub.submit(task("t2", n_jobs=3, site="Q_SITE"), owner="alice")
    sub.submit(task("t3", n_jobs=2, site="Q_SITE"), owner="alice")      # exactly at the quota
    sub.submit(task("t4", n_jobs=3, site="Q_SITE"), owner="bob")        # bob has no quota
    assert Quotas(tb).usage("alice")["user"] == {
        "name": "alice", "running": 0, "submitted_24h": 5, "max_running": None, "max_per_day": 5}


def test_the_default_user_quota_and_group_quotas(tb):
    q = Quotas(tb)
    q.set("user", "*", None, 2)
    q.set("group", "higgs", None, 3)
    sub = submitter(tb)
    with pytest.raises(QuotaExceeded, match="user carol"):
        sub.submit(task(n_jobs=3, site="Q_SITE"), owner="carol")
    q.set("user", "carol", None, 100)                      # her own row beats the default
    sub.submit(task(n_jobs=2, site="Q_SITE", working_group="higgs"), owner="carol")
    with pytest.raises(QuotaExceeded, match="group higgs submitted 2 jobs"):
        sub.submit(task("t2", n_jobs=2, site="Q_SITE", working_group="higgs"), owner="dave")
    with pytest.raises(ValueError):
        q.set("team", "x", 1, 1)
    with pytest.raises(ValueError):
        q.set("user", "x", -1, None)


def test_running_quota_refuses_new_work_and_makes_waiting_jobs_yield(tb):
    Quotas(tb).set("user", "alice", 2, None)
    sub = submitter(tb)
    sub.submit(task(n_jobs=4, site="Q_SITE", priority=2000), owner="alice")
    for _ in range(2):
        job = tb.jobs.dispatch("Q_SITE", node="wn", actor="pilot")
        assert job["owner"] == "alice"
        tb.pilots.update(job["panda_id"], "running", {}, actor="pilot")
    with pytest.raises(QuotaExceeded, match="alice has 2 jobs running, the quota is 2"):
        sub.submit(task("more", n_jobs=1, site="Q_SITE"), owner="alice")
    sub.submit(task("bobs", n_jobs=1, site="Q_SITE", priority=500), owner="bob")
    pm = plugin_manager(load_entry_points=False)
    pm.register(QuotaPolicy(tb, refresh_s=0), name="quotas")
    recompute_priorities(tb, pm.hook)
    # alice's jobs have the higher priority, but she is at her quota: bob's goes first
    assert tb.jobs.dispatch("Q_SITE", node="wn", actor="pilot")["owner"] == "bob"
    # and hers still run when nothing else waits: nothing is lost
    assert tb.jobs.dispatch("Q_SITE", node="wn", actor="pilot")["owner"] == "alice"


def test_quota_api_roles_and_bad_values(tmp_path):
    from dbkit import start_server, stop_server
    from panda_core.client import ApiClient, Refused

    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "Q.yaml").write_text(json.dumps(site("Q_SITE")))
    srv = start_server(tmp_path / "srv", site_dir=sites)
    try:
        admin = ApiClient(srv.url, srv.token("admin", "root"))
        alice = ApiClient(srv.url, srv.token("user", "alice"))
        with pytest.raises(Refused) as err:
            alice.call("quota", "set", "POST", kind="user", name="alice", max_per_day=10**6)
        assert err.value.http_status == 403
        for bad in ({"kind": "team", "name": "x"}, {"kind": "user"},
                    {"kind": "user", "name": "x", "max_running": -3},
                    {"kind": "user", "name": "x", "max_running": "many"}):
            with pytest.raises(Refused) as err:
                admin.call("quota", "set", "POST", **bad)
            # int_param's refusals follow the API's convention for a wrong type
            assert err.value.http_status in (200, 400), bad
            assert err.value.reason
        admin.call("quota", "set", "POST", kind="user", name="alice", max_per_day=2)
        assert {"kind": "user", "name": "alice", "max_running": None, "max_per_day": 2} in \
            alice.call("quota", "list")
        with pytest.raises(Refused) as err:
            alice.submit_task({"name": "big", "scope": "s", "transformation": "/bin/true",
                               "n_jobs": 3, "site": "Q_SITE"})
        assert err.value.http_status == 403 and "quota of 2 per day" in err.value.reason
        assert alice.call("quota", "usage")["user"]["max_per_day"] == 2
        # the command line, as a person types it
        import os
        import subprocess
        import sys
        token = tmp_path / "admin.token"
        token.write_text(srv.token("admin", "root"))
        env = {**os.environ, "PANDA_URL": srv.url}

        def panda(*args):
            return subprocess.run([sys.executable, "-m", "panda_wms.cli", "quota", *args,
                                   "--token-file", str(token)], env=env, capture_output=True,
                                  text=True, timeout=60)
        res = panda("set", "--group", "higgs", "--max-per-day", "40")
        assert res.returncode == 0 and "group higgs: at most no limit running, 40 submitted " \
            "per day" in res.stdout, res.stderr
        res = panda("list")
        assert res.returncode == 0 and "higgs" in res.stdout and "alice" in res.stdout
        res = panda("--user", "alice", "--group", "higgs", "--json")
        assert json.loads(res.stdout)["group"]["max_per_day"] == 40
        res = panda("set", "--max-running", "3")
        assert res.returncode == 2 and "--user or one --group" in res.stderr
        res = panda("set", "--user", "x", "--max-running", "lots")
        assert res.returncode == 2 and "whole number" in res.stderr
    finally:
        stop_server(srv)
