"""A server that goes away and comes back; pilots killed with SIGKILL whose jobs a later pilot
recovers from the state files they left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path
from pilotkit import fake, make_job, pilot_cmd, pilot_env, run_pilot, se, stored  # noqa: F401


def start_pilot(fake, workdir, *args):
    """A pilot in the background, its output in a file (a pipe would stay open as long as any
    process it forked lives, e.g. a hung transfer)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir.parent / f"pilot-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(pilot_cmd(fake, workdir, *args), env=pilot_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.logfile = log
    return proc


def finish(proc, timeout=60):
    proc.wait(timeout)
    proc.logfile.seek(0)
    return proc.logfile.read(), None


def state_of(workdir):
    states = [json.loads(p.read_text()) for p in workdir.glob("panda_job_*/pilot_state.json")]
    return states


def test_server_away_during_job_and_back(fake, se, tmp_path):
    fake.add_job(make_job(701, "sleep 1.5; echo result > out.dat", outputs=["out.dat"]))
    proc = start_pilot(fake, tmp_path / "wd", "--server-retries", "7", "--server-backoff", "0.5",
                       "--heartbeat", "0.3")
    try:
        fake.wait_for(lambda: any(u["state"] == "running" for u in fake.updates(701)))
        fake.stop()                                  # the server goes away mid-job ...
        time.sleep(3.0)                              # ... the payload ends while it is away ...
        n_before = len(fake.updates(701))
        fake.start()                                 # ... and it comes back on the same port
        out, _ = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = fake.final(701)
    assert final is not None and final["state"] == "finished", out
    assert "out.dat" in stored(final)
    assert len(fake.updates(701)) > n_before
    assert "retrying" in out
    assert (se / replica_path("test", "out.dat")).read_text() == "result\n"
    assert not state_of(tmp_path / "wd")


def test_final_state_kept_on_disk_and_sent_by_a_later_pilot(fake, se, tmp_path):
    fake.add_job(make_job(702, "sleep 1; echo r > out.dat", outputs=["out.dat"]))
    proc = start_pilot(fake, tmp_path / "wd")
    try:
        fake.wait_for(lambda: any(u["state"] == "running" for u in fake.updates(702)))
        fake.stop()
        out, _ = finish(proc)        # gives up: retries exhausted
    finally:
        if proc.poll() is None:
            proc.kill()
    assert fake.final(702) is None
    states = state_of(tmp_path / "wd")
    assert len(states) == 1 and states[0]["phase"] == "final_pending", out
    assert states[0]["final"]["state"] == "finished"
    assert "kept in" in out
    fake.start()
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0, res.stderr
    final = fake.final(702)
    assert final is not None and final["state"] == "finished"
    assert "out.dat" in stored(final) and "job702.log.tgz" in stored(final)
    assert not state_of(tmp_path / "wd")


def test_sigkilled_pilot_is_recovered_by_the_next(fake, se, tmp_path):
    marker = tmp_path / "go"
    script = f"while [ ! -e {marker} ]; do sleep 0.1; done; echo made > out.dat"
    fake.add_job(make_job(703, script, outputs=["out.dat"]))
    proc = start_pilot(fake, tmp_path / "wd")
    fake.wait_for(lambda: any(u["state"] == "running" for u in fake.updates(703)))
    proc.send_signal(signal.SIGKILL)
    finish(proc, 10)
    [state] = state_of(tmp_path / "wd")
    assert state["phase"] == "running"
    payload_pid = state["payload"]["pid"]
    os.kill(payload_pid, 0)                           # the payload lives on, in its own session

    # a pilot arriving while that payload still runs leaves the job alone
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0, res.stderr
    assert fake.final(703) is None and "still running" in res.stderr

    marker.touch()                                    # let the payload finish
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not list((tmp_path / "wd").glob("*/work/.payload_exit")):
        time.sleep(0.05)
    res = run_pilot(fake, tmp_path / "wd")
    assert res.returncode == 0, res.stderr
    final = fake.final(703)
    assert final is not None, res.stderr
    assert final["state"] == "finished" and final["transExitCode"] == "0"
    assert set(stored(final)) == {"out.dat", "job703.log.tgz"}
    assert (se / replica_path("test", "out.dat")).read_text() == "made\n"
    assert not state_of(tmp_path / "wd")
    assert "recovered jobs: 703" in res.stderr


