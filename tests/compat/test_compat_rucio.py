"""Rucio's own client (PyPI ``rucio-clients``, unmodified, in pilot 3's venv) against this
server's ``/rucio`` API: the look-ups pilot 3 makes before it stages inputs in."""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import requests

from compatkit import SITE, adler32_hex
from panda_core.client import ApiClient
from panda_core.replicas import replica_path, replica_url, same_location
from testkit import EXAMPLE_SITES, start_server, stop_server

SE_NAME = "LOCAL_SE"


def write_rucio_cfg(folder: Path, server_url: str, account: str) -> Path:
    """The ``rucio.cfg`` a site gives pilot 3 (docs/compat.md): this server as Rucio host and
    auth host, the token found as a WLCG bearer token (``auth_type = oidc``)."""
    cfg = folder / "rucio.cfg"
    cfg.write_text(textwrap.dedent(f"""\
        [common]
        loglevel = WARNING

        [client]
        rucio_host = {server_url}/rucio
        auth_host = {server_url}/rucio
        auth_type = oidc
        account = {account}
        request_retries = 1
        """))
    return cfg


CLIENT_SCRIPT = r"""
import json, sys
from rucio.client import Client
from rucio.common import exception
calls = json.loads(sys.argv[1])
out = []
client = None
for name, kwargs in calls:
    try:
        client = client or Client()     # it authenticates when it is made
        if name == "list_replicas":
            out.append({"ok": list(client.list_replicas(**kwargs))})
        else:
            out.append({"ok": getattr(client, name)(**kwargs)})
    except exception.RucioException as exc:
        out.append({"error": type(exc).__name__, "message": str(exc)})
print(json.dumps(out, default=str))
"""


def run_rucio_client(venv: Path, cfg: Path, calls: list, token: str | None) -> list[dict]:
    """``calls`` ([name, kwargs]) through ``rucio.client.Client`` in its own process."""
    env = {"PATH": "/usr/bin:/bin", "RUCIO_CONFIG": str(cfg), "HOME": str(cfg.parent)}
    if token is not None:
        token_file = cfg.parent / "bearer.token"
        token_file.write_text(token)
        env["BEARER_TOKEN_FILE"] = str(token_file)
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", CLIENT_SCRIPT, json.dumps(calls)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rucio_server(tmp_path_factory, compat_venv):
    """A server with the LOCAL_DEMO site and two catalogued input files at its SE."""
    tmp = tmp_path_factory.mktemp("rucio")
    sites = tmp / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    server = start_server(tmp / "srv", site_dir=sites, env={"PANDA_SE_ROOT": str(tmp / "se")})
    alice = ApiClient(server.url, server.token("user", "alice"))
    server.files = {f"in.{i}": f"input {i}\n".encode() * (i + 1) for i in range(2)}
    assert alice.add_files("rucio.in", "rucio", [
        {"lfn": lfn, "fsize": len(data), "checksum": f"ad:{adler32_hex(data)}"}
        for lfn, data in server.files.items()], SE_NAME) == 2
    server.tmp = tmp
    yield server
    stop_server(server)


def test_rucio_client_lists_replicas_from_the_catalogue(rucio_server, compat_venv, tmp_path):
    cfg = write_rucio_cfg(tmp_path, rucio_server.url, "pilot3-wn")
    token = rucio_server.token("pilot", "pilot3-wn", site=SITE)
    se_url = requests.get(f"{rucio_server.url}/cache/ddmendpoints.json",
                          timeout=5).json()[SE_NAME]["rprotocols"]["0"]
    # pilot 3's own query (pilot/api/data.py), plus a file nobody catalogued
    query = {"dids": [{"scope": "rucio", "name": "in.0"}, {"scope": "rucio", "name": "in.1"},
                      {"scope": "rucio", "name": "nowhere"}],
             "schemes": ["srm", "root", "davs", "gsiftp", "https", "storm", "file"],
             "sort": "geoip", "client_location": {"ip": "127.0.0.1", "site": SITE},
             "signature_lifetime": 86400}
    ping, who, listed, wrong_scheme, other_rse = run_rucio_client(compat_venv, cfg, [
        ["ping", {}], ["whoami", {}], ["list_replicas", query],
        ["list_replicas", {**query, "schemes": ["davs"]}],
        ["list_replicas", {**query, "rse_expression": "ELSEWHERE"}]], token)
    assert "panda-wms" in ping["ok"]["version"]
    assert who["ok"]["account"] == "pilot3-wn"
    replicas = listed["ok"]
    assert [r["name"] for r in replicas] == ["in.0", "in.1"]      # the unknown file: no record
    for r in replicas:
        data = rucio_server.files[r["name"]]
        assert r["scope"] == "rucio" and r["bytes"] == len(data)
        assert r["adler32"] == adler32_hex(data) and r["md5"] is None
        [(pfn, info)] = r["pfns"].items()
        # the URL pilot 3 itself would build from ddmendpoints.json: endpoint + path + layout
        root = se_url["endpoint"] + se_url["path"]
        assert same_location(pfn, replica_url(root, "rucio", r["name"]))
        assert info["rse"] == SE_NAME and info["type"] == "DISK" and info["priority"] == 1
        assert r["rses"] == {SE_NAME: [pfn]}
    assert wrong_scheme == {"ok": []} and other_rse == {"ok": []}


