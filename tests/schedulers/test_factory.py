"""The pilot factory against a real server and the real local backend.

Policy tests give the factory a stand-in pilot command (a process that sleeps or fails, so the
activated jobs stay activated and the numbers are exact); the end-to-end test runs real pilots.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from testkit import free_port, put_input, start_server, stop_server
from panda_core.client import ApiClient
from panda_core.trust import key_fingerprint
from schedulers.base import SchedulerError
from schedulers.factory import STATE_FILE, Factory
from site_configs import EXAMPLES_DIR, parse_site_config

SITE = "FTEST"
PY = sys.executable


def site_dict(**pilots) -> dict:
    data = yaml.safe_load((EXAMPLES_DIR / "LOCAL_DEMO.yaml").read_text())
    data["name"] = SITE
    data["scheduler"]["options"] = {"slots": 4, "kill_grace_s": 1}
    data["pilots"].update({"max_queued": 3, "max_running": 5, "rate_per_minute": 60,
                           "walltime_s": 600}, **pilots)
    return data


def site_config(tmp_path, **pilots):
    return parse_site_config(site_dict(**pilots), env={"PANDA_SE_ROOT": str(tmp_path / "se")})


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real server knowing site FTEST (and LOCAL_DEMO's storage element in tmp)."""
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(site_dict()))
    srv = start_server(tmp_path / "srv", site_dir=sites)
    srv.se = tmp_path / "se"
    srv.pilot_token = srv.token("pilot", "factory-test", site=SITE)
    yield srv
    stop_server(srv)


def activate_jobs(srv, n: int, name: str = "ftask") -> int:
    """Register n input files on the SE and submit a task of n one-file jobs at FTEST."""
    user = ApiClient(srv.url, srv.token("user", "alice"))
    files = []
    for i in range(n):
        lfn = f"{name}.in.{i}.txt"
        files.append(put_input(srv.se, "ft", lfn, f"input {i}\n".encode() * 20))
    user.add_files(f"{name}.inputs", "ft", files, "LOCAL_SE")
    task_id = user.submit_task({
        "name": name, "scope": "ft", "transformation": "/bin/sh",
        "job_parameters": "-c 'sha256sum ${IN} > ${OUT}'", "input_dataset": f"{name}.inputs",
        "output_dataset": f"{name}.outputs", "outputs": [f"{name}.${{SN}}.out"], "site": SITE,
        "files_per_job": 1, "max_attempts": 1,
        "resources": {"cores": 1, "memory_mb": 100, "walltime_s": 120, "disk_mb": 100}})
    assert user.task_details(task_id)["jobs"] == {"activated": n}
    return task_id


class StandIn(Factory):
    """The factory with a stand-in for the pilot's argv (policy tests only)."""

    def __init__(self, *args, command: list[str], **kw):
        self.command = command
        super().__init__(*args, **kw)

    def pilot_command(self, site):
        return self.command


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def factories():
    made = []
    yield made
    for f in made:
        f.cancel_all()


def make(factories, srv, sites, tmp_path, command=(PY, "-c", "import time; time.sleep(60)"),
         **kw):
    f = StandIn(srv.url, sites, token=srv.pilot_token, pilot_token=srv.pilot_token,
                state_dir=tmp_path / "factory", command=list(command), factory_id="ft-1", **kw)
    factories.append(f)
    return f


def summary(srv) -> dict:
    return requests.get(srv.url + "/api/v1/pilot/summary", timeout=10).json()["data"]


def test_pilots_fill_the_site_within_its_limits(server, tmp_path, factories):
    activate_jobs(server, 10)
    site = site_config(tmp_path, max_queued=3, max_running=5)
    site.scheduler.options["slots"] = 2                # the local batch system runs 2 at once
    f = make(factories, server, [site], tmp_path)
    c1 = f.run_once().sites[SITE]
    assert (c1.activated, c1.submitted) == (10, 3)     # max_queued
    c2 = f.run_once().sites[SITE]
    # 2 slots: 2 running, 1 still queued; 2 more submitted to get back to 3 queued
    assert (c2.queued, c2.running, c2.submitted) == (3, 2, 2)
    c3 = f.run_once().sites[SITE]
    assert (c3.queued, c3.running, c3.submitted) == (3, 2, 0)
    assert c3.skipped == "site limits reached (max_queued/max_running)"
    got = summary(server)
    assert got["sites"][SITE] == {"queued": 3, "running": 2}
    assert [fa["name"] for fa in got["factories"]] == ["ft-1"]


