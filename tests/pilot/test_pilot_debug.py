"""Debug mode (issue 16 item 4): the built-in views, the pilot sending them while the server's
``debug`` command is on, and the real server storing and showing the latest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from panda_core.client import ApiClient, ClientError
from panda_core.debugview import (MAX_TEXT_BYTES, MAX_VIEW_BYTES, BadDebugRequest, DebugRequest,
                                  clean_view, parse_request, render)
from pilot.debug.views import du, ls, open_in_workdir, tail, view
from pilotkit import TOKEN, fake, make_job, pilot_cmd, pilot_env, se  # noqa: F401
from testkit import EXAMPLE_SITES, start_server, stop_server, wait_for


# ---------------------------------------------------------------------- the request contract
@pytest.mark.parametrize("text,expected", [
    (None, DebugRequest("tail")), ("", DebugRequest("tail")), ("debug", DebugRequest("tail")),
    ("tail", DebugRequest("tail")), ("tail out/log.txt", DebugRequest("tail", "out/log.txt")),
    (" ls ", DebugRequest("ls")), ("ps", DebugRequest("ps")), ("du", DebugRequest("du"))])
def test_requests_that_are_views(text, expected):
    assert parse_request(text) == expected
    assert parse_request(expected.to_wire()) == expected


@pytest.mark.parametrize("text", [
    "rm -rf /", "sh -c id", "tail ../pilot_state.json", "tail /etc/passwd", "tail a/../../b",
    "tail a//b", "tail ./x", "ls /", "ps aux", "du -sh /", "tail x\ny", "tail \0", 7, ["ls"],
    "tail " + "a" * 300, "cat payload.stdout"])
def test_anything_else_is_refused(text):
    with pytest.raises(BadDebugRequest):
        parse_request(text)


def test_the_server_stores_views_bounded_and_only_known_keys():
    big = json.dumps({"view": "tail", "name": "payload.stdout", "time": 1.5,
                      "text": "x" * (3 * MAX_TEXT_BYTES), "cmd": "rm -rf /"})
    stored = json.loads(clean_view(big))
    assert set(stored) == {"view", "name", "time", "truncated", "text"}
    assert stored["truncated"] and len(stored["text"].encode()) <= MAX_TEXT_BYTES
    assert len(clean_view(big)) <= MAX_VIEW_BYTES
    for bad in ("not json", "[1, 2]", "x" * (5 * MAX_VIEW_BYTES)):
        assert "dropped" in json.loads(clean_view(bad))["error"]
    assert clean_view("") is None
    assert json.loads(clean_view({"view": "ps", "text": "x"}))["text"] == "x"   # a JSON body
    # a payload's terminal escapes never reach the reader's terminal
    shown = render(clean_view(json.dumps({"view": "tail", "text": "a\x1b[2J\x1b]0;pwn\x07b\n"})))
    assert "\x1b" not in shown and "\x07" not in shown and "a?[2J" in shown
    assert render(clean_view(json.dumps({"view": "ls", "text": "a\nb"}))) .startswith("ls")


# ---------------------------------------------------------------------- the views
@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "work"
    (wd / "sub").mkdir(parents=True)
    (wd / "payload.stdout").write_text("".join(f"line {i}\n" for i in range(20000)))
    (wd / "sub" / "f.txt").write_text("inner\n")
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    (wd / "link").symlink_to(secret)
    (wd / "dirlink").symlink_to(tmp_path)
    os.mkfifo(wd / "fifo")
    return wd


def test_tail_is_bounded_and_starts_on_a_whole_line(workdir):
    text, cut = tail(workdir, "payload.stdout")
    assert cut and len(text.encode()) <= MAX_TEXT_BYTES
    assert text.startswith("line ") and text.endswith("line 19999\n")
    assert tail(workdir, "sub/f.txt") == ("inner\n", False)


@pytest.mark.parametrize("name", ["link", "dirlink/token", "fifo", "sub", "missing"])
def test_tail_never_follows_links_nor_blocks(workdir, name):
    with pytest.raises(BadDebugRequest):
        open_in_workdir(workdir, name)
    out = view(DebugRequest("tail", name), workdir)
    assert "error" in out and TOKEN not in json.dumps(out)


def test_ls_and_du_show_links_without_following_them(workdir):
    text, cut = ls(workdir)
    assert not cut and "l " in text and "link -> " in text and "sub/f.txt" in text
    assert TOKEN not in text
    text, _ = du(workdir)
    assert text.splitlines()[-1].split()[1] == "total" and "payload.stdout" in text


# ---------------------------------------------------------------------- the pilot (fake server)
def test_pilot_sends_the_view_while_debug_is_on(fake, tmp_path):
    release = tmp_path / "release"
    script = ("i=0; while [ $i -lt 5 ]; do echo step-$i; i=$((i+1)); done; "
              f"n=0; while [ ! -e {release} ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done")
    fake.add_job(make_job(501, script, log=False))
    fake.commands["501"] = "debug"
    fake.debug_views["501"] = "tail"
    proc = subprocess.Popen(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1", "--heartbeat",
                                      "600", "--debug-interval", "0.2", "--no-recovery"),
                            env=pilot_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def views():
            return [json.loads(u["debugView"]) for u in fake.updates(501) if u.get("debugView")]
        fake.wait_for(lambda: any("step-4" in v.get("text", "") for v in views()))
        # the view changes with the request; a hostile one is refused and nothing is sent
        fake.debug_views["501"] = "ls"
        fake.wait_for(lambda: views()[-1]["view"] == "ls")
        assert "payload.stdout" in views()[-1]["text"]
        fake.debug_views["501"] = "ps"
        fake.wait_for(lambda: views()[-1]["view"] == "ps")
        assert "sleep" in views()[-1]["text"] or "sh" in views()[-1]["text"]
        fake.debug_views["501"] = "tail ../pilot_state.json"
        fake.wait_for(lambda: "refused" in views()[-1].get("error", ""))
        assert "'..'" in views()[-1]["error"] and "text" not in views()[-1]
        # and debug mode off: heartbeats go back to their interval, no more views
        fake.commands["501"] = "NULL"
        n = len(views())
        release.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert fake.final(501)["state"] == "finished"
    assert len(views()) <= n + 1
    assert "debug request refused" in err and "../pilot_state.json" in err


# ---------------------------------------------------------------------- the real server
@pytest.fixture
def real(tmp_path, monkeypatch):
    se = tmp_path / "se"
    se.mkdir()
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    sites = tmp_path / "sites"
    sites.mkdir()
    text = (EXAMPLE_SITES / "LOCAL_DEMO.yaml").read_text().replace("heartbeat_s: 60",
                                                                    "heartbeat_s: 1")
    (sites / "LOCAL_DEMO.yaml").write_text(text)
    server = start_server(tmp_path / "srv", site_dir=sites)
    yield server
    stop_server(server)


def panda(server, token, *args) -> subprocess.CompletedProcess:
    """``panda debug ARGS`` in this process (its own process costs a second on a busy node):
    exit code, stdout and stderr as a subprocess's."""
    import contextlib
    import io

    from panda_wms.client_cli import debug_main

    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.get("PANDA_AUTH_TOKEN")
    os.environ["PANDA_AUTH_TOKEN"] = token
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = debug_main([*args, "--server", server.url])
            except SystemExit as exc:            # argparse's usage errors
                rc = exc.code
    finally:
        if saved is None:
            os.environ.pop("PANDA_AUTH_TOKEN", None)
        else:
            os.environ["PANDA_AUTH_TOKEN"] = saved
    return subprocess.CompletedProcess(["panda", "debug", *args], rc, out.getvalue(),
                                       err.getvalue())


