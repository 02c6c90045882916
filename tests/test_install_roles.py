"""The base install is a worker node's: ``pip install panda-wms`` (no extras) into a fresh venv
gives a working ``panda pilot`` and none of the server's packages, and each command that needs
an extra says which one, instead of a traceback."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import REPO

PACKAGES = ["copytools", "pilot", "panda_core", "panda_wms", "server", "schedulers", "site_configs",
            "storage_element"]
SERVER_DISTRIBUTIONS = ["tornado", "SQLAlchemy", "alembic", "prometheus_client", "jsonschema",
                        "PyYAML"]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A fresh venv with the local checkout installed without extras, not editable."""
    tmp = tmp_path_factory.mktemp("base-install")
    # a copy, so that the build's egg-info and build/ never land in the checkout
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", str(src)],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def _env() -> dict[str, str]:
    """No PYTHONPATH: the venv must run what it installed, not this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def panda(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "panda"), *args], capture_output=True, text=True,
                          timeout=60, env=_env(), cwd=cwd)


@pytest.mark.slow
def test_base_install_is_the_worker_nodes(base_venv, tmp_path):
    r = panda(base_venv, "pilot", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "usage: panda pilot" in r.stdout, r.stdout + r.stderr

    probe = ("import importlib.metadata as m, json, sys\n"
             "found = {}\n"
             "for name in sys.argv[1:]:\n"
             "    try:\n"
             "        found[name] = m.version(name)\n"
             "    except m.PackageNotFoundError:\n"
             "        pass\n"
             "print(json.dumps({'found': found, 'panda': m.version('panda-wms')}))\n")
    r = subprocess.run([str(base_venv / "bin" / "python"), "-c", probe, *SERVER_DISTRIBUTIONS],
                       capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    installed = json.loads(r.stdout)
    assert installed["panda"] == "0.1.0"
    assert installed["found"] == {}, f"the base install pulled {installed['found']}"


@pytest.mark.slow
@pytest.mark.parametrize("args, extra, module", [
    (["server", "--help"], "server", "tornado"),
    (["db", "current"], "server", "tornado"),
    (["se", "--root", "se"], "se", "tornado"),
    (["factory", "--help"], "factory", "yaml"),
    (["sites", "check", "sites"], "factory", "yaml"),
    (["demo"], "server", "tornado"),
    (["submit", "task.yaml"], "client", "yaml"),
    (["jobs"], "client", "yaml"),
    (["data", "list", "x"], "client", "yaml"),
])
def test_a_missing_extra_is_named(base_venv, tmp_path, args, extra, module):
    (tmp_path / "task.yaml").write_text("taskName: t\n")
    r = panda(base_venv, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"pip install 'panda-wms[{extra}]'" in r.stderr and repr(module) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "se").exists()  # refused before it did anything


def test_library_code_imports_no_test_code():
    """tests/ is not installed: a package that imports from it breaks every real install."""
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")} | {"tests"}
    offenders = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module
                         and not node.level else [])
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                              if n.split(".")[0] in test_modules]
    assert offenders == []
