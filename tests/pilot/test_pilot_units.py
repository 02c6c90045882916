"""The pilot's parts on their own: job spec parsing, signatures, environment scrubbing, the
payload runner, the log tarball, Slurm times, the HTTP client's retries, plugin loading."""
from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from testkit import free_port
from panda_core.errorcodes import ErrorCode
from pilot.cli import batch_deadline, parse_slurm_time
from panda_core.client import PilotClient
from panda_core.retry import RetryPolicy
from pilot.errors import BadSignature, PilotError, ServerUnreachable
from panda_core.canonical import signed_bytes
from panda_core.siteconfig import SiteConfig
from panda_core.wire import decode_job
from pilot.hookspecs import hookimpl
from pilot.job import JobLogHandler, JobRun, PilotConfig
from pilot.logtar import make_log_tarball
from pilot.monitoring import JobLimits, MonitorContext, Verdict
from pilot.payload import Payload, Sample, build_argv, scrub_env
from pilot.signature import SpecVerifier
from pilotkit import fake, make_job, run_pilot, se  # noqa: F401


# --- job spec -------------------------------------------------------------------------------
def test_parse_job_files():
    raw = make_job(5, "true", inputs=[{"lfn": "a", "scope": "s", "fsize": 3, "checksum": "ad:1"},
                                      {"lfn": "b", "scope": "s", "fsize": 4, "checksum": "md5:x"}],
                   outputs=["o1", "o2"], scope="sc")
    job = decode_job(raw)
    assert [f.lfn for f in job.inputs] == ["a", "b"] and job.inputs[1].fsize == 4
    assert job.inputs[0].guid == "guid-a"
    assert [(f.lfn, f.scope) for f in job.outputs] == [("o1", "sc"), ("o2", "sc")]
    assert job.log.lfn == "job5.log.tgz" and job.log.guid == "logguid-5"
    assert job.max_walltime_s == 600


@pytest.mark.parametrize("field,value,code", [
    ("outFiles", "../x", ErrorCode.HOSTILE_FILE_NAME),
    ("outFiles", "/abs", ErrorCode.HOSTILE_FILE_NAME),
    ("outFiles", "a\0b", ErrorCode.HOSTILE_FILE_NAME),
    ("outFiles", ".hidden", ErrorCode.HOSTILE_FILE_NAME),
    ("scopeLog", "../s", ErrorCode.HOSTILE_FILE_NAME),
    ("maxWalltime", "soon", ErrorCode.BAD_JOB_SPEC),
    ("transformation", "", ErrorCode.BAD_JOB_SPEC),
    ("outFiles", "job9.log.tgz,dup,dup", ErrorCode.BAD_JOB_SPEC),
])
def test_parse_job_refuses(field, value, code):
    raw = make_job(9, "true")
    raw[field] = value
    raw["scopeOut"] = "sc,sc"
    with pytest.raises(PilotError) as err:
        decode_job(raw)
    assert err.value.code == code


# --- signatures -----------------------------------------------------------------------------
def _signed(job):
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    job = dict(job, specSignature=base64.b64encode(key.sign(signed_bytes(job))).decode())
    return job, pem


def test_signature_verifies_and_catches_tampering():
    job, pem = _signed(make_job(1, "true"))
    v = SpecVerifier(pem)
    v.verify(job)
    for change in ({"jobPars": "-c 'rm -rf ~'"}, {"specSignature": "AAAA"},
                   {"specSignature": "not base64!"}, {"extra": 1}):
        with pytest.raises(BadSignature):
            v.verify({**job, **change})
    with pytest.raises(BadSignature):
        v.verify({k: x for k, x in job.items() if k != "specSignature"})
    other, _ = _signed(make_job(1, "true"))
    with pytest.raises(BadSignature):
        SpecVerifier(_signed(make_job(2, "x"))[1]).verify(other)
    with pytest.raises(BadSignature):
        SpecVerifier("not a pem")


