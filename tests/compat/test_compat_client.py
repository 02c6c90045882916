"""PanDA's own client (PyPI panda-client 2.x, unmodified) does round trips against /api/v1."""
from __future__ import annotations

import ast
import json
import subprocess
import zlib
from pathlib import Path


from compatkit import SITE
from panda_core.client import ApiClient
from server.api_panda import FILE_ATTRIBUTES, JOB_ATTRIBUTES

SCRIPT = Path(__file__).with_name("pandaclient_roundtrip.py")


def run_client(venv: Path, server, token: str, *args: str, extra_env: dict | None = None) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(server.tmp), "PANDA_CONFIG_ROOT": str(server.tmp),
           "PANDA_URL_SSL": server.url + "/server/panda", "PANDA_URL": server.url + "/server/panda",
           "PANDACACHE_URL": server.url + "/server/panda",
           "PANDA_BEHIND_REAL_LB": "1",      # else the client resolves a CERN host (offline here)
           "PANDA_AUTH": "oidc", "PANDA_AUTH_VO": "panda-wms", "PANDA_AUTH_ID_TOKEN": token,
           **(extra_env or {})}
    proc = subprocess.run([str(venv / "bin" / "python"), str(SCRIPT), SITE, *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _declared(path: Path) -> tuple[str, ...]:
    """The ``_attributes`` tuple a pandaclient spec module declares, read without importing it."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_attributes"
                                                for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"no _attributes in {path}")


def test_spec_attribute_order_matches_installed_client(compat_venv):
    """job/submit decodes positional lists in the order the installed client declares."""
    site_packages = next((compat_venv / "lib").glob("python3*/site-packages"))
    assert _declared(site_packages / "pandaclient" / "JobSpec.py") == JOB_ATTRIBUTES
    assert _declared(site_packages / "pandaclient" / "FileSpec.py") == FILE_ATTRIBUTES


def test_client_jobs_roundtrip(site_server, compat_venv):
    alice = site_server.token("user", "alice")
    res = run_client(compat_venv, site_server, alice, "jobs")
    assert res["hello"][0] == 0
    status, ids = res["submit"]
    assert status == 0 and len(ids) == 2
    assert all(isinstance(i[0], int) and i[1] == 7 and "jobsetID" in i[2] for i in ids)
    # one call, one jobset (as in panda-server): both jobs in one task
    assert ids[0][2]["jobsetID"] == ids[1][2]["jobsetID"]
    status, jobs = res["status"]
    assert status == 0 and jobs[2] is None                    # unknown id -> None
    for job, n in zip(jobs[:2], (1, 2)):
        assert job["jobStatus"] == "activated" and job["computingSite"] == SITE
        assert job["prodUserName"] == "alice" and job["transformation"] == "/bin/sh"
        assert job["jobParameters"] == "-c 'echo hi > out.txt'"
        assert [f"compat.{n}.out", "output"] in job["files"]
        assert job["jobsetID"] == ids[0][2]["jobsetID"]
    assert res["kill"] == [0, [True]]
    assert res["after_kill"] == [0, ["cancelled", "activated"]]
    # what the client sent is stored as ours: the job's owner, priority, resources
    mine = ApiClient(site_server.url, alice)
    row = mine.call("job", "get_description", "POST", job_ids=[ids[1][0]])[0]
    assert (row["owner"], row["priority"], row["memory_mb"], row["walltime_s"]) == \
        ("alice", 900, 200, 120)


def test_client_task_roundtrip_and_ownership(site_server, compat_venv):
    alice = site_server.token("user", "alice")
    mine = ApiClient(site_server.url, alice)
    data = b"input\n"
    mine.add_files("compat.in", "compat", [{"lfn": f"in.{i}", "fsize": len(data),
                                            "checksum": f"ad:{zlib.adler32(data):08x}"}
                                           for i in range(2)], "LOCAL_SE")
    task = {"name": "compat-task", "scope": "compat", "transformation": "/bin/sh",
            "job_parameters": "-c 'cat ${IN} > ${OUT}'", "input_dataset": "compat.in",
            "output_dataset": "compat.out", "outputs": ["ct.${SN}.out"], "site": SITE}
    res = run_client(compat_venv, site_server, alice, "task",
                     extra_env={"COMPAT_TASK": json.dumps(task)})
    status, code, message = res["insert"]
    assert status == 0 and code == 0 and f"jediTaskID={res['task_id']}" in message
    task_id = res["task_id"]
    assert res["status"] == [0, "ready"]
    assert res["params"][0] == 0 and res["params"][1]["name"] == "compat-task"
    status, ids = res["ids"]
    assert status == 0 and len(ids) == 2
    assert res["details"][0] == 0 and res["details"][1]["jediTaskID"] == task_id
    assert res["details"][1]["taskParams"]["input_dataset"] == "compat.in"
    assert res["since"] == [0, [str(task_id)]]
    status, datasets = res["files"]
    assert status == 0 and datasets[0]["dataset"]["name"] == "compat.in"
    assert sorted(f["lfn"] for f in datasets[0]["files"]) == ["in.0", "in.1"]
    assert res["kill"] == [0, [True, 0]]
    assert res["status_after_kill"] == [0, "aborted"]


def test_client_cannot_kill_others(site_server, compat_venv):
    """bob may not kill alice's task or jobs, through PanDA's own client either."""
    alice = ApiClient(site_server.url, site_server.token("user", "alice"))
    task_id = alice.submit_task({"name": "mine", "transformation": "/bin/true", "n_jobs": 1,
                                 "site": SITE})
    (job_id,) = alice.call("task", "get_job_ids", task_id=task_id)
    bob = site_server.token("user", "bob")
    res = run_client(compat_venv, site_server, bob, "kill_other", str(task_id), str(job_id))
    assert res["kill_task"][1][0] is False and "alice" in res["kill_task"][1][1]
    assert res["kill_jobs"] == [0, [False]]
    assert alice.call("job", "get_description", "POST", job_ids=[job_id])[0]["jobStatus"] == \
        "activated"


def test_client_sandbox_upload_and_download(site_server, compat_venv, tmp_path):
    sandbox = site_server.tmp / "sources.compat-1234.tar.gz"
    sandbox.write_text("sandbox bytes\n")
    res = run_client(compat_venv, site_server, site_server.token("user", "alice"), "files",
                     str(sandbox))
    assert res["put"] == [0, "True"]
    assert res["get"] == [0, True]
    assert res["back"] == "sandbox bytes\n"
    assert (site_server.tmp / "cache" / sandbox.name).read_text() == "sandbox bytes\n"
