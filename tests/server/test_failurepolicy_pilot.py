"""The failure policy end to end: a running server, real pilots, a site whose storage fails
every job. Its jobs fail at stage-out; their retries are brokered to the other site and finish
there; the failing site is set to test with the reason and gets test jobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from dbkit import start_server, stop_server
from logic_kit import site
from panda_core.client import ApiClient


def _pilot(srv, name: str, workdir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PANDA_AUTH_TOKEN"] = srv.token("pilot", f"p-{name}", site=name)
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", "pilot", "--server", srv.url,
                           "--site", name, "--workdir", str(workdir), "--monitor-interval", "0.2",
                           "--server-backoff", "0.3", "--public-key",
                           str(srv.public_key_file())],
                          env=env, capture_output=True, text=True, timeout=180)


def _wait(fn, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def test_a_failing_site_is_set_to_test_and_the_retries_finish_elsewhere(tmp_path):
    good_se = tmp_path / "good_se"
    good_se.mkdir()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the storage element's folder should be\n")
    bad = site("BAD", "SE_BAD", f"file://{blocker}/se")          # every stage-out fails
    good = site("GOOD", "SE_GOOD", f"file://{good_se}", status="offline")
    sites = tmp_path / "sites"
    sites.mkdir()
    for cfg in (bad, good):
        (sites / f"{cfg['name']}.yaml").write_text(json.dumps(cfg))
    srv = start_server(tmp_path / "srv", site_dir=sites,
                       extra=["--watcher-interval", "0.2", "--site-test-min-jobs", "3"])
    try:
        user = ApiClient(srv.url, srv.token("user", "alice"))
        admin = ApiClient(srv.url, srv.token("admin", "root"))
        task_id = user.submit_task({
            "name": "fp", "scope": "s", "transformation": "/bin/sh",
            "job_parameters": "-c 'echo done > ${OUT}'", "output_dataset": "fp.out",
            "outputs": ["fp.${SN}.out"], "n_jobs": 3, "max_attempts": 3,
            "resources": {"memory_mb": 500, "walltime_s": 300}})
        assert {j["site"] for j in user.jobs(task_id)} == {"BAD"}     # GOOD was offline
        admin.sync_sites([bad, {**good, "status": "online"}])
        res = _pilot(srv, "BAD", tmp_path / "wd_bad")
        jobs = user.jobs(task_id)
        failed = [j for j in jobs if j["status"] == "failed"]
        assert len(failed) == 3, (jobs, res.stderr[-3000:])
        assert all(j["pilot_error_code"] == 1137 for j in failed), failed
        # the retries are brokered away from BAD
        retries = _wait(lambda: [j for j in user.jobs(task_id) if j["attempt_nr"] == 2
                                 and j["status"] == "activated"] or None,
                        "the retries were not re-brokered")
        assert {j["site"] for j in retries} == {"GOOD"}
        assert all(json.loads(j["excluded_sites"]) == ["BAD"] for j in retries)
        # BAD is set to test, with the reason, and has test jobs
        row = _wait(lambda: next((s for s in user.call("site", "list")
                                  if s["name"] == "BAD" and s["status"] == "test"), None),
                    "BAD was not set to test")
        assert "3 of 3 jobs" in row["status_reason"] and row["configured_status"] == "online"
        res = _pilot(srv, "GOOD", tmp_path / "wd_good")
        assert res.returncode == 0, res.stderr[-3000:]
        details = _wait(lambda: (d := user.task_details(task_id))["status"] in
                        ("done", "finished") and d, "the task did not end")
        assert details["status"] == "done", details
        page = srv_get(srv.url + "/monitor/sites/BAD")
        assert "set by the server" in page
    finally:
        stop_server(srv)


def srv_get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()
