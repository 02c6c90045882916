"""Issue 14: the command line a site admin uses on the first day, against one real server.

``panda jobs/tasks/job/kill --task/retry/data add``, ``--json`` and ``--watch``, and every error
a person meets on the way (a malformed URL, a missing token, a bad task file, a bad state) read
as a person sees it: the command's stderr and exit code, never a traceback.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from testkit import EXAMPLE_SITES, REPO, start_server, stop_server, wait_for

SITE = "LOCAL_DEMO"
SHORT = "ADMIN_SHORT"        # a site whose pilots ask for 10 minutes only
NOFIT = "ADMIN_NOFIT"        # the same, for the no-fit explanation alone
E2E = "ADMIN_E2E"            # LOCAL_DEMO's defaults, for a factory that runs pilots
#: task fields of docs/contracts.md's example that the README's one-site example leaves out
OPTIONAL_ELSEWHERE = ("destination_se", "notify")


def panda(*args: str, token: str | None = None, server=None, env=None, timeout=60,
          cwd=None, isolated: bool = False) -> subprocess.CompletedProcess:
    """``panda ARGS`` as a person runs it: its stdout, stderr and exit code. In this process
    (an interpreter start per command would cost the suite a minute) unless ``isolated``; an
    exception escaping the command would be the traceback a person sees, and fails the test."""
    full = {**os.environ, **(env or {})}
    full.pop("PANDA_AUTH_TOKEN", None)
    if token:
        full["PANDA_AUTH_TOKEN"] = token
    if server is not None:
        full["PANDA_URL"] = server.url
    if isolated:
        return subprocess.run([sys.executable, "-m", "panda_wms.cli", *args],
                              capture_output=True, text=True, timeout=timeout, env=full, cwd=cwd)
    import contextlib
    import io
    from unittest import mock

    from panda_wms.cli import main
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, full, clear=True), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:          # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["panda", *args], code, out.getvalue(), err.getvalue())


def person_sees(res: subprocess.CompletedProcess) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    sites = tmp / "sites"
    sites.mkdir()
    demo = yaml.safe_load((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(demo))
    short = {**demo, "name": SHORT, "pilots": {**demo["pilots"], "walltime_s": 600}}
    (sites / f"{SHORT}.yaml").write_text(yaml.safe_dump(short))
    (sites / f"{NOFIT}.yaml").write_text(yaml.safe_dump({**short, "name": NOFIT}))
    se_url = f"file://{tmp / 'se'}"
    (tmp / "se").mkdir()
    (sites / f"{E2E}.yaml").write_text(yaml.safe_dump({**demo, "name": E2E, "storage": {
        "input": {"name": "E2E_SE", "url": se_url}, "output": {"name": "E2E_SE", "url": se_url}}}))
    server = start_server(tmp / "server", site_dir=sites)
    server.sites = sites
    from server.auth import KeyStore
    keys = KeyStore(server.key_dir)           # the server's own keys: tokens without a process
    server.alice = keys.issue_token("alice", "user")
    server.bob = keys.issue_token("bob", "user")
    server.admin = keys.issue_token("root", "admin")
    server.pilot = keys.issue_token("p1", "pilot")
    yield server
    stop_server(server)


def submit(srv, task: dict, token: str) -> int:
    reply = requests.post(f"{srv.url}/api/v1/task/submit", json={"task_parameters": task},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert reply["success"], reply
    return int(reply["data"])


def pilot_call(srv, method: str, **form) -> dict:
    resp = requests.post(f"{srv.url}/server/panda/{method}", data=form,
                         headers={"Accept": "application/json",
                                  "Authorization": f"Bearer {srv.pilot}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def take_and_fail(srv, site: str, code: int = 1305, diag: str = "payload ran out of beer"):
    job = pilot_call(srv, "getJob", siteName=site, remainingWalltime=100000)
    assert job["StatusCode"] == 0, job
    pid = job["PandaID"]
    for state in ("starting", "running"):
        assert pilot_call(srv, "updateJob", jobId=pid, state=state)["StatusCode"] == 0
    assert pilot_call(srv, "updateJob", jobId=pid, state="failed", pilotErrorCode=code,
                      pilotErrorDiag=diag)["StatusCode"] == 0
    return pid


def task(name: str, n: int = 2, site: str = SITE, **kw) -> dict:
    return {"name": name, "transformation": "/bin/true", "n_jobs": n, "site": site, **kw}


# ---------------------------------------------------------------------- panda jobs / job
def test_jobs_table_json_and_filters(srv):
    t_alice = submit(srv, task("listing", 3, max_attempts=1), srv.alice)
    t_bob = submit(srv, task("bobs", 1), srv.bob)
    failed = take_and_fail(srv, SITE)

    res = panda("jobs", "--json", "--task", str(t_alice), server=srv)
    jobs = json.loads(person_sees(res) and res.stdout)
    assert res.returncode == 0 and len(jobs) == 3
    for job in jobs:
        assert {"id", "task", "site", "state", "attempt", "error_code"} <= set(job)
        assert job["task"] == t_alice and job["site"] == SITE
    by_id = {j["id"]: j for j in jobs}
    assert by_id[failed]["state"] == "failed" and by_id[failed]["error_code"] == 1305
    assert "beer" in by_id[failed]["error_text"]

    table = panda("jobs", "--task", str(t_alice), server=srv)
    text = person_sees(table)
    assert table.returncode == 0
    assert text.splitlines()[0].split()[:5] == ["ID", "TASK", "SITE", "STATE", "ATT"]
    failed_line = next(line for line in text.splitlines() if line.startswith(str(failed)))
    assert "failed" in failed_line and "1305" in failed_line and "beer" in failed_line
    assert "3 job(s)" in text

    def ids(*args):
        res = panda("jobs", "--json", *args, server=srv)
        assert res.returncode == 0, person_sees(res)
        return {j["id"] for j in json.loads(res.stdout)}

    assert ids("--state", "failed", "--task", str(t_alice)) == {failed}
    assert ids("--user", "bob") == {j["id"] for j in json.loads(panda(
        "jobs", "--json", "--task", str(t_bob), server=srv).stdout)}
    assert ids("--site", SITE, "--state", "activated,failed", "--task", str(t_alice)) == \
        set(by_id)
    assert set(by_id) <= ids("--since", "1h")
    assert ids("--since", "2099-01-01T00:00:00Z") == set()
    assert len(ids("--limit", "1")) == 1

    bad = panda("jobs", "--state", "runing", server=srv)
    assert bad.returncode == 2 and "unknown job state(s) runing" in person_sees(bad)
    assert "known: defined" in bad.stderr
    bad = panda("jobs", "--since", "yesterday-ish", server=srv)
    assert bad.returncode == 2 and "--since" in person_sees(bad)

    details = panda("job", str(failed), server=srv)
    text = person_sees(details)
    assert details.returncode == 0
    assert f"job {failed}: failed, attempt 1 of 1" in text
    assert "error" in text and "1305: payload ran out of beer" in text
    assert "files:" in text and "log" in text and "history:" in text and "IN STATE" in text
    for step in ("defined", "activated", "sent", "starting", "running", "failed"):
        assert step in text.split("history:")[1]
    as_json = json.loads(panda("job", str(failed), "--json", server=srv).stdout)
    steps = [h["to"] for h in as_json["history"]]
    assert steps == ["defined", "activated", "sent", "starting", "running", "holding", "failed"]
    assert all(h["seconds"] is not None and h["seconds"] >= 0 for h in as_json["history"][:-1])
    assert as_json["history"][-1]["seconds"] is None          # final: no time "in" it
    assert as_json["error_code"] == 1305
    missing = panda("job", "999999", server=srv)
    assert missing.returncode == 1 and "no job 999999" in person_sees(missing)


def test_tasks_lists_counts(srv):
    t = submit(srv, task("counted", 2), srv.alice)
    res = panda("tasks", "--json", "--user", "alice", server=srv)
    tasks = {x["id"]: x for x in json.loads(person_sees(res) and res.stdout)}
    assert tasks[t]["jobs"] == {"activated": 2} and tasks[t]["owner"] == "alice"
    assert all(x["owner"] == "alice" for x in tasks.values())
    text = person_sees(panda("tasks", server=srv))
    line = next(line for line in text.splitlines() if line.startswith(str(t)))
    assert "counted" in line and "activated=2" in line
    bad = panda("tasks", "--state", "runing", server=srv)
    assert bad.returncode == 2 and "known: registered" in person_sees(bad)


def test_watch_refreshes_until_ctrl_c(srv):
    submit(srv, task("watched", 1), srv.alice)
    proc = subprocess.Popen([sys.executable, "-m", "panda_wms.cli", "jobs", "--watch", "0.5",
                             "--server", srv.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    deadline = time.monotonic() + 30
    while len([s for s in seen if s.startswith("every 0.5 s")]) < 2:
        assert time.monotonic() < deadline, seen
        seen.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert any(line.startswith("ID ") for line in seen)
    # --json: stdout carries one JSON document per refresh and nothing else
    proc = subprocess.Popen([sys.executable, "-m", "panda_wms.cli", "jobs", "--json", "--watch",
                             "0.5", "--server", srv.url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    docs = [json.loads(proc.stdout.readline()) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and all(isinstance(d, list) and d for d in docs)
    assert "every 0.5 s" in err and "Traceback" not in err
    # a server that is down (restarting): said on every refresh, the watch goes on
    from testkit import free_port
    proc = subprocess.Popen([sys.executable, "-m", "panda_wms.cli", "jobs", "--watch", "0.5",
                             "--server", f"http://127.0.0.1:{free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = [proc.stderr.readline() for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and all("cannot reach the server" in e for e in errors), errors


# ---------------------------------------------------------------------- kill --task, retry
def test_kill_task_and_retry(srv):
    t = submit(srv, task("killme", 3, max_attempts=1), srv.alice)
    # bob may not kill alice's task
    res = panda("kill", "--task", str(t), token=srv.bob, server=srv)
    assert res.returncode == 1 and "permission denied" in person_sees(res)
    res = panda("kill", "--task", str(t), token=srv.alice, server=srv)
    assert res.returncode == 0 and "killed" in person_sees(res)
    jobs = json.loads(panda("jobs", "--json", "--task", str(t), server=srv).stdout)
    assert {j["state"] for j in jobs} <= {"cancelled", "failed"}
    status = json.loads(panda("status", str(t), "--json", server=srv).stdout)
    assert status["status"] == "aborted"
    usage = panda("kill", server=srv)
    assert usage.returncode == 2 and "job ids or --task" in person_sees(usage)

    # retry the whole task: every job ended without finishing gets a new attempt
    res = panda("retry", "--task", str(t), token=srv.alice, server=srv)
    assert res.returncode == 0 and "3 job(s) again" in person_sees(res), res.stderr
    ended = {j["id"] for j in jobs}
    again = json.loads(panda("jobs", "--json", "--task", str(t), server=srv).stdout)
    new = [j for j in again if j["id"] not in ended]
    assert len(new) == 3 and all(j["state"] == "activated" and j["attempt"] == 2 for j in new)
    assert json.loads(panda("status", str(t), "--json", server=srv).stdout)["status"] in (
        "running", "ready")
    res = panda("retry", "--task", str(t), token=srv.alice, server=srv)
    assert res.returncode == 1 and "only an ended task is retried" in person_sees(res)
    # a job already retried is not retried twice; an unknown one is named
    res = panda("retry", str(next(iter(ended))), "999999", token=srv.alice, server=srv)
    text = person_sees(res)
    assert res.returncode == 1 and "already retried" in text and "no job 999999" in text
    # a failed job of someone else's task, then one's own by id
    submit(srv, task("retry-one", 1, site=SHORT, max_attempts=1), srv.alice)
    pid = take_and_fail(srv, SHORT)
    assert panda("retry", str(pid), token=srv.bob, server=srv).returncode == 1
    res = panda("retry", str(pid), token=srv.alice, server=srv)
    assert res.returncode == 0 and f"job {pid}: retried as job" in person_sees(res)
    assert json.loads(panda("tasks", "--json", "--user", "alice", server=srv).stdout)


# ---------------------------------------------------------------------- panda data add
def test_data_add_then_the_contracts_task_submits(srv, tmp_path):
    se_root = tmp_path / "se"
    se_root.mkdir()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        (inputs / f"demo.input.{i}.txt").write_text(f"input {i}\n" * 10)
    res = panda("data", "add", "demo.inputs", "--scope", "demo", "--endpoint", "LOCAL_SE",
                "--copy-to", str(se_root), *map(str, sorted(inputs.iterdir())),
                token=srv.alice, server=srv)
    assert res.returncode == 0 and "3 new file(s) registered" in person_sees(res)
    from panda_core.replicas import replica_path
    assert (se_root / replica_path("demo", "demo.input.1.txt")).read_text() == "input 1\n" * 10
    again = panda("data", "add", "demo.inputs", "--scope", "demo", *map(str, inputs.iterdir()),
                  token=srv.alice, server=srv)
    assert again.returncode == 0 and "0 new file(s)" in again.stdout and "3 already" in again.stdout
    listed = json.loads(panda("data", "list", "demo.inputs", "--json", server=srv).stdout)
    assert sorted(f["lfn"] for f in listed) == [f"demo.input.{i}.txt" for i in range(3)]
    assert all(f["checksum"].startswith("ad:") and f["fsize"] == 80 for f in listed)

    # the task file of docs/contracts.md, as written there
    text = (REPO / "docs" / "contracts.md").read_text()
    block = text.split("```yaml\nname: demo")[1].split("```")[0]
    task_file = tmp_path / "task.yaml"
    task_file.write_text("name: demo" + block)
    # the README's example: the same task without the parts that need more than one site
    # (an aggregation storage element, notifications by mail and webhook)
    example = yaml.safe_load((REPO / "docs" / "examples" / "demo-task.yaml").read_text())
    contract = yaml.safe_load("name: demo" + block)
    assert example == {k: v for k, v in contract.items() if k not in OPTIONAL_ELSEWHERE}
    # the contracts' task, as written (its optional multi-site parts are comments), is accepted
    res = panda("submit", str(task_file), token=srv.alice, server=srv)
    assert res.returncode == 0 and "jobs=3" in person_sees(res), res.stderr

    # bad input: a list line, a name, a missing file, no action
    lst = tmp_path / "files.txt"
    lst.write_text("ok.1 10 ad:0000000a\nbad/name 3\n")
    res = panda("data", "add", "x.ds", "--scope", "demo", "--list", str(lst), server=srv)
    assert res.returncode == 2 and f"{lst}, line 2" in person_sees(res)
    res = panda("data", "add", "../x", "--scope", "demo", str(task_file), server=srv)
    assert res.returncode == 2 and "refusing dataset" in person_sees(res)
    res = panda("data", "add", "x.ds", "--scope", "demo", str(tmp_path / "nope"), server=srv)
    assert res.returncode == 2 and "no such file" in person_sees(res)
    res = panda("data", server=srv)
    assert res.returncode == 2 and "panda data add DATASET" in person_sees(res)
    lst.write_text("ok.1 10 ad:0000000a\nok.2\n")
    res = panda("data", "add", "listed.ds", "--scope", "demo", "--list", str(lst), server=srv)
    assert res.returncode == 1 and "an identity is required" in person_sees(res)
    res = panda("data", "add", "listed.ds", "--scope", "demo", "--list", str(lst),
                token=srv.alice, server=srv)
    assert res.returncode == 0 and "2 new file(s)" in person_sees(res)


# ---------------------------------------------------------------------- errors a person reads
@pytest.mark.parametrize("url", ["notaurl", "http://", "http://host:abc", "http://[::1",
                                 "ftp://example.org", "http://127.0.0.1:99999"])
def test_malformed_server_url(url):
    for args in (["status", "1"], ["jobs"], ["kill", "--task", "1"]):
        res = panda(*args, "--server", url, isolated=args[0] == "status")
        assert res.returncode == 2, person_sees(res)
        assert "not a server URL" in person_sees(res) and repr(url) in res.stderr


def test_task_file_errors_name_file_line_and_known_fields(srv, tmp_path):
    bad = tmp_path / "task.yaml"
    bad.write_text("name: x\n  transformation: /bin/true\n")
    res = panda("submit", str(bad), token=srv.alice, server=srv)
    text = person_sees(res)
    assert res.returncode == 2 and f"{bad}, line 2, column 17" in text
    assert "<unicode string>" not in text
    bad.write_text("name: x\ntransformation: /bin/true\nn_job: 2\nwalltime: 10\n")
    res = panda("submit", str(bad), token=srv.alice, server=srv)
    text = person_sees(res)
    assert res.returncode == 1 and "unknown field(s) 'n_job' (did you mean 'n_jobs'?)" in text
    assert "(did you mean 'resources.walltime_s'?)" in text
    assert "known fields: " in text and "input_dataset" in text and "max_attempts" in text
    from panda_wms.client_cli import read_task_file       # YAML 1.2 booleans: 'on' is a key
    bad.write_text("name: x\nnotify: {on: [task_end], email: [a@example.org]}\nn: yes\nt: true\n")
    assert read_task_file(str(bad)) == {"name": "x", "notify": {
        "on": ["task_end"], "email": ["a@example.org"]}, "n": "yes", "t": True}
    bad.write_text("name: x\ntransformation: /bin/true\nn_jobs: 2\nwalltime_s: 10\n")
    res = panda("submit", str(bad), token=srv.alice, server=srv)
    assert res.returncode == 1 and "go under 'resources'" in person_sees(res)


def test_missing_token_says_an_identity_is_required(srv, tmp_path):
    t = tmp_path / "t.json"
    t.write_text(json.dumps(task("anon", 1)))
    res = panda("submit", str(t), server=srv)
    assert res.returncode == 1
    assert "an identity is required to call task/submit" in person_sees(res)
    assert "panda token issue" in res.stderr


def test_token_usage_and_file(srv, tmp_path):
    res = panda("token", "--role", "user", "--subject", "x", "--key-dir", str(srv.key_dir))
    assert res.returncode == 2 and "panda token issue --role" in person_sees(res)
    for command, actions in ((["db"], "upgrade|current|archive"), (["sites"], "check|show|sync"),
                             (["data"], "panda data add DATASET")):
        res = panda(*command)
        assert res.returncode == 2 and actions in person_sees(res), res.stderr
    out = tmp_path / "pilot.token"
    out.write_text("old")
    out.chmod(0o644)
    res = panda("token", "issue", "--role", "pilot", "--subject", "p9", "-o", str(out),
                "--key-dir", str(srv.key_dir))
    assert res.returncode == 0 and res.stdout == "", person_sees(res)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    raw = out.read_bytes()
    assert not raw.endswith(b"\n") and b"\n" not in raw
    # what pilot 3 does: the file's content, verbatim, in the header
    reply = requests.post(f"{srv.url}/server/panda/getJob", data={"siteName": SHORT},
                          headers={"Authorization": "Bearer " + raw.decode(),
                                   "Accept": "application/json"}, timeout=10).json()
    assert reply["StatusCode"] in (0, 20), reply
    piped = panda("token", "issue", "--role", "user", "--subject", "q", "--key-dir",
                  str(srv.key_dir))
    assert piped.returncode == 0 and not piped.stdout.endswith("\n") and piped.stdout
    res = panda("token", "issue", "--role", "user", "--subject", "q", "-o",
                str(tmp_path / "no" / "dir" / "t"), "--key-dir", str(srv.key_dir))
    assert res.returncode == 2 and "cannot write the token" in person_sees(res)


def test_alembic_is_quiet_unless_debug(srv, tmp_path):
    db = f"sqlite:///{tmp_path / 'q.db'}"     # (the test's own folder may say alembic)
    up = panda("db", "upgrade", "--db", db, isolated=True)
    assert up.returncode == 0 and "alembic.runtime" not in person_sees(up)
    cur = panda("db", "current", "--db", db)
    assert cur.returncode == 0 and "(head)" in person_sees(cur)
    debug = panda("db", "current", "--db", db, "--log-level", "debug", isolated=True)
    assert "alembic.runtime" in debug.stderr
    assert "alembic.runtime" not in srv.log()


def test_missing_database_driver_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None; sys.modules['psycopg2'] = None\n"
            "from panda_wms.cli import main; sys.exit(main(sys.argv[1:]))")
    for args in (["server", "--db", "postgresql+psycopg://panda@127.0.0.1/panda", "--port", "0",
                  "--key-dir", str(tmp_path / "k")],
                 ["db", "current", "--db", "postgresql://panda@127.0.0.1/panda"]):
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2, person_sees(res)
        assert "pip install 'panda-wms[postgres]'" in person_sees(res)
    # and without the driver the server still runs on SQLite (the README's install)
    from testkit import free_port, wait_http
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", code, "server", "--db",
                               f"sqlite:///{tmp_path / 'p.db'}", "--port", str(port),
                               "--key-dir", str(tmp_path / "k")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v1/system/is_alive", proc=server)
    finally:
        server.terminate()
        server.wait(15)


# ---------------------------------------------------------------------- finding 1
def test_no_job_says_why_and_the_default_walltime_fits(srv):
    from panda_core.siteconfig import DEFAULT_JOB_WALLTIME_S, PILOT_RESERVE_S, PilotLimits
    assert DEFAULT_JOB_WALLTIME_S <= PilotLimits().walltime_s - PILOT_RESERVE_S - 300
    t = submit(srv, task("fits", 2, site=NOFIT), srv.alice)
    # a pilot of the short site: 600 s minus the reserve; the jobs' default needs more
    reply = pilot_call(srv, "getJob", siteName=NOFIT, remainingWalltime=540)
    assert reply["StatusCode"] == 20
    assert reply["errorDialog"].startswith(f"2 activated jobs at {NOFIT}, none fits this pilot")
    assert f"walltime {DEFAULT_JOB_WALLTIME_S} s > remaining 540 s" in reply["errorDialog"]
    from panda_core.client import PilotClient
    pilot = PilotClient(srv.url, srv.pilot)               # what our pilot logs it from
    assert pilot.get_job({"siteName": NOFIT, "remainingWalltime": 540}) is None
    assert "walltime" in pilot.no_job_reason and "none fits this pilot" in pilot.no_job_reason
    count = requests.get(f"{srv.url}/api/v1/pilot/activated_count",
                         params={"site": NOFIT, "walltime_s": 540}, timeout=10).json()["data"]
    assert count["activated"] == 2 and count["fitting"] == 0 and "walltime" in count["reason"]

    # the factory: no pilots for jobs they cannot take, and says why once
    from schedulers.factory import Factory
    from site_configs import load_dir
    configs = {s.name: s for s in load_dir(srv.sites)[0]}
    factory = Factory(srv.url, [configs[NOFIT]], token=srv.pilot, pilot_token=srv.pilot,
                      state_dir=srv.key_dir.parent / "factory", server_key_fingerprint=
                      srv.key_fingerprint())
    assert factory.pilot_fit(configs[NOFIT])["walltime_s"] == 600 - PILOT_RESERVE_S
    for _ in range(2):
        cycle = factory.run_once().sites[NOFIT]
        assert cycle.submitted == 0 and cycle.activated == 0
        assert cycle.skipped.startswith("no activated job fits the pilots: 2 activated jobs")
    # a default pilot (3600 s) takes a default job
    reply = pilot_call(srv, "getJob", siteName=NOFIT, remainingWalltime=3600 - PILOT_RESERVE_S)
    assert reply["StatusCode"] == 0 and reply["maxWalltime"] == DEFAULT_JOB_WALLTIME_S
    requests.post(f"{srv.url}/api/v1/task/kill", json={"task_id": t},
                  headers={"Authorization": f"Bearer {srv.alice}"}, timeout=10)


def test_a_task_without_walltime_runs_with_the_default_pilots(srv, tmp_path):
    """Finding 1 as it was met: n_jobs, no walltime, the factory's default pilots."""
    from schedulers.factory import Factory
    from site_configs import load_dir
    t = submit(srv, task("defaults", 2, site=E2E), srv.alice)
    site = {s.name: s for s in load_dir(srv.sites)[0]}[E2E]
    factory = Factory(srv.url, [site], token=srv.pilot, pilot_token=srv.pilot,
                      state_dir=tmp_path / "factory", server_key_fingerprint=srv.key_fingerprint())
    try:
        def done():
            factory.run_once()
            state = json.loads(panda("status", str(t), "--json", server=srv).stdout)["status"]
            return state if state in ("done", "finished", "failed") else None
        assert wait_for(done, "the task's jobs to run", timeout=120) == "done"
    finally:
        factory.cancel_all()
        factory.shutdown()
    jobs = json.loads(panda("jobs", "--json", "--task", str(t), server=srv).stdout)
    assert [j["state"] for j in jobs] == ["finished", "finished"]


