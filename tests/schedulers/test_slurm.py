"""The slurm backend against a REAL single-node Slurm started for this session."""
from __future__ import annotations

import json
import os
import stat
import sys
import time

import pytest

import slurm_cluster
from schedulers.base import BatchState, PilotSpec, SchedulerError, load_backend
from schedulers.slurm import SlurmBackend, format_walltime, map_state, parse_exit_code

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PY = sys.executable


@pytest.fixture(scope="session")
def slurm():
    """munged + slurmctld + slurmd, private to this session. Backends reach it through their
    ``slurm_conf`` option; the rest of the process environment is left alone."""
    try:
        cluster = slurm_cluster.start()
    except slurm_cluster.SlurmUnavailable as exc:
        pytest.skip(f"no Slurm here: {exc}")
    yield cluster
    cluster.stop()


def backend_for(cluster, **options) -> SlurmBackend:
    return SlurmBackend(slurm_conf=str(cluster.conf), **options)


def wait_final(backend, bid, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = backend.details([bid])[bid]
        if info.state in (BatchState.DONE, BatchState.FAILED, BatchState.CANCELLED):
            return info
        time.sleep(0.2)
    raise AssertionError(f"slurm job {bid} still {info.state} after {timeout} s")


def wait_state(backend, bid, state, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.status([bid])[bid] == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"slurm job {bid} never reached {state}")


def test_pure_helpers():
    assert format_walltime(1) == "0-00:01:00"
    assert format_walltime(3600) == "0-01:00:00"
    assert format_walltime(90061) == "1-01:02:00"
    assert map_state("CANCELLED by 0") == BatchState.CANCELLED
    assert map_state("PENDING") == BatchState.QUEUED
    assert map_state("OUT_OF_MEMORY") == BatchState.FAILED
    assert map_state("WHATEVER") == BatchState.UNKNOWN
    assert parse_exit_code("3:0") == (3, 0) and parse_exit_code("0:9") == (0, 9)


def test_pilot_runs_with_its_environment_and_argv(slurm, tmp_path):
    backend = load_backend("slurm", partition="debug", command_timeout_s=20,
                           slurm_conf=str(slurm.conf))
    weird = "a b; $(touch pwned) 'q' \"d\" *"
    code = ("import os, sys, json; print('pilot says hi'); json.dump([sys.argv[1:], "
            "os.environ.get('PANDA_AUTH_TOKEN'), os.environ.get('SLURM_JOB_ID')], "
            "open('seen.json', 'w'))")
    bid = backend.submit(PilotSpec(site="SLURM_TEST", command=[PY, "-c", code, weird],
                                   env={"PANDA_AUTH_TOKEN": "secret-tok"}, workdir=str(tmp_path),
                                   walltime_s=300, cores=1, memory_mb=100))
    info = wait_final(backend, bid)
    assert (info.state, info.exit_code) == (BatchState.DONE, 0), info
    assert json.loads((tmp_path / "seen.json").read_text()) == [[weird], "secret-tok", bid]
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / f"pilot-{bid}.out").read_text() == "pilot says hi\n"
    # the token never appears on a command line Slurm recorded
    shown = slurm.run("scontrol", "show", "job", bid).stdout
    assert "secret-tok" not in shown


def test_resources_reach_slurm(slurm, tmp_path):
    backend = backend_for(slurm, partition="debug")
    bid = backend.submit(PilotSpec(site="S", command=["sleep", "30"], workdir=str(tmp_path),
                                   walltime_s=125, cores=2, memory_mb=300, name="res-test"))
    try:
        shown = slurm.run("scontrol", "show", "job", "-o", bid).stdout
        assert "TimeLimit=00:03:00" in shown
        assert "JobName=res-test" in shown
        assert "MinMemoryNode=300M" in shown
        assert "NumCPUs=2" in shown or "MinCPUsNode=2" in shown
        assert "Partition=debug" in shown
    finally:
        backend.cancel([bid])


def test_failed_pilot_has_its_exit_code(slurm, tmp_path):
    backend = backend_for(slurm)
    bid = backend.submit(PilotSpec(site="S", command=["sh", "-c", "exit 3"],
                                   workdir=str(tmp_path)))
    info = wait_final(backend, bid)
    assert (info.state, info.exit_code) == (BatchState.FAILED, 3), info
    assert "exit code 3" in info.reason