def test_debug_mode_through_the_real_server(real, tmp_path):
    alice_token = real.token("user", "alice")
    alice = ApiClient(real.url, alice_token)
    release = tmp_path / "release"
    script = ("-c 'for i in 1 2 3; do echo debug-line-$i; done; echo partial > part.txt; "
              f"n=0; while [ ! -e {release} ] && [ $n -lt 900 ]; do sleep 0.05; n=$((n+1)); "
              "done'")
    task_id = alice.submit_task({"name": "dbg", "scope": "p", "transformation": "/bin/sh",
                                 "job_parameters": script, "n_jobs": 1,
                                 "output_dataset": "p.dbg.out", "site": "LOCAL_DEMO",
                                 "max_attempts": 1,
                                 "resources": {"memory_mb": 500, "walltime_s": 300}})
    [job] = alice.jobs(task_id)
    job_id = job.get("PandaID") or job["panda_id"]
    # who may: the owner and an admin; not another user, not without a token; bad views: 400
    bob = ApiClient(real.url, real.token("user", "bob"))
    with pytest.raises(ClientError, match="belongs to alice"):
        bob.set_debug_mode(job_id, "tail")
    with pytest.raises(ClientError):
        ApiClient(real.url, None).set_debug_mode(job_id, "tail")
    bad = requests.post(f"{real.url}/api/v1/job/set_debug_mode", timeout=30,
                        headers={"Authorization": f"Bearer {alice_token}"},
                        json={"job_id": job_id, "mode": True, "view": "sh -c id"})
    assert bad.status_code == 400 and "unknown debug view" in bad.json()["message"]
    from panda_wms.cli import SUBCOMMANDS
    assert SUBCOMMANDS["debug"][0] == "panda_wms.client_cli:debug_main"   # what `panda` runs
    res = panda(real, alice_token, "on", str(job_id), "tail", "../../etc/passwd")
    assert res.returncode == 2 and "'..'" in res.stderr
    res = panda(real, alice_token, "on", str(job_id))
    assert res.returncode == 0 and "debug mode on (tail)" in res.stdout, res.stderr

    cmd = [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", real.url, "--site",
           "LOCAL_DEMO", "--workdir", str(tmp_path / "wd"), "--monitor-interval", "0.2",
           "--debug-interval", "0.2", "--max-jobs", "1", "--no-recovery",
           "--public-key", str(real.public_key_file())]
    proc = subprocess.Popen(cmd, env=pilot_env({"PANDA_AUTH_TOKEN": real.token(
        "pilot", "pilot1", site="LOCAL_DEMO")}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "debug-line-3" in ((alice.debug_view(job_id)["view"] or {})
                                           .get("text", "")), "the stdout tail", 60)
        shown = panda(real, alice_token, "show", str(job_id))
        assert shown.returncode == 0 and "debug mode on (tail)" in shown.stdout
        assert "tail payload.stdout" in shown.stdout and "debug-line-3" in shown.stdout
        # an admin switches the view to a work-dir file; the monitor's job page shows it
        admin = ApiClient(real.url, real.token("admin", "ops"))
        admin.set_debug_mode(job_id, "tail part.txt")
        wait_for(lambda: (alice.debug_view(job_id)["view"] or {}).get("name") == "part.txt",
                 "the file's tail", 60)
        page = requests.get(f"{real.url}/monitor/jobs/{job_id}", timeout=30).text
        assert "debug mode on (tail part.txt)" in page and "partial" in page
        release.touch()            # left on: the job's end is what ends it
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    final = alice.debug_view(job_id)
    assert final["status"] == "finished" and final["debug"] is None
    assert final["view"]["name"] == "part.txt"          # the latest view stays for the record
    res = panda(real, alice_token, "off", str(job_id))   # clearing an ended job's is fine
    assert res.returncode == 0 and "debug mode off" in res.stdout
    res = panda(real, alice_token, "on", str(job_id))    # an ended job has nothing to debug
    assert res.returncode == 1 and "has ended" in res.stderr
