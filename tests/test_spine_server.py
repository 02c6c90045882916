"""The spine over real HTTP: a server subprocess, the client CLI, and a pilot's protocol calls."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import zlib

import pytest
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from testkit import EXAMPLE_SITES, free_port, start_server, stop_server
from panda_core.client import ApiClient, ClientError
from panda_core.replicas import replica_path, replica_url

SITE = "LOCAL_DEMO"


@pytest.fixture
def site_server(tmp_path, monkeypatch):
    se = tmp_path / "se"
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    server = start_server(tmp_path / "srv", site_dir=sites)
    server.se = se
    yield server
    stop_server(server)


def register_inputs(server, client, n=3, dataset="t.inputs"):
    files = []
    for i in range(n):
        lfn = f"in.{i}.txt"
        data = f"data {i}\n".encode() * 10
        path = server.se / replica_path("t", lfn)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append({"lfn": lfn, "fsize": len(data),
                      "checksum": f"ad:{zlib.adler32(data):08x}"})
    assert client.add_files(dataset, "t", files, "LOCAL_SE") == n
    return files


TASK = {"name": "t1", "scope": "t", "transformation": "/bin/sh",
        "job_parameters": "-c 'cat ${IN} > ${OUT}'", "input_dataset": "t.inputs",
        "output_dataset": "t.outputs", "outputs": ["t1.${SN}.out"], "site": SITE,
        "max_attempts": 2, "resources": {"memory_mb": 100, "walltime_s": 60}}


def pilot_call(server, token, method, **form):
    resp = requests.post(f"{server.url}/server/panda/{method}", data=form,
                         headers={"Accept": "application/json",
                                  "Authorization": f"Bearer {token}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_task_runs_through_protocol(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "alice"))
    register_inputs(site_server, user)
    task_id = user.submit_task(TASK)
    assert "jediTaskID=" in user.last_message
    assert user.task_details(task_id)["jobs"] == {"activated": 3}

    pilot_token = site_server.token("pilot", "pilot1", site=SITE)
    key = load_pem_public_key(requests.get(
        f"{site_server.url}/.well-known/panda-jobspec-key.pem", timeout=5).content)
    seen = set()
    for _ in range(3):
        job = pilot_call(site_server, pilot_token, "getJob", siteName=SITE, node="wn1",
                         mem="2000", unknownKey="ignored")
        assert job["StatusCode"] == 0
        # the spec is signed over its canonical JSON
        sig = base64.b64decode(job.pop("specSignature"))
        job.pop("StatusCode")
        key.verify(sig, json.dumps(job, sort_keys=True, separators=(",", ":")).encode())
        assert job["PandaID"] not in seen
        seen.add(job["PandaID"])
        lfn_in = job["inFiles"]
        assert job["jobPars"] == f"-c 'cat {lfn_in} > {job['outFiles'].split(',')[0]}'"
        reply = pilot_call(site_server, pilot_token, "updateJob", jobId=job["PandaID"],
                           state="running", attemptNr=job["attemptNr"])
        assert reply == {"StatusCode": 0, "command": "NULL"}
        out, logf = job["outFiles"].split(",")
        se = f"file://{site_server.se}"       # outputs count only where the server puts them
        xml = {out: {"guid": "g1", "fsize": 5, "adler32": "01234567",
                     "surl": replica_url(se, job["scopeOut"], out)},
               logf: {"guid": "g2", "fsize": 9, "adler32": "89abcdef",
                      "surl": replica_url(se, job["scopeLog"], logf)}}
        reply = pilot_call(site_server, pilot_token, "updateJob", jobId=job["PandaID"],
                           state="finished", xml=json.dumps(xml), cpuConsumptionTime="1.5",
                           transExitCode="0", pilotErrorCode="0")
        assert reply["StatusCode"] == 0
    assert pilot_call(site_server, pilot_token, "getJob", siteName=SITE)["StatusCode"] == 20
    details = user.task_details(task_id)
    assert details["status"] == "done"
    assert details["jobs"] == {"finished": 3}
    job = user.call("job", "get_description", "POST", job_ids=[min(seen)])[0]
    history = [h["new_status"] for h in user.call("job", "get_history", job_id=min(seen))]
    assert history == ["defined", "activated", "sent", "running", "holding", "finished"]
    assert {f["status"] for f in job["Files"] if f["type"] != "input"} == {"ready"}


def test_failed_job_is_retried_and_kill(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "alice"))
    register_inputs(site_server, user, n=1)
    task_id = user.submit_task(TASK)
    pilot_token = site_server.token("pilot", "p", site=SITE)
    job = pilot_call(site_server, pilot_token, "getJob", siteName=SITE)
    pilot_call(site_server, pilot_token, "updateJob", jobId=job["PandaID"], state="failed",
               pilotErrorCode="1099", pilotErrorDiag="stage-in failed")
    retry = pilot_call(site_server, pilot_token, "getJob", siteName=SITE)
    assert retry["attemptNr"] == 2 and retry["PandaID"] != job["PandaID"]
    assert retry["outFiles"].split(",")[0].endswith(".2")
    # a heartbeat for the old attempt is told to stop
    assert pilot_call(site_server, pilot_token, "updateJob", jobId=job["PandaID"],
                      state="running")["command"] == "tobekilled"
    # another user may not kill alice's job; alice may
    bob = ApiClient(site_server.url, site_server.token("user", "bob"))
    assert bob.kill_jobs([retry["PandaID"]]) == [False]
    assert user.kill_jobs([retry["PandaID"]]) == [True]
    assert pilot_call(site_server, pilot_token, "updateJob", jobId=retry["PandaID"],
                      state="running")["command"] == "tobekilled"
    details = user.task_details(task_id)
    assert details["status"] == "failed"


def test_pilot_token_bound_to_other_site_is_refused(site_server):
    token = site_server.token("pilot", "p", site="ELSEWHERE")
    reply = pilot_call(site_server, token, "getJob", siteName=SITE)
    assert reply["StatusCode"] == 70
    user_token = site_server.token("user", "u")
    assert pilot_call(site_server, user_token, "getJob", siteName=SITE)["StatusCode"] == 60


def test_unknown_site_and_bad_task(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "alice"))
    register_inputs(site_server, user, n=1)
    with pytest.raises(ClientError, match="unknown site 'NOWHERE'"):
        user.submit_task({**TASK, "site": "NOWHERE"})
    with pytest.raises(ClientError, match="field 'transformation'"):
        user.submit_task({k: v for k, v in TASK.items() if k != "transformation"})
    with pytest.raises(ClientError, match="unknown field"):
        user.submit_task({**TASK, "bogus": 1})
    pilot = site_server.token("pilot", "p")
    reply = pilot_call(site_server, pilot, "getJob", siteName="NOWHERE")
    assert reply["StatusCode"] == 30 and "unknown site" in reply["errorDialog"]
    # nothing was created by the refused submissions
    assert user.call("task", "list") == []


def test_writes_need_identity(site_server):
    resp = requests.post(f"{site_server.url}/api/v1/task/submit",
                         json={"task_parameters": TASK}, timeout=5)
    assert resp.status_code == 200 and resp.json()["success"] is False
    assert "secure connection required" in resp.json()["message"]
    resp = requests.post(f"{site_server.url}/api/v1/task/submit",
                         json={"task_parameters": TASK}, timeout=5,
                         headers={"Authorization": "Bearer forged.token"})
    assert resp.status_code == 403


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_dead_server_names_url(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("name: x\ntransformation: /bin/true\nn_jobs: 1\n")
    url = f"http://127.0.0.1:{free_port()}"
    res = run_cli("submit", str(task), "--server", url)
    assert res.returncode == 1
    assert url in res.stderr and "cannot reach" in res.stderr


def test_cli_malformed_task_file(tmp_path, site_server):
    bad = tmp_path / "task.yaml"
    bad.write_text("name: [unclosed\n")
    res = run_cli("submit", str(bad), "--server", site_server.url)
    assert res.returncode == 2 and str(bad) in res.stderr and "not valid YAML" in res.stderr
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    res = run_cli("submit", str(lst), "--server", site_server.url)
    assert res.returncode == 2 and "mapping" in res.stderr


def test_cli_submit_status_kill(tmp_path, site_server):
    import os
    token = site_server.token("user", "carol")
    env = {**os.environ, "PANDA_AUTH_TOKEN": token, "PANDA_URL": site_server.url}
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": "nofiles", "transformation": "/bin/true", "n_jobs": 2,
                                "site": SITE}))
    res = run_cli("submit", str(task), "--json", env=env)
    assert res.returncode == 0, res.stderr
    task_id = json.loads(res.stdout)["task_id"]
    res = run_cli("status", str(task_id), env=env)
    assert res.returncode == 0 and "activated" in res.stdout and "2" in res.stdout
    ids = ApiClient(site_server.url).call("task", "get_job_ids", task_id=task_id)
    res = run_cli("kill", *map(str, ids), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli("status", str(task_id), "--json", env=env)
    assert json.loads(res.stdout)["jobs"] == {"cancelled": 2}


def test_metrics_and_monitor_pages(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "alice"))
    register_inputs(site_server, user, n=2)
    task_id = user.submit_task(TASK)
    text = requests.get(f"{site_server.url}/metrics", timeout=5).text
    assert 'panda_jobs{site="LOCAL_DEMO",state="activated"} 2.0' in text
    assert 'panda_tasks{state="ready"} 1.0' in text
    assert 'panda_requests_total{kind="api",method="task/submit"} 1.0' in text
    for path in ("/", "/monitor/tasks", f"/monitor/tasks/{task_id}", "/monitor/sites",
                 "/monitor/sites/LOCAL_DEMO", "/monitor/pilots"):
        resp = requests.get(site_server.url + path, timeout=5)
        assert resp.status_code == 200, path
    job_id = user.call("task", "get_job_ids", task_id=task_id)[0]
    page = requests.get(f"{site_server.url}/monitor/jobs/{job_id}", timeout=5).text
    assert "activated" in page and "in.0.txt" in page
    assert requests.get(f"{site_server.url}/monitor/jobs/999999", timeout=5).status_code == 404


def test_scheduler_status_page_shows_factories_and_pilots(site_server):
    factory = ApiClient(site_server.url, site_server.token("pilot", "factory-host-1"))
    factory.call("pilot", "report", "POST", factory="factory-host-1", pilots=[
        {"batch_id": "101", "site": SITE, "backend": "local", "state": "running"},
        {"batch_id": "102", "site": SITE, "backend": "local", "state": "queued"},
        {"batch_id": "103", "site": SITE, "backend": "local", "state": "failed", "exit_code": 1}])
    # a later report updates a pilot instead of adding one
    factory.call("pilot", "report", "POST", factory="factory-host-1", pilots=[
        {"batch_id": "101", "site": SITE, "backend": "local", "state": "done", "exit_code": 0}],
        sites={SITE: {"submitting": False, "reason": "5 pilots failed in a row",
                      "consecutive_failures": 5}})
    summary = factory.call("pilot", "summary")
    assert summary["sites"][SITE] == {"done": 1, "queued": 1, "failed": 1}
    page = requests.get(f"{site_server.url}/monitor/pilots", timeout=5).text
    assert "factory-host-1" in page and "<td>yes</td>" in page
    assert "5 pilots failed in a row" in page and "<b>no</b>" in page
    with pytest.raises(ClientError, match="batch_id and site"):
        factory.call("pilot", "report", "POST", factory="f", pilots=[{"site": SITE}])


def test_task_share_defaults_and_unknown_share(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "alice"))
    with pytest.raises(ClientError, match="unknown global share 'nosuch'"):
        user.submit_task({"name": "s0", "transformation": "/bin/true", "n_jobs": 1,
                          "site": SITE, "share": "nosuch"})
    prod = user.submit_task({"name": "s1", "transformation": "/bin/true", "n_jobs": 1,
                             "site": SITE})
    ana = user.submit_task({"name": "s2", "transformation": "/bin/true", "n_jobs": 1,
                            "site": SITE, "prod_source_label": "user"})
    assert user.task_details(prod)["share"] == "production"
    assert user.task_details(ana)["share"] == "analysis"


def test_update_without_site_name_after_restart_does_not_wait_for_a_lock(tmp_path, monkeypatch):
    """A read nested in updateJob's write transaction (the site's config, not yet cached after
    a restart) must not wait for that transaction's own SQLite write lock."""
    import time

    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    server = start_server(tmp_path / "srv", site_dir=sites)
    try:
        user = ApiClient(server.url, server.token("user", "alice"))
        task_id = user.submit_task({"name": "r", "transformation": "/bin/true", "n_jobs": 1,
                                    "site": SITE})
        token = server.token("pilot", "p", site=SITE)
        job = pilot_call(server, token, "getJob", siteName=SITE)
    finally:
        stop_server(server)
    server = start_server(tmp_path / "srv", db_url=server.db_url, site_dir=sites)
    try:
        t0 = time.monotonic()
        reply = pilot_call(server, token, "updateJob", jobId=job["PandaID"], state="finished")
        assert reply["StatusCode"] == 0
        assert time.monotonic() - t0 < 10, "updateJob waited for a database lock"
        assert ApiClient(server.url).task_details(task_id)["status"] == "done"
    finally:
        stop_server(server)


