"""The htcondor backend against the fake condor_* tools (tests/schedulers/fakes/fake_condor.py),
which really run the submitted pilots; and the fake itself against the formats in HTCondor's
manual. What the fake does not cover is listed in docs/htcondor.md."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from schedulers.base import FINAL_BATCH_STATES, BatchState, PilotSpec, SchedulerError, load_backend
from schedulers.htcondor import HTCondorBackend, quote_arguments, quote_environment

sys.path.insert(0, str(Path(__file__).resolve().parent / "fakes"))
import fake_condor  # noqa: E402

SCHEDD = "schedd.test.local"
TRICKY = """a "quoted" word, it's $HOME and $(DOLLAR) `id` \\back"""


@pytest.fixture
def condor(tmp_path, monkeypatch):
    bin_dir = fake_condor.install(tmp_path / "bin")
    monkeypatch.setenv("FAKE_CONDOR_DIR", str(tmp_path / "condor"))
    monkeypatch.setenv("FAKE_CONDOR_SCHEDD", SCHEDD)
    backend = load_backend("htcondor", condor_bin=str(bin_dir), schedd=SCHEDD,
                           pool="cm.test.local:9618", log_dir=str(tmp_path / "logs"),
                           command_timeout_s=20)
    backend.bin_dir = bin_dir
    backend.tmp = tmp_path
    yield backend
    # end whatever a test left running: each runner leads its own process group
    for path in (tmp_path / "condor" / "jobs").glob("*.json"):
        ad = json.loads(path.read_text())
        if ad.get("JobStatus") == 2 and ad.get("RunnerPid"):
            fake_condor.kill_group(ad["RunnerPid"], grace_s=0.5)


def wait_for(backend, batch_id, states, timeout=30):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        state = backend.status([batch_id])[batch_id]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in states:
            return seen
        if state in FINAL_BATCH_STATES:
            break
        time.sleep(0.1)
    raise AssertionError(f"{batch_id} never reached {states}: {seen}")


def out_file(backend, batch_id, ext="out") -> str:
    return (backend.tmp / "logs" / f"pilot.{batch_id}.{ext}").read_text()


