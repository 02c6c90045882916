"""Issue 13's pilot-side findings, each reproduced against a running ``panda server``.

A hostile network is a small proxy in front of the server (``Mitm``): it forwards every request
and may rewrite what comes back, re-sign it with its own key and serve that key. The pilot is
started as the factory starts it (``Factory.pilot_command``: the server's key pinned by its
fingerprint) or with the key's PEM file. Covered: a re-signed getJob, a tampered queue
description, a copytool option naming a program, a replayed signed spec, ``tobekilled`` followed
by no stage-out, a final update that gets "try again" (StatusCode 10) or no answer at all (kept,
then delivered by a later pilot's recovery), and credentials in the pilot's environment.
"""
from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from panda_core.canonical import (QUEUEDATA_SIGNATURE_KEY, SIGNATURE_KEY, queuedata_signed_bytes,
                                  signed_bytes)
from panda_core.client import ApiClient
from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path
from peers import make_test_ca
from pilotkit import pilot_env
from schedulers.factory import Factory
from site_configs import parse_site_config
from testkit import EXAMPLE_SITES, free_port, start_server, stop_server, wait_for

SITE = "LOCAL_DEMO"


class Mitm:
    """A man in the middle on 127.0.0.1: forwards to ``upstream``; the hooks may rewrite.

    ``on_getjob(reply) -> reply``, ``on_queuedata(doc) -> doc``: rewrite a reply;
    ``on_update(form) -> reply | (status, reply, headers) | "drop" | None``: answer an
    updateJob itself (None: forward it);
    ``own_key``: re-sign getJob replies and queue descriptions with it and serve its public key
    as the server's."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.port = free_port()
        self.on_getjob = self.on_queuedata = self.on_update = None
        self.own_key: Ed25519PrivateKey | None = None
        self.getjob_replies: list[dict] = []
        mitm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                mitm.handle(self, "GET", b"")

            def do_POST(self):
                mitm.handle(self, "POST", self.rfile.read(int(self.headers.get("Content-Length")
                                                              or 0)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _sign(self, data: bytes) -> str:
        return base64.b64encode(self.own_key.sign(data)).decode()

    def _forward(self, method: str, path: str, body: bytes, headers) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        keep = {k: v for k, v in headers.items()
                if k.lower() in ("authorization", "accept", "content-type", "user-agent")}
        conn.request(method, path, body=body or None, headers=keep)
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
        conn.close()
        return status, data

    def handle(self, req: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        path = urllib.parse.urlsplit(req.path).path
        form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        if self.own_key is not None and path == "/api/v1/system/get_public_key":
            pem = self.own_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            return self._reply(req, 200, {"success": True, "message": "", "data": pem.decode()})
        if path == "/server/panda/updateJob" and self.on_update is not None:
            answer = self.on_update(form)
            if answer == "drop":                      # a dead server: no answer at all
                req.close_connection = True
                req.connection.shutdown(2)
                return
            if isinstance(answer, tuple):
                return self._reply(req, *answer)
            if answer is not None:
                return self._reply(req, 200, answer)
        status, data = self._forward(method, req.path, body, req.headers)
        if status == 200 and path == "/server/panda/getJob":
            reply = json.loads(data)
            if reply.get("StatusCode") == 0:
                self.getjob_replies.append(dict(reply))
            if self.on_getjob is not None:
                reply = self.on_getjob(reply)
            if self.own_key is not None and reply.get("StatusCode") == 0:
                spec = {k: v for k, v in reply.items() if k != "StatusCode"}
                reply[SIGNATURE_KEY] = self._sign(signed_bytes(spec))
            return self._reply(req, 200, reply)
        if status == 200 and path.startswith("/cache/schedconfig/"):
            doc = json.loads(data)
            if self.on_queuedata is not None:
                doc = self.on_queuedata(doc)
            if self.own_key is not None:
                doc[QUEUEDATA_SIGNATURE_KEY] = self._sign(queuedata_signed_bytes(SITE,
                                                                                 doc["panda_wms"]))
            return self._reply(req, 200, doc)
        self._reply(req, status, data)

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, obj, headers: dict | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        req.send_response(status)
        for name, value in (headers or {}).items():
            req.send_header(name, value)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)


def _site_yaml(sites: Path, **changes) -> dict:
    data = yaml.safe_load((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    data["limits"]["heartbeat_s"] = 1
    data.update(changes)
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
    return data


@pytest.fixture
def real(tmp_path, monkeypatch):
    se = tmp_path / "se"
    se.mkdir()
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    sites = tmp_path / "sites"
    sites.mkdir()
    _site_yaml(sites)
    server = start_server(tmp_path / "srv", site_dir=sites)
    server.se, server.sites = se, sites
    server.user = ApiClient(server.url, server.token("user", "alice"))
    yield server
    stop_server(server)


@pytest.fixture
def mitm(real):
    proxy = Mitm(real.url)
    yield proxy
    proxy.stop()


def submit(server, name: str, script: str, n_jobs: int = 1, walltime_s: int = 300) -> int:
    return server.user.submit_task({
        "name": name, "scope": "p", "transformation": "/bin/sh", "job_parameters": script,
        "output_dataset": f"p.{name}.out", "outputs": [f"{name}.${{SN}}.out"], "n_jobs": n_jobs,
        "site": SITE, "max_attempts": 1, "resources": {"memory_mb": 500, "walltime_s": walltime_s}})


def factory_pilot(server, url: str, workdir: Path, *args: str) -> list[str]:
    """The pilot's command line as the factory builds it (the server's key pinned by its
    fingerprint), pointed at ``url``."""
    site = parse_site_config(yaml.safe_load((server.sites / f"{SITE}.yaml").read_text()))
    factory = Factory(url, [site], state_dir=workdir.parent / "factory",
                      server_key_fingerprint=server.key_fingerprint())
    return [*factory.pilot_command(site), "--workdir", str(workdir), "--monitor-interval", "0.2",
            "--server-retries", "2", "--server-backoff", "0.2", *args]


def pem_pilot(server, url: str, workdir: Path, *args: str) -> list[str]:
    """The pilot with the server's PEM pinned (``--public-key``), pointed at ``url``."""
    return [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", url, "--site", SITE,
            "--workdir", str(workdir), "--monitor-interval", "0.2", "--server-retries", "2",
            "--server-backoff", "0.2", "--public-key", str(server.public_key_file()), *args]