def test_processes_share_the_connections(tmp_path):
    """--processes N: every worker accepts connections of its own (SO_REUSEPORT); with one
    shared socket a single worker was seen taking all of a benchmark's 50 keep-alive pilots."""
    import socket

    import psutil

    server = start_server(tmp_path / "srv", extra=["--processes", "2"])
    try:
        workers = psutil.Process(server.proc.pid).children()
        assert len(workers) == 2
        port = int(server.url.rsplit(":", 1)[1])
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
        try:
            for c in conns:         # each connection gets its reply: somebody accepted it
                c.sendall(b"GET /server/panda/isAlive HTTP/1.1\r\nHost: x\r\n"
                          b"Accept: application/json\r\n\r\n")
                assert c.recv(4096).startswith(b"HTTP/1.1 200")
            mine = {c.getsockname()[1] for c in conns}
            served = [sum(1 for k in w.net_connections(kind="tcp")
                          if k.status == "ESTABLISHED" and k.raddr and k.raddr.port in mine)
                      for w in workers]
            # 24 connections hashed over 2 sockets: all on one has a chance of 2 in 16 million
            assert sum(served) == 24 and min(served) > 0, served
        finally:
            for c in conns:
                c.close()
    finally:
        stop_server(server)


def test_server_stops_within_its_grace_time_despite_a_stuck_client(tmp_path):
    """SIGTERM waits for requests in flight, but not forever: a client that sent half a
    request must not keep the server (or its --processes workers) alive."""
    import signal
    import socket
    import time

    import psutil

    server = start_server(tmp_path / "srv", extra=["--processes", "2"])
    workers = psutil.Process(server.proc.pid).children()
    assert len(workers) == 2
    port = int(server.url.rsplit(":", 1)[1])
    stuck = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    for s in stuck:   # a body that never comes
        s.sendall(b"POST /server/panda/getJob HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\nsiteName=")
    try:
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == [], "workers outlived the parent"
        assert time.monotonic() - t0 < 25
    finally:
        for s in stuck:
            s.close()
        stop_server(server)


@pytest.mark.slow
def test_server_stop_does_not_wait_for_a_stuck_database_call(tmp_path):
    """A request stuck in the database (here: SQLite locked by another program for longer than
    the server's grace time) must not keep a stopping server alive."""
    import signal
    import sqlite3
    import threading
    import time

    server = start_server(tmp_path / "srv")
    token = server.token("admin", "root")
    locker = sqlite3.connect(server.db_url[len("sqlite:///"):], timeout=1)
    locker.execute("BEGIN IMMEDIATE")          # another program holds the write lock
    try:
        def submit():
            try:
                requests.post(f"{server.url}/api/v1/task/submit", timeout=60, json={
                    "task_parameters": {"name": "x", "transformation": "/bin/true",
                                        "n_jobs": 1}},
                    headers={"Authorization": f"Bearer {token}"})
            except requests.RequestException:
                pass                           # the server went away under it: expected
        threading.Thread(target=submit, daemon=True).start()
        time.sleep(1.0)                        # the submission now waits for the lock
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(25)                   # the lock wait alone would take 30 s
        assert time.monotonic() - t0 < 20
    finally:
        locker.rollback()
        locker.close()
        stop_server(server)
