"""The lost-heartbeat path with real components: a ``panda pilot`` is killed (SIGKILL, no last
word) while its payload runs; the server's watcher fails the job with 100 once its heartbeats
stop and creates a retry; a second pilot runs the retry and the task is done."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from dbkit import start_server, stop_server
from logic_kit import site
from panda_core.client import ApiClient
from testkit import wait_for

SITE = "W_SITE"


@pytest.mark.slow
def test_killed_pilot_job_is_failed_by_the_watcher_and_its_retry_runs(tmp_path):
    se = tmp_path / "se"
    se.mkdir()
    sites = tmp_path / "sites"
    sites.mkdir()
    cfg = site(SITE, "SE_W", f"file://{se}")
    cfg["limits"]["heartbeat_s"] = 1                      # live pilots beat every second
    (sites / f"{SITE}.yaml").write_text(json.dumps(cfg))
    srv = start_server(tmp_path / "srv", site_dir=sites,
                       extra=["--watcher-interval", "0.2", "--heartbeat-timeout", "8"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PANDA_AUTH_TOKEN"] = srv.token("pilot", "p1", site=SITE)

    def pilot_cmd(wd):
        return [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", srv.url, "--site",
                SITE, "--workdir", str(wd), "--monitor-interval", "0.2", "--server-backoff", "0.3",
                "--public-key", str(srv.public_key_file())]

    mark = tmp_path / "first-attempt-ran"
    first = None
    try:
        user = ApiClient(srv.url, srv.token("user", "alice"))
        task_id = user.submit_task({
            "name": "lost", "scope": "s", "transformation": "/bin/sh",
            # the first attempt hangs (its pilot is killed), the retry finishes at once
            "job_parameters": f"-c 'if [ -e {mark} ]; then echo ok > ${{OUT}}; "
                              f"else touch {mark}; sleep 120; fi'",
            "output_dataset": "lost.out", "outputs": ["lost.${SN}.out"], "n_jobs": 1,
            "site": SITE, "max_attempts": 2, "resources": {"memory_mb": 500, "walltime_s": 300}})
        first = subprocess.Popen(pilot_cmd(tmp_path / "wd1"), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        wait_for(lambda: mark.exists() and user.task_details(task_id)["jobs"] == {"running": 1},
                 "the first attempt to run")
        [job] = user.jobs(task_id)
        # kill the pilot and everything under it: no final update, no more heartbeats
        procs = [first] + psutil.Process(first.pid).children(recursive=True)
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait(10)
        failed = wait_for(lambda: (d := user.call("job", "get_description",
                                                  job_ids=job["PandaID"])[0])["jobStatus"]
                          == "failed" and d, "the watcher")
        assert failed["dispatcher_error_code"] == 100
        assert "lost heartbeat" in failed["dispatcher_error_diag"]
        res = subprocess.run(pilot_cmd(tmp_path / "wd2"), env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        details = user.task_details(task_id)
        assert details["status"] == "done", (details, res.stderr[-3000:])
        assert details["jobs"] == {"failed": 1, "finished": 1}
    finally:
        if first is not None and first.poll() is None:
            first.kill()
            first.wait()
        stop_server(srv)