def test_factory_without_its_own_token_says_so(srv, tmp_path):
    pilot_token = tmp_path / "pilot.token"
    pilot_token.write_text(srv.pilot)
    res = panda("factory", "--server", srv.url, "--site-configs", str(srv.sites),
                "--pilot-token-file", str(pilot_token), "--server-public-key",
                str(srv.public_key_file()), "--state-dir", str(tmp_path / "f"), "--once",
                isolated=True)
    assert res.returncode == 2, person_sees(res)
    assert "an identity is required" in person_sees(res) and "--token-file" in res.stderr


# ---------------------------------------------------------------------- panda demo --serve
def test_demo_serve_keeps_the_monitor_up_until_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "panda_wms.cli", "demo", "--jobs", "2",
                             "--serve", "--workdir", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    try:
        while not (lines and lines[-1].startswith("serving")):
            line = proc.stdout.readline()
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line)
        url = lines[-1].split()[1]
        assert requests.get(url, timeout=10).status_code == 200      # after the task: still up
        assert "all 2 jobs finished" in "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    mark = f"PANDA_DEMO_ID={proc.pid}-".encode()
    wait_for(lambda: not any(mark in _environ(p) for p in Path("/proc").iterdir()
                             if p.name.isdigit()), "no demo process left", timeout=15)


def _environ(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "environ").read_bytes()
    except OSError:
        return b""
