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
    assert status == 400 and "at most 10000" in reply["message"], reply


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


# ---------------------------------------------------------------------- item 2: data owners
def add_files(server, who, dataset, scope, files, endpoint="LOCAL_SE", role="user"):
    return api(server, who, "POST", "data/add_files", role=role, dataset=dataset, scope=scope,
               files=files, ddm_endpoint=endpoint)


def test_users_write_only_scopes_and_datasets_they_own(server):
    from testkit import put_input
    alice_file = put_input(server.se, "alice", "base.000001.out", b"alice's bytes\n")
    status, reply = add_files(server, "alice", "alice.private", "alice", [alice_file])
    assert reply["success"], reply                       # alice claims scope 'alice'
    # bob: not in alice's scope, not in alice's dataset, not in another's user scope
    evil = {"lfn": "evil.txt", "fsize": 1, "surl": "file:///etc/shadow"}
    for dataset, scope in (("alice.private", "alice"), ("bob.own", "alice"),
                           ("alice.private", "user.bob"), ("bob.x", "user.alice")):
        status, reply = add_files(server, "bob", dataset, scope, [evil])
        assert status == 403 and reply["success"] is False, (dataset, scope, reply)
        assert "permission denied" in reply["message"]
    status, reply = api(server, None, "GET", "data/list_files", dataset="alice.private")
    assert [f["lfn"] for f in reply["data"]] == ["base.000001.out"]
    # bob's task may not write alice's scope or her dataset
    for params in ({"scope": "alice"}, {"scope": "user.bob", "output_dataset": "alice.private"}):
        status, reply = api(server, "bob", "POST", "task/submit", task_parameters={
            "name": "steal", "transformation": "/bin/true", "n_jobs": 1, "site": SITE,
            "outputs": ["base.${SN}.out"], "output_dataset": "bob.out", **params})
        assert status == 403 and "permission denied" in reply["message"], reply
    # his own user scope works, and a surl that is not the file's path is refused
    status, reply = add_files(server, "bob", "user.bob.in", "user.bob",
                              [{"lfn": "b.txt", "fsize": 1, "surl": "file:///etc/shadow"}])
    assert status == 409 and "is not its path on LOCAL_SE" in reply["message"], reply
    bob_file = put_input(server.se, "user.bob", "b.txt", b"b")
    assert add_files(server, "bob", "user.bob.in", "user.bob", [bob_file])[1]["data"] == 1


def test_reading_is_open_but_another_users_task_does_not_consume_her_files(server):
    from testkit import put_input
    files = [put_input(server.se, "user.alice", f"in.{i}", f"{i}\n".encode()) for i in range(2)]
    assert add_files(server, "alice", "user.alice.shared", "user.alice", files)[1]["success"]
    status, reply = api(server, "bob", "POST", "task/submit", task_parameters={
        "name": "readit", "transformation": "/bin/true", "input_dataset": "user.alice.shared",
        "site": SITE})
    assert reply["success"], reply
    bobs_task = reply["data"]
    status, reply = api(server, None, "GET", "data/list_files", dataset="user.alice.shared")
    assert [f["task_id"] for f in reply["data"]] == [None, None]     # not marked used
    status, reply = api(server, "alice", "POST", "task/submit", task_parameters={
        "name": "mine", "transformation": "/bin/true", "input_dataset": "user.alice.shared",
        "site": SITE})
    assert reply["success"], reply                     # alice still has all her files
    status, reply = api(server, "bob", "POST", "task/extend", task_id=bobs_task)
    assert reply["success"] is False and "does not consume" in reply["message"]
    assert api(server, "bob", "POST", "task/kill", task_id=bobs_task)[1]["success"]
    status, reply = api(server, "alice", "GET", "task/list", owner="alice")
    for t in reply["data"]:
        if t["taskName"] == "mine":
            kill_task(server, t["jediTaskID"])


def test_an_existing_lfn_keeps_its_bytes(server):
    from testkit import put_input
    f = put_input(server.se, "user.carol", "c.dat", b"first")
    assert add_files(server, "carol", "user.carol.a", "user.carol", [f])[1]["data"] == 1
    assert add_files(server, "carol", "user.carol.a", "user.carol", [f])[1]["data"] == 0  # again
    assert add_files(server, "carol", "user.carol.b", "user.carol", [f])[1]["data"] == 1
    status, reply = add_files(server, "carol", "user.carol.c", "user.carol",
                              [{**f, "fsize": 6, "checksum": "ad:0000ffff"}])
    assert status == 409 and "user.carol:c.dat is registered with 5 bytes" in reply["message"]
    status, reply = api(server, None, "GET", "data/list_files", dataset="user.carol.c")
    assert reply["data"] == []