def test_trust_pins_the_key_and_checks_queuedata_and_dispatch():
    from panda_core.canonical import QUEUEDATA_SIGNATURE_KEY, queuedata_signed_bytes
    from panda_core.trust import key_fingerprint
    from panda_core.wire import DISPATCH_KEY, Dispatch
    from pilot.signature import NotOurDispatch, Trust, check_dispatch

    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    config = {"storage": {"output": {"name": "SE", "url": "file:///se"}}}
    qd = {"panda_wms": config, QUEUEDATA_SIGNATURE_KEY: base64.b64encode(
        key.sign(queuedata_signed_bytes("S", config))).decode()}
    served = []
    Trust(lambda: served.append(1) or pem.decode(), qd, "S",
          fingerprint=key_fingerprint(pem)).check_queuedata()
    assert served == [1]                       # fetched, then checked against the fingerprint
    Trust(lambda: pytest.fail("a pinned PEM is never fetched"), qd, "S", pem=pem).verifier()
    impostor = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(BadSignature, match="is not the pinned key"):
        Trust(lambda: impostor.decode(), qd, "S", fingerprint=key_fingerprint(pem)).verifier()
    with pytest.raises(BadSignature, match="is not the pinned key"):   # both given: must agree
        Trust(lambda: "", qd, "S", pem=impostor, fingerprint=key_fingerprint(pem)).verifier()
    for changed in ({**qd, "panda_wms": {"storage": {}}}, {"panda_wms": config}):
        with pytest.raises(BadSignature, match="queue description"):
            Trust(lambda: "", changed, "S", pem=pem).check_queuedata()
    with pytest.raises(BadSignature):          # signed for S, not for T
        Trust(lambda: "", qd, "T", pem=pem).check_queuedata()
    Trust(lambda: "", {"panda_wms": config}, "S", pem=pem, local=True).check_queuedata()
    with pytest.raises(ValueError):
        Trust(lambda: "", qd, "S")
    mine = Dispatch("S", "wn:1", "n1")
    check_dispatch({DISPATCH_KEY: {**mine.to_wire(), "time": 5}}, mine)
    for raw in ({}, {DISPATCH_KEY: Dispatch("S", "wn:2", "n1").to_wire()},
                {DISPATCH_KEY: Dispatch("S", "wn:1", "old").to_wire()}):
        with pytest.raises(NotOurDispatch) as err:
            check_dispatch(raw, mine)
        assert err.value.code == ErrorCode.BAD_SIGNATURE


def test_a_copytool_program_option_needs_the_local_allow_list(tmp_path):
    from pilot.errors import StageError
    from pilot.stage import _tool

    program = tmp_path / "xrdcp"
    with pytest.raises(StageError) as err:
        _tool("xrdcp", {"xrdfs": str(program)}, "out", frozenset())
    assert err.value.code == ErrorCode.STAGEOUT_FAILED and "allow list" in err.value.diag
    link = tmp_path / "link"
    link.symlink_to(program)
    assert _tool("xrdcp", {"xrdcp": str(link)}, "in", frozenset({str(program)})).xrdcp == \
        str(link)
    assert _tool("xrdcp", {}, "in", frozenset()).xrdcp     # its own: found on PATH


def test_final_report_kept_while_the_server_says_try_again():
    from pilot.report import send_final

    class Server:
        def __init__(self, *codes):
            self.codes = list(codes)

        def update_job(self, form, policy, deadline=None):
            self.deadlines = getattr(self, "deadlines", []) + [deadline]
            return {"StatusCode": self.codes.pop(0), "errorDialog": "x"}

    quick = RetryPolicy(attempts=2, backoff_s=0.01)
    assert send_final(Server(10, 0), {"jobId": 1}, quick) is True       # taken on the retry
    assert send_final(Server(10, 10), {"jobId": 1}, quick) is False     # kept for later
    assert send_final(Server(30), {"jobId": 1}, quick) is True          # a refusal is final
    assert send_final(Server(0), {"jobId": 1}, quick) is True
    # "try again" for ever: the pilot's deadline ends the retries, not the policy's 50 attempts
    patient, at = RetryPolicy(attempts=50, backoff_s=0.2, jitter=0, timeout_s=0.1), time.time() + 1
    server = Server(*[10] * 50)
    t0 = time.monotonic()
    assert send_final(server, {"jobId": 1}, patient, deadline=at) is False
    assert time.monotonic() - t0 < 1.2 and 3 <= len(server.deadlines) <= 6
    assert set(server.deadlines) == {at}, "each updateJob is bound by the same deadline"


