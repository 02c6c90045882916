"""``panda demo`` end to end: server, factory and pilots as real subprocesses over HTTP."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


def processes_under(workdir) -> list[psutil.Process]:
    """Live processes whose command line or working directory is inside ``workdir``."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
            if str(workdir) in text and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def demo(workdir, *args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PANDA_AUTH_TOKEN"}
    return subprocess.Popen([sys.executable, "-m", "panda_wms.cli", "demo", "--workdir",
                             str(workdir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


@pytest.mark.slow
def test_demo_runs_task_to_the_end(tmp_path):
    workdir = tmp_path / "demo"
    proc = demo(workdir, "--jobs", "6", "--timeout", "90")
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert "all 6 jobs finished" in out
    assert "/monitor/tasks" in out
    assert "finished" in out and "LOCAL_DEMO" in out
    assert processes_under(workdir) == []
    # every output is on the storage element, with the content the payload wrote
    outputs = list((workdir / "se" / "demo").rglob("demo.output.*.txt"))
    assert len(outputs) == 6
    assert all("demo.input." in p.read_text() for p in outputs)
    logs = list((workdir / "se" / "demo").rglob("*.job.log.tgz"))
    assert len(logs) == 6
    # the pilots were one-file pilots, as on a site: fetched, verified and cached by the
    # factory's batch script (in the demo's folder), run from the cache by the node's Python
    [line] = [ln for ln in out.splitlines() if ln.startswith("pilots ")]
    version = line.split("one-file pilot ")[1].split(":")[0]
    from server.pilotfile import platform_tag
    assert (workdir / "node-cache" / version / platform_tag() / "PANDA_PILOT.json").exists()
    pilot_logs = [p.read_text() for p in (workdir / "factory").rglob("pilot.log")]
    assert pilot_logs and all(f"pilot panda-wms-pilot 0.1+{version} on Python" in text
                              for text in pilot_logs if "got job" in text), pilot_logs[:1]


@pytest.mark.slow
def test_demo_with_installed_pilots_when_told(tmp_path):
    workdir = tmp_path / "demo"
    proc = demo(workdir, "--jobs", "2", "--timeout", "60", "--pilot-launch", "installed")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "all 2 jobs finished" in out, out
    assert f"pilots       installed: {sys.executable} -m panda_wms.cli pilot" in out
    assert not (workdir / "node-cache").exists()


@pytest.mark.slow
def test_demo_interrupted_leaves_no_process(tmp_path):
    workdir = tmp_path / "demo"
    proc = demo(workdir, "--jobs", "20", "--timeout", "90", "--job-seconds", "30")
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:     # interrupt once payloads are running
        line = proc.stdout.readline()
        lines.append(line)
        if (line.startswith("progress") and "running=" in line) or not line:
            break
    payloads = [p for p in processes_under(workdir) if "sleep 30" in " ".join(p.cmdline())]
    assert payloads, "".join(lines)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + out
    time.sleep(0.5)
    assert processes_under(workdir) == []
