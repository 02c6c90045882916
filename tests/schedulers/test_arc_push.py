"""ARC push mode end to end: the real server, the project's HTTP storage element, a real A-REX.

Six jobs go through the driver at once: two that read their input staged in by ARC and write
an output ARC stages out, one whose payload exits 7, one whose input is registered but not on the
storage element (stage-in failure), one whose output is already on it (stage-out refused), and
one that sleeps until the server kills it. The final reports go first to a dead server (kept), then to
the real one by a second driver on the same state dir (a restarted factory). Alongside, in pilot
mode, a real pilot submitted through the arc backend finishes a job of another site.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import yaml

from panda_core.client import ApiClient
from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path, replica_url
from peers import start_se
from schedulers.arc import ArcBackend
from panda_core.client import PilotClient
from schedulers.arc_push import ArcPushDriver, BadJob, parse_job, push_xrsl
from schedulers.base import FINAL_BATCH_STATES, BatchState, PilotSpec, SchedulerError
from testkit import free_port, put_input, start_server, stop_server


SITE = "ARC_PUSH_TEST"
PILOT_SITE = "ARC_PILOT_TEST"
REPO = Path(__file__).resolve().parents[2]
# jobs run as 'nobody' on the test CE, who cannot enter /root where the project's Python lives:
# the pilot runs with Debian's python3 (its requests, psutil, pluggy, stevedore from Debian)
WN_PYTHON = "/usr/bin/python3"
SCOPE = "push"
CE_PATIENCE_S = 300


def site_yaml(se_url: str, ce_options: dict) -> dict:
    return {
        "name": SITE, "region": "nordic", "status": "online",
        "resources": {"cores": 1, "memory_mb": 1000, "max_walltime_s": 3600, "max_disk_mb": 2000},
        "scheduler": {"backend": "arc", "options": {**ce_options, "push": True}},
        "pilots": {"max_queued": 5, "max_running": 5, "rate_per_minute": 60, "walltime_s": 3600},
        "storage": {"input": {"name": "PUSH_SE", "url": se_url},
                    "output": {"name": "PUSH_SE", "url": se_url}},
        "copytools": {"input": {"name": "http", "options": {}},
                      "output": {"name": "http", "options": {}}},
        "direct_read": False,
        "transfer": {"timeout_s": 60, "retries": 1},
        "limits": {"looping_s": 600, "min_free_disk_mb": 100, "max_workdir_mb": 2000,
                   "heartbeat_s": 30},
    }


@pytest.mark.arc
@pytest.mark.slow
def test_push_mode_end_to_end(arc_ce, tmp_path):
    se = start_se(tmp_path / "se")
    sites = tmp_path / "sites"
    sites.mkdir()
    config = site_yaml(se.url, arc_ce.options)
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(config))
    # a pilot-mode ARC site on the same CE and storage element
    pilot_site = {**site_yaml(se.url, arc_ce.options), "name": PILOT_SITE,
                  "scheduler": {"backend": "arc", "options": arc_ce.options}}
    (sites / f"{PILOT_SITE}.yaml").write_text(yaml.safe_dump(pilot_site))
    server = start_server(tmp_path / "srv", site_dir=sites)
    state_dir = tmp_path / "push-state"
    arc_ids: list[str] = []
    try:
        user = ApiClient(server.url, server.token("user", "alice"))
        # inputs: two on the SE, one registered but missing from it
        files = []
        for i in range(3):
            files.append(put_input(se.root, SCOPE, f"in.{i}.txt", f"input {i}\n".encode() * 100,
                                   store=i < 2))
        assert user.add_files("push.inputs", SCOPE, files, "PUSH_SE") == 3
        common = {"scope": SCOPE, "transformation": "/bin/sh", "site": SITE,
                  "output_dataset": "push.outputs", "max_attempts": 1,
                  "resources": {"memory_mb": 500, "walltime_s": 600}}
        ok_task = user.submit_task({**common, "name": "pushok", "input_dataset": "push.inputs",
                                    "job_parameters": "-c 'sha256sum ${IN} > ${OUT}; "
                                                      "echo \"payload saw $PANDA_ID\"'",
                                    "outputs": ["${TASK}.${SN}.out"]})
        fail_task = user.submit_task({**common, "name": "pushfail",
                                      "job_parameters": "-c 'echo bad; exit 7'", "n_jobs": 1,
                                      "outputs": ["${TASK}.${SN}.out"]})
        kill_task = user.submit_task({**common, "name": "pushkill",
                                      "job_parameters": "-c 'sleep 300'", "n_jobs": 1,
                                      "outputs": ["${TASK}.${SN}.out"]})
        # an output that is already on the SE: ARC's upload (If-None-Match: *) is refused
        out_task = user.submit_task({**common, "name": "pushout",
                                     "job_parameters": "-c 'echo new > ${OUT}'", "n_jobs": 1,
                                     "outputs": ["${TASK}.${SN}.out"]})
        out_job = user.call("job", "get_description", "POST",
                            job_ids=[int(user.jobs(out_task)[0]["PandaID"])])[0]
        taken_lfn = next(f["lfn"] for f in out_job["Files"] if f["type"] == "output")
        occupied = se.root / replica_path(SCOPE, taken_lfn)
        occupied.parent.mkdir(parents=True, exist_ok=True)
        occupied.write_text("old\n")
        jobs = {}
        for task_id in (ok_task, fail_task, kill_task, out_task):
            for job in user.jobs(task_id):
                jobs[int(job["PandaID"] if "PandaID" in job else job["panda_id"])] = task_id
        assert len(jobs) == 6, jobs

        token = server.token("pilot", "arc-push", site=SITE)
        driver = ArcPushDriver.from_site(config, server.url, token, state_dir, heartbeat_s=3)
        taken = driver.fetch_and_submit(10)
        assert sorted(taken) == sorted(jobs)
        arc_ids = [t.arc_id for t in driver.tracked()]
        assert len(arc_ids) == 6

        # meanwhile, pilot mode: a real pilot through the arc backend takes a job of its site
        pilot_files = []
        for i in range(2):
            pilot_files.append(put_input(se.root, SCOPE, f"pin.{i}.txt",
                                         f"pilot input {i}\n".encode() * 50))
        assert user.add_files("pilot.inputs", SCOPE, pilot_files, "PUSH_SE") == 2
        pilot_task = user.submit_task({**common, "name": "arcpilot", "site": PILOT_SITE,
                                       "input_dataset": "pilot.inputs", "files_per_job": 2,
                                       "job_parameters": "-c 'cat pin.0.txt pin.1.txt | sha256sum > ${OUT}'",
                                       "outputs": ["${TASK}.${SN}.out"]})
        backend = ArcBackend(**arc_ce.options)
        pilot_id = backend.submit(PilotSpec(
            site=PILOT_SITE, name="arc-pilot", walltime_s=600,
            command=[WN_PYTHON, "-m", "panda_wms.cli", "pilot", "--server", server.url,
                     "--site", PILOT_SITE, "--max-jobs", "1",
                     "--public-key-fingerprint", server.key_fingerprint()],
            env={"PYTHONPATH": str(REPO), "PANDA_AUTH_TOKEN":
                 server.token("pilot", "arc-pilot", site=PILOT_SITE)}))
        arc_ids.append(pilot_id)
        kill_ids = [pid for pid, task in jobs.items() if task == kill_task]
        deadline = time.monotonic() + CE_PATIENCE_S
        # follow the jobs (starting -> running) until the server's kill reached the CE
        kill_arc_id = next(t.arc_id for t in driver.tracked() if t.panda_id == kill_ids[0])
        asked = False
        while time.monotonic() < deadline:
            states = driver.poll()
            if not asked and arc_ce.job_running(kill_arc_id):
                assert user.kill_jobs(kill_ids) == [True]
                asked = True
            if any(t.kill_requested for t in driver.tracked()):
                break
            time.sleep(2)
        else:
            pytest.fail(f"the kill never reached the CE: {states}\n{server.log()[-3000:]}")
        # then let the CE finish the rest without reporting, so a dead server gets the finals
        # ("ended" as the driver sees it: KILLING already counts as cancelled for status(), but
        # the driver waits for KILLED before it writes the final report)
        left = driver.tracked()
        while time.monotonic() < deadline:
            push_states = {i: j.state for i, j in
                           driver.backend.jobs([t.arc_id for t in left]).items()}
            ce_states = driver.backend.status([pilot_id])
            if (all(s in ("FINISHED", "FAILED", "KILLED", "WIPED", None)
                    for s in push_states.values())
                    and all(s in FINAL_BATCH_STATES for s in ce_states.values())):
                break
            time.sleep(3)
        else:
            pytest.fail(f"ARC jobs did not end: {push_states} {ce_states}")

        # a dead server does not take the final reports: they stay on disk
        dead = ArcPushDriver.from_site(config, f"http://127.0.0.1:{free_port()}", token,
                                       state_dir, timeout_s=2)
        dead.poll()
        assert len(dead.tracked()) == len(left)
        assert all(t.final is not None for t in dead.tracked())

        # a restarted driver delivers them
        again = ArcPushDriver.from_site(config, server.url, token, state_dir)
        for _ in range(3):
            again.poll()
            if not again.tracked():
                break
        assert again.tracked() == []

        by_task: dict[int, list[dict]] = {}
        for task_id in (ok_task, fail_task, kill_task, out_task):
            by_task[task_id] = user.call("job", "get_description", "POST",
                                         job_ids=[p for p, t in jobs.items() if t == task_id])
        ok_jobs = by_task[ok_task]
        statuses = sorted(j["jobStatus"] for j in ok_jobs)
        assert statuses == ["failed", "finished", "finished"], [
            (j["jobStatus"], j.get("pilotErrorCode"), j.get("pilotErrorDiag")) for j in ok_jobs]
        for job in ok_jobs:
            if job["jobStatus"] == "finished":
                out = next(f for f in job["Files"] if f["type"] == "output")
                stored = se.root / replica_path(SCOPE, out["lfn"])
                data = stored.read_bytes()
                assert b"sha256" not in data and len(data.split()) == 2   # "<hash>  <lfn>"
                lfn_in = next(f for f in job["Files"] if f["type"] == "input")["lfn"]
                expected = hashlib.sha256(f"input {lfn_in.split('.')[1]}\n".encode() * 100)
                assert data.split()[0].decode() == expected.hexdigest()
                assert int(out["fsize"]) == len(data)
                assert out["checksum"] == f"ad:{zlib.adler32(data):08x}"
                logf = next(f for f in job["Files"] if f["type"] == "log")
                with tarfile.open(fileobj=io.BytesIO(
                        (se.root / replica_path(SCOPE, logf["lfn"])).read_bytes())) as tar:
                    stdout = tar.extractfile("payload.stdout").read().decode()
                assert f"payload saw {job['PandaID']}" in stdout
            else:
                assert job["pilotErrorCode"] == ErrorCode.STAGEIN_FAILED, job
        failed = by_task[fail_task][0]
        assert failed["jobStatus"] == "failed"
        assert failed["pilotErrorCode"] == ErrorCode.PAYLOAD_FAILED
        assert failed["transExitCode"] == 7
        # ARC stored the failed payload's log too (preserve=yes)
        logf = next(f for f in failed["Files"] if f["type"] == "log")
        with tarfile.open(fileobj=io.BytesIO(
                (se.root / replica_path(SCOPE, logf["lfn"])).read_bytes())) as tar:
            assert tar.extractfile("payload.exitcode").read() == b"7\n"
        refused = by_task[out_task][0]
        assert refused["jobStatus"] == "failed"
        assert refused["pilotErrorCode"] == ErrorCode.STAGEOUT_FAILED, refused["pilotErrorDiag"]
        assert occupied.read_text() == "old\n"          # nothing lost on the SE
        # the server cancels a killed job at once; the driver killed its ARC job on the command
        killed_job = by_task[kill_task][0]
        assert killed_job["jobStatus"] == "cancelled" or (
            killed_job["pilotErrorCode"] == ErrorCode.KILLED_BY_SERVER), killed_job
        assert push_states[kill_arc_id] in ("KILLED", "WIPED", None)

        # the pilot ran as the CE's mapped user, staged in over HTTP, ran the payload, stored
        # the output on the SE and finished the job
        assert ce_states[pilot_id] == BatchState.DONE, (
            backend.client.session_file(pilot_id, "pilot.err"), server.log()[-2000:])
        pilot_job = user.call("job", "get_description", "POST", job_ids=[
            int(j["PandaID"]) for j in user.jobs(pilot_task)])[0]
        assert pilot_job["jobStatus"] == "finished", (
            pilot_job.get("pilotErrorCode"), pilot_job.get("pilotErrorDiag"),
            backend.client.session_file(pilot_id, "pilot.err")[-3000:])
        out = next(f for f in pilot_job["Files"] if f["type"] == "output")
        expected = hashlib.sha256(b"".join(f"pilot input {i}\n".encode() * 50 for i in range(2)))
        assert (se.root / replica_path(SCOPE, out["lfn"])).read_text().split()[0] == \
            expected.hexdigest()
    finally:
        for arc_id in arc_ids:
            arc_ce.kill_job_processes(arc_id)
        stop_server(server)
        se.stop()


def test_parse_job_refuses_hostile_names_and_bad_fields():
    base = {"PandaID": "7", "transformation": "/bin/sh", "jobPars": "-c true",
            "inFiles": "a.txt", "scopeIn": "s", "outFiles": "o.txt,log.tgz", "scopeOut": "s",
            "logFile": "log.tgz", "scopeLog": "s", "logGUID": "g"}
    job = parse_job(base, "http://127.0.0.1:1/se", "http://127.0.0.1:2/se")
    assert job.inputs[0].url == replica_url("http://127.0.0.1:1/se", "s", "a.txt")
    assert [f.lfn for f in job.outputs] == ["o.txt"] and job.log.guid == "g"
    for key, value in (("inFiles", "../../etc/passwd"), ("outFiles", "-rf,log.tgz"),
                       ("logFile", ".hidden")):
        with pytest.raises(BadJob) as err:
            parse_job({**base, key: value}, "http://h/se", "http://h/se")
        assert err.value.code == ErrorCode.HOSTILE_FILE_NAME
    with pytest.raises(BadJob) as err:
        parse_job({**base, "PandaID": "x"}, "http://h/se", "http://h/se")
    assert err.value.code == ErrorCode.BAD_JOB_SPEC
    with pytest.raises(BadJob):
        parse_job({**base, "jobPars": "-c 'unterminated"}, "http://h/se", "http://h/se").argv()
    with pytest.raises(BadJob):
        parse_job({**base, "outFiles": "a.txt,log.tgz"}, "http://h/se", "http://h/se")


def test_driver_refuses_storage_the_ce_cannot_reach(tmp_path):
    from schedulers.arc import ArcBackend
    backend = ArcBackend(ce="https://127.0.0.1:1/arex")
    with pytest.raises(SchedulerError, match="not reachable by the CE"):
        ArcPushDriver(backend, "http://127.0.0.1:1", "t", SITE, "file:///data", "http://h/se",
                      tmp_path)


def test_push_xrsl_stages_inputs_outputs_and_log():
    from schedulers.arc import ArcBackend
    raw = {"PandaID": "7", "transformation": "/bin/sh", "jobPars": "-c 'cat $X'",
           "inFiles": "a.txt", "scopeIn": "s", "outFiles": "o.txt,log.tgz", "scopeOut": "s",
           "logFile": "log.tgz", "scopeLog": "s", "logGUID": "g", "maxWalltime": "120"}
    job = parse_job(raw, "http://127.0.0.1:1/se", "http://127.0.0.1:2/se")
    xrsl = push_xrsl(job, ArcBackend(ce="https://127.0.0.1:1/arex", queue="q"))
    assert f'("a.txt" "{replica_url("http://127.0.0.1:1/se", "s", "a.txt")}")' in xrsl
    assert f'("o.txt" "{replica_url("http://127.0.0.1:2/se", "s", "o.txt")}")' in xrsl
    assert '//127.0.0.1:2;preserve=yes/se/s/' in xrsl and '(queue="q")' in xrsl and '(walltime="2")' in xrsl
    assert '("PANDA_LOG_FILE" "log.tgz")' in xrsl


def test_final_reports_survive_refusals_and_dead_ce(tmp_path):
    """No CE needed: finals waiting in the state dir, a token the server refuses, a dead CE."""
    from dataclasses import asdict

    from schedulers.arc_push import Refused, Tracked

    sites = tmp_path / "sites"
    sites.mkdir()
    options = {"ce": f"https://127.0.0.1:{free_port()}/arex", "timeout_s": 2}
    config = site_yaml("http://127.0.0.1:1/se", options)
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(config))
    server = start_server(tmp_path / "srv", site_dir=sites)
    state = tmp_path / "state"
    try:
        state.mkdir()
        user = ApiClient(server.url, server.token("user", "alice"))
        user.submit_task({"name": "t", "scope": SCOPE, "transformation": "/bin/true",
                          "n_jobs": 1, "site": SITE, "output_dataset": "t.out",
                          "outputs": ["${TASK}.${SN}.out"]})
        right = server.token("pilot", "p", site=SITE)
        job = PilotClient(server.url, right).post("getJob", {"siteName": SITE})
        panda_id = int(job["PandaID"])
        final = Tracked(panda_id, 1, "", final={"state": "failed", "pilotErrorCode": 1008,
                                                "pilotErrorDiag": "test"})
        (state / f"{panda_id}.json").write_text(json.dumps(asdict(final)))
        # a token for another site is refused (StatusCode 70): a refusal is final, as for the
        # pilot's final report; only "try again" (StatusCode 10) keeps it for the next poll
        assert Refused("refused", 70).permanent
        assert Refused("try again", 10).permanent is False
        wrong = server.token("pilot", "p", site="ELSEWHERE")
        ArcPushDriver.from_site(config, server.url, wrong, state).poll()
        assert not (state / f"{panda_id}.json").exists()
        # the right token: taken and forgotten
        (state / f"{panda_id}.json").write_text(json.dumps(asdict(final)))
        assert ArcPushDriver.from_site(config, server.url, right, state).poll() == {
            panda_id: "failed"}
        assert not (state / f"{panda_id}.json").exists()
        assert user.call("job", "get_description", "POST", job_ids=[panda_id])[0][
            "jobStatus"] == "failed"
        # a job in flight while the CE is dead: a clear error, the job stays tracked
        live = Tracked(7, 1, "someArcId")
        (state / "7.json").write_text(json.dumps(asdict(live)))
        with pytest.raises(SchedulerError, match=r"ARC CE https://127\.0\.0\.1:\d+/arex: "):
            ArcPushDriver.from_site(config, server.url, right, state).poll()
        assert (state / "7.json").exists()
    finally:
        stop_server(server)


def test_example_site_config_builds_the_arc_backend():
    """The site-config example for ARC carries options the arc backend takes."""
    from schedulers.base import load_backend
    from site_configs import EXAMPLES_DIR, parse_site_config

    site = parse_site_config(yaml.safe_load((EXAMPLES_DIR / "examples" / "ARC_EXAMPLE.yaml").read_text()),
                             env={})
    backend = load_backend(site.scheduler.backend, **site.to_dict()["scheduler"]["options"])
    assert isinstance(backend, ArcBackend) and backend.client.base.startswith("https://")


def test_outputs_checked_on_the_storage_element(tmp_path):
    """Sizes and adler32 come from the SE; a missing output fails the job, a dead SE waits."""
    from schedulers.arc_push import SEUnavailable

    with start_se(tmp_path / "se") as se:
        driver = ArcPushDriver(ArcBackend(ce="https://127.0.0.1:1/arex"), "http://127.0.0.1:1",
                               "t", SITE, se.url, se.url, tmp_path / "state")
        data = b"stored bytes\n" * 1000
        path = se.root / replica_path(SCOPE, "out.1")
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        url = replica_url(se.url, SCOPE, "out.1")
        assert driver._se_file(url) == (len(data), f"{zlib.adler32(data):08x}")
        with pytest.raises(BadJob) as err:
            driver._se_file(replica_url(se.url, SCOPE, "missing.1"))
        assert err.value.code == ErrorCode.NO_SUCH_FILE
    with pytest.raises(SEUnavailable, match="unreachable"):
        driver._se_file(url)          # the SE is gone now: ask again on a later poll


@pytest.mark.arc
@pytest.mark.slow
def test_factory_drives_push_mode(arc_ce, tmp_path):
    """`panda factory`'s Factory takes the jobs of a push-mode site itself (no pilot), ARC stages
    the output, and the job finishes on the server; the factory's limits bound what it takes."""
    from schedulers.factory import Factory
    from site_configs import load_site_config

    se = start_se(tmp_path / "se")
    sites = tmp_path / "sites"
    sites.mkdir()
    config = site_yaml(se.url, {**arc_ce.options, "fast_states": True})
    config["pilots"].update(max_queued=2, max_running=2)
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(config))
    server = start_server(tmp_path / "srv", site_dir=sites)
    arc_ids = []
    try:
        user = ApiClient(server.url, server.token("user", "alice"))
        task_id = user.submit_task({
            "name": "factorypush", "scope": SCOPE, "transformation": "/bin/sh", "site": SITE,
            "job_parameters": "-c 'echo pushed by the factory > ${OUT}'", "n_jobs": 3,
            "output_dataset": "fpush.outputs", "outputs": ["${TASK}.${SN}.out"],
            "max_attempts": 1, "resources": {"memory_mb": 500, "walltime_s": 600}})
        factory = Factory(server.url, [load_site_config(sites / f"{SITE}.yaml")],
                          token=server.token("pilot", "factory"),
                          pilot_token=server.token("pilot", "factory", site=SITE),
                          state_dir=tmp_path / "factory", factory_id="push-factory")
        first = factory.run_once().sites[SITE]
        assert first.submitted == 2 and first.activated == 3       # max_running caps it
        arc_ids += [t.arc_id for t in factory.push_driver(factory.sites[SITE]).tracked()]
        deadline = time.monotonic() + CE_PATIENCE_S
        while time.monotonic() < deadline:
            cycle = factory.run_once().sites[SITE]
            arc_ids += [t.arc_id for t in factory.push_driver(factory.sites[SITE]).tracked()]
            if user.task_details(task_id)["status"] in ("done", "finished", "failed"):
                break
            assert cycle.running <= 2
            time.sleep(2)
        details = user.task_details(task_id)
        assert details["status"] == "done", details
        outs = sorted((se.root / SCOPE).rglob("factorypush.*.out"))
        assert len(outs) == 3
        assert all(p.read_text() == "pushed by the factory\n" for p in outs)
    finally:
        stop_server(server)
        se.stop()
        if arc_ids:
            ArcBackend(**arc_ce.options).cancel(sorted(set(arc_ids)))