def test_rucio_client_refusals_are_rucio_exceptions(rucio_server, compat_venv, tmp_path):
    cfg = write_rucio_cfg(tmp_path, rucio_server.url, "pilot3-wn")
    good = {"dids": [{"scope": "rucio", "name": "in.0"}]}
    [no_token] = run_rucio_client(compat_venv, cfg, [["list_replicas", good]], None)
    assert no_token["error"] == "CannotAuthenticate"
    [forged] = run_rucio_client(compat_venv, cfg, [["list_replicas", good]], "not.a.token")
    assert forged["error"] == "CannotAuthenticate"
    token = rucio_server.token("user", "alice")
    bad_name, bad_expression = run_rucio_client(compat_venv, cfg, [
        ["list_replicas", {"dids": [{"scope": "rucio", "name": "../../etc/passwd"}]}],
        ["list_replicas", {**good, "rse_expression": "type=DATADISK&tier=1"}]], token)
    assert bad_name["error"] == "InvalidObject" and "refusing file name" in bad_name["message"]
    assert bad_expression["error"] == "InvalidRSEExpression"


def test_rucio_api_answers_bad_requests_with_reasons(rucio_server):
    """What a hostile or broken caller sends: a 4xx with Rucio's exception headers, never 5xx."""
    url = f"{rucio_server.url}/rucio/replicas/list"
    auth = {"X-Rucio-Auth-Token": rucio_server.token("user", "alice")}
    for body in (b"{", b"[]", b'{"dids": []}', b'{"dids": "x"}', b'{"dids": [1]}',
                 b'{"dids": [{"scope": 1, "name": "a"}]}',
                 b'{"dids": [{"scope": "s", "name": "a"}], "schemes": "root"}',
                 json.dumps({"dids": [{"scope": "s", "name": f"f{i}"}
                                      for i in range(10001)]}).encode()):
        reply = requests.post(url, data=body, headers=auth, timeout=10)
        assert reply.status_code == 400, (body[:60], reply.status_code, reply.text[:300])
        assert reply.headers["ExceptionClass"] in ("InvalidObject", "InvalidRSEExpression")
        assert reply.json()["ExceptionMessage"]
    reply = requests.post(url, data=b'{"dids": [{"scope": "rucio", "name": "in.0"}]}',
                          headers={"X-Rucio-Auth-Token": "x" * 5000}, timeout=10)
    assert reply.status_code == 401 and reply.headers["ExceptionClass"] == "CannotAuthenticate"
    reply = requests.get(f"{rucio_server.url}/rucio/auth/userpass", timeout=10,
                         headers={"X-Rucio-Username": "a", "X-Rucio-Password": "b"})
    assert reply.status_code == 401 and "bearer token" in reply.headers["ExceptionMessage"]
    reply = requests.get(f"{rucio_server.url}/rucio/auth/validate", headers=auth, timeout=10)
    assert reply.status_code == 200 and reply.json()["account"] == "alice"


XRD_SE = "XRD_SE"
# the job's input payload.sh arrives from the SE through pilot 3's xrdcp, without its mode bits
# (xrdcp keeps none), and pilot 3's generic user runs "./<transformation> <jobPars>" (it
# downloads transformations only from its own fixed list of URLs): so the first word fails with
# "Permission denied" and the shell runs the staged-in script with /bin/sh; its output must
# say it read the input it got from the SE
STAGED_PAYLOAD = (b'#!/bin/sh\n# staged in from XRootD by pilot 3 after a Rucio look-up\n'
                  b'echo "pilot 3 read $(wc -c < payload.sh) bytes of payload.sh from the SE" > "$1"\n')