def test_cancel_running_and_queued(slurm, tmp_path):
    backend = backend_for(slurm)
    running = backend.submit(PilotSpec(site="S", command=["sleep", "60"], workdir=str(tmp_path),
                                       cores=os.cpu_count() or 1))
    wait_state(backend, running, BatchState.RUNNING)
    queued = backend.submit(PilotSpec(site="S", command=["sleep", "60"], workdir=str(tmp_path)))
    time.sleep(1.5)
    assert backend.status([queued])[queued] == BatchState.QUEUED   # the node is full
    backend.cancel([running, queued])
    assert wait_final(backend, running).state == BatchState.CANCELLED
    assert wait_final(backend, queued).state == BatchState.CANCELLED
    backend.cancel([running])                      # cancelling an ended job is no error


def test_jobs_squeue_has_forgotten_come_from_sacct(slurm, tmp_path, monkeypatch):
    backend = backend_for(slurm)
    ok = backend.submit(PilotSpec(site="S", command=["true"], workdir=str(tmp_path)))
    bad = backend.submit(PilotSpec(site="S", command=["sh", "-c", "exit 7"],
                                   workdir=str(tmp_path)))
    wait_final(backend, ok), wait_final(backend, bad)
    monkeypatch.setattr(backend, "_squeue", lambda ids: {})    # as after MinJobAge
    got = backend.details([ok, bad])
    assert (got[ok].state, got[ok].exit_code) == (BatchState.DONE, 0)
    assert (got[bad].state, got[bad].exit_code) == (BatchState.FAILED, 7)


def test_unknown_and_hostile_ids(slurm):
    backend = backend_for(slurm)
    got = backend.status(["999999", "1;rm -rf /", "../x"])
    assert got == {"999999": BatchState.UNKNOWN, "1;rm -rf /": BatchState.UNKNOWN,
                   "../x": BatchState.UNKNOWN}
    backend.cancel(["999999"])
    with pytest.raises(SchedulerError, match="not Slurm job ids"):
        backend.cancel(["1;rm -rf /"])


def test_refusal_is_a_clear_error(slurm, tmp_path):
    backend = backend_for(slurm, partition="no_such_partition")
    with pytest.raises(SchedulerError, match="sbatch failed.*[Pp]artition"):
        backend.submit(PilotSpec(site="S", command=["true"], workdir=str(tmp_path)))


def test_unknown_option_is_refused():
    with pytest.raises(SchedulerError, match="unknown option.*pool"):
        SlurmBackend(pool="x")