def test_max_running_caps_queued_plus_running(server, tmp_path, factories):
    activate_jobs(server, 10)
    f = make(factories, server, [site_config(tmp_path, max_queued=10, max_running=4)], tmp_path)
    assert f.run_once().sites[SITE].submitted == 4
    assert f.run_once().sites[SITE].submitted == 0


def test_never_more_pilots_than_activated_jobs(server, tmp_path, factories):
    activate_jobs(server, 2)
    f = make(factories, server, [site_config(tmp_path, max_queued=10, max_running=10)], tmp_path)
    assert f.run_once().sites[SITE].submitted == 2
    assert f.run_once().sites[SITE].submitted == 0


def test_no_activated_jobs_no_pilots(server, tmp_path, factories):
    f = make(factories, server, [site_config(tmp_path)], tmp_path)
    cycle = f.run_once().sites[SITE]
    assert (cycle.activated, cycle.submitted, cycle.skipped) == (0, 0, "no activated jobs")


def test_rate_per_minute(server, tmp_path, factories):
    activate_jobs(server, 10)
    clock = Clock()
    f = make(factories, server, [site_config(tmp_path, max_queued=10, max_running=10,
                                             rate_per_minute=2)], tmp_path, clock=clock)
    assert f.run_once().sites[SITE].submitted == 2
    cycle = f.run_once().sites[SITE]
    assert cycle.submitted == 0 and "rate limit of 2 per minute" in cycle.skipped
    clock.now += 61
    assert f.run_once().sites[SITE].submitted == 2


def test_offline_site_gets_no_pilots(server, tmp_path, factories):
    activate_jobs(server, 3)
    site = site_config(tmp_path)
    site.status = "offline"
    f = make(factories, server, [site], tmp_path)
    cycle = f.run_once().sites[SITE]
    assert cycle.submitted == 0 and cycle.skipped == "site status is offline"


def test_site_going_offline_cancels_its_queued_pilots(server, tmp_path, factories):
    from dataclasses import replace

    activate_jobs(server, 6)
    site = site_config(tmp_path, max_queued=4, max_running=6)
    site.scheduler.options["slots"] = 2                # 2 run, the others wait in the queue
    f = make(factories, server, [site], tmp_path)
    f.run_once()
    cycle = f.run_once().sites[SITE]
    assert (cycle.running, cycle.queued) == (2, 4)
    f.update_sites([replace(site, status="offline")])
    cycle = f.run_once().sites[SITE]
    assert cycle.cancelled == 4 and cycle.submitted == 0
    states = sorted(p.state for p in f.pilots.values())
    assert states == ["cancelled"] * 4 + ["running"] * 2   # running pilots keep their job
    assert summary(server)["sites"][SITE] == {"cancelled": 4, "running": 2}
    assert f.run_once().sites[SITE].cancelled == 0


