"""Payloads in a sandbox (issue 16 item 2): the pilot as a real subprocess against the fake
dispatcher, with the site config's ``sandbox`` section choosing the runtime.

bwrap is Debian's bubblewrap, really isolating; apptainer cannot be installed here, so its
runtime is run against ``fakes/apptainer`` (a faithful fake of ``apptainer exec``'s command line
that isolates nothing: see its docstring for what that leaves uncovered).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from panda_core.errorcodes import ErrorCode
from panda_core.replicas import replica_path
from panda_core.siteconfig import SandboxConfig
from pilot.sandbox import SandboxError, SandboxSpec, load
from pilotkit import TOKEN, fake, make_job, pilot_cmd, pilot_env, put_input, se  # noqa: F401

FAKES = Path(__file__).parent / "fakes"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap is not installed (tests/debian-packages.txt)")

#: what a hostile payload tries; each line of its report says ALLOWED or denied
PROBE = r"""
try() { if sh -c "$2" >/dev/null 2>&1; then echo "ALLOWED $1"; else echo "denied $1"; fi; }
JOBDIR=$(dirname "$PANDA_WORKDIR")
{ try token "cat '$TOKEN_FILE'"; try pilot_environ "cat /proc/$PILOT/environ";
  try pilot_signal "kill -0 $PILOT"; try other_job "cat '$OTHER/work/secret.txt'";
  try state_file "cat '$JOBDIR/pilot_state.json'"; try pilot_log "cat '$JOBDIR/pilot.log'";
  try write_outside "echo x > '$TOKEN_DIR/escaped'"; try write_input "echo x >> in.dat";
  try network "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", $PORT), 2)'";
  try token_dir "ls '$TOKEN_DIR' | grep -q token"; } > report.txt
