"""Issue 13, server side: data has owners, a job has one pilot, identity, bounded inputs.

Each finding of the issue reproduced against a running ``panda server`` (one per module, on
SQLite: the rules live above the database) and the site config tools as a sysadmin runs them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests

from panda_core.replicas import MAX_NAME_LENGTH, BadFileName, check_name
from testkit import EXAMPLE_SITES, start_server, stop_server

SITE = "LOCAL_DEMO"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust-data")
    se = tmp / "se"
    sites = tmp / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    srv = start_server(tmp / "srv", site_dir=sites, env={"PANDA_SE_ROOT": str(se)})
    srv.se = se
    srv.tokens = {}
    yield srv
    stop_server(srv)


def token(server, subject: str, role: str = "user", site: str | None = None) -> str:
    key = (subject, role, site)
    if key not in server.tokens:
        server.tokens[key] = server.token(role, subject, site)
    return server.tokens[key]


def api(server, who: str | None, method: str, path: str, role: str = "user", **body):
    headers = {"Authorization": f"Bearer {token(server, who, role)}"} if who else {}
    resp = requests.request(method, f"{server.url}/api/v1/{path}", headers=headers, timeout=30,
                            **({"json": body} if method == "POST" else {"params": body}))
    assert resp.status_code < 500, resp.text
    return resp.status_code, resp.json()


# ---------------------------------------------------------------------- item 8: names
@pytest.mark.parametrize("name", ["base.000001.out\n", "", "a" * (MAX_NAME_LENGTH + 1),
                                  "x\n/../../etc"])
def test_name_check_refuses_newline_empty_and_too_long(name):
    with pytest.raises(BadFileName):
        check_name(name)


def test_longest_name_leaves_room_for_every_temporary_name():
    """Every temporary name a component makes from a replica's name fits the 255 bytes of a
    file system's name (the copytools' partial name, the data service's copy)."""
    from copytools.base import partial_path
    name = "a" * MAX_NAME_LENGTH
    assert check_name(name) == name
    temporaries = [os.path.basename(partial_path(f"/se/{name}")),
                   f".{name}.part-{'0' * 8}"]                 # server/dataservice.py LocalMover
    assert max(len(t.encode()) for t in temporaries) <= 255


def test_hostile_names_and_scopes_refused_by_the_server(server):
    for body in ({"scope": "alice", "dataset": "ds\n"}, {"scope": "", "dataset": "ds"},
                 {"scope": "alice", "dataset": "d" * 240}):
        status, reply = api(server, "alice", "POST", "data/add_files",
                            files=[{"lfn": "f", "fsize": 1}], **body)
        assert reply["success"] is False and "refusing" in reply["message"], reply
    status, reply = api(server, "alice", "POST", "data/add_files", scope="user.alice",
                        dataset="user.alice.ds", files=[{"lfn": "f.root\n", "fsize": 1}])
    assert reply["success"] is False and "refusing lfn" in reply["message"]
    # an empty scope in a task description: not silently "no scope"
    status, reply = api(server, "alice", "POST", "task/submit", task_parameters={
        "name": "t", "transformation": "/bin/true", "n_jobs": 1, "scope": "", "site": SITE})
    assert reply["success"] is False and "field 'scope'" in reply["message"], reply


# ---------------------------------------------------------------------- item 8: bounds
def test_n_jobs_and_one_calls_work_are_bounded(server):
    start = time.monotonic()
    status, reply = api(server, "alice", "POST", "task/submit", task_parameters={
        "name": "big", "transformation": "/bin/true", "n_jobs": 20000, "site": SITE})
    assert status == 400 and reply["success"] is False
    assert "at most 5000" in reply["message"], reply
    assert time.monotonic() - start < 5
    status, reply = api(server, "alice", "GET", "task/list", owner="alice")
    assert not [t for t in reply["data"] if t["taskName"] == "big"]     # nothing was created
    status, reply = api(server, "alice", "POST", "data/add_files", scope="user.alice",
                        dataset="user.alice.many",
                        files=[{"lfn": f"f{i}", "fsize": 1} for i in range(10001)])
    assert status == 400 and "at most 10000 per call" in reply["message"], reply


