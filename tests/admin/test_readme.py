"""The README's "Using it" block, run as written: a new user's first hour, on one machine.

The block's commands run in bash with ``set -e`` from a copy of the checkout's
``site_configs/`` and ``docs/examples/``, with a fresh ``$HOME``, in a network namespace of its
own (``unshare -n``): the block's fixed port 25080 is then free whatever else runs here. Every
job of the task must finish, and every process the block started is gone afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from testkit import REPO

VENV_BIN = str(Path(sys.executable).parent)


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Using it\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def shell_env(home: Path, mark: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDA_")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               PANDA_TEST_RUN=mark)
    return env


def kill_marked(mark: str) -> list[int]:
    """SIGKILL every process whose environment carries ``mark``; their pids."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PANDA_TEST_RUN") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    for proc in found:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=10)
    return [p.pid for p in found]


def run_block(script: str, cwd: Path, env: dict, timeout: float,
              isolated: bool) -> subprocess.CompletedProcess:
    (cwd / "block.sh").write_text("set -euo pipefail\nset -x\n" + script)
    cmd = ["bash", str(cwd / "block.sh")]
    if isolated:
        cmd = ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$@"', "-", *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def can_unshare() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_readme_using_it_runs_every_job(tmp_path):
    if not can_unshare():
        pytest.skip("needs unshare -n (root) to give the block's port 25080 a namespace")
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copytree(REPO / "site_configs", work / "site_configs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docs" / "examples", work / "docs" / "examples")
    home = tmp_path / "home"
    home.mkdir()
    mark = uuid.uuid4().hex
    try:
        res = run_block(readme_block(), work, shell_env(home, mark), 300, isolated=True)
    finally:
        left = kill_marked(mark)
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in work.glob("*.log")}
    report = f"{res.stdout}\n{res.stderr}\n{logs}"
    assert res.returncode == 0, report
    assert "Traceback" not in res.stdout + res.stderr, report
    # the last command's table: every job of the task finished
    table = res.stdout.split("ID ", 1)[1]
    rows = [line.split() for line in table.splitlines()[2:] if re.match(r"\d+ +\d+ ", line)]
    assert rows and all(row[3] == "finished" for row in rows), report
    assert re.search(r"(\d+) job\(s\): \1 finished", res.stdout), report
    assert "task 1 demo: done" in res.stdout, report
    # the tokens the block wrote: private, no trailing newline (pilot 3 reads them verbatim)
    for name in ("admin.token", "alice.token", "factory.token", "pilot.token"):
        token = work / name
        assert token.stat().st_mode & 0o077 == 0 and not token.read_bytes().endswith(b"\n")
    # the outputs reached the storage element
    assert list((home / "panda-se" / "demo").rglob("demo.00000*.out"))
    assert "alembic.runtime" not in res.stderr and "alembic.runtime" not in logs["server.log"]
    assert left, "the block's server and factory were running until the test stopped them"