def test_scopes_registered_by_an_admin(server):
    status, reply = api(server, "ops", "POST", "scope/add", role="admin", scope="mc23",
                        production=True)
    assert reply["success"], reply
    status, reply = add_files(server, "alice", "mc23.evgen", "mc23", [{"lfn": "e", "fsize": 1}])
    assert status == 403 and "production scope" in reply["message"]
    assert add_files(server, "prodsys", "mc23.evgen", "mc23", [{"lfn": "e", "fsize": 1}],
                     role="admin")[1]["success"]
    assert api(server, "ops", "POST", "scope/add", role="admin", scope="group.phys",
               owner="dave")[1]["success"]
    assert add_files(server, "alice", "group.phys.x", "group.phys",
                     [{"lfn": "g", "fsize": 1}])[0] == 403
    assert add_files(server, "dave", "group.phys.x", "group.phys",
                     [{"lfn": "g", "fsize": 1}])[1]["success"]
    assert api(server, "alice", "POST", "scope/add", scope="mine", owner="alice")[0] == 403
    scopes = {s["name"]: s for s in api(server, None, "GET", "scope/list")[1]["data"]}
    assert scopes["mc23"]["production"] and scopes["group.phys"]["owner"] == "dave"
    assert scopes["alice"]["owner"] == "alice"


def test_registered_scope_policy(tmp_path):
    srv = start_server(tmp_path / "srv", extra=["--scope-policy", "registered"])
    srv.tokens = {}
    try:
        status, reply = add_files(srv, "alice", "free.ds", "free", [{"lfn": "f", "fsize": 1}],
                                  endpoint=None)
        assert status == 403 and "is not registered" in reply["message"], reply
        assert add_files(srv, "alice", "user.alice.ds", "user.alice",
                         [{"lfn": "f", "fsize": 1}], endpoint=None)[1]["success"]
        assert api(srv, "ops", "POST", "scope/add", role="admin", scope="free",
                   owner="alice")[1]["success"]
        assert add_files(srv, "alice", "free.ds", "free", [{"lfn": "f", "fsize": 1}],
                         endpoint=None)[1]["success"]
    finally:
        stop_server(srv)


def test_group_scopes_belong_to_the_groups_members(server):
    def group_token(subject, *groups):
        cmd = [sys.executable, "-m", "panda_wms.cli", "token", "issue", "--key-dir",
               str(server.key_dir), "--role", "user", "--subject", subject]
        for g in groups:
            cmd += ["--group", g]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    def add(tok, dataset):
        resp = requests.post(f"{server.url}/api/v1/data/add_files", timeout=30,
                             headers={"Authorization": f"Bearer {tok}"},
                             json={"dataset": dataset, "scope": "group.higgs",
                                   "files": [{"lfn": f"{dataset}.f", "fsize": 1}]})
        return resp.status_code, resp.json()

    assert add(group_token("erin", "atlas/higgs"), "group.higgs.a")[0] == 403   # not 'higgs'
    status, reply = add(group_token("frank"), "group.higgs.b")
    assert status == 403 and "belongs to the group higgs" in reply["message"]
    assert add(group_token("gina", "higgs"), "group.higgs.c")[1]["success"]
    assert add(group_token("hal", "/higgs"), "group.higgs.d")[1]["success"]     # a member too
    scopes = {s["name"]: s for s in api(server, None, "GET", "scope/list")[1]["data"]}
    assert scopes["group.higgs"]["owner"] == "group:higgs"


def test_a_job_output_with_other_bytes_than_the_catalogue_is_not_registered(server):
    assert add_files(server, "alice", "user.alice.clash", "user.alice",
                     [{"lfn": "clash.000001.out", "fsize": 9, "checksum": "ad:00000001"}],
                     endpoint=None)[1]["success"]
    task_id = submit(server, "clash")
    a = dict(siteName=SITE, node="wn-c", pilotID="wn-c:1", pilotNonce="n-clash")
    job = pilot(server, "site-pilots", "getJob", **a)
    assert job["outFiles"].startswith("clash.000001.out"), job
    assert pilot(server, "site-pilots", "updateJob", jobId=job["PandaID"], state="finished",
                 attemptNr=1, xml=stored_xml(server, job), **a)["StatusCode"] == 0
    row = job_row(server, job["PandaID"])
    assert row["jobStatus"] == "failed" and row["pilot_error_code"] == 1165
    assert "user.alice:clash.000001.out is in the catalogue with other bytes" in \
        row["pilot_error_diag"], row
    status, reply = api(server, None, "GET", "data/list_files", dataset="user.alice.clash")
    assert [(f["fsize"], f["checksum"]) for f in reply["data"]] == [(9, "ad:00000001")]
    kill_task(server, task_id)