def run(server, cmd: list[str], env: dict | None = None, timeout: float = 120):
    env = pilot_env({"PANDA_AUTH_TOKEN": server.token("pilot", "pilot1", site=SITE),
                     **(env or {})})
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def job_of(server, task_id: int) -> dict:
    [job] = server.user.jobs(task_id)
    panda_id = job.get("PandaID") or job.get("panda_id")
    return server.user.call("job", "get_description", "POST", job_ids=[panda_id])[0]


# ------------------------------------------------------------------ 1. a man in the middle
def test_resigned_getjob_with_the_proxys_own_key_is_refused(real, mitm, tmp_path):
    marker = tmp_path / "pwned"
    task_id = submit(real, "mitm", "-c 'echo hello > ${OUT}'")
    mitm.own_key = Ed25519PrivateKey.generate()
    mitm.on_getjob = lambda reply: {**reply, "jobPars": f"-c 'echo PWNED-$PANDA_ID > {marker}'"}
    res = run(real, factory_pilot(real, mitm.url, tmp_path / "wd", "--max-jobs", "1"))
    assert not marker.exists(), res.stderr[-3000:]
    assert "is not the pinned key" in res.stderr, res.stderr[-3000:]
    job = job_of(real, task_id)
    assert job["jobStatus"] == "failed" and job["pilot_error_code"] == ErrorCode.BAD_SIGNATURE


