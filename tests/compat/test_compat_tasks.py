"""JEDI task parameters: the dict prun builds (PyPI panda-client, unmodified, asked for its task
parameters with --noSubmit) goes through panda-client's own insertTaskParams and becomes a task
of ours; refusals carry PanDA's codes. One server for the module."""
from __future__ import annotations

import json
import shlex
import os
import sys
import subprocess
import zlib
from pathlib import Path

import pytest
import requests

from compatkit import SITE
from panda_core.client import ApiClient
from server.jeditask import task_from_jedi
from server.jobcreator import TaskSpec, TaskSpecError
from testkit import EXAMPLE_SITES, start_server, stop_server

PRUN_PROBE = """
import json, sys
from pandaclient import PrunScript
params = PrunScript.main(get_taskparams=True, ext_args=sys.argv[1:])
print("TASKPARAMS:" + json.dumps(params))
"""
SUBMIT_PROBE = """
import json, sys
from pandaclient import Client
print("RESULT:" + json.dumps(Client.insertTaskParams(json.load(sys.stdin), properErrorCode=True)))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jedi")
    sites = tmp / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    srv = start_server(tmp / "srv", site_dir=sites, env={"PANDA_SE_ROOT": str(tmp / "se"),
                                                         "PANDA_CACHE_DIR": str(tmp / "cache")})
    srv.tmp = tmp
    data = b"input\n"
    alice = ApiClient(srv.url, srv.token("user", "alice"))
    alice.add_files("user.alice.in", "user.alice",
                    [{"lfn": f"in.{i}", "fsize": len(data),
                      "checksum": f"ad:{zlib.adler32(data):08x}"} for i in range(3)], "LOCAL_SE")
    alice.add_files("user.alice.in2", "user.alice", [{"lfn": "in2.0", "fsize": len(data),
                    "checksum": f"ad:{zlib.adler32(data):08x}"}], "LOCAL_SE")
    yield srv
    stop_server(srv)


def _env(server, token: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": str(server.tmp), "PANDA_CONFIG_ROOT": str(server.tmp),
            "PANDA_URL_SSL": server.url + "/server/panda", "PANDA_URL": server.url + "/server/panda",
            "PANDACACHE_URL": server.url + "/server/panda", "PANDA_BEHIND_REAL_LB": "1",
            "PANDA_AUTH": "oidc", "PANDA_AUTH_VO": "panda-wms", "PANDA_AUTH_ID_TOKEN": token}


def prun_task_parameters(venv: Path, server, workdir: Path, *args: str) -> dict:
    """What prun would send for ``args``: its own task parameters (--noSubmit, nothing sent)."""
    workdir.mkdir(exist_ok=True)
    (workdir / "run.sh").write_text("cat \"$@\" > out.txt\n")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", PRUN_PROBE, *args, "--noSubmit"],
                          env=_env(server, server.token("user", "alice")), cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TASKPARAMS:")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("TASKPARAMS:"):])


def insert_task_params(venv: Path, server, params: dict, user: str = "alice") -> list:
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", SUBMIT_PROBE],
                          input=json.dumps(params), env=_env(server, server.token("user", user)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")][-1]
    return json.loads(line[len("RESULT:"):])


@pytest.fixture(scope="module")
def prun_params(server, compat_venv):
    return prun_task_parameters(compat_venv, server, server.tmp / "work", "--exec",
                                "sh run.sh %IN", "--outDS", "user.alice.jedi1",
                                "--inDS", "user.alice.in", "--noBuild", "--outputs", "out.txt",
                                "--nFilesPerJob", "2", "--site", SITE)


def test_prun_task_becomes_a_task_with_panda_codes(server, compat_venv, prun_params):
    status, (code, message) = insert_task_params(compat_venv, server, prun_params)
    assert (status, code) == (0, 0) and "jediTaskID=" in message, message
    task_id = int(message.split("jediTaskID=")[1].split()[0])
    alice = ApiClient(server.url, server.token("user", "alice"))
    details = alice.call("task", "get_details", task_id=task_id, include_parameters=True)
    assert details["taskName"] == "user.alice.jedi1" and details["owner"] == "alice"
    params = details["taskParams"]
    assert params["jedi_parameters"] == prun_params          # kept as sent
    assert (params["input_dataset"], params["output_dataset"], params["scope"]) == \
        ("user.alice.in", "user.alice.jedi1_out.txt", "user.alice")
    # 3 files, 2 per job: 2 jobs; outputs named as prun's template says, in the user's dataset
    ids = alice.call("task", "get_job_ids", task_id=task_id)
    jobs = alice.call("job", "get_description", "POST", job_ids=ids)
    assert len(jobs) == 2
    first = jobs[0]
    outs = [f for f in first["Files"] if f["type"] == "output"]
    assert [f["lfn"] for f in outs] == [f"user.alice.{task_id}._000001.out.txt"]
    assert outs[0]["dataset"] == "user.alice.jedi1_out.txt"
    assert sorted(f["lfn"] for f in first["Files"] if f["type"] == "input") == ["in.0", "in.1"]
    # runGen's part as a script of ours: the sandbox from the cache, the user's command with
    # %IN filled, its output renamed to the lfn
    assert first["transformation"] == "/bin/sh"
    script = shlex.split(first["jobParameters"])[1]
    assert "/cache/jobO." in script and "tar -xzf jobO." in script
    assert "sh -c 'sh run.sh in.0,in.1'" in script
    assert f"mv -f out.txt \"$top\"/'user.alice.{task_id}._000001.out.txt'" in script
    assert first["prodSourceLabel"] == "user" and first["computingSite"] == SITE
    # the same unique task name again while the first one lives: JEDI's duplication code
    status, (code, message) = insert_task_params(compat_venv, server, prun_params)
    assert (status, code) == (0, 2) and f"jediTaskID={task_id}" in message


@pytest.mark.parametrize("change,code,words", [
    ({"buildSpec": {"archiveName": "a.tgz", "jobParameters": "-i x"}}, 4, "build step"),
    ({"jobParameters": "not a list"}, 4, "jobParameters"),
    ({"nFilesPerJob": "two"}, 4, "nFilesPerJob"),
    ({"dsForIN": "user.alice.nothing"}, 4, "names 'user.alice.nothing'"),
    ({"site": "NO_SUCH_SITE"}, 4, "unknown site"),
])
def test_refusals_carry_panda_codes_and_reasons(server, compat_venv, prun_params, change, code,
                                                words):
    params = {**prun_params, **change, "taskName": "user.alice.refused/"}
    status, (got, message) = insert_task_params(compat_venv, server, params)
    assert (status, got) == (0, code) and words in message, message
    assert "Traceback" not in server.log()


def test_fields_without_a_meaning_here_are_kept_not_refused(server, compat_venv, prun_params):
    items = [{**i, "dataset": "user.alice.in2"} if i.get("param_type") == "input" else i
             for i in prun_params["jobParameters"]]
    params = {**prun_params, "taskName": "user.alice.extra/", "dsForIN": "user.alice.in2",
              "jobParameters": items, "noEmail": True, "skipScout": True,
              "someFutureKnob": {"a": [1, 2]}, "excludedSite": ["X"], "cloud": "WORLD"}
    status, (code, message) = insert_task_params(compat_venv, server, params)
    assert (status, code) == (0, 0), message
    task_id = int(message.split("jediTaskID=")[1].split()[0])
    alice = ApiClient(server.url, server.token("user", "alice"))
    kept = alice.call("task", "get_details", task_id=task_id,
                      include_parameters=True)["taskParams"]["jedi_parameters"]
    assert kept["someFutureKnob"] == {"a": [1, 2]} and kept["noEmail"] is True


def test_no_input_and_event_splitting_translate():
    base = {"taskName": "user.bob.gen/", "prodSourceLabel": "user", "noInput": True,
            "transPath": "/usr/bin/env",
            "nEvents": 100, "nEventsPerJob": 30, "coreCount": 2, "ramCount": 1000,
            "ramCountUnit": "MBPerCore", "maxAttempt": 5, "currentPriority": 900,
            "jobParameters": [
                {"type": "constant", "value": "gen.sh --seed ${SN}"},
                {"type": "template", "param_type": "output", "value": "out.$JEDITASKID.${SN/P}.root",
                 "dataset": "user.bob:user.bob.gen_out/"}]}
    task = task_from_jedi(base)
    spec = TaskSpec.from_dict(task)
    assert (spec.n_jobs, spec.cores, spec.memory_mb, spec.max_attempts, spec.priority) == \
        (4, 2, 2000, 5, 900)
    assert spec.outputs == ["out.${TASKID}.${SN}.root"] and spec.scope == "user.bob"
    assert spec.output_dataset == "user.bob.gen_out"
    assert spec.job_parameters == "gen.sh --seed ${SN} ${OUT0}"   # not hidden: on the line
    assert spec.transformation == "/usr/bin/env"
    # without transPath the jobs run runGen: its options only
    with pytest.raises(TaskSpecError, match="runGen option 'gen.sh' is not supported"):
        task_from_jedi({k: v for k, v in base.items() if k != "transPath"})
    split = {**base, "noInput": False, "dsForIN": "data.x", "nEventsPerInputFile": 50,
             "jobParameters": [{"type": "template", "param_type": "input", "value": "${IN}",
                                "dataset": "data.x"}]}
    spec = TaskSpec.from_dict(task_from_jedi(split))
    assert (spec.input_dataset, spec.events_per_job, spec.events_per_file) == ("data.x", 30, 50)
    for bad, words in (({**split, "nEventsPerInputFile": None}, "nEventsPerInputFile"),
                       ({**base, "jobParameters": [{"type": "template", "param_type": "input",
                                                    "value": "--dbr=${DBR}", "dataset": "d"}]},
                        "${DBR} is not supported"),
                       ({**base, "jobParameters": [{"type": "magic", "value": ""}]}, "type")):
        with pytest.raises(TaskSpecError, match=words.replace("$", r"\$")
                           .replace("{", r"\{").replace("}", r"\}")):
            task_from_jedi(bad)


# ---------------------------------------------------------------------- pbook, unmodified
def pbook(venv: Path, server, user: str, snippet: str) -> subprocess.CompletedProcess:
    """``pbook -c SNIPPET`` as a user runs it: the venv active, panda_setup.sh sourced."""
    script = (f'. "{venv}/bin/activate" && . "{venv}/etc/panda/panda_setup.sh" && '
              f'export PANDA_CONFIG_ROOT="{server.tmp}" && exec pbook -c "$0"')
    return subprocess.run(["bash", "-c", script, snippet],
                          env=_env(server, server.token("user", user)), capture_output=True,
                          text=True, timeout=120, cwd=server.tmp)


def show(venv: Path, server, user: str) -> dict[int, dict]:
    """The tasks ``show()`` finds for ``user``, by jediTaskID."""
    done = pbook(venv, server, user, "import json; print('SHOWN:' + json.dumps("
                                     "show(format='json'), default=str))")
    assert done.returncode == 0, done.stdout + done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("SHOWN:")][-1]
    return {t["jediTaskID"]: t for t in json.loads(line[len("SHOWN:"):])}


def test_pbook_shows_kills_and_retries_a_task(server, compat_venv):
    alice = ApiClient(server.url, server.token("user", "alice"))
    task_id = alice.submit_task({"name": "pbook-task", "transformation": "/bin/true",
                                 "n_jobs": 2, "site": SITE})
    listed = show(compat_venv, server, "alice")
    assert listed[task_id]["taskName"] == "pbook-task" and listed[task_id]["status"] == "ready"
    # the table pbook prints for a person has the task in it
    table = pbook(compat_venv, server, "alice", "show()")
    assert table.returncode == 0 and "pbook-task" in table.stdout, table.stdout + table.stderr
    # bob's pbook neither sees nor kills alice's task
    assert task_id not in show(compat_venv, server, "bob")
    killed = pbook(compat_venv, server, "bob", f"kill({task_id})")
    assert alice.task_details(task_id)["status"] == "ready", killed.stdout + killed.stderr
    # alice kills it: every job cancelled, the task aborted
    killed = pbook(compat_venv, server, "alice", f"kill({task_id})")
    assert killed.returncode == 0, killed.stdout + killed.stderr
    details = alice.task_details(task_id)
    assert details["status"] == "aborted" and details["jobs"] == {"cancelled": 2}
    # and retries it: each cancelled job gets a new attempt, the task is ready again
    retried = pbook(compat_venv, server, "alice", f"retry({task_id})")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    details = alice.task_details(task_id)
    assert details["status"] == "ready" and details["jobs"] == {"cancelled": 2, "activated": 2}
    jobs = alice.call("job", "get_description", "POST",
                      job_ids=alice.call("task", "get_job_ids", task_id=task_id))
    assert sorted(j["attemptNr"] for j in jobs) == [1, 1, 2, 2]
    # a running task is not retried; nor is someone else's (PanDA's codes 4 and 3)
    resp = requests.post(f"{server.url}/api/v1/task/retry", json={"task_id": task_id},
                         headers={"Authorization": f"Bearer {server.token('user', 'alice')}"},
                         timeout=10).json()
    assert (resp["success"], resp["data"]) == (False, 4) and "only an ended task" in \
        resp["message"]
    resp = requests.post(f"{server.url}/api/v1/task/retry", json={"task_id": task_id},
                         headers={"Authorization": f"Bearer {server.token('user', 'bob')}"},
                         timeout=10).json()
    assert (resp["success"], resp["data"]) == (False, 3)
    assert "Traceback" not in server.log()


CLIENT_PROBE = """
import json, sys
from pandaclient import Client
print("RESULT:" + json.dumps([getattr(Client, call)(int(sys.argv[1])) for call in sys.argv[2:]]))
"""


def client_calls(venv: Path, server, user: str, task_id: int, *calls: str) -> list:
    """``Client.<call>(task_id)`` for each call, in the compat venv as ``user``: the replies
    as the client returns them (status, (ok, data or message))."""
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", CLIENT_PROBE, str(task_id),
                           *calls], env=_env(server, server.token("user", user)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")][-1]
    return json.loads(line[len("RESULT:"):])


def test_pbook_finishes_and_debugs_and_the_client_pauses_and_resumes(server, compat_venv):
    """pbook's ``finish(N)``, ``finish(N, soft=True)``, ``debug(PandaID, True)`` and the
    client's ``pauseTask``/``resumeTask``/``increase_attempt_nr``/``reactivateTask``, unmodified: another user's task
    is refused and nothing changes; a paused task's jobs go to no pilot until it is resumed."""
    alice = ApiClient(server.url, server.token("user", "alice"))
    task_id = alice.submit_task({"name": "pbook-finish", "transformation": "/bin/true",
                                 "n_jobs": 3, "site": SITE})
    # bob's client may not pause alice's task; his pbook may not finish it (PanDA's code 3)
    [(status, (ok, message))] = client_calls(compat_venv, server, "bob", task_id, "pauseTask")
    assert (status, ok) == (0, False) and "belongs to alice" in message
    refused = pbook(compat_venv, server, "bob", f"finish({task_id})")
    assert "ermission denied" in refused.stdout + refused.stderr, refused.stdout
    assert alice.task_details(task_id)["jobs"] == {"activated": 3}
    # alice pauses it: no pilot gets its jobs; pausing again is refused with the reason
    paused, again = client_calls(compat_venv, server, "alice", task_id, "pauseTask",
                                 "pauseTask")
    assert paused == [0, [True, 0]] and again[1][0] is False and "is paused" in again[1][1]
    details = alice.task_details(task_id)
    assert details["status"] == "paused" and details["jobs"] == {"throttled": 3}
    pilot = {"Authorization": f"Bearer {server.token('pilot', 'p', site=SITE)}",
             "Accept": "application/json"}

    def pilot_call(method: str, **form) -> dict:
        return requests.post(f"{server.url}/server/panda/{method}", data=form, headers=pilot,
                             timeout=30).json()

    given = []              # the module's other tasks may have jobs queued there too
    while (reply := pilot_call("getJob", siteName=SITE))["StatusCode"] == 0:
        given.append(reply["jediTaskID"])
    assert reply["StatusCode"] == 20 and task_id not in given
    [(status, (ok, data))] = client_calls(compat_venv, server, "alice", task_id, "resumeTask")
    assert (status, ok, data) == (0, True, 0)
    job = pilot_call("getJob", siteName=SITE)
    assert job["StatusCode"] == 0 and job["jediTaskID"] == task_id
    pilot_call("updateJob", jobId=job["PandaID"], state="running")
    # pbook's debug: the job's pilot is asked for the tail of its payload's stdout
    debug = pbook(compat_venv, server, "alice", f"debug({job['PandaID']}, True)")
    assert debug.returncode == 0 and "'debug': 'tail'" in debug.stdout, debug.stdout
    assert pilot_call("updateJob", jobId=job["PandaID"], state="running")["command"] == "debug"
    debug = pbook(compat_venv, server, "alice", f"debug({job['PandaID']}, False)")
    assert pilot_call("updateJob", jobId=job["PandaID"], state="running")["command"] == "NULL"
    # more attempts for the task's jobs (increase_attempt_nr's own codes: 3 not yours)
    [(status, (ok, data))] = client_calls(compat_venv, server, "alice", task_id,
                                          "increase_attempt_nr")
    assert (status, ok, data) == (0, True, 0)
    assert {j["max_attempts"] for j in alice.jobs(task_id)} == {6}       # 3 + 3
    [(status, (ok, message))] = client_calls(compat_venv, server, "bob", task_id,
                                             "increase_attempt_nr")
    assert (status, ok) == (0, False) and "belongs to alice" in message
    # a soft finish: the queued jobs are cancelled, the running one goes on
    done = pbook(compat_venv, server, "alice", f"finish({task_id}, soft=True)")
    assert done.returncode == 0 and "will be finished soon" in done.stdout, done.stdout
    details = alice.task_details(task_id)
    assert details["status"] == "finishing"
    assert details["jobs"] == {"running": 1, "cancelled": 2}
    # finished hard: the running job is killed, its pilot told; nothing finished: failed
    done = pbook(compat_venv, server, "alice", f"finish({task_id})")
    assert done.returncode == 0 and "will be finished soon" in done.stdout, done.stdout
    assert pilot_call("updateJob", jobId=job["PandaID"], state="running")["command"] == \
        "tobekilled"
    details = alice.task_details(task_id)
    assert details["status"] == "failed" and details["jobs"] == {"cancelled": 3}
    # an ended task is not resumed; reactivateTask is refused with its reason
    resumed, reactivated = client_calls(compat_venv, server, "alice", task_id, "resumeTask",
                                        "reactivateTask")
    assert resumed[1][0] is False and "only a paused task" in resumed[1][1]
    assert reactivated[1][0] is False and "retryTask" in reactivated[1][1]
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------------- prun, unmodified, to done
def test_prun_submits_a_task_that_runs_to_done_on_our_pilots(server, compat_venv, tmp_path):
    """``prun --exec ... --inDS ... --outDS user.alice.<x> --noBuild`` as a user types it: its
    sandbox goes to the cache, its task is made from its JEDI parameters (runGen's part done by
    a script of ours), our pilot runs the jobs, and the outputs are in the user's dataset, on
    the storage element with the registered size and checksum."""
    from panda_core.replicas import replica_path
    from testkit import put_input

    se = server.tmp / "se"
    alice = ApiClient(server.url, server.token("user", "alice"))
    files = [put_input(se, "user.alice", f"data.{i}", f"line {i}\n".encode()) for i in range(2)]
    alice.add_files("user.alice.prunin", "user.alice", files, "LOCAL_SE")
    work = tmp_path / "analysis"
    work.mkdir()
    (work / "count.sh").write_text('for f in $(echo "$1" | tr , " "); do cat "$f"; done '
                                   '| wc -l > counted.txt\n')
    venv = compat_venv
    script = (f'. "{venv}/bin/activate" && . "{venv}/etc/panda/panda_setup.sh" && '
              f'export PANDA_CONFIG_ROOT="{server.tmp}" && exec prun "$@"')
    done = subprocess.run(["bash", "-c", script, "prun", "--exec", "sh count.sh %IN",
                           "--inDS", "user.alice.prunin", "--outDS", "user.alice.counts",
                           "--outputs", "counted.txt", "--nFilesPerJob", "1", "--noBuild",
                           "--site", SITE],
                          env=_env(server, server.token("user", "alice")), cwd=work,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = int(done.stdout.split("jediTaskID=")[1].split()[0]) if "jediTaskID=" in \
        done.stdout else int((done.stdout + done.stderr).split("jediTaskID=")[1].split()[0])
    env = {**os.environ, "PANDA_AUTH_TOKEN": server.token("pilot", "wn-prun", site=SITE)}
    pilot = subprocess.run([sys.executable, "-m", "panda_wms.cli", "pilot", "--server",
                            server.url, "--site", SITE, "--workdir", str(tmp_path / "wn"),
                            "--monitor-interval", "0.2", "--server-backoff", "0.3",
                            "--public-key", str(server.public_key_file())],
                           env=env, capture_output=True, text=True, timeout=240)
    details = alice.task_details(task_id)
    assert details["status"] == "done", (details, pilot.stdout[-3000:], pilot.stderr[-3000:])
    listed = alice.call("data", "list_files", dataset="user.alice.counts_counted.txt")
    assert len(listed) == 2
    for f in listed:
        data = (se / replica_path(f["scope"], f["lfn"])).read_bytes()
        assert data == b"1\n"
        assert f["fsize"] == len(data) and f["checksum"] == f"ad:{zlib.adler32(data):08x}"
        assert f["lfn"].startswith(f"user.alice.{task_id}._0000") and \
            f["lfn"].endswith(".counted.txt")