def wait_cycles(f, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = f.run_once()
        if until(report):
            return report
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_failing_site_is_stopped_and_says_why_then_probed(server, tmp_path, factories, caplog):
    activate_jobs(server, 10)
    clock = Clock()
    f = make(factories, server, [site_config(tmp_path, max_queued=2, max_running=2)], tmp_path,
             command=["sh", "-c", "echo broken node >&2; exit 3"], max_failures=3,
             failure_backoff_s=300, clock=clock)
    wait_cycles(f, lambda r: f.health[SITE].disabled_since is not None)
    wait_cycles(f, lambda r: all(p.final for p in f.pilots.values()))   # none left in flight
    reason = f.health[SITE].disabled_reason
    m = re.fullmatch(r"(\d+) pilots in a row failed; last: pilot local-\w+ failed: "
                     r"pilot exited with code 3", reason)
    assert m and int(m.group(1)) >= 3, reason
    assert any("stopped submitting pilots" in r.getMessage() and SITE in r.getMessage()
               for r in caplog.records)
    assert f.site_states()[SITE] == {"submitting": False, "reason": reason,
                                     "consecutive_failures": int(m.group(1))}
    cycle = f.run_once().sites[SITE]
    assert cycle.submitted == 0 and cycle.skipped == f"not submitting: {reason}"
    # the server saw the failed pilots with their exit codes
    assert summary(server)["sites"][SITE].get("failed", 0) >= 3
    # after the back-off exactly one probe pilot goes out
    clock.now += 301
    probe = f.run_once().sites[SITE]
    assert probe.submitted == 1
    assert f.run_once().sites[SITE].submitted == 0


def test_probe_success_resumes_submission(server, tmp_path, factories):
    activate_jobs(server, 10)
    clock = Clock()
    f = make(factories, server, [site_config(tmp_path, max_queued=2, max_running=2)], tmp_path,
             command=["sh", "-c", "exit 3"], max_failures=2, failure_backoff_s=300, clock=clock)
    wait_cycles(f, lambda r: f.health[SITE].disabled_since is not None)
    wait_cycles(f, lambda r: all(p.final for p in f.pilots.values()))   # none left in flight
    f.command = ["true"]                          # the site is repaired
    clock.now += 301
    assert f.run_once().sites[SITE].submitted == 1
    # the cycle that sees the probe succeed feeds the site in full again (max_queued, not one
    # more probe); a later cycle would find those pilots still queued on a slow machine
    resumed = wait_cycles(f, lambda r: f.health[SITE].disabled_since is None)
    assert f.health[SITE].consecutive_failures == 0
    assert resumed.sites[SITE].finished == 1 and resumed.sites[SITE].submitted == 2


def test_dead_server_no_pilots_clear_error(tmp_path, factories):
    url = f"http://127.0.0.1:{free_port()}"

    dead = type("DeadServer", (), {"url": url, "pilot_token": "t"})()
    f = make(factories, dead, [site_config(tmp_path)], tmp_path)
    report = f.run_once()
    cycle = report.sites[SITE]
    assert cycle.submitted == 0 and cycle.skipped == "no activated count from the server"
    assert f"cannot reach the server at {url}/api/v1/pilot/activated_count" in cycle.errors[0]


def test_pilots_survive_a_factory_restart(server, tmp_path, factories):
    activate_jobs(server, 2)
    site = site_config(tmp_path, max_queued=2)
    marker = tmp_path / "go"
    wait_for_marker = [PY, "-c", f"import os, time\nwhile not os.path.exists({str(marker)!r}): "
                                 "time.sleep(0.05)"]
    first = make(factories, server, [site], tmp_path, command=wait_for_marker)
    assert first.run_once().sites[SITE].submitted == 2
    ids = sorted(p.batch_id for p in first.pilots.values())
    del first, factories[:]
    second = make(factories, server, [site], tmp_path, command=wait_for_marker)
    assert sorted(p.batch_id for p in second.pilots.values()) == ids
    assert second.run_once().sites[SITE].submitted == 0     # it still counts them
    marker.write_text("go")
    second.sites[SITE].status = "offline"                   # no new pilots from here on
    wait_cycles(second, lambda r: all(p.state == "done" for p in second.pilots.values()))
    assert sorted(p.batch_id for p in second.pilots.values()) == ids
    assert summary(server)["sites"][SITE] == {"done": 2}


def test_corrupt_state_file_is_set_aside(server, tmp_path, factories):
    (tmp_path / "factory").mkdir()
    (tmp_path / "factory" / STATE_FILE).write_text("{not json")
    f = make(factories, server, [site_config(tmp_path)], tmp_path)
    assert f.pilots == {}
    assert (tmp_path / "factory" / "factory-pilots.corrupt").exists()


def test_report_failure_is_retried_next_cycle(server, tmp_path, factories):
    activate_jobs(server, 1)
    f = make(factories, server, [site_config(tmp_path)], tmp_path)
    assert f.run_once().reported == 1                      # the new pilot, queued
    assert summary(server)["sites"][SITE] == {"queued": 1}
    good_api, f.api = f.api, ApiClient(server.url, "not-a-token")
    report = f.run_once()                                  # it runs now, but the report fails
    assert "refused the report (HTTP 403)" in report.report_error
    assert "/api/v1/pilot/report" in report.report_error
    f.api = good_api
    report = f.run_once()
    assert report.reported == 1 and not report.report_error
    assert summary(server)["sites"][SITE] == {"running": 1}


def test_pilot_command_and_environment(server, tmp_path):
    f = Factory(server.url, [site_config(tmp_path)], pilot_token="ptok",
                state_dir=tmp_path / "f", pilot_args=["--max-jobs", "1"])
    cmd = f.pilot_command(f.sites[SITE])
    assert cmd == [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", server.url,
                   "--site", SITE, "--walltime", "600", "--max-jobs", "1"]


def test_pilots_get_what_the_deployment_trusts(tmp_path):
    """The factory's pinned key and CA bundle, or the site's own (its ``trust`` section), and the
    site's copytool programs and payload variables reach each pilot's command line."""
    key = tmp_path / "server.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAWJSPzLv8ICuTH1KLoXTQijSzbnh522WiFoK5NZ"
                   "VYWyY=\n-----END PUBLIC KEY-----\n")
    factory_fp = "sha256:" + "ab" * 32
    plain = site_config(tmp_path)
    pinned = parse_site_config({**site_dict(), "trust": {
        "server_public_key": str(key), "ca_bundle": "/etc/site-ca.pem",
        "copytool_programs": ["/opt/xrootd/bin/xrdcp"], "payload_env": ["FRONTIER_SERVER"]}},
        env={"PANDA_SE_ROOT": str(tmp_path / "se")})
    f = Factory("http://panda.example:25080", [plain], state_dir=tmp_path / "f",
                server_key_fingerprint=factory_fp.upper().replace("SHA256", "sha256"),
                ca_file="/etc/grid-ca.pem")
    assert f.pilot_trust_args(plain) == ["--public-key-fingerprint", factory_fp,
                                         "--ca-bundle", "/etc/grid-ca.pem"]
    assert f.pilot_trust_args(pinned) == [
        "--public-key-fingerprint", key_fingerprint(key.read_text()),
        "--ca-bundle", "/etc/site-ca.pem", "--allow-program", "/opt/xrootd/bin/xrdcp",
        "--payload-env", "FRONTIER_SERVER"]
    assert f.pilot_command(pinned)[-len(f.pilot_trust_args(pinned)):] == \
        f.pilot_trust_args(pinned)
    key.unlink()
    with pytest.raises(SchedulerError, match="trust.server_public_key"):
        f.pilot_trust_args(pinned)