@pytest.mark.slow
@pytest.mark.xrootd
def test_pilot3_stages_through_xrootd_after_rucio_lookups(tmp_path, pilot_user, compat_venv,
                                                         monkeypatch):
    """Three jobs in one pilot 3 (timefloor) at a site whose SE is a real xrootd: each input
    found through Rucio's client answered by this server, copied in with xrdcp, each output
    written to the SE with xrdcp and read back there with the checksum the server registered."""
    import tempfile

    import yaml
    from peers import XROOTD_USER, start_xrootd, xrootd_available
    from server.rucio_api import replica_pfn
    from test_compat_pilot3 import kill_tree, pilot3_command, prepare_launch

    if xrootd_available():
        pytest.skip(xrootd_available())
    launch = Path(tempfile.mkdtemp(prefix="panda-wms-pilot3-", dir="/var/tmp"))
    shutil.copy(compat_venv / "pilot3-src" / "pilot.py", launch)
    shutil.copytree(compat_venv / "pilot3-src" / "pilot", launch / "pilot")
    with start_xrootd() as xrd:
        sites = tmp_path / "sites"
        sites.mkdir()
        data = yaml.safe_load((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
        data["storage"] = {"input": {"name": XRD_SE, "url": xrd.url},
                           "output": {"name": XRD_SE, "url": xrd.url}}
        data["copytools"] = {"input": {"name": "xrdcp", "options": {}},
                             "output": {"name": "xrdcp", "options": {}}}
        data["pilots"]["timefloor"] = 20
        (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
        server = start_server(tmp_path / "srv", site_dir=sites)
        try:
            alice = ApiClient(server.url, server.token("user", "alice"))
            tasks = []
            for name in ("p3xa", "p3xb", "p3xc"):
                payload = STAGED_PAYLOAD + f"# {name}\n".encode()
                path = xrd.data / replica_path(name, "payload.sh")
                path.parent.mkdir(parents=True)
                path.write_bytes(payload)
                assert alice.add_files(f"{name}.in", name, [{
                    "lfn": "payload.sh", "fsize": len(payload),
                    "checksum": f"ad:{adler32_hex(payload)}"}], XRD_SE) == 1
                tasks.append((name, len(payload), alice.submit_task({
                    "name": name, "scope": name, "transformation": "payload.sh",
                    "job_parameters": "${OUT} || /bin/sh payload.sh ${OUT}",
                    "input_dataset": f"{name}.in", "output_dataset": f"{name}.out",
                    "outputs": [name + ".${SN}.out"], "site": SITE,
                    "resources": {"memory_mb": 100, "walltime_s": 600}})))
            # the SE's files belong to xrootd's user, as pilot 3's outputs will
            subprocess.run(["chown", "-R", f"{XROOTD_USER}:", str(xrd.data)], check=True)
            prepare_launch(server, launch, pilot_user, b"")
            (launch / "payload.sh").unlink()        # nothing from the launch dir: all from the SE
            cfg = write_rucio_cfg(launch, server.url, "pilot3-wn")
            subprocess.run(["chown", "-R", f"{pilot_user}:", str(launch)], check=True)
            cmd = pilot3_command(compat_venv, pilot_user, launch, server.url)
            at = cmd.index("-i") + 1
            cmd[at:at] = [f"RUCIO_CONFIG={cfg}", f"BEARER_TOKEN_FILE={launch / 'pilot.token'}"]
            cmd += ["--getjobfailures", "1"]
            proc = subprocess.Popen(cmd, cwd=launch, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                out, _ = proc.communicate(timeout=420)
            finally:
                kill_tree(proc)
            assert out.count("replicas received from Rucio") >= 3, out[-6000:]
            for name, size, task_id in tasks:
                (job_id,) = alice.call("task", "get_job_ids", task_id=task_id)
                job = alice.call("job", "get_description", "POST", job_ids=[job_id])[0]
                assert job["jobStatus"] == "finished", (job, out[-6000:])
                for f in job["Files"]:
                    if f["type"] == "input":
                        continue
                    back = tmp_path / f"back.{f['lfn']}"
                    url = replica_pfn(xrd.url, name, f["lfn"])
                    subprocess.run(["xrdcp", "-f", "-s", url, str(back)], check=True, timeout=60)
                    got = back.read_bytes()
                    assert f["status"] == "ready" and f["fsize"] == len(got)
                    assert f["checksum"] == f"ad:{adler32_hex(got)}"
                    if f["type"] == "output":
                        assert got == (f"pilot 3 read {size} bytes of payload.sh from the "
                                       "SE\n").encode()
            assert out.count("pilot can run another job") >= 2, out[-6000:]
            log = server.log()
            assert "Traceback" not in log and log.count("/rucio/replicas/list") >= 3
        finally:
            stop_server(server)
            shutil.rmtree(launch, ignore_errors=True)


def test_replica_pfns_are_the_urls_pilot3_builds():
    """The PFNs answered are the URLs pilot 3 builds from ddmendpoints.json (absolute paths
    after an XRootD host need two slashes: test_ddmendpoints_give_pilot3_absolute_xrootd_paths)."""
    from server.rucio_api import replica_pfn

    layout = replica_path("user.a", "f.txt")
    assert replica_pfn("root://127.0.0.1:1094//data/se", "user.a", "f.txt") == \
        f"root://127.0.0.1:1094//data/se/{layout}"
    assert replica_pfn("root://127.0.0.1:1095/", "user.a", "f.txt") == \
        f"root://127.0.0.1:1095//{layout}"
    assert replica_pfn("https://se.example.org:8443/se/", "user.a", "f.txt") == \
        f"https://se.example.org:8443/se/{layout}"