def test_https_certificate_is_checked_against_the_sites_ca_bundle(tmp_path, monkeypatch):
    """Over https the pilot trusts the CA bundle it is given (the factory passes the site's),
    not whatever certificate the server shows."""
    se = tmp_path / "se"
    se.mkdir()
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    sites = tmp_path / "sites"
    sites.mkdir()
    _site_yaml(sites)
    server = start_server(tmp_path / "srv", site_dir=sites, tls=make_test_ca(tmp_path / "tls"))
    server.sites = sites
    server.user = ApiClient(server.url, server.token("user", "alice"), ca_file=server.ca)
    try:
        task_id = submit(server, "tls", "-c 'echo out > ${OUT}'")
        res = run(server, pem_pilot(server, server.url, tmp_path / "wd", "--max-jobs", "1"))
        assert res.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in res.stderr, res.stderr
        assert server.user.task_details(task_id)["jobs"] == {"activated": 1}
        res = run(server, pem_pilot(server, server.url, tmp_path / "wd", "--max-jobs", "1",
                                    "--ca-bundle", server.ca))
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.user.task_details(task_id)["jobs"] == {"finished": 1}
    finally:
        stop_server(server)


def test_tampered_queue_description_is_refused(real, mitm, tmp_path):
    """The queue description's storage element redirected to the attacker's: nothing goes
    there, the pilot refuses to act on a site config the server did not sign."""
    evil = tmp_path / "evil-se"
    evil.mkdir()
    submit(real, "qd", "-c 'echo secret-output > ${OUT}'")

    def redirect(doc):
        doc["panda_wms"]["storage"]["output"]["url"] = f"file://{evil}"
        return doc
    mitm.on_queuedata = redirect
    res = run(real, pem_pilot(real, mitm.url, tmp_path / "wd", "--max-jobs", "1"))
    assert not any(evil.rglob("*")), (list(evil.rglob("*")), res.stderr[-3000:])
    assert "queue description signature does not verify" in res.stderr, res.stderr[-3000:]
    assert res.returncode == 1


def test_copytool_option_naming_a_program_runs_only_from_the_allow_list(tmp_path, monkeypatch):
    """A (signed, legitimate) site config whose copytool option names a program: the pilot
    runs it only when its own command line allows that program."""
    se = tmp_path / "se"
    se.mkdir()
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    marker = tmp_path / "program-ran"
    program = tmp_path / "not-xrdcp.sh"
    program.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    program.chmod(0o755)
    sites = tmp_path / "sites"
    sites.mkdir()
    _site_yaml(sites, storage={"input": {"name": "LOCAL_SE", "url": f"file://{se}"},
                               "output": {"name": "XRD_SE", "url": "root://127.0.0.1:1/"}},
               copytools={"input": {"name": "cp", "options": {}},
                          "output": {"name": "xrdcp", "options": {"xrdcp": str(program)}}})
    server = start_server(tmp_path / "srv", site_dir=sites)
    server.sites = sites
    server.user = ApiClient(server.url, server.token("user", "alice"))
    try:
        task_id = submit(server, "prog", "-c 'echo out > ${OUT}'")
        res = run(server, pem_pilot(server, server.url, tmp_path / "wd", "--max-jobs", "1"))
        assert not marker.exists(), res.stderr[-3000:]
        job = job_of(server, task_id)
        assert job["pilot_error_code"] == ErrorCode.STAGEOUT_FAILED, job["pilot_error_diag"]
        assert "not in this pilot's allow list" in job["pilot_error_diag"]
        # allowed locally: the same option is used
        submit(server, "prog2", "-c 'echo out > ${OUT}'")
        res = run(server, pem_pilot(server, server.url, tmp_path / "wd2", "--max-jobs", "1",
                                    "--allow-program", str(program)))
        assert marker.exists(), res.stderr[-3000:]
    finally:
        stop_server(server)


