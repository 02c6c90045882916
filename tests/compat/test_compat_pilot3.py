"""PanDA's own pilot 3 (PyPI panda-pilot, unmodified) takes a job from this server, runs it and
reports it finished. It runs as an unprivileged user made for the test, with PILOT_NOKILL=1."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from compatkit import SITE, CertAuthority, adler32_hex, dn, start_tls_server, stop_process
from panda_core.client import ApiClient
from testkit import EXAMPLE_SITES

PAYLOAD = b'#!/bin/sh\n# the transformation pilot 3 runs as ./payload.sh <jobPars>\necho "hello from pilot 3" > "$1"\n'


def _pilot_env(launch: Path, user: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": f"/var/tmp/{user}-home", "LANG": "C.UTF-8",
           "PILOT_NOKILL": "1",                       # never kill the user's other processes
           "LOCAL_AGIS_SCHEDCONF": str(launch / "schedconf.json")}
    if (launch / "pilot.token").exists():
        # docs/compat.md's one environment for both pilots: pilot 3 takes OIDC_AUTH_TOKEN (a file
        # name, found in launch) before PANDA_AUTH_TOKEN, which our pilot reads as the token
        env.update(OIDC_AUTH_TOKEN="pilot.token", OIDC_AUTH_ORIGIN="panda-wms",
                   PANDA_AUTH_TOKEN=(launch / "pilot.token").read_text())
    if (launch / "x509up").exists():        # else: certificate, key and CA chain in one file
        env.update(X509_USER_PROXY=str(launch / "x509up"), X509_CERT_DIR=str(launch / "certs"))
    if (launch / "pilot.cfg").exists():     # pilot 3's own way to read another config file
        env["HARVESTER_PILOT_CONFIG"] = str(launch / "pilot.cfg")
    return [f"{k}={v}" for k, v in env.items()]


def pilot3_command(venv: Path, user: str, launch: Path, url: str) -> list[str]:
    """Pilot 3 in ``launch`` (its main directory: no -a) as ``user``."""
    base, port = url.rsplit(":", 1)
    return ["runuser", "-u", user, "--", "env", "-i", *_pilot_env(launch, user),
            str(venv / "bin" / "python"), "pilot.py", "-q", SITE, "--pilot-user", "generic",
            "-w", "generic", "-j", "managed", "--url", base, "-p", port,
            "--queuedata-url", f"{url}/cache/schedconfig/{SITE}.all.json",
            "--storagedata-url", f"{url}/cache/ddmendpoints.json",
            "-t",                      # no X.509 proxy to verify: the pilot authenticates by token
            "--no-pilot-log", "-d"]


def run_pilot3(venv: Path, user: str, launch: Path, url: str, timeout: int = 240
               ) -> subprocess.CompletedProcess:
    """Run pilot 3 to its end; past ``timeout`` it and its children are ended by process id."""
    proc = subprocess.Popen(pilot3_command(venv, user, launch, url), cwd=launch, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def prepare_launch(server, launch: Path, user: str, payload: bytes,
                   heartbeat_s: int | None = None, url: str | None = None,
                   verify: str | bool = True) -> None:
    """The transformation, the pilot's token, its queue description (and config) in ``launch``."""
    (launch / "payload.sh").write_bytes(payload)
    (launch / "payload.sh").chmod(0o755)
    if server is not None:
        # no trailing newline: pilot 3 would shell-quote it into the header, which breaks it
        (launch / "pilot.token").write_text(server.token("pilot", "pilot3-wn", site=SITE))
    url = url or server.url
    queuedata = requests.get(f"{url}/cache/schedconfig/{SITE}.all.json", timeout=5,
                             verify=verify).json()
    (launch / "schedconf.json").write_text(json.dumps({SITE: queuedata}))
    if heartbeat_s is not None:
        cfg = (launch / "pilot" / "util" / "default.cfg").read_text()
        cfg = re.sub(r"(?m)^(debug_)?heartbeat: \d+$", lambda m: f"{m.group(1) or ''}heartbeat: "
                     f"{heartbeat_s}", cfg)
        (launch / "pilot.cfg").write_text(cfg)
    subprocess.run(["chown", "-R", f"{user}:", str(launch)], check=True)


