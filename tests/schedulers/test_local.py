"""The local backend: real processes, slots, exit codes, cancel, restart of the factory."""
from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from schedulers.base import BatchState, PilotSpec, SchedulerError, load_backend
from schedulers.local import LocalBackend

PY = sys.executable


def spec(code: str, tmp_path=None, **kw) -> PilotSpec:
    return PilotSpec(site="LOCAL_TEST", command=[PY, "-c", code], **kw)


def wait_state(backend, bid, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = backend.details([bid])[bid]
        if info.state in states:
            return info
        time.sleep(0.05)
    raise AssertionError(f"{bid} still {backend.status([bid])[bid]} after {timeout} s")


@pytest.fixture
def backend(tmp_path):
    b = LocalBackend(slots=2, state_dir=str(tmp_path / "state"), kill_grace_s=2)
    yield b
    b.cancel([r["batch_id"] for r in b._records()])


def test_loaded_through_stevedore(tmp_path):
    b = load_backend("local", slots=1, state_dir=str(tmp_path))
    assert isinstance(b, LocalBackend) and b.slots == 1


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(SchedulerError, match="unknown option.*partition"):
        LocalBackend(state_dir=str(tmp_path), partition="x")


def test_exit_codes_map_to_done_and_failed(backend, tmp_path):
    ok = backend.submit(spec("print('hello from the pilot')", workdir=str(tmp_path / "w1")))
    bad = backend.submit(spec("import sys; sys.exit(3)"))
    info_ok = wait_state(backend, ok, {BatchState.DONE, BatchState.FAILED})
    info_bad = wait_state(backend, bad, {BatchState.DONE, BatchState.FAILED})
    assert (info_ok.state, info_ok.exit_code) == (BatchState.DONE, 0)
    assert (info_bad.state, info_bad.exit_code) == (BatchState.FAILED, 3)
    assert "code 3" in info_bad.reason
    # stdout lands in a log file in the pilot's work dir
    assert (tmp_path / "w1" / "pilot.log").read_text() == "hello from the pilot\n"


def test_environment_and_argv_reach_the_pilot_unchanged(backend, tmp_path):
    out = tmp_path / "w"
    weird = "a b; $(touch pwned) 'q' \"d\""
    code = ("import os, sys, json; json.dump([sys.argv[1:], os.environ['PANDA_AUTH_TOKEN'], "
            "os.environ['PANDA_BATCH_ID']], open('seen.json', 'w'))")
    bid = backend.submit(PilotSpec(site="S", command=[PY, "-c", code, weird],
                                   env={"PANDA_AUTH_TOKEN": "tok123"}, workdir=str(out)))
    assert wait_state(backend, bid, {BatchState.DONE, BatchState.FAILED}).state == BatchState.DONE
    import json
    assert json.loads((out / "seen.json").read_text()) == [[weird], "tok123", bid]
    assert not (out / "pwned").exists()
    # the token is not left on disk once the pilot started
    assert "tok123" not in (backend.state_dir / f"{bid}.json").read_text()


def test_slots_limit_running_pilots(backend):
    ids = [backend.submit(spec("import time; time.sleep(30)")) for _ in range(3)]
    states = backend.status(ids)
    assert sorted(states.values()) == sorted([BatchState.RUNNING, BatchState.RUNNING,
                                              BatchState.QUEUED])
    queued = [b for b, s in states.items() if s == BatchState.QUEUED][0]
    running = [b for b, s in states.items() if s == BatchState.RUNNING]
    backend.cancel(running[:1])
    assert backend.status(running[:1])[running[0]] == BatchState.CANCELLED
    # the freed slot goes to the queued pilot
    assert backend.status([queued])[queued] == BatchState.RUNNING


def test_cancel_kills_the_whole_process_group(backend, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(%r, 'w').write(str(p.pid)); time.sleep(60)"
            % str(pidfile))
    bid = backend.submit(spec(code))
    wait_state(backend, bid, {BatchState.RUNNING})
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    backend.cancel([bid])
    assert backend.status([bid])[bid] == BatchState.CANCELLED
    deadline = time.monotonic() + 5
    while psutil.pid_exists(grandchild) and time.monotonic() < deadline:
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert not psutil.pid_exists(grandchild) or \
        psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    backend.cancel([bid])                       # cancelling again is no error


def test_batch_ids_survive_a_factory_restart(tmp_path):
    state = str(tmp_path / "state")
    first = LocalBackend(slots=1, state_dir=state)
    long_id = first.submit(spec("import time; time.sleep(30)"))
    short_id = first.submit(spec("import sys; sys.exit(0)"))     # queued behind the long one
    assert first.status([long_id, short_id]) == {long_id: BatchState.RUNNING,
                                                 short_id: BatchState.QUEUED}
    del first                                   # the factory restarts
    second = LocalBackend(slots=1, state_dir=state)
    assert second.status([long_id])[long_id] == BatchState.RUNNING
    second.cancel([long_id])
    info = wait_state(second, short_id, {BatchState.DONE, BatchState.FAILED})
    assert (info.state, info.exit_code) == (BatchState.DONE, 0)


def test_pid_reuse_is_not_mistaken_for_the_pilot(backend):
    bid = backend.submit(spec("import time; time.sleep(30)"))
    record = backend._read(bid)
    record["create_time"] -= 1000               # as if the pid now belonged to another process
    backend._write(record)
    backend._children.clear()
    info = backend.details([bid])[bid]
    assert info.state == BatchState.FAILED and "vanished" in info.reason
    os.killpg(record["pid"], 9)


def test_walltime_is_enforced(tmp_path, monkeypatch):
    monkeypatch.setattr("schedulers.local.WALLTIME_GRACE_S", 0)
    b = LocalBackend(slots=1, state_dir=str(tmp_path), kill_grace_s=1)
    bid = b.submit(spec("import time; time.sleep(60)", walltime_s=1))
    info = wait_state(b, bid, {BatchState.FAILED, BatchState.DONE})
    assert info.state == BatchState.FAILED and "wall time" in info.reason


def test_unknown_and_hostile_ids(backend):
    assert backend.status(["local-doesnotexist0", "../../etc/passwd"]) == {
        "local-doesnotexist0": BatchState.UNKNOWN, "../../etc/passwd": BatchState.UNKNOWN}
    backend.cancel(["local-doesnotexist0"])
    with pytest.raises(SchedulerError):
        backend.cancel(["../../etc/passwd"])


def test_command_that_does_not_exist_fails_cleanly(backend):
    bid = backend.submit(PilotSpec(site="S", command=["/nonexistent/pilot"]))
    info = wait_state(backend, bid, {BatchState.DONE, BatchState.FAILED})
    assert info.state == BatchState.FAILED and info.exit_code == 127


def test_unwritable_state_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SchedulerError, match="cannot create state dir"):
        LocalBackend(state_dir=str(tmp_path / "file" / "sub"))


def test_ended_pilots_are_forgotten_after_keep_final_s(tmp_path):
    b = LocalBackend(slots=2, state_dir=str(tmp_path / "s"), keep_final_s=0.5)
    outside = tmp_path / "outside"
    inside = b.submit(spec("pass"))
    other = b.submit(spec("pass", workdir=str(outside)))
    for bid in (inside, other):
        assert wait_state(b, bid, {BatchState.DONE}).state == BatchState.DONE
    assert (b.state_dir / inside).is_dir()
    time.sleep(0.7)
    assert b.status([inside, other]) == {inside: BatchState.UNKNOWN, other: BatchState.UNKNOWN}
    assert not (b.state_dir / inside).exists()          # its work dir was ours: removed
    assert (outside / "pilot.log").exists()             # a work dir elsewhere is left alone