def test_state_file_reaches_the_disk_only_for_what_exists_nowhere_else(tmp_path, monkeypatch):
    """The payload's result and a final update the server has not taken are fsynced; the
    phases before the payload are not (they cost the start path an fsync each)."""
    from pilot import statefile as sf

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    phases = [sf.RECEIVED, sf.STAGEIN, sf.RUNNING, sf.STAGEOUT, sf.FINAL_PENDING, sf.DONE]
    durable = []
    for phase in phases:
        before = len(synced)
        sf.write_state(tmp_path, {"phase": phase, "job": {"PandaID": 1}})
        assert sf.read_state(tmp_path)["phase"] == phase
        if len(synced) > before:
            durable.append(phase)
    assert durable == [sf.STAGEOUT, sf.FINAL_PENDING]
    assert not list(tmp_path.glob(".*.tmp"))


# --- environment and argv -------------------------------------------------------------------
def test_scrub_env_drops_credentials():
    env = {"PATH": "/bin", "PANDA_AUTH_TOKEN": "t", "BEARER_TOKEN_FILE": "/f", "X509_USER_PROXY": "/p",
           "X509_CERT_DIR": "/ca", "MY_SECRET": "s", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "k",
           "OIDC_ACCESS_TOKEN": "o"}
    assert scrub_env(env, {"PANDA_ID": "1"}) == {"PATH": "/bin", "X509_CERT_DIR": "/ca",
                                                  "HOME": "/root", "PANDA_ID": "1"}


def test_payload_env_is_built_from_an_allow_list():
    env = {"PATH": "/bin", "HOME": "/h", "LANG": "C", "LC_ALL": "C", "TZ": "UTC",
           "MY_API_KEY": "k", "S3_ACCESS_KEY": "s", "MYSQL_PWD": "p", "SSH_AUTH_SOCK": "/s",
           "DATABASE_URL": "postgresql://u:pw@h/db", "FRONTIER_SERVER": "f", "SITE_A": "a",
           "SITEX": "x"}
    assert scrub_env(env, {"PANDA_ID": "1"}) == {"PATH": "/bin", "HOME": "/h", "LANG": "C",
                                                  "LC_ALL": "C", "TZ": "UTC", "PANDA_ID": "1"}
    assert scrub_env(env, {}, ("FRONTIER_SERVER", "SITE_*")) == {
        "PATH": "/bin", "HOME": "/h", "LANG": "C", "LC_ALL": "C", "TZ": "UTC",
        "FRONTIER_SERVER": "f", "SITE_A": "a"}


def test_build_argv():
    assert build_argv("/bin/sh", "-c 'echo a b' x") == ["/bin/sh", "-c", "echo a b", "x"]
    assert build_argv("sh", "in1,in2 in1", {"in1": "root://x/in1"}) == \
        ["sh", "root://x/in1,in2", "root://x/in1"]
    with pytest.raises(PilotError) as err:
        build_argv("no-such-program-xyz", "")
    assert err.value.code == ErrorCode.TRANSFORM_NOT_FOUND
    with pytest.raises(PilotError) as err:
        build_argv("/bin/sh", "-c 'unbalanced")
    assert err.value.code == ErrorCode.BAD_JOB_SPEC


# --- payload runner -------------------------------------------------------------------------
def test_payload_records_exit_cpu_and_memory(tmp_path):
    script = ("x = b'y' * (80 * 2**20)\n"
              "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
              "raise SystemExit(7)")
    p = Payload([sys.executable, "-c", script], tmp_path, dict(os.environ))
    p.start()
    res = p.wait(timeout=30)
    assert res.exit_code == 7 and res.signal is None and not res.killed
    assert res.cpu_s >= 0.25
    assert res.max_rss_kb >= 80 * 1024
    assert (tmp_path / ".payload_exit").read_text().strip() == "7"


