"""Issue 13, server side: data has owners, a job has one pilot, identity, bounded inputs.

Each finding of the issue reproduced against a running ``panda server`` (one per module, on
SQLite: the rules live above the database) and the site config tools as a sysadmin runs them.
"""
from __future__ import annotations

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