# ---------------------------------------------------------------------- item 7: factories
def test_a_factorys_report_is_bound_to_its_token(server):
    pilots = [{"batch_id": "b1", "site": SITE, "state": "running"}]
    status, reply = api(server, "factory-a", "POST", "pilot/report", role="pilot",
                        factory="fac-a", pilots=pilots,
                        sites={SITE: {"submitting": True}})
    assert reply["success"], reply
    # a user naming the factory may not overwrite what it reported
    status, reply = api(server, "mallory", "POST", "pilot/report", factory="fac-a",
                        pilots=[{"batch_id": "b1", "site": SITE, "state": "failed"}],
                        sites={SITE: {"submitting": False, "reason": "fake"}})
    assert status == 403 and reply["success"] is False
    assert "fac-a" in reply["message"] and "factory-a" in reply["message"], reply
    status, summary = api(server, None, "GET", "pilot/summary")
    fac = [f for f in summary["data"]["factories"] if f["name"] == "fac-a"][0]
    assert fac["actor"] == "factory-a" and fac["site_status"][SITE]["submitting"] is True
    assert summary["data"]["sites"][SITE] == {"running": 1}
    # the factory itself reports on; an admin may report for any factory
    assert api(server, "factory-a", "POST", "pilot/report", role="pilot", factory="fac-a",
               pilots=[{"batch_id": "b1", "site": SITE, "state": "done"}])[1]["success"]
    assert api(server, "ops", "POST", "pilot/report", role="admin", factory="fac-a",
               pilots=[])[1]["success"]


# ---------------------------------------------------------------------- item 8: site configs
def panda(*args, cwd=None, timeout=20):
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def _site_yaml(name: str, extra: str = "") -> str:
    text = (EXAMPLE_SITES / f"{SITE}.yaml").read_text().replace(f"name: {SITE}", f"name: {name}")
    return text + extra


ALIAS_BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
              + "".join(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n"
                        for p, n in zip("abcdefgh", "bcdefghi")))


def test_alias_bomb_duplicate_key_and_symlink_refused_by_sites_check(tmp_path):
    assert len(ALIAS_BOMB) < 450
    folder = tmp_path / "sites"
    folder.mkdir()
    (folder / "bomb.yaml").write_text(_site_yaml("BOMB", ALIAS_BOMB))
    (folder / "dup.yaml").write_text(_site_yaml("DUP", "region: again\n"))
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SECRETHASH:19000:0:99999:7:::\n")
    (folder / "shadow.yaml").symlink_to(secret)
    (folder / ".inside.yaml").write_text(_site_yaml("INSIDE"))          # hidden: not read
    (folder / "alias.yaml").symlink_to(folder / ".inside.yaml")   # within the folder: read
    start = time.monotonic()
    r = panda("sites", "check", str(folder))
    assert time.monotonic() - start < 15
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "bomb.yaml" in out and "aliases are expanded" in out, out
    assert "dup.yaml" in out and "duplicate key 'region'" in out, out
    assert "shadow.yaml" in out and "symlink that leads out of its folder" in out, out
    assert "SECRETHASH" not in out and "root:" not in out
    assert any(line.startswith("OK") and "alias.yaml" in line for line in out.splitlines())


def test_server_start_survives_an_alias_bomb(tmp_path):
    folder = tmp_path / "sites"
    folder.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", folder)
    (folder / "bomb.yaml").write_text(_site_yaml("BOMB", ALIAS_BOMB))
    start = time.monotonic()
    srv = start_server(tmp_path / "srv", site_dir=folder,
                       env={"PANDA_SE_ROOT": str(tmp_path / "se")})
    try:
        assert time.monotonic() - start < 15
        sites = requests.get(f"{srv.url}/api/v1/site/list", timeout=10).json()["data"]
        assert [s["name"] for s in sites] == [SITE]
        assert "aliases are expanded" in srv.log()
    finally:
        stop_server(srv)


def test_strict_yaml_keeps_anchors_and_merge_keys():
    from site_configs.yamlsafe import YamlRefused, load
    text = "base: &b {x: 1, y: 2}\none: {<<: *b, y: 3}\nlist: [*b, *b]\n"
    assert load(text) == {"base": {"x": 1, "y": 2}, "one": {"x": 1, "y": 3},
                          "list": [{"x": 1, "y": 2}, {"x": 1, "y": 2}]}
    with pytest.raises(YamlRefused, match="recursive"):
        load("a: &a [*a]\n")
    with pytest.raises(YamlRefused, match="duplicate key 'k'"):
        load("m: {k: 1, k: 2}\n")