def test_replayed_signed_spec_is_refused(real, mitm, tmp_path):
    """A spec the server signed for pilot A, replayed to pilot B: B neither runs nor reports
    it, and the job A finished stays finished with A's log."""
    runs = tmp_path / "runs"
    task_id = submit(real, "replay", f"-c 'echo ran-$PANDA_ID >> {runs}; echo x > ${{OUT}}'")
    res_a = run(real, pem_pilot(real, mitm.url, tmp_path / "wd-a", "--max-jobs", "1"))
    assert res_a.returncode == 0, res_a.stderr[-3000:]
    job = job_of(real, task_id)
    assert job["jobStatus"] == "finished"
    log = next(f for f in job["Files"] if f["type"] == "log")
    log_path = real.se / replica_path(log["scope"], log["lfn"])
    log_bytes = log_path.read_bytes()
    first = mitm.getjob_replies[0]
    mitm.on_getjob = lambda reply: dict(first)          # every getJob now gets A's spec
    res_b = run(real, pem_pilot(real, mitm.url, tmp_path / "wd-b", "--max-jobs", "1"))
    assert runs.read_text().count("ran-") == 1, res_b.stderr[-3000:]
    assert "replayed or redirected spec" in res_b.stderr, res_b.stderr[-3000:]
    assert job_of(real, task_id)["jobStatus"] == "finished"
    assert log_path.read_bytes() == log_bytes


