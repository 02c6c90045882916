"""Our pilot against the real ``panda server`` (a subprocess on 127.0.0.1, SQLite): a task run end
to end, a kill from the server, and the server restarted while a job runs."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from testkit import (EXAMPLE_SITES, RunningServer, put_input, start_server, stop_server,
                     wait_http)
from panda_core.client import ApiClient
from panda_core.errorcodes import ErrorCode
from pilotkit import pilot_env

SITE = "LOCAL_DEMO"


@pytest.fixture
def real(tmp_path, monkeypatch):
    se = tmp_path / "se"
    se.mkdir()
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    sites = tmp_path / "sites"
    sites.mkdir()
    text = (EXAMPLE_SITES / f"{SITE}.yaml").read_text().replace("heartbeat_s: 60", "heartbeat_s: 1")
    (sites / f"{SITE}.yaml").write_text(text)
    server = start_server(tmp_path / "srv", site_dir=sites)
    server.se = se
    server.sites = sites
    yield server
    stop_server(server)


def register(server, user, names, dataset="p.inputs", scope="p"):
    files = []
    for lfn in names:
        files.append(put_input(server.se, scope, lfn, f"content of {lfn}\n".encode() * 50))
    user.add_files(dataset, scope, files, "LOCAL_SE")
    return files


def task(name, script, **extra):
    t = {"name": name, "scope": "p", "transformation": "/bin/sh", "job_parameters": script,
         "input_dataset": "p.inputs", "output_dataset": f"p.{name}.out",
         "outputs": [f"{name}.${{SN}}.out"], "site": SITE, "max_attempts": 1,
         "resources": {"memory_mb": 500, "walltime_s": 300}}
    t.update(extra)
    return t


def pilot(server, workdir, *args, token=None):
    token = token or server.token("pilot", "pilot1", site=SITE)
    cmd = [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", server.url, "--site", SITE,
           "--workdir", str(workdir), "--monitor-interval", "0.2", "--server-backoff", "0.3",
           "--public-key", str(server.public_key_file()), *args]
    return cmd, pilot_env({"PANDA_AUTH_TOKEN": token})


def test_task_end_to_end_with_real_server(real, tmp_path):
    user = ApiClient(real.url, real.token("user", "alice"))
    register(real, user, ["a.txt", "b.txt"])
    task_id = user.submit_task(task("e2e", "-c 'sha256sum ${IN} > ${OUT}'"))
    cmd, env = pilot(real, tmp_path / "wd")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    details = user.task_details(task_id)
    assert details["status"] == "done", (details, res.stderr[-3000:])
    assert details["jobs"] == {"finished": 2}
    outs = sorted(real.se.glob("p/*/*/e2e.*.out"))
    assert len(outs) == 2, res.stderr[-2000:]
    assert {o.read_text().split()[1] for o in outs} == {"a.txt", "b.txt"}
    assert len(list(real.se.glob("p/*/*/*.log.tgz"))) == 2
    jobs = user.jobs(task_id)
    assert all(j.get("status", j.get("jobStatus")) == "finished" for j in jobs), jobs
    # the server registered what the pilot stored (the final update's xml)
    ids = [j.get("PandaID") or j.get("panda_id") for j in jobs]
    for job in user.call("job", "get_description", "POST", job_ids=ids):
        outs = [f for f in job["Files"] if f["type"] in ("output", "log")]
        assert len(outs) == 2
        for f in outs:
            assert f["status"] == "ready" and f["fsize"] > 0, f
            assert f["checksum"].startswith("ad:"), f
        assert job["cpu_consumption_time"] is not None and job["max_rss"] > 0


def test_failed_payload_reported_to_real_server(real, tmp_path):
    user = ApiClient(real.url, real.token("user", "alice"))
    register(real, user, ["f.txt"])
    task_id = user.submit_task(task("fail", "-c 'echo oops >&2; exit 9'"))
    cmd, env = pilot(real, tmp_path / "wd")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    [job] = user.jobs(task_id)
    panda_id = job.get("PandaID") or job.get("panda_id")
    desc = user.call("job", "get_description", "POST", job_ids=[panda_id])[0]
    assert desc["jobStatus"] == "failed", desc
    assert desc["pilot_error_code"] == ErrorCode.PAYLOAD_FAILED
    assert desc["trans_exit_code"] == 9
    assert "exited with code 9" in desc["pilot_error_diag"]


def test_kill_from_real_server(real, tmp_path):
    user = ApiClient(real.url, real.token("user", "alice"))
    register(real, user, ["k.txt"])
    task_id = user.submit_task(task("kill", "-c 'sleep 60'"))
    cmd, env = pilot(real, tmp_path / "wd", "--heartbeat", "0.5")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            details = user.task_details(task_id)
            if details["jobs"].get("running"):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"job never ran: {details}")
        [job] = user.jobs(task_id)
        panda_id = job.get("PandaID") or job.get("panda_id")
        t0 = time.monotonic()
        assert user.kill_jobs([panda_id]) == [True]
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 0, out[-3000:]
    assert "the server says tobekilled" in out and "killing payload" in out, out[-3000:]
    assert f"[{int(ErrorCode.KILLED_BY_SERVER)}]" in out
    job = user.call("job", "get_description", "POST", job_ids=[panda_id])[0]
    assert job["jobStatus"] == "cancelled", job


def test_real_server_restarted_during_job(real, tmp_path):
    user = ApiClient(real.url, real.token("user", "alice"))
    register(real, user, ["r.txt"])
    task_id = user.submit_task(task("restart", "-c 'sleep 2; cat ${IN} > ${OUT}'"))
    token = real.token("pilot", "pilot1", site=SITE)
    cmd, env = pilot(real, tmp_path / "wd", "--server-retries", "8", "--server-backoff", "0.5",
                     token=token)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not user.task_details(task_id)["jobs"].get("running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        port = real.url.rsplit(":", 1)[1]
        stop_server(real)                       # the server goes away mid-job ...
        time.sleep(3)
        restarted = restart(real, tmp_path, port)   # ... and comes back on the same port and DB
        try:
            out, _ = proc.communicate(timeout=90)
            assert proc.returncode == 0, out[-3000:]
            details = ApiClient(restarted.url, real.token("user", "alice")).task_details(task_id)
            assert details["status"] == "done", (details, out[-3000:])
        finally:
            stop_server(restarted)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "retrying" in out


def restart(old: RunningServer, tmp_path, port: str) -> RunningServer:
    log_path = tmp_path / "server2.log"
    cmd = [sys.executable, "-m", "panda_wms.cli", "server", "--db", old.db_url, "--port", port,
           "--host", "127.0.0.1", "--key-dir", str(old.key_dir), "--site-configs", str(old.sites)]
    logf = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/api/v1/system/is_alive", proc=proc)
    return RunningServer(url=url, db_url=old.db_url, key_dir=old.key_dir, proc=proc, log_path=log_path)