def test_payload_kill_takes_the_tree(tmp_path):
    pidfile = tmp_path / "child.pid"
    p = Payload(["/bin/sh", "-c", f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; sleep 60' & sleep 60"],
                tmp_path, dict(os.environ))
    p.start()
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sample = p.sample()
    assert len(sample.pids) >= 3 and sample.rss_kb > 0
    res = p.kill(grace_s=0.5)
    assert res.killed and res.exit_code is None
    child = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.05)


def test_leftover_processes_are_killed_after_the_payload(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        p = Payload(["/bin/sh", "-c", "sleep 60 & echo $! > left.pid; exit 0"], tmp_path,
                    dict(os.environ))
        p.start()
        res = p.wait(timeout=10)
        assert res.exit_code == 0
        left = int((tmp_path / "left.pid").read_text())
        os.kill(left, 0)                                  # still there (orphaned, our session)
        assert p.kill_leftovers() == 1
        deadline = time.monotonic() + 5
        while psutil.pid_exists(left) and psutil.Process(left).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert bystander.poll() is None                   # not ours: untouched
    finally:
        bystander.kill()
        bystander.wait()


# --- log tarball ----------------------------------------------------------------------------
def test_log_tarball_is_capped(tmp_path):
    wd = tmp_path / "wd"
    (wd / "sub").mkdir(parents=True)
    (wd / "small.txt").write_text("small")
    (wd / "sub" / "nested.txt").write_text("nested")
    (wd / "big.log").write_bytes(b"a" * 400_000 + b"THE END")
    (wd / "input.dat").write_bytes(b"i" * 1000)
    tar_path = make_log_tarball(wd, tmp_path / "job.log.tgz", {"input.dat"}, cap_bytes=200_000)
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        assert names == {"job/small.txt", "job/sub/nested.txt", "job/big.log.tail"}
        tail = tar.extractfile("job/big.log.tail").read()
    assert tail.endswith(b"THE END") and len(tail) <= 200_000


# --- Slurm wall time ------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184),
                                          ("5", 300), ("2-00", 172800), ("UNLIMITED", None),
                                          ("", None), ("garbage", None)])
def test_parse_slurm_time(text, seconds):
    assert parse_slurm_time(text) == seconds


def test_batch_deadline_from_environment():
    assert batch_deadline({"SLURM_JOB_END_TIME": "2000000000"}, 0) == 2000000000.0
    assert batch_deadline({}, 0) is None


# --- server client --------------------------------------------------------------------------
def test_client_gives_up_on_a_dead_server():
    client = PilotClient(f"http://127.0.0.1:{free_port()}", "tok",
                         retry=RetryPolicy(attempts=3, backoff_s=0.05, timeout_s=1))
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable) as err:
        client.update_job({"jobId": 1, "state": "running"})
    assert err.value.code == ErrorCode.COMMUNICATION_FAILURE
    assert "3 attempts" in str(err.value) and "tok" not in repr(client)
    assert time.monotonic() - t0 < 5


# --- plugins --------------------------------------------------------------------------------
def test_builtin_monitors_are_entry_point_plugins():
    from pilot.plugins import make_manager
    pm = make_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"looping", "memory", "disk", "walltime", "stdout"} <= names



class _AlwaysFires:
    """A monitor that asks for a kill every cycle, and counts how often it was asked."""

    def __init__(self, code: int) -> None:
        self.code, self.asked = code, 0

    @hookimpl
    def pilot_monitor_check(self, ctx):
        self.asked += 1
        return Verdict(self.code, f"monitor {self.code} fired", "always")

    @hookimpl
    def pilot_monitor_metrics(self, ctx):
        return {"clash": self.code}


def _firing_context(tmp_path):
    """A cycle in which both the looping and the walltime monitor fire."""
    now = time.time()
    limits = JobLimits(looping_s=1, memory_mb=0, workdir_mb=0, min_free_disk_mb=0, walltime_s=1,
                       stdout_silent_s=0)
    return MonitorContext(job=decode_job(make_job(1, "true")), limits=limits, workdir=tmp_path,
                          payload_start=now - 10, now=now, sample=Sample(now, [], 0, 0, 0.0))


def _monitor_cycle(pm, ctx) -> JobRun:
    """One monitor cycle of a job run, as the monitor loop runs it."""
    run = JobRun(PilotConfig("http://127.0.0.1:1", "SITE", ctx.workdir), None, SiteConfig(name="SITE"),
                 pm, {})
    run._run_monitors(ctx)
    return run