def test_tobekilled_stages_nothing_out(real, tmp_path):
    """Told tobekilled, the pilot stages out nothing: not its log over the job's log."""
    task_id = submit(real, "kill", "-c 'echo started; sleep 60'")
    cmd = pem_pilot(real, real.url, tmp_path / "wd", "--max-jobs", "1", "--heartbeat", "0.5")
    env = pilot_env({"PANDA_AUTH_TOKEN": real.token("pilot", "pilot1", site=SITE)})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: real.user.task_details(task_id)["jobs"].get("running"), "the job to run")
        job = job_of(real, task_id)
        log = next(f for f in job["Files"] if f["type"] == "log")
        log_path = real.se / replica_path(log["scope"], log["lfn"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"the real job's log\n")
        assert real.user.kill_jobs([job["PandaID"]]) == [True]
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the server says tobekilled" in out, out[-3000:]
    assert log_path.read_bytes() == b"the real job's log\n", out[-3000:]
    assert [p.name for p in real.se.rglob("*") if p.is_file()] == [log["lfn"]]


# ------------------------------------------------------------------ 3. no loss on faults
@pytest.mark.parametrize("fault", ["try again", "dead server"])
def test_undelivered_final_report_is_kept_and_recovered(real, mitm, tmp_path, fault):
    """The final updateJob gets StatusCode 10 (a transient server-side failure) or no answer:
    the pilot keeps the report and the work dir; a later pilot's recovery delivers it."""
    task_id = submit(real, "final", "-c 'echo result > ${OUT}'")
    answer = ({"StatusCode": 10, "errorDialog": "database connection lost; try again"}
              if fault == "try again" else "drop")
    finals = []

    def final_fails(form):
        if form.get("state") in ("finished", "failed"):
            finals.append(form)
            return answer
        return None
    mitm.on_update = final_fails
    wd = tmp_path / "wd"
    res = run(real, pem_pilot(real, mitm.url, wd, "--max-jobs", "1"))
    assert finals and finals[-1]["state"] == "finished", res.stderr[-3000:]
    kept = list(wd.glob("panda_job_*"))
    assert len(kept) == 1, res.stderr[-3000:]
    assert json.loads((kept[0] / "pilot_state.json").read_text())["phase"] == "final_pending"
    assert job_of(real, task_id)["jobStatus"] != "finished"
    # a later pilot on the same node, the server answering again
    mitm.on_update = None
    res = run(real, pem_pilot(real, mitm.url, wd, "--max-jobs", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recovered jobs" in res.stderr
    assert job_of(real, task_id)["jobStatus"] == "finished"
    assert real.user.task_details(task_id)["status"] == "done"
    assert not list(wd.glob("panda_job_*"))


def test_a_busy_server_cannot_hold_the_final_report_past_the_wall_time(real, mitm, tmp_path):
    """Every final updateJob gets 503 with ``Retry-After: 3600``, and the pilot's policy would
    try ten times (each wait capped at 60-90 s: ~10 minutes). Its wall time ends 20 s after its
    start: the report's retries end at that less ``--exit-time``, the report is kept on disk
    (not lost mid-report to the batch system's kill), and a later pilot delivers it."""
    import time

    task_id = submit(real, "busy", "-c 'echo result > ${OUT}'", walltime_s=5)
    finals = []

    def busy(form):
        if form.get("state") in ("finished", "failed"):
            finals.append(time.time())
            return 503, {"success": False, "message": "busy"}, {"Retry-After": "3600"}
        return None
    mitm.on_update = busy
    wd = tmp_path / "wd"
    t0 = time.time()
    res = run(real, pem_pilot(real, mitm.url, wd, "--max-jobs", "1", "--walltime", "20",
                              "--reserve", "8", "--exit-time", "4", "--server-retries", "10"))
    took = time.time() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert finals, res.stderr[-3000:]
    assert took < 20 and finals[-1] < t0 + 16.5, "the retries ended by wall time less --exit-time"
    assert "was reached after" in res.stderr and "Retry-After 3600 s" in res.stderr
    [kept] = wd.glob("panda_job_*")
    assert json.loads((kept / "pilot_state.json").read_text())["phase"] == "final_pending"
    mitm.on_update = None
    res = run(real, pem_pilot(real, mitm.url, wd, "--max-jobs", "1"))
    assert "recovered jobs" in res.stderr, res.stderr[-3000:]
    assert job_of(real, task_id)["jobStatus"] == "finished"


# ------------------------------------------------------------------ 8. the payload's environment
def payload_env(server, task_id: int) -> dict[str, str]:
    """The environment the job's payload saw (it wrote ``env`` into its output)."""
    job = job_of(server, task_id)
    out = next(f for f in job["Files"] if f["type"] == "output")
    text = (server.se / replica_path(out["scope"], out["lfn"])).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_payload_environment_keeps_the_pilots_secrets(real, tmp_path):
    secrets = {"MY_API_KEY": "k-123", "S3_ACCESS_KEY": "s3-456", "MYSQL_PWD": "pw-789",
               "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock",
               "APP_DB": "postgresql://panda:db-secret-000@db.example:5432/panda"}
    task_id = submit(real, "env", "-c 'env > ${OUT}'")
    res = run(real, pem_pilot(real, real.url, tmp_path / "wd", "--max-jobs", "1"),
              env={**secrets, "LANG": "C.UTF-8"})
    assert res.returncode == 0, res.stderr[-3000:]
    env = payload_env(real, task_id)
    for name, value in secrets.items():
        assert name not in env and value not in "\n".join(env.values()), name
    assert env["LANG"] == "C.UTF-8" and env["PANDA_ID"] == str(job_of(real, task_id)["PandaID"])
    assert "PATH" in env and "HOME" in env


def test_payload_environment_adds_what_the_site_names(real, tmp_path):
    task_id = submit(real, "env2", "-c 'env > ${OUT}'")
    res = run(real, pem_pilot(real, real.url, tmp_path / "wd", "--max-jobs", "1",
                              "--payload-env", "FRONTIER_SERVER", "--payload-env", "SITE_*"),
              env={"FRONTIER_SERVER": "http://frontier:8000", "SITE_AREA": "/sw",
                   "OTHER_SETTING": "x"})
    assert res.returncode == 0, res.stderr[-3000:]
    env = payload_env(real, task_id)
    assert env["FRONTIER_SERVER"] == "http://frontier:8000" and env["SITE_AREA"] == "/sw"
    assert "OTHER_SETTING" not in env


def test_token_public_key_prints_the_key_to_pin(real):
    """What an admin pins at deployment comes from the server's key dir, not from the network."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "panda_wms.cli", "token", "public-key",
                               "--key-dir", str(real.key_dir), *args], check=True,
                              capture_output=True, text=True).stdout
    assert cli() == real.public_key_file().read_text()
    assert cli("--fingerprint").strip() == real.key_fingerprint()
