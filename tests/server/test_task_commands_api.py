"""``task/finish``, ``task/pause``, ``task/resume`` (PanDA's finishTask, pauseTask,
resumeTask) through a live server on SQLite, PostgreSQL and MariaDB: owner checks, PanDA's
return codes, a paused task's jobs refused to pilots' getJob and given after resume (on
PostgreSQL through the hot path), hostile input, the refused calls, ``panda finish/pause/
resume``. The same calls from PanDA's own client and pbook: tests/compat/test_compat_tasks.py."""
from __future__ import annotations

import json

import pytest
import requests

from logic_kit import site
from testkit import start_server, stop_server


@pytest.fixture(scope="module")
def srv(request, db_backend, tmp_path_factory):
    db_url = request.getfixturevalue("_session_db")     # migrated once per session
    tmp = tmp_path_factory.mktemp(f"task-commands-{db_backend}")
    sites = tmp / "sites"
    sites.mkdir()
    (sites / "S.yaml").write_text(json.dumps(site("S", "SE_S", f"file://{tmp}/se")))
    server = start_server(tmp / "srv", db_url=db_url, site_dir=sites,
                          extra=["--watcher-interval", "0", "--ops-interval", "0",
                                 "--archive-interval", "0"])
    server.users = {name: {"Authorization": f"Bearer {server.token(role, name)}"}
                    for name, role in (("alice", "user"), ("bob", "user"), ("root", "admin"))}
    server.pilot = {"Authorization": f"Bearer {server.token('pilot', 'p', site='S')}",
                    "Accept": "application/json"}
    yield server
    stop_server(server)
    assert "Traceback" not in server.log(), server.log()[-3000:]


def call(srv, user: str | None, method: str, http: str = "POST", **params) -> dict:
    """An API call as ``user`` (None: no token): the reply, never a server error."""
    headers = srv.users[user] if user else {}
    url = f"{srv.url}/api/v1/task/{method}"
    reply = (requests.post(url, json=params, headers=headers, timeout=30) if http == "POST"
             else requests.get(url, params=params, headers=headers, timeout=30))
    assert reply.status_code < 500, (reply.status_code, reply.text[:300])
    body = reply.json()
    body["http"] = reply.status_code
    return body


def submit(srv, n: int = 3) -> int:
    body = call(srv, "alice", "submit", task_parameters={
        "name": "commands", "scope": "s", "transformation": "/bin/true", "n_jobs": n,
        "site": "S", "resources": {"cores": 1, "memory_mb": 100, "walltime_s": 60}})
    assert body["success"], body
    return body["data"]


def details(srv, task_id: int) -> dict:
    return call(srv, None, "get_details", "GET", task_id=task_id)["data"]


def pilot(srv, method: str, **form) -> dict:
    reply = requests.post(f"{srv.url}/server/panda/{method}", data=form, headers=srv.pilot,
                          timeout=30)
    assert reply.status_code == 200, reply.text[:300]
    return reply.json()


def test_owner_pauses_resumes_and_finishes_others_are_refused(srv):
    task_id = submit(srv)
    # bob: PanDA's code 3, nothing changes
    for method in ("pause", "resume", "finish"):
        body = call(srv, "bob", method, task_id=task_id)
        assert (body["success"], body["data"]) == (False, 3), body
        assert f"task {task_id} belongs to alice" in body["message"]
    assert details(srv, task_id)["jobs"] == {"activated": 3}
    # alice pauses it: her pilots get nothing from it
    body = call(srv, "alice", "pause", task_id=task_id)
    assert (body["success"], body["data"]) == (True, 0), body
    assert "3 queued job(s) held" in body["message"]
    view = details(srv, task_id)
    assert view["status"] == "paused" and view["jobs"] == {"throttled": 3}
    assert pilot(srv, "getJob", siteName="S")["StatusCode"] == 20
    body = call(srv, "alice", "pause", task_id=task_id)
    assert (body["success"], body["data"]) == (False, 4) and "is paused" in body["message"]
    # an admin resumes it: the jobs go to pilots again
    body = call(srv, "root", "resume", task_id=task_id)
    assert (body["success"], body["data"]) == (True, 0) and "3 job(s) queued again" in \
        body["message"]
    job = pilot(srv, "getJob", siteName="S")
    assert job["StatusCode"] == 0 and job["jediTaskID"] == task_id
    assert pilot(srv, "updateJob", jobId=job["PandaID"], state="running")["StatusCode"] == 0
    assert details(srv, task_id)["status"] == "running"
    # a soft finish lets the running job end; the queued ones are cancelled
    body = call(srv, "alice", "finish", task_id=task_id, soft=True)
    assert (body["success"], body["data"]) == (True, 0), body
    assert "2 job(s) cancelled; the task is finishing" in body["message"]
    assert details(srv, task_id)["jobs"] == {"running": 1, "cancelled": 2}
    assert pilot(srv, "updateJob", jobId=job["PandaID"], state="running")["command"] == "NULL"
    # finished hard: the running one is killed, its pilot told; the task failed (none done)
    body = call(srv, "alice", "finish", task_id=task_id)
    assert body["success"] and "the task is failed" in body["message"], body
    assert pilot(srv, "updateJob", jobId=job["PandaID"], state="running")["command"] == \
        "tobekilled"
    view = details(srv, task_id)
    assert view["status"] == "failed" and view["jobs"] == {"cancelled": 3}
    for method in ("pause", "resume", "finish"):
        body = call(srv, "alice", method, task_id=task_id)
        assert (body["success"], body["data"]) == (False, 4), body
        assert f"task {task_id} is failed" in body["message"]