[ "$TRY_KILL" = 1 ] && kill -TERM $PILOT 2>/dev/null
cat in.dat > out.dat
echo done-in-sandbox
"""


@pytest.fixture
def secret_dir():
    """A folder outside /tmp (a private /tmp alone must not be what hides it) with the pilot's
    token file in it."""
    path = Path(tempfile.mkdtemp(prefix="panda-sandbox-test-", dir=Path.home()))
    (path / "token").write_text(TOKEN)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_probe_job(fake, se, tmp_path, secret_dir, sandbox: dict, panda_id: int,
                  try_kill: bool) -> tuple[subprocess.CompletedProcess, dict, dict[str, str]]:
    fake.site_config["sandbox"] = sandbox
    # inputs are links into the storage element: the sandbox must show their targets read-only
    fake.site_config["copytools"] = {"input": {"name": "symlink", "options": {}},
                                     "output": {"name": "cp", "options": {}}}
    entry = put_input(se, "test", "in.dat", b"input bytes\n")
    base = tmp_path / "wd"
    other = base / "panda_job_999_1"          # another job's dir on the same node
    (other / "work").mkdir(parents=True)
    (other / "work" / "secret.txt").write_text("the other job's data")
    script = (f"TOKEN_FILE={secret_dir / 'token'}; TOKEN_DIR={secret_dir}; OTHER={other}; "
              f"PORT={fake.port}; TRY_KILL={int(try_kill)}; PILOT=__PILOT__\n" + PROBE)
    cmd = pilot_cmd(fake, base, "--token-file", str(secret_dir / "token"), "--max-jobs", "1",
                    "--no-recovery")
    env = pilot_env()
    env.pop("PANDA_AUTH_TOKEN")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # the job is queued once the pilot's pid is known (it asks for it only after ~0.1 s of start)
    fake.add_job(make_job(panda_id, script.replace("__PILOT__", str(proc.pid)), inputs=[entry],
                          outputs=["report.txt", "out.dat"]))
    out, err = proc.communicate(timeout=60)
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert fake.requests and any(p.endswith("getJob") for _, p, _ in fake.requests)
    final = fake.final(panda_id)
    assert final is not None, err[-3000:]
    report = (se / replica_path("test", "report.txt")).read_text() \
        if final["state"] == "finished" else ""
    verdicts = dict(reversed(line.split()) for line in report.splitlines())
    return res, final, verdicts


@needs_bwrap
def test_bwrap_payload_cannot_reach_the_pilot_or_other_jobs(fake, se, tmp_path, secret_dir):
    # the site binds the token's folder: the folder is visible, the token file in it is not
    sandbox = {"runtime": "bwrap", "network": False, "bind": [str(secret_dir)]}
    res, final, seen = run_probe_job(fake, se, tmp_path, secret_dir, sandbox, 401, True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert final["state"] == "finished", final
    assert seen == {"token": "denied", "pilot_environ": "denied", "pilot_signal": "denied",
                    "other_job": "denied", "state_file": "denied", "pilot_log": "denied",
                    "write_outside": "denied", "write_input": "denied", "network": "denied",
                    "token_dir": "ALLOWED"}, seen
    assert not (secret_dir / "escaped").exists()
    assert (se / replica_path("test", "in.dat")).read_bytes() == b"input bytes\n"
    assert (se / replica_path("test", "out.dat")).read_bytes() == b"input bytes\n"
    assert "pilot received SIGTERM" not in res.stderr
    # the log tarball still has the pilot's log (kept beside the work dir, not in it)
    with tarfile.open(se / replica_path("test", "job401.log.tgz")) as tar:
        names = tar.getnames()
        log = tar.extractfile("job401/pilot.log").read().decode()
    assert "job401/payload.stdout" in names and "payload started" in log
    assert final["transExitCode"] == "0" and float(final["cpuConsumptionTime"]) > 0


def test_same_job_without_a_sandbox_reaches_everything(fake, se, tmp_path, secret_dir):
    """The control: the probes above are real (runtime none is today's behaviour)."""
    res, final, seen = run_probe_job(fake, se, tmp_path, secret_dir, {"runtime": "none"}, 402,
                                     False)
    assert res.returncode == 0 and final["state"] == "finished", res.stderr[-3000:]
    assert seen["token"] == seen["pilot_environ"] == seen["pilot_signal"] == "ALLOWED", seen
    assert seen["other_job"] == seen["state_file"] == seen["pilot_log"] == "ALLOWED", seen
    assert seen["network"] == seen["write_outside"] == "ALLOWED", seen
    # without a sandbox a linked input is the storage element's own file, and writable
    assert seen["write_input"] == "ALLOWED"
    assert (se / replica_path("test", "out.dat")).read_bytes().startswith(b"input bytes\n")


@needs_bwrap
def test_monitors_see_and_kill_the_sandboxed_tree(fake, se, tmp_path):
    """The memory monitor measures the processes inside the sandbox and its kill ends all of
    them, the ones bwrap's init would otherwise keep."""
    fake.site_config["sandbox"] = {"runtime": "bwrap", "network": False}
    marker = f"{time.time() % 1000:.6f}"
    script = (f"sleep 3{marker} & "
              "python3 -c 'import time; a = bytearray(400 * 2**20); time.sleep(60)'")
    fake.add_job(make_job(403, script, log=False, minRamCount=150))
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1", "--no-recovery"),
                         env=pilot_env(), capture_output=True, text=True, timeout=60)
    final = fake.final(403)
    assert final is not None, res.stderr[-3000:]
    assert final["pilotErrorCode"] == str(ErrorCode.MEMORY_LIMIT), final
    assert int(final["maxRSS"]) > 150 * 1024          # measured inside the sandbox
    left = subprocess.run(["pgrep", "-f", f"sleep 3{marker}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a sandboxed process outlived the kill"


@needs_bwrap
def test_exit_code_and_cpu_time_as_without_sandbox(fake, se, tmp_path):
    fake.site_config["sandbox"] = {"runtime": "bwrap"}
    script = "python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass'; exit 7"
    fake.add_job(make_job(404, script, log=False))
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1", "--no-recovery"),
                         env=pilot_env(), capture_output=True, text=True, timeout=60)
    final = fake.final(404)
    assert final is not None, res.stderr[-3000:]
    assert final["state"] == "failed" and final["transExitCode"] == "7", final
    assert final["pilotErrorCode"] == str(ErrorCode.PAYLOAD_FAILED)
    assert float(final["cpuConsumptionTime"]) >= 0.2


def test_node_without_the_runtime_takes_no_job(fake, tmp_path):
    fake.site_config["sandbox"] = {"runtime": "bwrap"}
    fake.add_job(make_job(405, "true", log=False))
    empty = tmp_path / "bin"
    empty.mkdir()
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1"),
                         env=pilot_env({"PATH": str(empty)}), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert "bwrap (bubblewrap) is not installed" in res.stderr
    assert len(fake.jobs) == 1 and fake.final(405) is None      # the job stays for another node


def test_unknown_runtime_is_a_clear_start_error(fake, tmp_path):
    fake.site_config["sandbox"] = {"runtime": "docker"}
    fake.add_job(make_job(406, "true", log=False))
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1"), env=pilot_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "no sandbox runtime 'docker'" in res.stderr and "bwrap" in res.stderr
    assert "Traceback" not in res.stderr and len(fake.jobs) == 1


# ---------------------------------------------------------------------------- apptainer (fake)
def test_apptainer_runs_the_jobs_container(fake, se, tmp_path):
    log = tmp_path / "apptainer.json"
    fake.site_config["sandbox"] = {"runtime": "apptainer", "network": False}
    fake.add_job(make_job(407, "echo in-container > out.txt; env > out.env; exit 3",
                          outputs=["out.txt", "out.env"], log=False,
                          container_name="docker://alpine:3.19"))
    env = pilot_env({"PATH": f"{FAKES}:{os.environ['PATH']}", "FAKE_APPTAINER_LOG": str(log)})
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1", "--keep-workdirs",
                                   "--no-recovery", "--payload-env", "FAKE_APPTAINER_LOG"),
                         env=env, capture_output=True, text=True, timeout=60)
    final = fake.final(407)
    assert final is not None, res.stderr[-3000:]
    assert final["transExitCode"] == "3", final          # the exit code comes through
    call = json.loads(log.read_text())
    argv = call["argv"]
    workdir = next(tmp_path.glob("wd/panda_job_407_*/work")).resolve()
    assert argv[:6] == ["exec", "--contain", "--ipc", "--pid", "--cleanenv", "--no-home"]
    assert ["--bind", f"{workdir}:{workdir}:rw"] == argv[6:8] and "--pwd" in argv
    assert argv[argv.index("--net") + 1: argv.index("--net") + 3] == ["--network", "none"]
    assert call["image"] == "docker://alpine:3.19"
    assert call["command"] == ["/bin/sh", "-c", "echo in-container > out.txt; env > out.env; exit 3"]
    # the payload's environment goes in as APPTAINERENV_*, the pilot's token never
    assert call["env"]["APPTAINERENV_PANDA_ID"] == "407"
    assert call["env"]["APPTAINERENV_HOME"] == str(workdir)
    assert TOKEN not in json.dumps(call["env"])
    assert set(k for k in call["env"] if not k.startswith("APPTAINERENV_")) <= {"PATH", "LANG", "TZ", "PWD"}  # PWD: the exit-code wrapper sh
    inner = (workdir / "out.env").read_text()
    assert "PANDA_ID=407" in inner and "APPTAINERENV_" not in inner
    assert f"PATH={os.environ['PATH']}" not in inner        # the image's PATH, not the node's