def test_first_found_monitor_wins_a_cycle_where_two_fire(tmp_path):
    """The verdict of the first-registered plugin wins; the ones after it are not asked."""
    from pilot.plugins import make_manager
    ctx = _firing_context(tmp_path)
    first, second = _AlwaysFires(1001), _AlwaysFires(1002)
    run = _monitor_cycle(make_manager(extra=[first, second], entry_points=False), ctx)
    assert (run.kill.code, run.kill.diag) == (1001, "monitor 1001 fired")
    assert (first.asked, second.asked) == (1, 0)
    # every plugin's metrics are merged; a clash keeps the first plugin's value, like a verdict
    assert run.metrics == {"clash": 1001}
    # built-ins come first, in setup.py's order: looping (1150) over walltime (1503) and add-ons
    run = _monitor_cycle(make_manager(extra=[first]), ctx)
    assert run.kill.code == ErrorCode.LOOPING_JOB and "no output file changed" in run.kill.diag
    assert first.asked == 1 and run.metrics["clash"] == 1001


THIRD_PARTY = '''
from pilot.hookspecs import hookimpl
from pilot.monitoring import Verdict
import os

def _log(text):
    with open(os.environ["THIRD_PARTY_LOG"], "a") as fh:
        fh.write(text + "\\n")

@hookimpl
def pilot_job_received(job, workdir):
    _log(f"received {job.panda_id}")

@hookimpl
def pilot_payload_started(job, pid):
    _log(f"started {pid}")

@hookimpl
def pilot_monitor_check(ctx):
    if (ctx.workdir / "stop-me").exists():
        return Verdict(1008, "third-party monitor saw stop-me", "thirdparty")

@hookimpl
def pilot_monitor_metrics(ctx):
    return {"thirdParty": 42}

@hookimpl
def pilot_job_done(job, state, error_code, error_diag):
    _log(f"done {state} {error_code}")
'''