# ---------------------------------------------------------------------- item 4: one pilot
def pilot(server, who: str, method: str, **form) -> dict:
    resp = requests.post(f"{server.url}/server/panda/{method}", data=form, timeout=30,
                         headers={"Accept": "application/json",
                                  "Authorization": f"Bearer {token(server, who, 'pilot', SITE)}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def submit(server, name: str, n_jobs: int = 1) -> int:
    status, reply = api(server, "alice", "POST", "task/submit", task_parameters={
        "name": name, "transformation": "/bin/true", "n_jobs": n_jobs, "site": SITE,
        "scope": "user.alice", "output_dataset": f"user.alice.{name}",
        "outputs": [f"{name}.${{SN}}.out"]})
    assert reply["success"], reply
    return reply["data"]


def kill_task(server, task_id: int) -> None:
    """Kill what is left of a task, so the next test's getJob gets its own jobs."""
    assert api(server, "alice", "POST", "task/kill", task_id=task_id)[1]["success"]


def stored_xml(server, job: dict, **override) -> str:
    """What a pilot that stored the job's outputs where the server puts them reports."""
    from panda_core.replicas import replica_url
    lfns = job["outFiles"].split(",")
    scopes = job["scopeOut"].split(",") + [job["scopeLog"]]
    out = {}
    for lfn, scope in zip(lfns, scopes):
        out[lfn] = {"guid": "0b0e5a1e-0000-4000-8000-000000000001", "fsize": 3,
                    "adler32": "024d0127",
                    "surl": replica_url(f"file://{server.se}", scope, lfn), **override}
    return json.dumps(out)


def job_row(server, panda_id: int) -> dict:
    status, reply = api(server, None, "GET", "job/get_description", job_ids=[panda_id])
    return reply["data"][0]


def test_another_pilot_of_the_site_cannot_update_or_finish_a_job(server):
    task_id = submit(server, "held", 2)
    a = dict(siteName=SITE, node="wn-a", pilotID="wn-a:101", pilotNonce="secret-nonce-of-a")
    job = pilot(server, "site-pilots", "getJob", **a)
    assert job["StatusCode"] == 0, job
    pid = job["PandaID"]
    row = job_row(server, pid)
    assert (row["pilot_owner"], row["pilot_id"], row["node"]) == ("site-pilots", "wn-a:101",
                                                                  "wn-a")
    assert row["pilot_nonce"] != "secret-nonce-of-a"          # only its digest is kept
    # the same site token, another pilot: no nonce, a guessed pilotID and node, a wrong nonce
    for claim in ({"node": "wn-b", "pilotID": "wn-b:7"}, {"node": "wn-a", "pilotID": "wn-a:101"},
                  {**a, "pilotNonce": "guessed"}):
        for state, extra in (("running", {}), ("finished", {"xml": stored_xml(server, job)}),
                             ("failed", {"pilotErrorCode": 1099})):
            reply = pilot(server, "site-pilots", "updateJob", jobId=pid, state=state,
                          attemptNr=1, **{**claim, "siteName": SITE}, **extra)
            assert reply["StatusCode"] == 70, reply
            assert "held by" in reply["errorDialog"]
    # another token with the right nonce (it leaked): still not the holder
    reply = pilot(server, "other-token", "updateJob", jobId=pid, state="running", attemptNr=1,
                  **a)
    assert reply["StatusCode"] == 70 and "held by site-pilots" in reply["errorDialog"], reply
    assert job_row(server, pid)["jobStatus"] == "sent"
    # the holder itself
    assert pilot(server, "site-pilots", "updateJob", jobId=pid, state="running", attemptNr=1,
                 **a) == {"StatusCode": 0, "command": "NULL"}
    assert pilot(server, "site-pilots", "updateJob", jobId=pid, state="finished", attemptNr=1,
                 xml=stored_xml(server, job), **a)["StatusCode"] == 0
    row = job_row(server, pid)
    assert row["jobStatus"] == "finished", row
    # a pilot without a nonce (pilot 3): the token subject and the node bind it
    p3 = dict(siteName=SITE, node="wn-3")
    job = pilot(server, "site-pilots", "getJob", **p3)
    pid = job["PandaID"]
    assert pilot(server, "site-pilots", "updateJob", jobId=pid, state="running", attemptNr=1,
                 siteName=SITE, node="wn-x")["StatusCode"] == 70
    assert pilot(server, "other-token", "updateJob", jobId=pid, state="running", attemptNr=1,
                 **p3)["StatusCode"] == 70
    assert pilot(server, "site-pilots", "updateJob", jobId=pid, state="running", attemptNr=1,
                 pilotID="1234|PBS|PR|3.9", **p3)["StatusCode"] == 0
    kill_task(server, task_id)


@pytest.mark.parametrize("bad, reason", [
    ({"fsize": -5}, "fsize of"), ({"fsize": 1e30}, "fsize of"), ({"fsize": "Infinity"}, "fsize"),
    ({"fsize": 2**64}, "fsize of"), ({"fsize": True}, "fsize of"),
    ({"adler32": "not-hex!"}, "adler32 of"), ({"adler32": "123456789"}, "adler32 of"),
    ({"md5sum": "abc"}, "md5sum of"), ({"guid": "x" * 100}, "guid of"),
    ({"surl": "../../../etc/passwd"}, "surl of"), ({"surl": "file:///se\u0000x"}, "surl of"),
    ({"surl": {"a": 1}}, "surl of"),
])
def test_final_xml_values_are_checked(server, bad, reason):
    task_id = submit(server, "xmlcheck")
    a = dict(siteName=SITE, node="wn-x", pilotID="wn-x:1", pilotNonce="n-xml")
    job = pilot(server, "site-pilots", "getJob", **a)
    pid = job["PandaID"]
    xml = json.loads(stored_xml(server, job))
    first = next(iter(xml))
    xml[first].update(bad)
    reply = pilot(server, "site-pilots", "updateJob", jobId=pid, state="finished", attemptNr=1,
                  xml=json.dumps(xml), **a)
    assert reply["StatusCode"] == 30 and reason in reply["errorDialog"], reply
    assert job_row(server, pid)["jobStatus"] == "sent"          # nothing changed
    # a name that would be a path
    reply = pilot(server, "site-pilots", "updateJob", jobId=pid, state="finished", attemptNr=1,
                  xml=json.dumps({"../../etc/passwd": {"fsize": 1}}), **a)
    assert reply["StatusCode"] == 30 and "refusing lfn" in reply["errorDialog"], reply
    kill_task(server, task_id)


def test_outputs_count_only_at_the_servers_path(server):
    task_id = submit(server, "elsewhere", 2)
    a = dict(siteName=SITE, node="wn-s", pilotID="wn-s:1", pilotNonce="n-surl")
    job = pilot(server, "site-pilots", "getJob", **a)
    pid = job["PandaID"]
    xml = json.loads(stored_xml(server, job))
    out = next(lfn for lfn in xml if lfn.endswith(".out"))
    xml[out]["surl"] = "file:///etc/passwd"
    reply = pilot(server, "site-pilots", "updateJob", jobId=pid, state="finished", attemptNr=1,
                  xml=json.dumps(xml), **a)
    assert reply["StatusCode"] == 0
    row = job_row(server, pid)
    assert row["jobStatus"] == "failed" and row["pilot_error_code"] == 1165
    assert "reported at file:///etc/passwd, not at file://" in row["pilot_error_diag"], row
    status, reply = api(server, None, "GET", "data/list_files", dataset="user.alice.elsewhere")
    assert out not in [f["lfn"] for f in reply["data"]]       # not registered
    # the same file at its own path, as pilot 3 writes it (file://localhost, doubled slash)
    job = pilot(server, "site-pilots", "getJob", **a)
    xml = json.loads(stored_xml(server, job))
    for info in xml.values():
        info["surl"] = info["surl"].replace("file://", "file://localhost", 1).replace(
            "/user/", "//user/", 1)
    assert pilot(server, "site-pilots", "updateJob", jobId=job["PandaID"], state="finished",
                 attemptNr=1, xml=json.dumps(xml), **a)["StatusCode"] == 0
    assert job_row(server, job["PandaID"])["jobStatus"] == "finished"
    kill_task(server, task_id)
