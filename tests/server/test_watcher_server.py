"""The periodic tasks inside a real ``panda server``: the data service activates assigned jobs,
the watcher fails a job whose pilot never reported (102) and retries it; the shares API; a bad
``--shares`` file stops the server with a clear message."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from dbkit import start_server, stop_server
from logic_kit import put_file, site
from panda_core.client import ApiClient, ClientError
from testkit import wait_for


@pytest.fixture
def server(tmp_path):
    ses = {n: tmp_path / n.lower() for n in ("SE_A", "SE_B")}
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, se in (("SITE_A", "SE_A"), ("SITE_B", "SE_B")):
        ses[se].mkdir()
        (sites / f"{name}.yaml").write_text(json.dumps(site(name, se, f"file://{ses[se]}")))
    srv = start_server(tmp_path / "srv", site_dir=sites,
                       extra=["--watcher-interval", "0.2", "--sent-timeout", "1"])
    srv.ses = ses
    yield srv
    stop_server(srv)


def test_data_service_and_watcher_run_inside_the_server(server):
    admin = ApiClient(server.url, server.token("admin", "root"))
    files = [put_file(server.ses["SE_B"], "s", f"in{i}", b"x" * (100 + i)) for i in range(2)]
    assert admin.add_files("ds.in", "s", files, "SE_B") == 2
    task_id = admin.submit_task({"name": "moved", "scope": "s", "transformation": "/bin/true",
                                 "input_dataset": "ds.in", "site": "SITE_A", "max_attempts": 2,
                                 "resources": {"memory_mb": 100, "walltime_s": 60}})
    assert "assigned=2" in admin.last_message
    wait_for(lambda: admin.task_details(task_id)["jobs"] == {"activated": 2}, "activation",
             timeout=20)
    assert (server.ses["SE_A"] / "s").is_dir()

    pilot = server.token("pilot", "p1", site="SITE_A")
    job = requests.post(f"{server.url}/server/panda/getJob", data={"siteName": "SITE_A"},
                        headers={"Accept": "application/json",
                                 "Authorization": f"Bearer {pilot}"}, timeout=10).json()
    pid = job["PandaID"]
    # the pilot never reports: after --sent-timeout the watcher fails it with 102 and retries
    failed = wait_for(lambda: (d := admin.call("job", "get_description", job_ids=pid)[0])
                      and d["jobStatus"] == "failed" and d, "the watcher", timeout=20)
    assert failed["dispatcher_error_code"] == 102
    assert "never reported" in failed["dispatcher_error_diag"]
    jobs = admin.jobs(task_id)
    retry = [j for j in jobs if j.get("parent_id") == pid]
    assert len(retry) == 1 and retry[0]["attempt_nr"] == 2


def test_shares_api(server):
    admin = ApiClient(server.url, server.token("admin", "root"))
    user = ApiClient(server.url, server.token("user", "alice"))
    view = ApiClient(server.url).call("shares", "list")
    assert view["targets"]["mc"] == pytest.approx(0.48)
    new = [{"name": "prod", "value": 90}, {"name": "user", "value": 10}]
    with pytest.raises(ClientError, match="role user may not"):
        user.call("shares", "set", "POST", shares=new)
    with pytest.raises(ClientError, match="add up to 100"):
        admin.call("shares", "set", "POST", shares=[{"name": "prod", "value": 90}])
    assert admin.call("shares", "set", "POST", shares=new)["targets"] == {"prod": 0.9,
                                                                         "user": 0.1}
    assert admin.call("shares", "set", "POST", values={"prod": 70, "user": 30})["targets"][
        "user"] == pytest.approx(0.3)
    assert ApiClient(server.url).call("shares", "list")["targets"]["prod"] == pytest.approx(0.7)
    usage = admin.call("shares", "usage", site="SITE_A")
    assert usage["order"] == ["prod", "user"]
    with pytest.raises(ClientError, match="unknown site"):
        admin.call("shares", "usage", site="NOPE")


def test_bad_shares_file_stops_the_server_with_the_reason(tmp_path):
    bad = tmp_path / "shares.yaml"
    bad.write_text("- {name: a, value: 60}\n- {name: b, value: 60}\n")
    proc = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server", "--db",
                           f"sqlite:///{tmp_path / 'x.db'}", "--key-dir", str(tmp_path / "k"),
                           "--port", "0", "--shares", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "--shares" in proc.stderr and "add up to 100 %, got 120" in proc.stderr


def test_two_server_processes_fail_each_silent_job_once(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "W.yaml").write_text(json.dumps(site("W", "SE_W", f"file://{tmp_path}")))
    srv = start_server(tmp_path / "srv", site_dir=sites,
                       extra=["--processes", "2", "--watcher-interval", "0.1",
                              "--sent-timeout", "1"])
    try:
        admin = ApiClient(srv.url, srv.token("admin", "root"))
        task_id = admin.submit_task({"name": "silent", "scope": "s", "transformation": "/bin/true",
                                     "n_jobs": 12, "site": "W", "max_attempts": 2,
                                     "resources": {"memory_mb": 100, "walltime_s": 60}})
        hdr = {"Accept": "application/json",
               "Authorization": f"Bearer {srv.token('pilot', 'p', site='W')}"}
        got = requests.post(f"{srv.url}/server/panda/getJob", data={"siteName": "W", "nJobs": 12},
                            headers=hdr, timeout=10).json()
        sent = [j["PandaID"] for j in got["jobs"]]
        assert len(sent) == 12
        # both processes run the watcher every 0.1 s; each silent job fails once, one retry each
        wait_for(lambda: admin.task_details(task_id)["jobs"].get("failed") == 12, "12 failures",
                 timeout=30)
        time.sleep(0.5)          # more watcher passes in both processes: nothing may change
        jobs = admin.jobs(task_id)
        assert sorted(j["parent_id"] for j in jobs if j["attempt_nr"] == 2) == sorted(sent)
        assert len(jobs) == 24
        for pid in sent:
            history = admin.call("job", "get_history", job_id=pid)
            assert [h["new_status"] for h in history].count("failed") == 1
    finally:
        stop_server(srv)


@pytest.mark.parametrize("args,words", [
    (["--data-mover", "teleport"], "--data-mover: no data mover 'teleport'"),
    (["--sent-timeout", "-5"], "--sent-timeout must be >= 0"),
])
def test_bad_watcher_options_stop_the_server_with_the_reason(tmp_path, args, words):
    proc = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server", "--db",
                           f"sqlite:///{tmp_path / 'x.db'}", "--key-dir", str(tmp_path / "k"),
                           "--port", "0"] + args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and words in proc.stderr