def test_missing_commands_and_hung_commands(tmp_path):
    backend = SlurmBackend(bin_dir=str(tmp_path))
    with pytest.raises(SchedulerError, match="not found"):
        backend.submit(PilotSpec(site="S", command=["true"], workdir=str(tmp_path)))
    hung = tmp_path / "squeue"                 # a squeue that never answers
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(hung.stat().st_mode | stat.S_IEXEC)
    backend = SlurmBackend(bin_dir=str(tmp_path), command_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(SchedulerError, match="squeue did not answer within 0.5 s"):
        backend.status(["1"])
    assert time.monotonic() - t0 < 5


def test_factory_drives_real_pilots_through_slurm_to_finished_jobs(slurm, tmp_path, monkeypatch):
    """The issue's end-to-end test: factory -> sbatch -> real pilots -> finished jobs on a real
    server; the pilots' batch ids and final states reach the server's pilot summary."""
    import requests
    import yaml

    from testkit import start_server, stop_server
    from panda_core.client import ApiClient
    from schedulers.factory import Factory
    from site_configs import parse_site_config
    from test_factory import SITE, activate_jobs, site_dict

    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    data = site_dict(max_queued=2, max_running=2, walltime_s=600)
    data["scheduler"] = {"backend": "slurm",
                         "options": {"partition": "debug", "command_timeout_s": 20,
                                     "slurm_conf": str(slurm.conf)}}
    data["resources"]["memory_mb"] = 500
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
    server = start_server(tmp_path / "srv", site_dir=sites)
    try:
        server.se = tmp_path / "se"
        pilot_token = server.token("pilot", "slurm-pilots", site=SITE)
        task_id = activate_jobs(server, 4, name="slurmtask")
        site = parse_site_config(data)
        factory = Factory(server.url, [site], token=pilot_token, pilot_token=pilot_token,
                          state_dir=tmp_path / "factory", factory_id="slurm-e2e",
                          server_key_fingerprint=server.key_fingerprint())
        admin = ApiClient(server.url, server.token("admin"))
        deadline = time.monotonic() + 120
        jobs = {}
        while time.monotonic() < deadline:
            factory.run_once()
            jobs = admin.task_details(task_id)["jobs"]
            if jobs == {"finished": 4}:
                break
            time.sleep(0.5)
        outs = [p.read_text()[-1500:] for p in (tmp_path / "factory").rglob("pilot-*.out")]
        assert jobs == {"finished": 4}, (jobs, outs, server.log()[-2000:])
        # every pilot was a Slurm job, and ended as one
        while time.monotonic() < deadline and not all(p.final for p in factory.pilots.values()):
            factory.run_once()
            time.sleep(0.5)
        assert factory.pilots and {p.backend for p in factory.pilots.values()} == {"slurm"}
        assert {p.state for p in factory.pilots.values()} == {"done"}
        assert {p.exit_code for p in factory.pilots.values()} == {0}
        for p in factory.pilots.values():
            acct = slurm.run("sacct", "-c", "-n", "-P", "-j", p.batch_id, "-o",
                             "JobID,State").stdout
            assert f"{p.batch_id}|COMPLETED" in acct
        got = requests.get(server.url + "/api/v1/pilot/summary", timeout=10).json()["data"]
        assert got["sites"][SITE] == {"done": len(factory.pilots)}
        # the server knows which batch job ran each job
        batch_ids = {j["batch_id"] for j in admin.jobs(task_id)}
        assert batch_ids and batch_ids <= {p.batch_id for p in factory.pilots.values()}, batch_ids
    finally:
        stop_server(server)


def test_factory_stops_a_site_whose_submissions_fail(slurm, tmp_path, caplog):
    """A refused sbatch (unknown partition) counts as a failure; the site is stopped, with why."""
    from schedulers.factory import Factory
    from site_configs import parse_site_config
    from test_factory import SITE, site_dict

    data = site_dict(max_queued=5, max_running=5)
    data["scheduler"] = {"backend": "slurm", "options": {"partition": "nowhere",
                                                         "slurm_conf": str(slurm.conf)}}
    site = parse_site_config(data, env={"PANDA_SE_ROOT": str(tmp_path)})

    class ManyJobs(Factory):
        def activated_count(self, name):           # no server needed for this policy check
            return 10
    f = ManyJobs("http://127.0.0.1:9", [site], state_dir=tmp_path / "f", max_failures=2)
    first = f.run_once().sites[SITE]
    assert first.submitted == 0 and "sbatch failed" in first.errors[0]
    assert "nowhere" in first.errors[0] or "partition" in first.errors[0].lower()
    f.run_once()
    assert f.health[SITE].disabled_since is not None
    assert f.health[SITE].disabled_reason.startswith("2 pilots in a row failed; last: "
                                                     "submission failed: sbatch failed")
    third = f.run_once().sites[SITE]
    assert third.skipped.startswith("not submitting: 2 pilots in a row failed")
    assert any("stopped submitting pilots" in r.getMessage() for r in caplog.records)


def test_sbatch_that_hangs_after_slurm_took_the_job(slurm, tmp_path):
    """sbatch accepted by slurmctld, then hung: the job is found by its tag, not lost."""
    import shutil as sh
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for cmd in ("squeue", "sacct", "scancel"):
        (bindir / cmd).symlink_to(sh.which(cmd))
    wrapper = bindir / "sbatch"
    pids = tmp_path / "pids"
    wrapper.write_text(f"#!/bin/sh\n{sh.which('sbatch')} \"$@\"\n"
                       f"sleep 60 & echo $$ $! > {pids}\nwait\n")
    wrapper.chmod(0o755)
    backend = backend_for(slurm, bin_dir=str(bindir), command_timeout_s=2)
    t0 = time.monotonic()
    bid = backend.submit(PilotSpec(site="S", command=["sh", "-c", "exit 0"],
                                   workdir=str(tmp_path)))
    assert time.monotonic() - t0 < 10
    assert slurm.run("squeue", "-h", "-a", "-t", "all", "-j", bid, "-o", "%k").stdout.strip() \
        .startswith("panda-wms:")
    assert wait_final(backend, bid).state == BatchState.DONE
    # the hung wrapper and its sleep were killed with their process group
    import psutil
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_factory_runs_onefile_pilots_on_slurm_with_a_bare_python(slurm, tmp_path, monkeypatch):
    """Issue 16: the batch job needs only python3. Debian's /usr/bin/python3 (no panda-wms; the
    batch script runs it with -E -s, so the PYTHONPATH Slurm exports does not reach it) fetches,
    verifies and caches the server's pilot file and takes the jobs to finished."""
    import subprocess

    import yaml

    from testkit import start_server, stop_server
    from panda_core.client import ApiClient
    from schedulers.factory import Factory
    from site_configs import parse_site_config
    from test_factory import SITE, activate_jobs, site_dict

    python = "/usr/bin/python3"
    factory = None
    assert subprocess.run([python, "-E", "-s", "-c", "import panda_core"], cwd="/",
                          capture_output=True).returncode != 0
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    monkeypatch.setenv("PANDA_PILOT_CACHE", str(tmp_path / "node-cache"))
    data = site_dict(max_queued=2, max_running=2, walltime_s=600)
    data["scheduler"] = {"backend": "slurm",
                         "options": {"partition": "debug", "command_timeout_s": 20,
                                     "slurm_conf": str(slurm.conf)}}
    data["resources"]["memory_mb"] = 500
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
    server = start_server(tmp_path / "srv", site_dir=sites)
    try:
        server.se = tmp_path / "se"
        pilot_token = server.token("pilot", "slurm-onefile", site=SITE)
        task_id = activate_jobs(server, 2, name="slurmonefile")
        factory = Factory(server.url, [parse_site_config(data)], token=pilot_token,
                          pilot_token=pilot_token, state_dir=tmp_path / "factory",
                          factory_id="slurm-onefile", pilot_launch="onefile", node_python=python,
                          server_key_fingerprint=server.key_fingerprint())
        admin = ApiClient(server.url, server.token("admin"))
        deadline = time.monotonic() + 120
        jobs = {}
        while time.monotonic() < deadline:
            factory.run_once()
            jobs = admin.task_details(task_id)["jobs"]
            if jobs == {"finished": 2}:
                break
            time.sleep(0.5)
        outs = [p.read_text()[-2000:] for p in (tmp_path / "factory").rglob("pilot-*.out")]
        assert jobs == {"finished": 2}, (jobs, outs, server.log()[-2000:])
        assert any(f"({python})" in o and "pilot panda-wms-pilot 0.1+" in o for o in outs), outs
        assert [p.name for p in (tmp_path / "node-cache").iterdir()
                if not p.name.startswith(".")] == [factory.pilot_version(factory.sites[SITE])]
        # a tampered file, met by a node that has no copy yet: the batch job refuses it, says
        # why in its output, and the factory sees the pilot fail with the refusal's exit code.
        # The bytes change on the way (a man in the middle the batch jobs fetch through; the
        # server itself refuses to serve a stored file whose bytes changed)
        from peers import TamperingProxy
        proxy = TamperingProxy(server.url)
        factory.server_url = proxy.url          # the batch scripts' server; the factory's own
        monkeypatch.setenv("PANDA_PILOT_CACHE", str(tmp_path / "fresh-node-cache"))
        task2 = activate_jobs(server, 1, name="slurmtampered")
        before = set(factory.pilots)
        deadline = time.monotonic() + 90
        new = []
        while time.monotonic() < deadline:
            factory.run_once()
            new = [p for k, p in factory.pilots.items() if k not in before]
            if new and all(p.final for p in new):
                break
            time.sleep(0.5)
        assert new and {(p.state, p.exit_code) for p in new} == {("failed", 4)}, new
        outs = [p.read_text() for p in (tmp_path / "factory").rglob("pilot-*.out")
                if "REFUSED" in p.read_text()]
        assert outs and "signature does not verify with the pinned server key" in outs[0]
        assert admin.task_details(task2)["jobs"] == {"activated": 1} and proxy.tampered
        proxy.close()
    finally:
        if factory is not None:
            factory.cancel_all()
        stop_server(server)
