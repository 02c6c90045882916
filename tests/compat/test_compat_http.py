"""The pilot protocol and the API over real HTTP: reply encodings, hostile and malformed input,
the body size limit. Bad requests get a clear reason and change nothing; nothing answers 500."""
from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
import requests

from compatkit import SITE
from panda_core.client import ApiClient

TASK = {"name": "h", "transformation": "/bin/true", "n_jobs": 2, "site": SITE}


def post(server, method, token=None, accept="application/json", **kw):
    headers = {"Accept": accept} if accept else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(kw.pop("headers", {}))
    return requests.post(f"{server.url}/server/panda/{method}", headers=headers, timeout=10, **kw)


def history(client, job_id):
    return [h["new_status"] for h in client.call("job", "get_history", job_id=job_id)]


def test_reply_is_json_when_accept_asks_else_urlencoded(site_server):
    token = site_server.token("pilot", "p", site=SITE)
    ApiClient(site_server.url, site_server.token("user", "u")).submit_task(TASK)
    resp = post(site_server, "getJob", token, data={"siteName": SITE})
    assert resp.headers["Content-Type"].startswith("application/json")
    job = resp.json()
    assert job["StatusCode"] == 0 and isinstance(job["PandaID"], int)
    resp = post(site_server, "getJob", token, accept=None, data={"siteName": SITE})
    assert resp.headers["Content-Type"].startswith("text/plain")
    fields = dict(urllib.parse.parse_qsl(resp.text, keep_blank_values=True))
    assert fields["StatusCode"] == "0" and int(fields["PandaID"]) != job["PandaID"]
    assert fields["inFiles"] == "" and fields["logFile"].endswith(".job.log.tgz")
    # a JSON request body is read like a form
    resp = post(site_server, "updateJob", token, json={"jobId": job["PandaID"], "state": "running",
                                                        "attemptNr": 1})
    assert resp.json() == {"StatusCode": 0, "command": "NULL"}
    # several jobs at once
    resp = post(site_server, "getJob", token, data={"siteName": SITE, "nJobs": "5"})
    assert resp.json()["StatusCode"] == 20     # both jobs were already taken


HOSTILE = ["", "NULL", "-1", "1e309", "nan", "9" * 30, "1,99999999999999999999999", "x" * 100_000, "../../etc/passwd", "\x00\x01",
           "é\u202e", "[1,2]", '{"a": 1}', "1;DROP TABLE jobs", "%s%s%n"]


def test_unknown_and_hostile_form_values_never_500(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "u"))
    task_id = user.submit_task(TASK)
    token = site_server.token("pilot", "p", site=SITE)
    job = post(site_server, "getJob", token, data={"siteName": SITE}).json()
    before = history(user, job["PandaID"])
    keys = ["jobId", "state", "attemptNr", "xml", "pilotErrorCode", "cpuConsumptionTime",
            "maxRSS", "nEvents", "siteName", "nJobs", "mem", "node", "ids", "pandaID", "nRanges",
            "eventRanges", "no such key", "日本"]
    codes = set()
    for method in ("getJob", "updateJob", "getStatus", "getEventRanges", "updateEventRanges"):
        for key in keys:
            for value in HOSTILE:
                form = {"siteName": SITE, "jobId": str(job["PandaID"]), "state": "bogus", key: value}
                resp = post(site_server, method, token, data=form)
                assert resp.status_code == 200, (method, key, value, resp.text[:200])
                codes.add(resp.json()["StatusCode"])
        # repeated keys and JSON values of every type
        resp = post(site_server, method, token, data=[("jobId", "1"), ("jobId", "2")])
        assert resp.status_code == 200
        for value in (None, True, 3.5, [1], {"x": [1]}):
            resp = post(site_server, method, token, json={"jobId": value, "state": value,
                                                          "siteName": value, "xml": value})
            assert resp.status_code == 200 and "StatusCode" in resp.json()
    assert codes <= {0, 20, 30, 70, 80}
    # none of that moved the job (a getJob with a valid siteName may hand out the other one)
    assert history(user, job["PandaID"]) == before
    assert user.task_details(task_id)["jobs"] in ({"activated": 1, "sent": 1}, {"sent": 2})
    assert "Traceback" not in site_server.log()


