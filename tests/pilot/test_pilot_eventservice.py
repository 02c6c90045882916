"""The event service end to end: the real ``panda server`` (subprocess, SQLite), our pilots as
subprocesses, the reference payload speaking the line protocol. One task of 200 events in ranges
of 10, three pilots, one killed with SIGKILL (pilot and payload, as a lost node) mid-way: the
merged output holds every event exactly once. Then a range the payload fails: retried until the
task's attempts run out, and left out of the merge."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from panda_core.client import ApiClient
from pilotkit import pilot_env
from testkit import EXAMPLE_SITES, REPO, put_input, start_server, stop_server, wait_for

SITE = "LOCAL_DEMO"
SANDBOXED = "LOCAL_DEMO_BWRAP"
REF = REPO / "pilot" / "eventservice" / "reference_payload.py"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("es")
    se = tmp / "se"
    se.mkdir()
    sites = tmp / "sites"
    sites.mkdir()
    text = (EXAMPLE_SITES / f"{SITE}.yaml").read_text().replace("heartbeat_s: 60", "heartbeat_s: 1")
    (sites / f"{SITE}.yaml").write_text(text)
    # the same site with its payloads in bubblewrap (no network, the system read-only)
    (sites / f"{SANDBOXED}.yaml").write_text(
        text.replace(f"name: {SITE}", f"name: {SANDBOXED}")
        + "sandbox: {runtime: bwrap, network: false}\n")
    # the watcher gives up a silent job after 10 s (pilots beat every second)
    server = start_server(tmp / "srv", site_dir=sites, env={"PANDA_SE_ROOT": str(se)},
                          extra=["--watcher-interval", "1", "--heartbeat-timeout", "10"])
    server.se = se
    server.tmp = tmp
    yield server
    stop_server(server)


def es_task(name, dataset, payload_args, **event_service):
    return {"name": name, "scope": "p", "transformation": sys.executable,
            "job_parameters": f"{REF} {payload_args}", "input_dataset": dataset,
            "output_dataset": f"p.{name}.out", "outputs": [f"{name}.merged.${{SN}}"],
            "site": SITE, "events_per_file": 200, "events_per_range": 10, "max_attempts": 3,
            "event_service": {"consumers": 3, "range_timeout_s": 2, **event_service,
                              "merge": {"transformation": sys.executable,
                                        "job_parameters": f"{REF} merge --out ${{OUT}} ${{IN}}"}},
            "resources": {"memory_mb": 500, "walltime_s": 300}}


def start_pilot(server, name, site=SITE):
    workdir = server.tmp / f"wd-{name}"
    cmd = [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", server.url, "--site", site,
           "--workdir", str(workdir), "--monitor-interval", "0.2", "--server-backoff", "0.3",
           "--es-poll", "0.3", "--public-key", str(server.public_key_file())]
    env = pilot_env({"PANDA_AUTH_TOKEN": server.token("pilot", f"pilot-{name}", site=site),
                     "PANDA_SE_ROOT": str(server.se)})
    log = open(server.tmp / f"pilot-{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def pilot_log(server, name, tail: int | None = 4000) -> str:
    text = (server.tmp / f"pilot-{name}.log").read_text(errors="replace")
    return text if tail is None else text[-tail:]


def summary(user, task_id) -> dict:
    return user.call("event", "summary", task_id=task_id)


def merged_lines(server, name) -> list[list[str]]:
    [merged] = list(server.se.glob(f"p/*/*/{name}.merged.*"))
    return [line.split() for line in merged.read_text().splitlines()]


@pytest.mark.slow
def test_200_events_3_pilots_one_killed_every_event_exactly_once(real):
    user = ApiClient(real.url, real.token("user", "alice"))
    user.add_files("p.ev", "p", [put_input(real.se, "p", "ev.root", b"e" * 2000)], "LOCAL_SE")
    task_id = user.submit_task(es_task("es", "p.ev", "--sleep-per-event 0.03"))
    assert summary(user, task_id) == {"ready": 20}
    victim = start_pilot(real, "a")
    others = []
    try:
        wait_for(lambda: summary(user, task_id).get("finished", 0) >= 2, "pilot a's first ranges",
                 timeout=60)
        others = [start_pilot(real, n) for n in ("b", "c")]
        wait_for(lambda: summary(user, task_id).get("finished", 0) >= 8, "ranges of 3 pilots",
                 timeout=60)
        # a lost node: the pilot and its payload die at once, with a range in flight
        tree = [victim, *psutil.Process(victim.pid).children(recursive=True)]
        for proc in tree:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victim.wait(10)
        for p in others:
            assert p.wait(120) == 0, pilot_log(real, "b") + pilot_log(real, "c")
        details = wait_for(lambda: (d := user.task_details(task_id))["status"] == "done" and d,
                           "the task done (merge finished, dead consumer failed)", timeout=60)
    finally:
        for p in [victim, *others]:
            if p.poll() is None:
                p.kill()
    assert summary(user, task_id) == {"finished": 20}
    lines = merged_lines(real, "es")
    events = sorted(int(fields[1]) for fields in lines)
    assert events == list(range(200)), "every event exactly once in the merged output"
    jobs = {j.get("PandaID") or j.get("panda_id"): j for j in user.jobs(task_id)}
    status = {pid: j.get("status", j.get("jobStatus")) for pid, j in jobs.items()}
    dead = [pid for pid, s in status.items() if s == "failed"]
    assert len(dead) == 1, (status, details)
    workers = {fields[3] for fields in lines}
    assert str(dead[0]) in workers, "the killed pilot's finished ranges are in the merge"
    assert workers <= {str(pid) for pid in jobs} and len(workers) >= 2, (workers, status)
    rest = [s for pid, s in status.items() if pid not in dead]    # 2 consumers and the merge,
    assert set(rest) == {"finished"} and len(rest) >= 3, status    # perhaps the dead one's retry
    # the monitor shows the task's ranges per state
    page = requests.get(f"{real.url}/monitor/tasks/{task_id}?json", timeout=10).json()
    assert page["event_ranges"] == {"finished": {"ranges": 20, "events": 200}}
    html = requests.get(f"{real.url}/monitor/tasks/{task_id}", timeout=10).text
    assert '<table id="eventranges">' in html and "<td class=\"n\">200</td>" in html
    server_log = real.log()
    assert "of ended or silent job(s) [%s] back to ready" % dead[0] in server_log
    assert "every event range is done: merge job" in server_log


def test_a_range_the_payload_fails_is_retried_then_left_out(real):
    user = ApiClient(real.url, real.token("user", "alice"))
    user.add_files("p.ev2", "p", [put_input(real.se, "p", "ev2.root", b"f" * 2000)], "LOCAL_SE")
    task = es_task("esfail", "p.ev2", "--fail-range 50 --workers 2", consumers=1)
    task["events_per_file"] = 60
    task_id = user.submit_task(task)
    pilot = start_pilot(real, "f")
    assert pilot.wait(120) == 0, pilot_log(real, "f")
    # one pilot: the consumer, then the merge job it created
    assert summary(user, task_id) == {"finished": 5, "failed": 1}, pilot_log(real, "f")
    events = sorted(int(fields[1]) for fields in merged_lines(real, "esfail"))
    assert events == [e for e in range(60) if not 50 <= e <= 59]
    assert user.task_details(task_id)["status"] == "done"
    log = pilot_log(real, "f", tail=None)
    assert "failed in the payload: asked to fail range 50" in log


SH_PAYLOAD = r'''exec 3>"$PANDA_ES_REPORTS" 4<"$PANDA_ES_RANGES"
while echo ready >&3 && read -r word id lfn first last path <&4 && [ "$word" = range ]; do
    seq "$first" "$last" | sed "s|^|$lfn |" > "out.$first" && echo "done $id out.$first" >&3
done'''


def test_the_protocol_in_posix_sh_as_documented(real):
    user = ApiClient(real.url, real.token("user", "alice"))
    user.add_files("p.ev3", "p", [put_input(real.se, "p", "ev3.root", b"g" * 100)], "LOCAL_SE")
    task = es_task("essh", "p.ev3", "", consumers=1)
    task.update(transformation="/bin/sh", events_per_file=60)
    task["job_parameters"] = "-c '" + SH_PAYLOAD.replace("'", "'\"'\"'") + "'"
    task_id = user.submit_task(task)
    pilot = start_pilot(real, "sh")
    assert pilot.wait(120) == 0, pilot_log(real, "sh")
    assert summary(user, task_id) == {"finished": 6}, pilot_log(real, "sh")
    assert sorted(int(f[1]) for f in merged_lines(real, "essh")) == list(range(60))


@pytest.mark.slow
def test_a_consumer_asks_for_more_only_while_its_wall_time_lasts(real):
    """Ranges of 0.5 s, jobs of 4 s: each consumer stops asking in time and ends well, the
    next one (the same pilot's next job) goes on; when both consumers the task asked for have
    ended with ranges still ready, the server adds a consumer (as JEDI adds jobs to a jobset)."""
    user = ApiClient(real.url, real.token("user", "alice"))
    user.add_files("p.ev4", "p", [put_input(real.se, "p", "ev4.root", b"h" * 100)], "LOCAL_SE")
    task = es_task("eswall", "p.ev4", "--sleep-per-event 0.05", consumers=2)
    # 20 ranges of 0.5 s cannot fit in two consumers of 4 s however fast the machine: the
    # server must add consumers (with 10 ranges a quiet machine finished them in two)
    task.update(events_per_file=200, resources={"memory_mb": 500, "walltime_s": 4})
    task_id = user.submit_task(task)
    pilot = start_pilot(real, "w")
    assert pilot.wait(180) == 0, pilot_log(real, "w")
    log = pilot_log(real, "w", tail=None)
    assert "not enough wall time left for another event range" in log
    assert summary(user, task_id) == {"finished": 20}, log[-4000:]
    assert sorted(int(f[1]) for f in merged_lines(real, "eswall")) == list(range(200))
    states = [j.get("status", j.get("jobStatus")) for j in user.jobs(task_id)]
    assert set(states) == {"finished"} and len(states) >= 4     # 2 + added consumers + merge
    assert f"task {task_id}: its consumers ended with ranges still ready: new consumer" \
        in real.log()
    assert user.task_details(task_id)["status"] == "done"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
def test_the_protocol_through_the_bwrap_sandbox(real):
    """The pipes are in the work dir, which the sandbox shows: the same payload works inside."""
    user = ApiClient(real.url, real.token("user", "alice"))
    user.add_files("p.ev5", "p", [put_input(real.se, "p", "ev5.root", b"i" * 100)], "LOCAL_SE")
    task = es_task("esbw", "p.ev5", "", consumers=1)
    task.update(transformation="/bin/sh", events_per_file=30, site=SANDBOXED)
    task["job_parameters"] = "-c '" + SH_PAYLOAD.replace("'", "'\"'\"'") + "'"
    task["event_service"]["merge"] = {"transformation": "/bin/sh",
                                      "job_parameters": "-c 'cat $(echo ${IN} | tr , \" \") "
                                                        "> ${OUT}'"}
    task_id = user.submit_task(task)
    pilot = start_pilot(real, "bw", site=SANDBOXED)
    assert pilot.wait(120) == 0, pilot_log(real, "bw")
    log = pilot_log(real, "bw", tail=None)
    assert summary(user, task_id) == {"finished": 3}, log[-4000:]
    assert "bwrap" in log
    assert sorted(int(f[1]) for f in merged_lines(real, "esbw")) == list(range(30))
    assert user.task_details(task_id)["status"] == "done"