def test_pilot_runs_with_argv_env_and_workdir_intact(condor, tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    spec = PilotSpec(site="CONDOR_TEST", workdir=str(work), walltime_s=600,
                     command=["/bin/sh", "-c", 'printf "arg=%s\\n" "$1"; '
                              'printf "env=%s\\n" "$PANDA_X"; pwd', "sh", TRICKY],
                     env={"PANDA_X": TRICKY})
    assert isinstance(condor, HTCondorBackend)
    batch_id = condor.submit(spec)
    assert batch_id.endswith(".0")
    seen = wait_for(condor, batch_id, {BatchState.DONE})
    assert set(seen) <= {BatchState.QUEUED, BatchState.RUNNING, BatchState.DONE}
    out = out_file(condor, batch_id)
    assert f"arg={TRICKY}\n" in out
    assert f"env={TRICKY}\n" in out
    assert f"{work}\n" in out
    info = condor.details([batch_id])[batch_id]
    assert info.state == BatchState.DONE and info.exit_code == 0
    log = (condor.tmp / "logs" / f"pilot.{batch_id.split('.')[0]}.log").read_text()
    assert log.startswith("000 (") and "005 (" in log


def test_failing_pilot_is_failed_with_exit_code(condor):
    batch_id = condor.submit(PilotSpec(site="S", command=["/bin/sh", "-c", "echo no >&2; exit 3"]))
    wait_for(condor, batch_id, {BatchState.FAILED})
    info = condor.details([batch_id])[batch_id]
    assert info.exit_code == 3 and "exit code 3" in info.reason
    assert out_file(condor, batch_id, "err") == "no\n"


def test_missing_executable_is_held_and_failed(condor):
    batch_id = condor.submit(PilotSpec(site="S", command=["/nonexistent/pilot"]))
    wait_for(condor, batch_id, {BatchState.FAILED})
    assert "Failed to execute" in condor.details([batch_id])[batch_id].reason


def test_cancel_kills_the_running_pilot(condor):
    batch_id = condor.submit(PilotSpec(site="S", command=["/bin/sh", "-c", "echo $$; exec sleep 60"]))
    wait_for(condor, batch_id, {BatchState.RUNNING})
    deadline = time.monotonic() + 10
    while not out_file(condor, batch_id).strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(out_file(condor, batch_id).split()[0])
    assert psutil.pid_exists(pid)
    condor.cancel([batch_id])
    assert condor.status([batch_id])[batch_id] == BatchState.CANCELLED
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "pilot still running after condor_rm"
        time.sleep(0.05)
    condor.cancel([batch_id])             # already gone: not an error
    assert "removed: via condor_rm" in condor.details([batch_id])[batch_id].reason


def test_walltime_removes_pilot(condor):
    batch_id = condor.submit(PilotSpec(site="S", walltime_s=1, command=["/bin/sleep", "30"]))
    started = time.monotonic()
    wait_for(condor, batch_id, {BatchState.CANCELLED}, timeout=15)
    assert time.monotonic() - started < 10
    assert "PeriodicRemove" in condor.details([batch_id])[batch_id].reason


def test_several_pilots_at_once_and_unknown_ids(condor):
    ids = [condor.submit(PilotSpec(site="S", command=["/bin/sh", "-c", f"exit {i}"]))
           for i in range(3)]
    assert len(set(ids)) == 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = condor.status(ids + ["999.0"])
        if all(states[i] in FINAL_BATCH_STATES for i in ids):
            break
        time.sleep(0.1)
    assert [states[i] for i in ids] == [BatchState.DONE, BatchState.FAILED, BatchState.FAILED]
    assert states["999.0"] == BatchState.UNKNOWN
    assert condor.status([]) == {}
    condor.cancel(["999.0"])


def test_hostile_ids_and_values_refused(condor):
    for bad in ("1.0; rm -rf /", "-all", "1", "a.b"):
        with pytest.raises(SchedulerError, match="not an HTCondor job id"):
            condor.status([bad])
        with pytest.raises(SchedulerError, match="not an HTCondor job id"):
            condor.cancel([bad])
    with pytest.raises(SchedulerError, match="newlines"):
        condor.submit(PilotSpec(site="S", command=["/bin/echo", "a\nqueue 100"]))
    with pytest.raises(SchedulerError, match="not a valid variable name"):
        condor.submit(PilotSpec(site="S", command=["/bin/true"], env={"A B": "x"}))
    with pytest.raises(SchedulerError, match="extra_submit"):
        HTCondorBackend(extra_submit={"queue": "5"})


def test_grid_universe_to_a_ce(condor, tmp_path):
    grid = HTCondorBackend(condor_bin=str(condor.bin_dir), schedd=SCHEDD, universe="grid",
                           grid_resource="condor ce.test.local ce.test.local:9619",
                           x509_proxy="/tmp/x509up_test", log_dir=str(tmp_path / "glogs"))
    batch_id = grid.submit(PilotSpec(site="S", walltime_s=7200, cores=8, memory_mb=16000,
                                     command=["/bin/true"]))
    assert grid.status([batch_id]) == {batch_id: BatchState.QUEUED}
    ad = json.loads((tmp_path / "condor" / "jobs" / f"{batch_id}.json").read_text())
    assert ad["JobUniverse"] == 9
    assert ad["GridResource"] == "condor ce.test.local ce.test.local:9619"
    assert (ad["maxWallTime"], ad["xcount"], ad["maxMemory"]) == ("120", "8", "16000")
    assert ad["SubmitCommands"]["x509userproxy"] == "/tmp/x509up_test"
    grid.cancel([batch_id])
    assert grid.status([batch_id]) == {batch_id: BatchState.CANCELLED}
    with pytest.raises(SchedulerError, match="grid_resource"):
        HTCondorBackend(universe="grid")


def test_schedd_errors_are_clear(condor, tmp_path, monkeypatch):
    wrong = HTCondorBackend(condor_bin=str(condor.bin_dir), schedd="other.schedd")
    with pytest.raises(SchedulerError, match="condor_q failed .*Can't find address for schedd"):
        wrong.status(["1.0"])
    missing = HTCondorBackend(condor_bin=str(tmp_path / "nowhere"))
    with pytest.raises(SchedulerError, match="condor_submit not found"):
        missing.submit(PilotSpec(site="S", command=["/bin/true"]))
    monkeypatch.setenv("FAKE_CONDOR_HANG", "1")
    hung = HTCondorBackend(condor_bin=str(condor.bin_dir), command_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(SchedulerError, match="did not answer within 1 s"):
        hung.status(["1.0"])
    assert time.monotonic() - started < 5
    with pytest.raises(SchedulerError, match="unknown option"):
        HTCondorBackend(partition="x")


# ---------------------------------------------------------------------- the fake vs the manual
def run_tool(condor, tool, *args, stdin=None):
    # relative paths in a submit file (log = j.log) are relative to where condor_submit runs
    return subprocess.run([str(condor.bin_dir / tool), *args], capture_output=True, text=True,
                          input=stdin, timeout=30, cwd=condor.tmp)


def test_fake_speaks_the_documented_formats(condor, tmp_path):
    sub = tmp_path / "job.sub"
    sub.write_text("executable = /bin/true\narguments = \"one \"\"two\"\" 'spacey ''quoted'' "
                   "argument'\"\nlog = j.log\nqueue 2\n")
    terse = run_tool(condor, "condor_submit", "-terse", str(sub))
    assert terse.returncode == 0
    cluster = terse.stdout.split(".")[0]
    assert terse.stdout == f"{cluster}.0 - {cluster}.1\n"          # "JobId ranges only"
    plain = run_tool(condor, "condor_submit", "-", stdin=sub.read_text())
    assert plain.stdout.startswith("Submitting job(s)")
    assert plain.stdout.rstrip().endswith(f"2 job(s) submitted to cluster {int(cluster) + 1}.")
    ad = json.loads((tmp_path / "condor" / "jobs" / f"{cluster}.0.json").read_text())
    # the manual's new-syntax example: three arguments
    assert ad["Arguments"] == ["one", '"two"', "spacey 'quoted' argument"]
    # old syntax: blanks separate, \" is a quote
    assert fake_condor.parse_arguments('one \\"two\\" \'three\'') == ["one", '"two"', "'three'"]
    assert fake_condor.parse_environment("\"A=1 B='x y' C=''\"") == {"A": "1", "B": "x y", "C": ""}
    assert fake_condor.parse_environment("A=1;B=2") == {"A": "1", "B": "2"}
    # -json: a list of ads; nothing at all when no job matches
    q = run_tool(condor, "condor_q", "-json", "-attributes", "ClusterId,ProcId,JobStatus",
                 "-constraint", "ClusterId == 999999")
    assert q.returncode == 0 and q.stdout == ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        h = run_tool(condor, "condor_history", "-json", "-attributes", "ClusterId,ProcId,JobStatus",
                     "-constraint", f"ClusterId == {cluster}", "-match", "5")
        if h.stdout and len(json.loads(h.stdout)) == 2:
            break
        time.sleep(0.1)
    ads = json.loads(h.stdout)
    assert sorted(ads[0]) == ["ClusterId", "JobStatus", "ProcId"]
    assert {a["JobStatus"] for a in ads} == {4}
    # condor_rm: exit 1 and a message for a job that is not in the queue
    rm = run_tool(condor, "condor_rm", f"{cluster}.0")
    assert rm.returncode == 1 and f"Job {cluster}.0 not found" in rm.stdout
    bad = run_tool(condor, "condor_q", "-json", "-constraint", "ClusterId ==")
    assert bad.returncode == 1 and "constraint" in bad.stderr
    # the submit language: $(DOLLAR) is a literal $, $(ClusterId) the cluster
    assert fake_condor.expand("a$(DOLLAR)(x) $(ClusterId)", {"clusterid": "7"}) == "a$(x) 7"


def test_backend_quoting_round_trips_through_the_fake_parser():
    args = ["plain", "with space", "it's", 'say "hi"', "$HOME", "$(DOLLAR)", "", "a''b"]
    quoted = quote_arguments(args)
    assert fake_condor.parse_arguments(fake_condor.expand(quoted, {})) == args
    env = {"A": "it's \"x\" $Y", "B": ""}
    assert fake_condor.parse_environment(fake_condor.expand(quote_environment(env), {})) == env


def test_example_site_config_builds_the_backend():
    """The site-config example for HTCondor carries options this backend takes."""
    import yaml

    from site_configs import EXAMPLES_DIR, parse_site_config

    site = parse_site_config(yaml.safe_load((EXAMPLES_DIR / "examples" / "HTCONDOR_EXAMPLE.yaml").read_text()),
                             env={})
    backend = load_backend(site.scheduler.backend, **site.to_dict()["scheduler"]["options"])
    assert isinstance(backend, HTCondorBackend) and backend.schedd