def test_apptainer_job_without_an_image_fails_clearly(fake, tmp_path):
    fake.site_config["sandbox"] = {"runtime": "apptainer"}
    fake.add_job(make_job(408, "true", log=False))
    env = pilot_env({"PATH": f"{FAKES}:{os.environ['PATH']}"})
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1", "--no-recovery"),
                         env=env, capture_output=True, text=True, timeout=60)
    final = fake.final(408)
    assert final is not None, res.stderr[-3000:]
    assert final["pilotErrorCode"] == str(ErrorCode.BAD_QUEUE_CONFIG)
    assert "container_name" in final["pilotErrorDiag"]


def test_apptainer_missing_on_the_node(fake, tmp_path):
    fake.site_config["sandbox"] = {"runtime": "apptainer", "image": "/images/x.sif"}
    fake.add_job(make_job(409, "true", log=False))
    res = subprocess.run(pilot_cmd(fake, tmp_path / "wd", "--max-jobs", "1"),
                         env=pilot_env({"PATH": "/usr/bin:/bin"}), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and "neither apptainer nor singularity" in res.stderr
    assert len(fake.jobs) == 1


# ---------------------------------------------------------------------------- command lines
def test_bwrap_command_covers_pilot_files_below_visible_paths(tmp_path, monkeypatch):
    sandbox = load(SandboxConfig(runtime="bwrap", network=True, bind=[str(tmp_path)]))
    monkeypatch.setattr(sandbox, "program", "/usr/bin/bwrap")
    token = tmp_path / "token"
    token.write_text("x")
    base = tmp_path / "jobs"
    work = base / "panda_job_1_2" / "work"
    work.mkdir(parents=True)
    outside = tmp_path / "se" / "f"
    outside.parent.mkdir()
    outside.write_text("data")
    argv = sandbox.command(SandboxSpec(argv=["x"], env={}, workdir=work, hide=[token, base],
                                       read_only=[outside, work / "inside"]))
    text = " ".join(argv)
    assert f"--ro-bind /dev/null {token}" in text           # a file: covered by an empty one
    assert f"--tmpfs {base}" in text                         # a folder: by an empty tmpfs
    assert text.index(f"--tmpfs {base}") < text.index(f"--bind {work} {work}")
    assert f"--ro-bind {outside} {outside}" in text and f"{work}/inside" not in text
    # an input that is (a link to) the pilot's token is never bound back in
    argv = sandbox.command(SandboxSpec(argv=["x"], env={}, workdir=work, hide=[token, base],
                                       read_only=[token, base / "panda_job_9_9" / "f"]))
    assert f"--ro-bind {token} {token}" not in " ".join(argv)
    assert "--unshare-net" not in argv and "--unshare-pid" in argv
    assert "--tmpfs /tmp" in text and "--proc /proc" in text
    no_net = load(SandboxConfig(runtime="bwrap", network=False))
    no_net.program = "/usr/bin/bwrap"
    assert "--unshare-net" in no_net.command(SandboxSpec(argv=[], env={}, workdir=work))


def test_site_config_sandbox_section_is_checked():
    from site_configs.schema import validate

    from site_configs import EXAMPLES_DIR
    import yaml

    data = yaml.safe_load((EXAMPLES_DIR / "examples" / "SLURM_EXAMPLE.yaml").read_text())
    data["sandbox"] = {"runtime": "bwrap", "network": False, "bind": ["/cvmfs"]}
    assert validate(data, "x.yaml") == []
    data["sandbox"] = {"runtime": "podman", "network": "no", "bind": ["cvmfs"], "extra": 1}
    errors = {(e.key_path, e.reason.split(" ")[0]) for e in validate(data, "x.yaml")}
    assert ("sandbox.runtime", "unknown") in errors and ("sandbox.network", "wrong") in errors
    assert ("sandbox.bind.0", "bad") in errors and ("sandbox.extra", "unknown") in errors


def test_a_working_probe_is_recorded_for_the_nodes_other_pilots(tmp_path, monkeypatch):
    from pilot.sandbox import PROBE_FILE, ready
    from pilot.sandbox.bwrap import BwrapSandbox

    calls = []
    monkeypatch.setattr(BwrapSandbox, "probe", lambda self: calls.append(1))
    monkeypatch.setattr(BwrapSandbox, "probe_key", lambda self: "/usr/bin/bwrap:1:2")
    cfg = SandboxConfig(runtime="bwrap")
    ready(cfg, tmp_path)
    ready(cfg, tmp_path)
    assert calls == [1] and (tmp_path / PROBE_FILE.format(name="bwrap")).is_file()
    monkeypatch.setattr(BwrapSandbox, "probe_key", lambda self: "/usr/bin/bwrap:3:2")  # upgraded
    ready(cfg, tmp_path)
    assert calls == [1, 1]

    def broken(self):
        raise SandboxError(ErrorCode.SANDBOX_USER_NAMESPACE, "no user namespaces")
    monkeypatch.setattr(BwrapSandbox, "probe", broken)
    monkeypatch.setattr(BwrapSandbox, "probe_key", lambda self: "/usr/bin/bwrap:4:2")
    with pytest.raises(SandboxError) as err:
        ready(cfg, tmp_path)
    assert err.value.code == ErrorCode.SANDBOX_USER_NAMESPACE
    with pytest.raises(SandboxError):                  # a failure is never recorded
        ready(cfg, tmp_path)


@needs_bwrap
def test_the_one_file_pilot_carries_the_runtimes(tmp_path):
    """The signed pilot file a bare node runs has the panda.sandboxes entry points and code."""
    from server.pilotfile import build

    _, data = build()
    pyz = tmp_path / "pilot.pyz"
    pyz.write_bytes(data)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from pilot.sandbox import available, load\n"
            "from panda_core.siteconfig import SandboxConfig\n"
            "s = load(SandboxConfig(runtime='bwrap', network=False)); s.probe()\n"
            "print(available(), type(s).__name__, s.program)")
    res = subprocess.run(["/usr/bin/python3", "-E", "-s", "-c", code, str(pyz)], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "['apptainer', 'bwrap', 'none'] BwrapSandbox" in res.stdout


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root to run the sandbox as an unprivileged user")
def test_bwrap_as_an_unprivileged_user():
    """As pilots run on grid nodes (not root): bwrap makes its namespaces through a user
    namespace; the payload still sees its work dir only, and its exit code comes through."""
    import pwd

    user = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="panda-sandbox-nobody-"))   # pytest's tmp is root's 0700
    try:
        _unprivileged_run(user, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _unprivileged_run(user, tmp_path: Path) -> None:
    base = tmp_path / "jobs"
    work = base / "panda_job_7_1" / "work"
    work.mkdir(parents=True)
    secret = base / "token"
    secret.write_text(TOKEN)
    for path in (tmp_path, base, work.parent, work, secret):
        os.chown(path, user.pw_uid, user.pw_gid)
    tmp_path.chmod(0o755)
    sandbox = load(SandboxConfig(runtime="bwrap", network=False))
    sandbox.probe()
    script = (f"cat {secret} && exit 9; ls /proc | grep -c '^[0-9]' > count; id -u > uid; "
              "echo ok > out; exit 5")
    wrapped = sandbox.wrap(SandboxSpec(argv=["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"},
                                       workdir=work, hide=[secret, base]))
    res = subprocess.run([shutil.which("runuser"), "-u", "nobody", "--", *wrapped.argv],
                         env=wrapped.env,
                         cwd=work, capture_output=True, text=True, timeout=60)
    assert res.returncode == 5, res.stderr
    assert (work / "out").read_text() == "ok\n"
    assert (work / "uid").read_text().strip() == str(user.pw_uid)
    assert int((work / "count").read_text()) <= 5   # bwrap's init, the CPU-times shell, sh, ls, grep