def submit_payload_task(server, name: str, payload: bytes) -> tuple[ApiClient, int]:
    """A one-job task whose input is the transformation script itself."""
    alice = ApiClient(server.url, server.token("user", "alice"))
    assert alice.add_files(f"{name}.in", name, [{"lfn": "payload.sh", "fsize": len(payload),
                                                 "checksum": f"ad:{adler32_hex(payload)}"}],
                           "LOCAL_SE") == 1
    task_id = alice.submit_task({
        "name": name, "scope": name, "transformation": "payload.sh", "job_parameters": "${OUT}",
        "input_dataset": f"{name}.in", "output_dataset": f"{name}.out",
        "outputs": [name + ".${SN}.out"], "site": SITE,
        "resources": {"memory_mb": 100, "walltime_s": 600}})
    return alice, task_id



def kill_tree(proc: subprocess.Popen) -> None:
    """End what this test started, by process id: runuser, the pilot and its payloads."""
    if proc.poll() is not None:      # ended and reaped: its pid may already name another process
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family + [proc]:
        try:
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait()


def left_behind(user: str, launch: Path, program: str = "") -> list[str]:
    """Processes of ``user`` (running ``program``) in (a folder below) ``launch``."""
    found = []
    for proc in psutil.process_iter(["username", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["username"] == user and proc.cwd().startswith(str(launch)) \
                    and cmdline.startswith(program):
                found.append(cmdline)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found

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
    # the transformation script is the job's input file: pilot 3's mv copytool links inputs
    # from its launch directory into the job directory
    alice, task_id = submit_payload_task(site_server, "p3", PAYLOAD)
    prepare_launch(site_server, launch_dir, pilot_user, PAYLOAD)
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





FAILING = b'#!/bin/sh\n# a payload that fails: no output, exit code 3\necho "failing on purpose" >&2\nexit 3\n'


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PANDA_WMS_COMPAT_FULL"),
                    reason="pilot 3 waits about 2 minutes after a failed payload before its final "
                           "update (its wait_for_aborted_job_stageout); set PANDA_WMS_COMPAT_FULL=1")
def test_pilot3_reports_a_failed_payload(site_server, launch_dir, pilot_user, compat_venv):
    """Pilot 3's failure report (exit code, error code and diagnostics) fails the job here and
    the server creates the retry."""
    alice, task_id = submit_payload_task(site_server, "p3f", FAILING)
    prepare_launch(site_server, launch_dir, pilot_user, FAILING)
    proc = run_pilot3(compat_venv, pilot_user, launch_dir, site_server.url)
    out = proc.stdout + proc.stderr
    first, retry = alice.call("task", "get_job_ids", task_id=task_id)
    job, again = alice.call("job", "get_description", "POST", job_ids=[first, retry])
    assert job["jobStatus"] == "failed", (job, out[-4000:])
    assert job["transExitCode"] == 3
    assert job["pilotErrorCode"] != 0 and job["pilotErrorDiag"], job
    assert [h["new_status"] for h in alice.call("job", "get_history", job_id=first)][-2:] == \
        ["holding", "failed"]
    assert (again["jobStatus"], again["attemptNr"]) == ("activated", 2)
    assert "Traceback" not in site_server.log()

SLEEPER = b'#!/bin/sh\n# runs until killed\necho started > "$1"\nexec sleep 300\n'


@pytest.mark.slow
def test_pilot3_x509_over_https_obeys_a_kill(tmp_path, launch_dir, pilot_user, compat_venv,
                                            monkeypatch):
    """Pilot 3 in certificate mode over https: curl presents its proxy file (certificate, key,
    CA chain) as TLS client certificate, and the server records the DN (a --pilot-dn) as the
    actor. The owner kills the running job; pilot 3 gets ``tobekilled`` in its next heartbeat
    reply, kills the payload and ends long before the payload would have."""
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    ca = CertAuthority(tmp_path / "pki")
    url, server = start_tls_server(tmp_path, sites, ca, pilot_dns=[dn("pilot3-wn")])
    verify, alice = str(ca.ca_file), ca.issue("alice")

    def api(method, path, **body):
        resp = requests.request(method, f"{url}/api/v1/{path}", cert=alice, verify=verify,
                                timeout=10, **({"json": body} if method == "POST"
                                               else {"params": body}))
        assert resp.json()["success"], resp.text
        return resp.json()["data"]

    def status():
        return api("POST", "job/get_description", job_ids=[job_id])[0]["jobStatus"]

    proc = None
    try:
        api("POST", "data/add_files", dataset="p3k.in", scope="p3k", ddm_endpoint="LOCAL_SE",
            files=[{"lfn": "payload.sh", "fsize": len(SLEEPER),
                    "checksum": f"ad:{adler32_hex(SLEEPER)}"}])
        task_id = api("POST", "task/submit", task_parameters={
            "name": "p3k", "scope": "p3k", "transformation": "payload.sh",
            "job_parameters": "${OUT}", "input_dataset": "p3k.in", "output_dataset": "p3k.out",
            "outputs": ["p3k.${SN}.out"], "site": SITE,
            "resources": {"memory_mb": 100, "walltime_s": 600}})
        (job_id,) = api("GET", "task/get_job_ids", task_id=task_id)
        cert, key = ca.issue("pilot3-wn")
        (launch_dir / "x509up").write_bytes(cert.read_bytes() + key.read_bytes()
                                            + ca.ca_file.read_bytes())
        (launch_dir / "x509up").chmod(0o600)
        (launch_dir / "certs").mkdir()
        prepare_launch(None, launch_dir, pilot_user, SLEEPER, heartbeat_s=3, url=url,
                       verify=verify)
        started = time.monotonic()
        log_path = launch_dir.parent / f"{launch_dir.name}.out"   # a pipe would fill and block
        with open(log_path, "w") as log:
            proc = subprocess.Popen(pilot3_command(compat_venv, pilot_user, launch_dir, url),
                                    cwd=launch_dir, stdout=log, stderr=subprocess.STDOUT)
        while status() != "running" or not left_behind(pilot_user, launch_dir, "sleep"):
            assert proc.poll() is None and time.monotonic() - started < 120, \
                log_path.read_text()[-4000:]
            time.sleep(0.5)
        assert api("POST", "job/kill", job_ids=[job_id]) == [True]
        killed = time.monotonic()
        # the next heartbeat reply says tobekilled and pilot 3 ends its payload; how long pilot
        # 3 then takes to wind down (up to minutes, in its own waits) is not the server's part
        while left_behind(pilot_user, launch_dir, "sleep") or \
                "tobekilled" not in log_path.read_text(errors="replace"):
            assert time.monotonic() - killed < 90, log_path.read_text()[-4000:]
            time.sleep(0.5)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass                                   # kill_tree below ends what is left
        out = log_path.read_text(errors="replace")
        assert "command" in out and "tobekilled" in out
        assert status() == "cancelled"
        history = api("GET", "job/get_history", job_id=job_id)
        assert [(h["new_status"], h["actor"]) for h in history] == [
            ("defined", dn("alice")), ("activated", "brokerage"), ("sent", dn("pilot3-wn")),
            ("starting", dn("pilot3-wn")), ("running", dn("pilot3-wn")),
            ("cancelled", dn("alice"))]
        # no payload of this pilot outlived it (other test sessions may run pilots too)
        assert left_behind(pilot_user, launch_dir, "sleep") == []
    finally:
        if proc is not None:
            kill_tree(proc)
            (launch_dir.parent / f"{launch_dir.name}.out").unlink(missing_ok=True)
        stop_process(server)


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


def test_timefloor_from_the_site_config_reaches_pilot3(tmp_path, compat_venv):
    """``pilots.timefloor`` (minutes) of a site config is the queue description's ``timefloor``,
    which pilot 3's QueueData turns into the seconds during which it asks for another job."""
    import yaml

    from server.queuedata import queuedata
    from site_configs import parse_site_config

    data = yaml.safe_load((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    data["pilots"]["timefloor"] = 20
    config = parse_site_config(data, env={"PANDA_SE_ROOT": str(tmp_path)}).to_dict()
    assert config["pilots"]["timefloor"] == 20
    qd = json.loads(json.dumps(queuedata(config)))
    assert qd["timefloor"] == 20
    probe = ("import json, sys\nfrom pilot.info.queuedata import QueueData\n"
             "print(QueueData(json.load(sys.stdin)).timefloor)\n")
    proc = subprocess.run([str(compat_venv / "bin" / "python"), "-c", probe],
                          input=json.dumps(qd), capture_output=True, text=True,
                          cwd=compat_venv / "pilot3-src", timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PILOT_USER": "generic",
                               "PILOT_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "1200"
    # a site config without the key keeps PanDA's default: one job per pilot
    del data["pilots"]["timefloor"]
    assert queuedata(parse_site_config(data, env={"PANDA_SE_ROOT": "/x"}).to_dict())[
        "timefloor"] == 0


def test_sandbox_becomes_pilot3s_container_type(tmp_path, compat_venv):
    """The site config's ``sandbox`` is the queue description's ``container_type`` and
    ``container_options`` as pilot 3's own QueueData reads them: our apptainer runtime is
    ``apptainer`` for the user ``pilot`` (pilot 3 runs the payload in it), with the same
    isolation in apptainer's options; bwrap and none are no container pilot 3 knows."""
    import yaml

    from server.queuedata import queuedata
    from site_configs import parse_site_config

    data = yaml.safe_load((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    probe = ("import json, sys\nfrom pilot.info.queuedata import QueueData\n"
             "q = QueueData(json.load(sys.stdin))\n"
             "print(json.dumps([q.container_type, q.container_options]))\n")

    def seen_by_pilot3(sandbox: dict | None) -> list:
        if sandbox is None:
            data.pop("sandbox", None)
        else:
            data["sandbox"] = sandbox
        config = parse_site_config(data, env={"PANDA_SE_ROOT": str(tmp_path)}).to_dict()
        proc = subprocess.run([str(compat_venv / "bin" / "python"), "-c", probe],
                              input=json.dumps(queuedata(config)), capture_output=True,
                              text=True, cwd=compat_venv / "pilot3-src", timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PILOT_USER": "generic",
                                   "PILOT_HOME": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert seen_by_pilot3({"runtime": "apptainer", "network": False,
                           "bind": ["/cvmfs", "/etc/grid-security/certificates"]}) == [
        {"pilot": "apptainer"},
        "-B /cvmfs:/cvmfs:ro,/etc/grid-security/certificates:/etc/grid-security/certificates:ro,"
        "${workdir} --contain --ipc --pid --net --network none"]
    assert seen_by_pilot3({"runtime": "apptainer"}) == [
        {"pilot": "apptainer"}, "-B ${workdir} --contain --ipc --pid"]
    for sandbox in ({"runtime": "bwrap", "network": False, "bind": ["/cvmfs"]},
                    {"runtime": "none"}, None):
        assert seen_by_pilot3(sandbox) == [{}, ""], sandbox


@pytest.mark.slow
def test_pilot3_runs_three_jobs_in_one_pilot_within_timefloor(tmp_path, launch_dir, pilot_user,
                                                              compat_venv, monkeypatch):
    """A site config with ``pilots.timefloor`` (minutes): one pilot 3 process takes, runs and
    finishes three jobs one after the other, then ends when the server has no more."""
    import yaml

    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    sites = tmp_path / "sites"
    sites.mkdir()
    data = yaml.safe_load((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    data["pilots"]["timefloor"] = 20
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
    from testkit import start_server, stop_server
    server = start_server(tmp_path / "srv", site_dir=sites,
                          env={"PANDA_CACHE_DIR": str(tmp_path / "cache")})
    try:
        # three tasks whose transformation is their input payload.sh, which pilot 3's mv
        # copytool links from the launch directory into each job's directory
        tasks = [submit_payload_task(server, name, PAYLOAD) for name in ("p3a", "p3b", "p3c")]
        prepare_launch(server, launch_dir, pilot_user, PAYLOAD)
        assert json.loads((launch_dir / "schedconf.json").read_text())[SITE]["timefloor"] == 20
        cmd = pilot3_command(compat_venv, pilot_user, launch_dir, server.url)
        cmd += ["--getjobfailures", "1"]     # end at the first getJob without a job, not 60 s on
        proc = subprocess.Popen(cmd, cwd=launch_dir, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=420)
        finally:
            kill_tree(proc)
        finished = []
        for alice, task_id in tasks:
            (job_id,) = alice.call("task", "get_job_ids", task_id=task_id)
            job = alice.call("job", "get_description", "POST", job_ids=[job_id])[0]
            finished.append(job["jobStatus"])
            history = alice.call("job", "get_history", job_id=job_id)
            assert {h["actor"] for h in history[2:]} == {"pilot3-wn"}
        assert finished == ["finished"] * 3, out[-6000:]
        assert out.count("pilot can run another job") >= 2, out[-6000:]
        assert "Traceback" not in server.log()
    finally:
        stop_server(server)


def test_ddmendpoints_give_pilot3_absolute_xrootd_paths(compat_venv, tmp_path):
    """Pilot 3 builds a file's URL as endpoint + os.path.join(path, <scope/xx/yy/lfn>); for an
    XRootD storage element that must be root://host:port//abs/path (one slash is relative)."""
    from server.queuedata import storagedata

    configs = [{"name": "XRD_SITE", "storage": {
        "input": {"name": "XRD_SE", "url": "root://127.0.0.1:1094//data/se"},
        "output": {"name": "XRD_ROOT", "url": "root://127.0.0.1:1095/"}}},
        {"name": "FILE_SITE", "storage": {"input": {"name": "F_SE", "url": "file:///data/se"},
                                          "output": {"name": "F_SE", "url": "file:///data/se"}}}]
    ddm = json.loads(json.dumps(storagedata(configs)))
    probe = ("import json, os, sys\nfrom pilot.info.storagedata import StorageData\n"
             "out = {}\nfor name, data in json.load(sys.stdin).items():\n"
             "    p = StorageData(data).arprotocols['pw'][0]\n"
             "    out[name] = p['endpoint'] + os.path.join(p.get('path', ''), 'user.a/ab/cd/f.txt')\n"
             "print(json.dumps(out))\n")
    proc = subprocess.run([str(compat_venv / "bin" / "python"), "-c", probe],
                          input=json.dumps(ddm), capture_output=True, text=True,
                          cwd=compat_venv / "pilot3-src", timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PILOT_USER": "generic",
                               "PILOT_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    urls = json.loads(proc.stdout.strip().splitlines()[-1])
    assert urls == {"XRD_SE": "root://127.0.0.1:1094//data/se/user.a/ab/cd/f.txt",
                    "XRD_ROOT": "root://127.0.0.1:1095//user.a/ab/cd/f.txt",
                    "F_SE": "file://localhost/data/se/user.a/ab/cd/f.txt"}