def test_malformed_requests_get_clear_reasons_and_change_nothing(site_server):
    user = ApiClient(site_server.url, site_server.token("user", "u"))
    user.submit_task(TASK)
    token = site_server.token("pilot", "p", site=SITE)
    job = post(site_server, "getJob", token, data={"siteName": SITE}).json()
    pid = job["PandaID"]
    before = history(user, pid)
    cases = [
        ({"state": "running"}, 80, "jobId is missing"),
        ({"jobId": "abc", "state": "running"}, 30, "jobId must be a number"),
        ({"jobId": pid}, 80, "state is missing"),
        ({"jobId": pid, "state": "exploded"}, 30, "not one a pilot may report"),
        ({"jobId": pid, "state": "finished", "xml": "<xml/>"}, 30, "xml must be a JSON object"),
        ({"jobId": pid, "state": "finished", "xml": '{"f": {"fsize": "big"}}'}, 30,
         "fsize of f must be a whole number of bytes"),
        ({"jobId": pid, "state": "running", "pilotErrorCode": "oops"}, 30,
         "pilotErrorCode must be a number"),
    ]
    for form, code, reason in cases:
        reply = post(site_server, "updateJob", token, data=form).json()
        assert reply["StatusCode"] == code and reason in reply["errorDialog"], (form, reply)
    assert history(user, pid) == before
    reply = post(site_server, "getJob", token, data={}).json()
    assert reply == {"StatusCode": 80, "errorDialog": "siteName is missing"}
    # a broken JSON body
    resp = post(site_server, "updateJob", token, data=b'{"jobId": ',
                headers={"Content-Type": "application/json", "Accept": "application/json",
                         "Authorization": f"Bearer {token}"})
    assert resp.status_code == 200 and "not valid JSON" in resp.json()["errorDialog"]
    resp = post(site_server, "noSuchMethod", token, data={})
    assert resp.status_code == 404 and "noSuchMethod" in resp.json()["errorDialog"]
    # the API: 4xx or success=false with the reason, never a 500
    api = f"{site_server.url}/api/v1"
    auth = {"Authorization": f"Bearer {site_server.token('user', 'u')}"}
    resp = requests.post(f"{api}/task/submit", data=b"{nope", timeout=5,
                         headers={**auth, "Content-Type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["message"]
    resp = requests.post(f"{api}/job/kill", json={"job_ids": ["x"]}, headers=auth, timeout=5)
    assert resp.json() == {"success": False, "message": "parameter 'job_ids': 'x' is not an "
                           "integer (64-bit)", "data": None}
    resp = requests.post(f"{api}/job/submit", json={"jobs": "[[1, 2]]"}, headers=auth, timeout=5)
    assert resp.json()["success"] is False and "JobSpec values" in resp.json()["message"]
    resp = requests.post(f"{api}/task/submit", json={"task_parameters": {**TASK, "bad": 1}},
                         headers=auth, timeout=5)
    assert resp.json()["success"] is False and "unknown field(s) 'bad'" in resp.json()["message"]
    resp = requests.get(f"{api}/nosuch/method", timeout=5)
    assert resp.status_code == 403
    # files registered with sizes and checksums that are not
    for bad, reason in (({"fsize": "big"}, "fsize must be"), ({"fsize": -1}, "fsize must be"),
                        ({"checksum": "ad:zz"}, "checksum must be"),
                        ({"guid": ["x"]}, "guid must be")):
        resp = requests.post(f"{api}/data/add_files", headers=auth, timeout=5, json={
            "dataset": "d.in", "scope": "d", "files": [{"lfn": "f1", **bad}]})
        assert resp.json()["success"] is False and reason in resp.json()["message"], bad
    assert user.call("data", "list_files", dataset="d.in") == []
    # output names that would leave a directory, from a task or from a client JobSpec
    for outputs in (["../evil"], ["a/b.${SN}"], [".hidden"]):
        resp = requests.post(f"{api}/task/submit", headers=auth, timeout=5, json={
            "task_parameters": {**TASK, "outputs": outputs, "output_dataset": "d"}})
        assert resp.status_code == 200 and resp.json()["success"] is False
        assert "refusing output file name" in resp.json()["message"]
    from server.api_panda import FILE_ATTRIBUTES, JOB_ATTRIBUTES
    job = ["NULL"] * len(JOB_ATTRIBUTES)
    job[JOB_ATTRIBUTES.index("transformation")] = "/bin/true"
    out = ["NULL"] * len(FILE_ATTRIBUTES)
    out[FILE_ATTRIBUTES.index("lfn")], out[FILE_ATTRIBUTES.index("type")] = "../../x", "output"
    resp = requests.post(f"{api}/job/submit", headers=auth, timeout=5,
                         json={"jobs": json.dumps([job + [[out]]])})
    assert resp.json()["success"] is False and "refusing output file name" in resp.json()["message"]
    # the second job's site is unknown, its priority too large: nothing of the call is created
    good = list(job)
    other = list(job)
    other[JOB_ATTRIBUTES.index("computingSite")] = "NOWHERE"
    huge = list(job)
    huge[JOB_ATTRIBUTES.index("assignedPriority")] = 2**70
    for second, reason in ((other, "unknown computingSite 'NOWHERE'"),
                           (huge, "assignedPriority must be an integer")):
        resp = requests.post(f"{api}/job/submit", headers=auth, timeout=5,
                             json={"jobs": json.dumps([good + [[]], second + [[]]])})
        assert resp.json()["success"] is False and reason in resp.json()["message"]
    assert [t["taskName"] for t in user.call("task", "list")] == ["h"]   # nothing else made
    assert "Traceback" not in site_server.log()



API_KEYS = ["task_id", "job_id", "job_ids", "site", "since", "dn", "limit", "status", "dataset",
            "scope", "files", "sites", "task_parameters", "jobs", "factory", "pilots",
            "ddm_endpoint", "share", "shares", "values", "min_task_id", "dataset_types", "owner",
            "include_parameters", "name", "prod_source_label", "parent_tid", "newest",
            "with_counts", "walltime_s", "memory_mb", "cores"]
API_HOSTILE = [None, True, -1, 2**70, 1e308, 0.5, "x" * 1000, "../..", [1, "a"],
               {"a": {"b": [None]}}, "1e309", "", "NULL", [[]]]


@pytest.mark.slow
def test_every_api_method_survives_hostile_parameters(site_server):
    """Every /api/v1 method, as admin, with hostile values in every parameter: a reason, not a
    500 (found: 64-bit overflows, whole-number floats, repeated query keys)."""
    from server.apibase import registry
    from server.app import API_MODULES

    user = ApiClient(site_server.url, site_server.token("user", "u"))
    user.submit_task(TASK)
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {site_server.token('admin', 'root')}"
    failures = []

    def call(verb, module, name, params):
        url = f"{site_server.url}/api/v1/{module}/{name}"
        if verb == "POST":
            resp = http.post(url, json=params, timeout=10)
        else:
            resp = http.get(url, params={k: (v if isinstance(v, (str, int, float, list))
                                             else json.dumps(v))
                                         for k, v in params.items() if v is not None},
                            timeout=10)
        if resp.status_code >= 500 or "success" not in resp.json():
            failures.append((verb, module, name, str(params)[:80], resp.status_code))

    for (module, name), method in sorted(registry(API_MODULES).items()):
        if (module, name) in (("task", "kill"), ("site", "sync"), ("shares", "set")):
            continue   # valid values would change the fixtures for the others; tested elsewhere
        for verb in method.http:
            for value in API_HOSTILE:
                call(verb, module, name, dict.fromkeys(API_KEYS, value))
            for key in API_KEYS:
                for value in (2**70, 1e308, [1, "a"], {"a": 1}):
                    call(verb, module, name, {key: value})
    assert failures == []
    assert "Traceback" not in site_server.log()
    assert [t["taskName"] for t in user.call("task", "list")] == ["h"]

def test_request_body_size_limit(site_server):
    from server.app import MAX_BODY_BYTES

    token = site_server.token("pilot", "p", site=SITE)
    big = b"x=" + b"y" * MAX_BODY_BYTES
    resp = post(site_server, "updateJob", token, data=big,
                headers={"Content-Type": "application/x-www-form-urlencoded",
                         "Authorization": f"Bearer {token}"})
    assert resp.status_code == 413
    assert f"limit of {MAX_BODY_BYTES} bytes" in resp.json()["errorDialog"]
    resp = requests.post(f"{site_server.url}/api/v1/task/submit", data=big, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["success"] is False
    # the server is fine afterwards, and a body just under the limit is read
    under = {"siteName": SITE, "padding": "z" * (MAX_BODY_BYTES // 2)}
    assert post(site_server, "getJob", token, data=under).json()["StatusCode"] == 20


def test_sandbox_cache_refuses_bad_names_and_overwrites(site_server):
    url = f"{site_server.url}/api/v1/file_server/upload_cache_file"
    alice = {"Authorization": f"Bearer {site_server.token('user', 'alice')}"}
    bob = {"Authorization": f"Bearer {site_server.token('user', 'bob')}"}
    for name in (".hidden", "-rf", "", "a" * 300, "x\x00y"):
        resp = requests.post(url, files={"file": (name, b"x")}, headers=alice, timeout=5)
        assert resp.status_code == 400 and resp.json()["success"] is False, name
    # a path in the upload's file name: only its last part names the cached file
    for name in ("../../evil", "/etc/evil2"):
        resp = requests.post(url, files={"file": (name, b"x")}, headers=alice, timeout=5)
        assert resp.json()["success"] is True
    cache = site_server.tmp / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["evil", "evil2"]
    assert not (site_server.tmp / "evil").exists() and not Path("/etc/evil2").exists()
    resp = requests.post(url, files={"file": ("sources.a.tgz", b"one")}, timeout=5)
    assert resp.json()["success"] is False and "secure connection" in resp.json()["message"]
    resp = requests.post(url, files={"file": ("sources.a.tgz", b"one")}, headers=alice, timeout=5)
    assert resp.json()["success"] is True
    resp = requests.post(url, files={"file": ("sources.a.tgz", b"two")}, headers=bob, timeout=5)
    assert resp.json()["success"] is False and "exists" in resp.json()["message"]
    assert requests.get(f"{site_server.url}/cache/sources.a.tgz", timeout=5).content == b"one"
    assert requests.get(f"{site_server.url}/cache/nothing.here", timeout=5).status_code == 404
    assert requests.get(f"{site_server.url}/cache/..%2fkeys%2ftoken-es256.pem",
                        timeout=5).status_code in (400, 404)
    resp = requests.post(url, files={"file": ("p.tgz", b"x")}, timeout=5,
                         headers={"Authorization": f"Bearer {site_server.token('pilot', 'p')}"})
    assert resp.status_code == 403
