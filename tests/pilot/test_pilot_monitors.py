"""Each monitor made to fire for real: a payload that loops, eats memory, fills its work dir,
outlives its wall time, falls silent; the batch slot ending; a hung transfer; the server's kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path
from pilotkit import fake, make_job, metrics, run_pilot, se  # noqa: F401


def run_and_final(fake, tmp_path, job, *args):
    fake.add_job(job)
    t0 = time.monotonic()
    res = run_pilot(fake, tmp_path / "wd", *args)
    final = fake.final(job["PandaID"])
    assert final is not None, res.stderr
    return final, time.monotonic() - t0, res


def test_looping_job_is_killed(fake, tmp_path):
    fake.site_config["limits"]["looping_s"] = 1
    final, took, res = run_and_final(fake, tmp_path, make_job(601, "echo start > progress; sleep 60"))
    assert final["state"] == "failed"
    assert int(final["pilotErrorCode"]) == ErrorCode.LOOPING_JOB, res.stderr
    assert "no output file changed" in final["pilotErrorDiag"]
    assert took < 30


def test_progressing_job_is_not_looping(fake, tmp_path):
    fake.site_config["limits"]["looping_s"] = 2     # margin for a loaded machine
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i > progress.$i; sleep 0.3; done"
    final, _, res = run_and_final(fake, tmp_path, make_job(602, script))
    assert final["state"] == "finished", res.stderr


def test_memory_hog_in_a_grandchild_is_killed(fake, tmp_path):
    hog = (f"{sys.executable} -c \"x = b'x' * (300 * 2**20); import time; time.sleep(60)\" & wait")
    final, took, res = run_and_final(fake, tmp_path, make_job(603, hog, minRamCount=100))
    assert int(final["pilotErrorCode"]) == ErrorCode.MEMORY_LIMIT, res.stderr
    assert "over the limit of 100 MB" in final["pilotErrorDiag"]
    assert int(final["maxRSS"]) > 100 * 1024
    assert took < 30


def test_work_dir_too_large(fake, tmp_path):
    script = "head -c 30000000 /dev/zero > big.dat; sleep 60"
    final, _, res = run_and_final(fake, tmp_path, make_job(604, script, maxDiskCount=10))
    assert int(final["pilotErrorCode"]) == ErrorCode.WORKDIR_TOO_LARGE, res.stderr


def test_free_disk_below_minimum(fake, tmp_path):
    fake.site_config["limits"]["min_free_disk_mb"] = 10**9
    final, _, res = run_and_final(fake, tmp_path, make_job(605, "sleep 60"))
    assert int(final["pilotErrorCode"]) == ErrorCode.DISK_SPACE_LOW, res.stderr


def test_job_outlives_its_wall_time(fake, tmp_path):
    final, took, res = run_and_final(fake, tmp_path, make_job(606, "sleep 60", maxWalltime=1))
    assert int(final["pilotErrorCode"]) == ErrorCode.PAYLOAD_WALLTIME, res.stderr
    assert final["transExitCode"] != "0"
    assert took < 30


def test_two_monitors_firing_in_one_cycle_the_first_registered_wins(fake, tmp_path):
    """A silent payload past both limits trips looping and walltime in the same cycle (its idle
    time is its run time); looping is registered first (setup.py), so its code is reported."""
    fake.site_config["limits"]["looping_s"] = 1
    final, _, res = run_and_final(fake, tmp_path, make_job(608, "sleep 60", maxWalltime=1))
    assert int(final["pilotErrorCode"]) == ErrorCode.LOOPING_JOB, res.stderr
    assert "no output file changed" in final["pilotErrorDiag"]


def test_batch_slot_ending_stops_the_payload(fake, tmp_path):
    job = make_job(607, "sleep 60", maxWalltime=0)
    final, took, res = run_and_final(fake, tmp_path, job, "--walltime", "6", "--reserve", "1")
    assert int(final["pilotErrorCode"]) == ErrorCode.BATCH_WALLTIME, res.stderr
    assert took < 20


def test_silent_stdout(fake, tmp_path):
    final, _, res = run_and_final(fake, tmp_path, make_job(608, "echo hi; sleep 60"),
                                  "--stdout-silent", "1")
    assert int(final["pilotErrorCode"]) == ErrorCode.PAYLOAD_STDOUT_SILENT, res.stderr


def test_silent_stdout_limit_from_the_site_config(fake, tmp_path):
    from site_configs import EXAMPLES_DIR, load_site_config, validate_dict

    demo = load_site_config(EXAMPLES_DIR / "LOCAL_DEMO.yaml").to_dict()
    demo["limits"]["stdout_silent_s"] = 1    # the key is part of the site-config schema
    assert validate_dict(demo)["limits"]["stdout_silent_s"] == 1
    fake.site_config["limits"]["stdout_silent_s"] = 1
    final, _, res = run_and_final(fake, tmp_path, make_job(618, "echo hi; sleep 60"))
    assert int(final["pilotErrorCode"]) == ErrorCode.PAYLOAD_STDOUT_SILENT, res.stderr


def test_kill_command_kills_whole_tree_and_nothing_else(fake, tmp_path):
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    pidfile = tmp_path / "grandchild.pid"
    # the grandchild ignores SIGTERM: only the SIGKILL that follows can end it
    script = (f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; while :; do sleep 1; done' & "
              "sleep 60")
    def kill_when_running():   # the server decides to kill once the payload runs
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        fake.commands["609"] = "tobekilled"

    threading.Thread(target=kill_when_running, daemon=True).start()
    try:
        final, took, res = run_and_final(fake, tmp_path, make_job(609, script), "--heartbeat", "0.5")
        assert final["state"] == "failed"
        assert int(final["pilotErrorCode"]) == ErrorCode.KILLED_BY_SERVER, res.stderr
        grandchild = int(pidfile.read_text())
        deadline = time.monotonic() + 5
        while psutil.pid_exists(grandchild) and time.monotonic() < deadline:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.1)
        assert not psutil.pid_exists(grandchild) or \
            psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None   # never a process the pilot did not start
    finally:
        bystander.kill()
        bystander.wait()


def test_heartbeats_carry_metrics(fake, tmp_path):
    script = "for i in 1 2 3 4 5 6 7 8; do echo $i > p.$i; sleep 0.25; done"
    final, _, res = run_and_final(fake, tmp_path, make_job(610, script), "--heartbeat", "0.5")
    assert final["state"] == "finished", res.stderr
    beats = [u for u in fake.updates(610) if u["state"] == "running" and u.get("jobMetrics")]
    assert beats, res.stderr
    m = metrics(beats[-1])
    assert float(beats[-1]["cpuConsumptionTime"]) >= 0 and int(beats[-1]["maxRSS"]) > 0
    for key in ("cpuModel", "cpuCores", "memTotalMB", "load1", "diskFreeMB", "rssMB",
                "workDirSizeMB", "payloadWallSeconds"):
        assert key in m, (key, m)


def test_hung_transfer_is_killed(fake, se, tmp_path):
    path = se / replica_path("test", "hung.dat")
    path.parent.mkdir(parents=True)
    os.mkfifo(path)          # opening it for reading blocks forever: a hung storage element
    fake.site_config["transfer"] = {"timeout_s": 1, "retries": 1}
    entry = {"lfn": "hung.dat", "scope": "test", "fsize": 10, "checksum": "ad:00000001"}
    final, took, res = run_and_final(fake, tmp_path, make_job(611, "cat hung.dat", inputs=[entry]))
    assert final["state"] == "failed"
    assert int(final["pilotErrorCode"]) == ErrorCode.STAGEIN_TIMEOUT, res.stderr
    assert took < 30
    assert not list((tmp_path / "wd").rglob("*.panda-part"))


def test_sigterm_to_pilot_fails_job_with_1201(fake, tmp_path):
    from pilotkit import pilot_cmd, pilot_env

    fake.add_job(make_job(612, "sleep 60"))
    proc = subprocess.Popen(pilot_cmd(fake, tmp_path / "wd"), env=pilot_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        fake.wait_for(lambda: any(u["state"] == "running" for u in fake.updates(612)))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = fake.final(612)
    assert final is not None, out
    assert int(final["pilotErrorCode"]) == ErrorCode.SIGTERM


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs: a disk that really fills up (needs root; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk(fake, small_fs, tmp_path):
    fake.site_config["limits"]["min_free_disk_mb"] = 1
    fake.add_job(make_job(613, "head -c 10000000 /dev/zero > fill.dat; sleep 60",
                          outputs=["fill.dat"]))
    res = run_pilot(fake, small_fs / "wd")
    final = fake.final(613)
    assert final is not None, res.stderr
    assert final["state"] == "failed"
    assert int(final["pilotErrorCode"]) in (ErrorCode.DISK_SPACE_LOW, ErrorCode.NO_LOCAL_SPACE), \
        res.stderr
    assert "Traceback" not in res.stderr