def test_cli_refuses_to_start_pilots_that_pin_no_key(server, tmp_path):
    sites = tmp_path / "cli-sites"
    sites.mkdir()
    (sites / "ftest.yaml").write_text(yaml.safe_dump(site_dict()))
    base = [PY, "-m", "panda_wms.cli", "factory", "--server", server.url, "--site-configs",
            str(sites), "--state-dir", str(tmp_path / "fs"), "--once"]
    res = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no server key pinned for site(s) FTEST" in res.stderr
    other = tmp_path / "other.pem"
    other.write_text(server.public_key_file().read_text())
    res = subprocess.run(base + ["--server-public-key", str(other), "--server-key-fingerprint",
                                 "sha256:" + "0" * 64], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not the --server-key-fingerprint" in res.stderr


def test_real_pilots_finish_the_jobs(server, tmp_path):
    """End to end on this host: factory -> local backend -> real pilots -> finished jobs."""
    task_id = activate_jobs(server, 3)
    site = site_config(tmp_path, max_queued=3, max_running=3)
    f = Factory(server.url, [site], token=server.pilot_token, pilot_token=server.pilot_token,
                state_dir=tmp_path / "factory", factory_id="ft-e2e",
                server_key_fingerprint=server.key_fingerprint())
    admin = ApiClient(server.url, server.token("admin"))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            f.run_once()
            if admin.task_details(task_id)["jobs"] == {"finished": 3}:
                break
            time.sleep(0.5)
        jobs = admin.task_details(task_id)["jobs"]
        logs = [p.read_text()[-1500:] for p in (tmp_path / "factory").rglob("pilot.log")]
        assert jobs == {"finished": 3}, (jobs, logs)
        wait_cycles(f, lambda r: all(p.final for p in f.pilots.values()), timeout=60)
        assert {p.state for p in f.pilots.values()} == {"done"}
        assert summary(server)["sites"][SITE] == {"done": len(f.pilots)}
    finally:
        f.cancel_all()


def test_cli_once_and_daemon(server, tmp_path):
    sites = tmp_path / "cli-sites"
    sites.mkdir()
    (sites / "ftest.yaml").write_text(yaml.safe_dump(site_dict()))
    (sites / "broken.yaml").write_text("name: [")
    token = tmp_path / "pilot.token"
    token.write_text(server.pilot_token)
    base = [PY, "-m", "panda_wms.cli", "factory", "--server", server.url, "--site-configs",
            str(sites), "--token-file", str(token), "--state-dir", str(tmp_path / "fs"),
            "--server-public-key", str(server.public_key_file())]
    res = subprocess.run(base + ["--once"], capture_output=True, text=True, timeout=60)
    # the broken file is reported (exit 1) but does not stop the good site
    assert res.returncode == 1
    assert f"{SITE}: activated=0 queued=0 running=0 submitted=0" in res.stdout
    assert "broken.yaml" in res.stderr
    (sites / "broken.yaml").unlink()
    res = subprocess.run(base + ["--once"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr

    daemon = subprocess.Popen(base + ["--interval", "0.2"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    daemon.send_signal(signal.SIGTERM)
    out, _ = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, out
    assert "stopping after this cycle" in out and "stopped" in out
    state = json.loads((tmp_path / "fs" / STATE_FILE).read_text())
    assert state["pilots"] == []


def test_cli_no_valid_site(tmp_path):
    (tmp_path / "s").mkdir()
    res = subprocess.run([PY, "-m", "panda_wms.cli", "factory", "--server", "http://127.0.0.1:1",
                          "--site-configs", str(tmp_path / "s"), "--once"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no valid site config" in res.stderr


def test_pilot_the_batch_system_forgot_is_failed_after_three_cycles(server, tmp_path, factories):
    activate_jobs(server, 1)
    f = make(factories, server, [site_config(tmp_path, max_queued=1, max_running=1)], tmp_path)
    assert f.run_once().sites[SITE].submitted == 1   # max_queued=1: no second pilot meanwhile
    (rec,) = f.pilots.values()
    backend = f.backend(f.sites[SITE])
    pid = backend._read(rec.batch_id)["pid"]
    (backend.state_dir / f"{rec.batch_id}.json").unlink()   # the batch system lost it
    os.killpg(pid, signal.SIGKILL)
    for _ in range(2):
        f.run_once()
        assert rec.state == "queued"               # patience: it may just not be listed yet
    f.run_once()
    assert rec.state == "failed" and "no such pilot" in rec.reason
    assert f.health[SITE].consecutive_failures == 1


def test_site_configs_are_reloaded_by_the_daemon(server, tmp_path, factories):
    activate_jobs(server, 3)
    f = make(factories, server, [site_config(tmp_path, max_queued=1, max_running=1)], tmp_path)
    assert f.run_once().sites[SITE].submitted == 1
    bigger = site_config(tmp_path, max_queued=3, max_running=3)
    f.update_sites([bigger])
    assert f.backend(f.sites[SITE]) is not None
    assert f.run_once().sites[SITE].submitted == 2      # 3 activated - 1 starting
    f.update_sites([])                                  # the file was removed
    assert f.sites[SITE].status == "offline"
    report = f.run_once()
    assert report.sites[SITE].skipped == "site status is offline"
    assert len(f.pilots) == 3                           # still followed

    stop = __import__("threading").Event()
    calls = []

    def reload():
        calls.append(1)
        stop.set()
        return [bigger]
    f.run(stop, interval=0.01, reload=reload)
    assert calls == [1] and f.sites[SITE].status == "online"


def test_final_pilots_and_their_workdirs_are_pruned(server, tmp_path, factories):
    activate_jobs(server, 1)
    clock = Clock()
    f = make(factories, server, [site_config(tmp_path)], tmp_path, command=["true"],
             clock=clock, keep_final_s=100)
    f.run_once()
    (rec,) = f.pilots.values()
    f.sites[SITE].status = "offline"
    wait_cycles(f, lambda r: rec.final and rec.reported)
    assert Path(rec.workdir).is_dir()
    clock.now += 101
    f.run_once()
    assert f.pilots == {} and not Path(rec.workdir).exists()


def test_a_broken_backend_does_not_stop_the_other_sites(server, tmp_path, factories):
    activate_jobs(server, 2)
    good = site_config(tmp_path)
    bad_data = site_dict()
    bad_data["name"] = "BROKEN_OPTS"
    bad_data["scheduler"]["options"] = {"slots": "many"}     # the backend refuses it
    bad = parse_site_config(bad_data, env={"PANDA_SE_ROOT": str(tmp_path / "se")})
    f = make(factories, server, [bad, good], tmp_path)
    f.activated_count = lambda name: 2                       # both sites have work
    report = f.run_once()
    assert report.sites["BROKEN_OPTS"].submitted == 0
    assert "slots" in report.sites["BROKEN_OPTS"].errors[0]
    assert report.sites[SITE].submitted == 2
