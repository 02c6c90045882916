"""Fixtures for the compatibility tests: PanDA's own pilot 3 and panda-client in their own venv,
an unprivileged user to run pilot 3, and a server that knows the LOCAL_DEMO site."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from testkit import EXAMPLE_SITES, REPO, start_server, stop_server

from compatkit import PILOT_USER, SITE, VENV


@pytest.fixture(scope="session")
def compat_venv() -> Path:
    """The venv with panda-pilot and panda-client (scripts/compat-venv.sh builds it once)."""
    proc = subprocess.run([str(REPO / "scripts" / "compat-venv.sh"), str(VENV)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"could not build {VENV} for PanDA's pilot/client:\n{proc.stdout}{proc.stderr}")
    return VENV


@pytest.fixture(scope="session")
def pilot_user() -> str:
    """An unprivileged system user for pilot 3 (it kills its user's orphans when it ends)."""
    if os.geteuid() != 0:
        pytest.skip("pilot 3 runs as a dedicated user: creating it needs root")
    try:
        pwd.getpwnam(PILOT_USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--create-home", "--home-dir",
                               f"/var/tmp/{PILOT_USER}-home", "--shell", "/bin/sh", PILOT_USER],
                              capture_output=True, text=True)
        if made.returncode not in (0, 9):      # 9: another test session made it just now
            pytest.fail(f"useradd {PILOT_USER} failed: {made.stderr}")
    return PILOT_USER


@pytest.fixture
def site_server(tmp_path, monkeypatch):
    """A real server with the LOCAL_DEMO site whose storage element is a scratch folder."""
    se = tmp_path / "se"
    monkeypatch.setenv("PANDA_SE_ROOT", str(se))
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    server = start_server(tmp_path / "srv", site_dir=sites,
                          env={"PANDA_CACHE_DIR": str(tmp_path / "cache")})
    server.se = se
    server.tmp = tmp_path
    yield server
    stop_server(server)
