"""PanDA's own pilot 3 (PyPI panda-pilot, unmodified) takes a job from this server, runs it and
reports it finished. It runs as an unprivileged user made for the test, with PILOT_NOKILL=1."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from conftest import SITE, adler32_hex
from panda_wms.client import PandaClient

PAYLOAD = b'#!/bin/sh\n# the transformation pilot 3 runs as ./payload.sh <jobPars>\necho "hello from pilot 3" > "$1"\n'


def _pilot_env(launch: Path, user: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": f"/var/tmp/{user}-home", "LANG": "C.UTF-8",
           "PILOT_NOKILL": "1",                       # never kill the user's other processes
           "LOCAL_AGIS_SCHEDCONF": str(launch / "schedconf.json"),
           "PANDA_AUTH_TOKEN": "pilot.token", "PANDA_AUTH_ORIGIN": "panda-wms"}
    return [f"{k}={v}" for k, v in env.items()]


def run_pilot3(venv: Path, user: str, launch: Path, url: str, timeout: int = 240
               ) -> subprocess.CompletedProcess:
    """Start pilot 3 in ``launch`` (its main directory: no -a) as ``user`` and wait for it."""
    port = url.rsplit(":", 1)[1]
    cmd = ["runuser", "-u", user, "--", "env", "-i", *_pilot_env(launch, user),
           str(venv / "bin" / "python"), "pilot.py", "-q", SITE, "--pilot-user", "generic",
           "-w", "generic", "-j", "managed", "--url", "http://127.0.0.1", "-p", port,
           "--queuedata-url", f"{url}/cache/schedconfig/{SITE}.all.json",
           "--storagedata-url", f"{url}/cache/ddmendpoints.json",
           "-t",                       # no X.509 proxy to verify: the pilot authenticates by token
           "--no-pilot-log", "-d"]
    return subprocess.run(cmd, cwd=launch, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def launch_dir(pilot_user, compat_venv):
    """Pilot 3's launch directory, owned by its user, outside root's private /tmp folders."""
    path = Path(tempfile.mkdtemp(prefix="panda-wms-pilot3-", dir="/var/tmp"))
    src = compat_venv / "pilot3-src"
    shutil.copy(src / "pilot.py", path)
    shutil.copytree(src / "pilot", path / "pilot")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_pilot3_runs_a_job_to_finished(site_server, launch_dir, pilot_user, compat_venv):
    url = site_server.url
    alice = PandaClient(url, site_server.token("user", "alice"))
    # the transformation script is the job's input file: pilot 3's mv copytool links inputs
    # from its launch directory into the job directory
    assert alice.add_files("p3.in", "p3", [{"lfn": "payload.sh", "fsize": len(PAYLOAD),
                                            "checksum": f"ad:{adler32_hex(PAYLOAD)}"}],
                           "LOCAL_SE") == 1
    task_id = alice.submit_task({
        "name": "p3", "scope": "p3", "transformation": "payload.sh", "job_parameters": "${OUT}",
        "input_dataset": "p3.in", "output_dataset": "p3.out", "outputs": ["p3.${SN}.out"],
        "site": SITE, "resources": {"memory_mb": 100, "walltime_s": 600}})
    (launch_dir / "payload.sh").write_bytes(PAYLOAD)
    (launch_dir / "payload.sh").chmod(0o755)
    (launch_dir / "pilot.token").write_text(site_server.token("pilot", "pilot3-wn", site=SITE))
    queuedata = requests.get(f"{url}/cache/schedconfig/{SITE}.all.json", timeout=5).json()
    (launch_dir / "schedconf.json").write_text(json.dumps({SITE: queuedata}))
    subprocess.run(["chown", "-R", f"{pilot_user}:", str(launch_dir)], check=True)

    proc = run_pilot3(compat_venv, pilot_user, launch_dir, url)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    (job_id,) = alice.call("task", "get_job_ids", task_id=task_id)
    job = alice.call("job", "get_description", "POST", job_ids=[job_id])[0]
    assert job["jobStatus"] == "finished", (job, out[-4000:])
    assert job["pilotErrorCode"] == 0 and job["transExitCode"] == 0
    history = alice.call("job", "get_history", job_id=job_id)
    assert [h["new_status"] for h in history][-5:] == ["sent", "starting", "running", "holding",
                                                       "finished"]
    assert {h["actor"] for h in history[2:]} == {"pilot3-wn"}   # the token's subject did it
    # the payload ran and its output is where pilot 3's mv copytool leaves it (launch dir),
    # with the size and adler32 pilot 3 reported in its final update
    outputs = {f["lfn"]: f for f in job["Files"] if f["type"] == "output"}
    (lfn,) = outputs
    produced = (launch_dir / lfn).read_bytes()
    assert produced == b"hello from pilot 3\n"
    assert outputs[lfn]["status"] == "ready"
    assert outputs[lfn]["fsize"] == len(produced)
    assert outputs[lfn]["checksum"] == f"ad:{adler32_hex(produced)}"
    log_file = [f for f in job["Files"] if f["type"] == "log"][0]
    assert (launch_dir / log_file["lfn"]).stat().st_size == log_file["fsize"]
    assert alice.task_details(task_id)["status"] == "done"
    server_log = site_server.log()
    assert "Traceback" not in server_log and " 500 " not in server_log


def test_queuedata_reads_in_pilot3(site_server, compat_venv):
    """Pilot 3's own QueueData/StorageData classes parse what the server serves, with our values."""
    url = site_server.url
    qd = requests.get(f"{url}/cache/schedconfig/{SITE}.all.json", timeout=5).json()
    ddm = requests.get(f"{url}/cache/ddmendpoints.json", timeout=5).json()
    probe = (
        "import json, sys\n"
        "from pilot.info.queuedata import QueueData\n"
        "from pilot.info.storagedata import StorageData\n"
        "qd, ddm = json.load(sys.stdin)\n"
        "q = QueueData(qd)\n"
        "s = StorageData(ddm['LOCAL_SE'])\n"
        "print(json.dumps({'name': q.name, 'resource': q.resource, 'state': q.state,"
        " 'copytools': q.copytools, 'acopytools': q.acopytools, 'maxwdir': q.maxwdir,"
        " 'maxrss': q.maxrss, 'maxtime': q.maxtime, 'corecount': q.corecount,"
        " 'se': s.name, 'protocols': s.arprotocols['pw']}))\n")
    proc = subprocess.run([str(compat_venv / "bin" / "python"), "-c", probe],
                          input=json.dumps([qd, ddm]), capture_output=True, text=True,
                          cwd=compat_venv / "pilot3-src", timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PILOT_USER": "generic",
                               "PILOT_HOME": str(site_server.tmp)})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["name"] == seen["resource"] == SITE
    assert seen["state"] == "ACTIVE"
    assert list(seen["copytools"]) == ["mv"] and seen["acopytools"]["pr"] == ["mv"]
    assert (seen["maxwdir"], seen["maxrss"], seen["maxtime"], seen["corecount"]) == \
        (2000, 1024, 3600, 1)
    assert seen["se"] == "LOCAL_SE"
    assert seen["protocols"][0]["endpoint"] == "file://localhost"
    assert seen["protocols"][0]["path"] == str(site_server.se)