def test_third_party_plugin_via_entry_point(fake, tmp_path):
    """A plugin installed like any other distribution: a module and an entry point."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "thirdmon.py").write_text(THIRD_PARTY)
    dist = site / "thirdmon-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdmon\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[panda.pilot]\nthirdmon = thirdmon\n")
    log = tmp_path / "third.log"
    fake.add_job(make_job(901, "sleep 0.3; touch stop-me; sleep 60"))
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "THIRD_PARTY_LOG": str(log)}
    res = run_pilot(fake, tmp_path / "wd", "--heartbeat", "0.3", env=env)
    final = fake.final(901)
    assert final is not None, res.stderr
    assert final["pilotErrorCode"] == "1008"
    assert "third-party monitor" in final["pilotErrorDiag"]
    lines = log.read_text().splitlines()
    assert lines[0] == "received 901" and lines[1].startswith("started ")
    assert lines[-1] == "done failed 1008"


def test_broken_plugin_is_reported_and_skipped(fake, tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "brokenmon.py").write_text("raise ImportError('missing dependency xyz')\n")
    dist = site / "brokenmon-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenmon\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[panda.pilot]\nbrokenmon = brokenmon\n")
    fake.site_config["limits"]["looping_s"] = 1
    fake.add_job(make_job(902, "sleep 60"))
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = run_pilot(fake, tmp_path / "wd", env=env)
    assert "pilot plugin 'brokenmon'" in res.stderr and "missing dependency xyz" in res.stderr
    # the built-in monitors still work
    assert int(fake.final(902)["pilotErrorCode"]) == ErrorCode.LOOPING_JOB


def test_parse_job_never_raises_anything_but_pilot_errors():
    """Every field set to every odd value: parse_job returns or raises PilotError, nothing else."""
    weird = [None, 123, -1, 1.5, [], ["a", "b"], {"a": 1}, "NULL", "", "x" * 300, "a,,b", "\0",
             "../..", True]
    base = make_job(77, "true", inputs=[{"lfn": "i", "scope": "s", "fsize": 1, "checksum": "ad:1"}],
                    outputs=["o"])
    assert decode_job(base).panda_id == 77
    outcomes = {"parsed": 0, "refused": 0}
    for key in list(base):
        for value in weird:
            raw = dict(base, **{key: value})
            try:
                decode_job(raw)
                outcomes["parsed"] += 1
            except PilotError as exc:
                assert exc.code in (ErrorCode.BAD_JOB_SPEC, ErrorCode.HOSTILE_FILE_NAME), exc
                outcomes["refused"] += 1
    assert outcomes["parsed"] > 0 and outcomes["refused"] > 50, outcomes


def test_queuedata_never_raises_anything_but_pilot_errors():
    from pilot.site import site_from_queuedata
    from pilotkit import site_config

    base = site_config(Path("/tmp/se"))
    weird = [None, 7, "x", [], ["a"], {"a": 1}, {"name": []}, True]
    site_from_queuedata({"panda_wms": base}, "PILOT_TEST")
    refused = 0
    for key in list(base):
        for value in weird:
            try:
                site_from_queuedata({"panda_wms": dict(base, **{key: value})}, "PILOT_TEST")
            except PilotError as exc:
                assert "PILOT_TEST" in str(exc) or "site config" in str(exc), exc
                refused += 1
    assert refused > 10
    for qd in (None, [], "x", {"panda_wms": None}, {"panda_wms": []}):
        with pytest.raises(PilotError):
            site_from_queuedata(qd, "PILOT_TEST")


def test_job_log_on_a_full_disk_drops_lines_without_a_traceback(capsys):
    """/dev/full refuses every write with ENOSPC, as a disk the payload filled does."""
    handler = JobLogHandler("/dev/full")
    logger = logging.getLogger("test.joblog.full")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("a line the disk has no room for")
        logger.warning("and another")
    finally:
        logger.removeHandler(handler)
    handler.close()                       # no OSError out of the pilot's finally
    assert handler.stream is None
    assert capsys.readouterr().err == ""


def test_the_report_deadline_keeps_the_exit_time_within_half_the_reserve(tmp_path):
    from pilot.job import PilotConfig

    def cfg(**kw):
        return PilotConfig(server="http://127.0.0.1:1", site="S", workdir_base=tmp_path, **kw)
    assert cfg().report_deadline() is None                       # no wall time: no deadline
    assert cfg(deadline=1000.0, reserve_s=60).report_deadline() == 990.0     # a sixth
    assert cfg(deadline=1000.0, reserve_s=6).report_deadline() == 999.0
    assert cfg(deadline=1000.0, reserve_s=60, exit_s=0).report_deadline() == 1000.0
    assert cfg(deadline=1000.0, reserve_s=60, exit_s=20).report_deadline() == 980.0
    # more than half the reserve: half of it stays the stage-out's and the report's
    assert cfg(deadline=1000.0, reserve_s=1, exit_s=10).report_deadline() == 999.5


def test_the_key_the_batch_script_carries_is_taken_only_with_the_pinned_fingerprint(
        monkeypatch, caplog):
    from panda_core.trust import key_fingerprint, raw_key_pem
    from pilot.cli import BOOTSTRAP_KEY_ENV, bootstrap_key

    def raw(key) -> bytes:
        return key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = ours.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert raw_key_pem(raw(ours)).encode() == pem          # the PEM cryptography writes
    pinned = key_fingerprint(pem)
    monkeypatch.delenv(BOOTSTRAP_KEY_ENV, raising=False)
    assert bootstrap_key(pinned) is None                    # not a one-file pilot: fetched
    monkeypatch.setenv(BOOTSTRAP_KEY_ENV, raw(ours).hex())
    assert bootstrap_key(pinned) == pem
    monkeypatch.setenv(BOOTSTRAP_KEY_ENV, raw(theirs).hex())
    assert bootstrap_key(pinned) is None and "is not the pinned" in caplog.text
    for junk in ("zz" * 32, "ab" * 31, "ab" * 33, "ab" * 32 + "\n", "é"):
        monkeypatch.setenv(BOOTSTRAP_KEY_ENV, junk)
        assert bootstrap_key(pinned) is None, junk
    with pytest.raises(ValueError):
        raw_key_pem(b"short")