def test_pilot_killed_before_payload_is_reported_lost(fake, se, tmp_path):
    fifo = se / replica_path("test", "slow.dat")
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    entry = {"lfn": "slow.dat", "scope": "test", "fsize": 2, "checksum": "ad:00000001"}
    fake.site_config["transfer"] = {"timeout_s": 300, "retries": 0}
    fake.add_job(make_job(704, "cat slow.dat", inputs=[entry]))
    proc = start_pilot(fake, tmp_path / "wd")
    try:
        fake.wait_for(lambda: any(u["state"] == "starting" for u in fake.updates(704)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and \
                (state_of(tmp_path / "wd") or [{}])[0].get("phase") != "stagein":
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        finish(proc, 10)
        # the orphaned transfer process is hung on the FIFO; a later pilot still gets the job
        fake.site_config["transfer"] = {"timeout_s": 5, "retries": 0}
        res = run_pilot(fake, tmp_path / "wd")
    finally:
        # release the hung copy (a writer opening the FIFO ends the reader's wait)
        def unblock():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
        threading.Thread(target=unblock, daemon=True).start()
        if proc.poll() is None:
            proc.kill()
    final = fake.final(704)
    assert final is not None, res.stderr
    assert final["state"] == "failed"
    assert int(final["pilotErrorCode"]) == ErrorCode.RECOVERED_LOST
    assert "job704.log.tgz" in stored(final)


def test_lost_heartbeats_kill_the_payload_and_report_later(fake, se, tmp_path):
    fake.add_job(make_job(705, "sleep 60"))
    proc = start_pilot(fake, tmp_path / "wd", "--heartbeat", "0.3", "--lost-heartbeat", "1.5")
    try:
        fake.wait_for(lambda: any(u["state"] == "running" for u in fake.updates(705)))
        fake.stop()
        out, _ = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    [state] = state_of(tmp_path / "wd")
    assert state["phase"] == "final_pending", out
    assert int(state["final"]["pilotErrorCode"]) == ErrorCode.NO_HEARTBEAT_REACHED
    fake.start()
    res = run_pilot(fake, tmp_path / "wd")
    assert int(fake.final(705)["pilotErrorCode"]) == ErrorCode.NO_HEARTBEAT_REACHED, res.stderr


def test_live_pilot_job_is_not_recovered_by_a_neighbour(fake, tmp_path):
    """Two pilots share a work-dir base: the second must leave the first's running job alone.
    The job runs until the test says so (a marker file; at most 60 s), not for a fixed time: a
    neighbour slowed by a loaded machine must still meet the first pilot's job alive."""
    go = tmp_path / "go"
    fake.add_job(make_job(706, f"i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; "
                               "i=$((i+1)); done; echo ok > out.dat", outputs=["out.dat"]))
    proc = start_pilot(fake, tmp_path / "wd")
    try:
        fake.wait_for(lambda: any(u["state"] == "running" for u in fake.updates(706)))
        res = run_pilot(fake, tmp_path / "wd")        # a neighbour with nothing to do
        assert res.returncode == 0, res.stderr
        assert fake.final(706) is None                 # it did not report the live job
        assert "recovery:" not in res.stderr
        go.write_text("go")                            # now the first pilot's job may end
        out, _ = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = fake.final(706)
    assert final["state"] == "finished", out
    assert len([u for u in fake.updates(706) if u["state"] in ("finished", "failed")]) == 1


def test_pilot_killed_during_stageout_keeps_its_verdict(fake, se, tmp_path):
    """The payload was killed as looping (1150), then the pilot died while storing the log: the
    recovering pilot reports 1150, not a generic 'lost' failure, and stores the log."""
    from copytools.base import partial_path

    log_replica = se / replica_path("test", "job707.log.tgz")
    log_replica.parent.mkdir(parents=True)
    os.mkfifo(partial_path(str(log_replica)))      # writing the log's temp file hangs
    fake.site_config["limits"]["looping_s"] = 1
    fake.site_config["transfer"] = {"timeout_s": 300, "retries": 0}
    fake.add_job(make_job(707, "sleep 60"))
    proc = start_pilot(fake, tmp_path / "wd")
    try:
        deadline = time.monotonic() + 30
        while (state_of(tmp_path / "wd") or [{}])[0].get("phase") != "stageout":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        finish(proc, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    [state] = state_of(tmp_path / "wd")
    assert state["error"]["code"] == ErrorCode.LOOPING_JOB
    se2 = tmp_path / "se2"
    se2.mkdir()
    fake.site_config["storage"]["output"] = {"name": "SE2", "url": f"file://{se2}"}
    fake.site_config["transfer"] = {"timeout_s": 5, "retries": 0}
    res = run_pilot(fake, tmp_path / "wd")
    final = fake.final(707)
    assert final is not None, res.stderr
    assert int(final["pilotErrorCode"]) == ErrorCode.LOOPING_JOB
    assert "job707.log.tgz" in stored(final)
    assert (se2 / replica_path("test", "job707.log.tgz")).exists()
    # let the orphaned, hung transfer of the dead pilot end
    fd = os.open(partial_path(str(log_replica)), os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)
