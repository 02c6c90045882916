"""``panda sites check`` and ``panda sites sync`` against a real server."""
from __future__ import annotations

import shutil
import subprocess
import sys

import requests
import yaml

from testkit import free_port
from site_configs import EXAMPLES_DIR


def panda(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def make_dir(tmp_path, broken: bool = True):
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLES_DIR / "LOCAL_DEMO.yaml", sites)
    data = yaml.safe_load((EXAMPLES_DIR / "LOCAL_DEMO.yaml").read_text())
    data["name"] = "SECOND"
    (sites / "second.yaml").write_text(yaml.safe_dump(data))
    if broken:
        data["name"] = "BROKEN"
        data["scheduler"]["backend"] = "pbs"
        del data["resources"]["memory_mb"]
        (sites / "broken.yaml").write_text(yaml.safe_dump(data))
    return sites


def test_check_prints_every_error_and_fails(tmp_path):
    sites = make_dir(tmp_path)
    res = panda("sites", "check", str(sites))
    assert res.returncode == 1
    errors = [line for line in res.stdout.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR {sites / 'broken.yaml'}: resources.memory_mb: missing required key",
        f"ERROR {sites / 'broken.yaml'}: scheduler.backend: unknown scheduler backend 'pbs' "
        "(installed: " + errors[1].split("(installed: ")[1],
    ]
    assert "2 valid site config(s), 2 error(s)" in res.stdout


def test_check_good_dir_succeeds(tmp_path):
    res = panda("sites", "check", str(make_dir(tmp_path, broken=False)))
    assert res.returncode == 0, res.stdout
    assert "site LOCAL_DEMO" in res.stdout and "site SECOND" in res.stdout


def test_check_missing_path(tmp_path):
    res = panda("sites", "check", str(tmp_path / "nothing"))
    assert res.returncode == 1 and "no such file or directory" in res.stdout


def test_sync_to_real_server(panda_server, tmp_path):
    sites = make_dir(tmp_path)
    token_file = tmp_path / "admin.token"
    token_file.write_text(panda_server.token("admin") + "\n")
    res = panda("sites", "sync", str(sites), "--server", panda_server.url,
                "--token-file", str(token_file))
    # the broken file is reported and makes the exit code non-zero, the good ones are synced
    assert res.returncode == 1, res.stderr
    assert "synced 2 site(s): LOCAL_DEMO, SECOND" in res.stdout
    assert "broken.yaml: scheduler.backend" in res.stdout
    listed = requests.get(panda_server.url + "/api/v1/site/list", timeout=10).json()
    assert listed["success"], listed
    names = sorted(s["name"] if isinstance(s, dict) else s for s in listed["data"])
    assert names == ["LOCAL_DEMO", "SECOND"]
    cfg = requests.get(panda_server.url + "/api/v1/site/get_config", params={"site": "SECOND"},
                       timeout=10).json()["data"]
    assert cfg["pilots"]["max_queued"] == 2 and cfg["scheduler"]["backend"] == "local"


def test_sync_with_token_from_environment_and_without(panda_server, tmp_path):
    import os
    sites = make_dir(tmp_path, broken=False)
    env = {k: v for k, v in os.environ.items() if k != "PANDA_AUTH_TOKEN"}
    res = panda("sites", "sync", str(sites), "--server", panda_server.url, env=env)
    assert res.returncode == 1 and "refused the sync" in res.stderr
    env["PANDA_AUTH_TOKEN"] = panda_server.token("admin")
    res = panda("sites", "sync", str(sites), "--server", panda_server.url, env=env)
    assert res.returncode == 0, res.stderr


def test_sync_to_dead_server_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    res = panda("sites", "sync", str(make_dir(tmp_path, broken=False)), "--server", url)
    assert res.returncode == 1
    assert f"cannot reach the server at {url}/api/v1/site/sync" in res.stderr


def test_sync_needs_a_server_and_a_readable_token(tmp_path):
    import os
    env = {k: v for k, v in os.environ.items() if k != "PANDA_URL"}
    res = panda("sites", "sync", str(make_dir(tmp_path, broken=False)), env=env)
    assert res.returncode == 2 and "--server" in res.stderr
    res = panda("sites", "sync", str(tmp_path / "sites"), "--server", "http://127.0.0.1:1",
                "--token-file", str(tmp_path / "missing.token"))
    assert res.returncode == 2 and "missing.token" in res.stderr


def test_sync_refuses_a_site_without_job_slots(panda_server):
    """A posted config whose ``pilots.max_running`` brokerage could not weigh (zero, negative,
    a string) is refused with its key and reason, and no site of the call is stored."""
    data = yaml.safe_load((EXAMPLES_DIR / "LOCAL_DEMO.yaml").read_text())
    data["storage"]["input"]["url"] = data["storage"]["output"]["url"] = "file:///tmp/se"
    auth = {"Authorization": f"Bearer {panda_server.token('admin')}"}
    good = {**data, "name": "GOOD"}
    for bad in (0, -3, "lots"):
        broken = {**data, "name": "BROKEN", "pilots": {**data["pilots"], "max_running": bad}}
        reply = requests.post(panda_server.url + "/api/v1/site/sync", headers=auth, timeout=10,
                              json={"sites": [good, broken]})
        assert reply.status_code < 500
        body = reply.json()
        assert body["success"] is False
        assert "posted site 'BROKEN'" in body["message"] and "pilots.max_running" in body["message"]
        assert ("below the minimum 1" if bad != "lots" else "expected integer") in body["message"]
    listed = requests.get(panda_server.url + "/api/v1/site/list", timeout=10).json()["data"]
    assert listed == []