def test_hostile_task_ids_and_options_are_refused_with_a_reason(srv):
    task_id = submit(srv, 1)
    for method in ("pause", "resume", "finish"):
        body = call(srv, "alice", method, task_id=987654321)
        assert (body["success"], body["data"], body["message"]) == (
            False, 2, "no task 987654321")
        for bad in ("abc", -1, 0, 2**70, 1.5, [task_id, task_id], {"id": task_id}, "1; DROP"):
            body = call(srv, "alice", method, task_id=bad)
            assert body["http"] == 400 and not body["success"], (bad, body)
            assert "task_id" in body["message"], body
        body = call(srv, "alice", method)
        assert body["http"] == 400 and "'task_id' is required" in body["message"]
        body = call(srv, None, method, task_id=task_id)           # no identity
        assert not body["success"] and "secure connection required" in body["message"]
        assert call(srv, "alice", method, "GET", task_id=task_id)["http"] == 405
    body = call(srv, "alice", "finish", task_id=task_id, soft="maybe")
    assert body["http"] == 400 and "'soft' must be true or false" in body["message"]
    reply = requests.post(f"{srv.url}/api/v1/task/pause", data="not json", timeout=30,
                          headers={**srv.users["alice"], "Content-Type": "application/json"})
    assert reply.status_code == 400
    assert details(srv, task_id)["status"] == "ready"
    assert details(srv, task_id)["jobs"] == {"activated": 1}


def test_more_attempts_with_the_codes_of_increase_attempt_nr(srv):
    task_id = submit(srv, 2)
    body = call(srv, "bob", "increase_attempts", task_id=task_id, increase=3)
    assert (body["success"], body["data"]) == (False, 3) and "belongs to alice" in \
        body["message"]
    for bad in (-1, 101, "x", 2**70, [1], 1.5):
        body = call(srv, "alice", "increase_attempts", task_id=task_id, increase=bad)
        assert (body["http"], body["success"], body["data"]) == (200, False, 4), (bad, body)
        assert "increase must be a whole number from 0 to 100" in body["message"]
    body = call(srv, "alice", "increase_attempts", task_id=987654321, increase=1)
    assert (body["success"], body["data"]) == (False, 1)
    body = call(srv, "alice", "increase_attempts", task_id=task_id)    # absent: 3, as the client
    assert (body["success"], body["data"]) == (True, 0), body
    assert "3 more attempt(s) for its jobs, 0 failed job(s) run again" in body["message"]
    call(srv, "alice", "finish", task_id=task_id)
    body = call(srv, "alice", "increase_attempts", task_id=task_id, increase=1)
    assert (body["success"], body["data"]) == (False, 2) and "is failed" in body["message"]


def test_unsupported_task_commands_say_why(srv):
    task_id = submit(srv, 1)
    for method, words in (("reactivate", "retryTask reruns"), ("reload_input", "task/extend")):
        body = call(srv, "alice", method, task_id=task_id, increase=3)
        assert body["http"] == 200 and not body["success"] and words in body["message"], body
    assert details(srv, task_id)["jobs"] == {"activated": 1}


def test_debug_mode_as_pandas_client_sets_it(srv):
    """PanDA's setDebugMode posts ``{"job_id", "mode"}`` to job/set_debug_mode."""
    task_id = submit(srv, 1)
    (pid,) = call(srv, None, "get_job_ids", "GET", task_id=task_id)["data"]
    url = f"{srv.url}/api/v1/job/set_debug_mode"
    reply = requests.post(url, json={"job_id": pid, "mode": True}, headers=srv.users["bob"],
                          timeout=30)
    assert reply.status_code == 403 and f"belongs to alice" in reply.json()["message"]
    reply = requests.post(url, json={"job_id": pid, "mode": True},
                          headers=srv.users["alice"], timeout=30).json()
    assert reply["success"] and reply["data"] == {"job_id": pid, "debug": "tail"}
    reply = requests.post(url, json={"job_id": pid, "mode": False},
                          headers=srv.users["alice"], timeout=30).json()
    assert reply["success"] and reply["data"] == {"job_id": pid, "debug": None}


def test_panda_cli_finishes_pauses_and_resumes(srv):
    """``panda pause N``, ``panda resume N``, ``panda finish N [--soft]`` as a user types them."""
    import os
    import subprocess
    import sys

    task_id = submit(srv, 2)

    def panda(*args: str, who: str = "alice") -> subprocess.CompletedProcess:
        token = srv.users[who]["Authorization"].split()[1]
        return subprocess.run([sys.executable, "-m", "panda_wms.cli", *args, "--server",
                               srv.url], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PANDA_AUTH_TOKEN": token})

    res = panda("pause", str(task_id), who="bob")
    assert res.returncode == 1 and "belongs to alice" in res.stderr, res.stderr
    res = panda("pause", str(task_id))
    assert res.returncode == 0 and res.stdout == (f"task {task_id}: jediTaskID={task_id} "
                                                  "paused: 2 queued job(s) held\n"), res
    res = panda("resume", str(task_id), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["task_id"] == task_id
    res = panda("finish", str(task_id), "--soft")
    assert res.returncode == 0 and "2 job(s) cancelled" in res.stdout, res
    res = panda("finish", str(task_id))
    assert res.returncode == 1 and "has ended already" in res.stderr
    assert "Traceback" not in res.stderr
    res = panda("pause", "x")
    assert res.returncode == 2 and "invalid int value" in res.stderr
