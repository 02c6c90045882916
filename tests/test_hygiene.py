"""Rules of the test tree that a full run would otherwise only break by accident."""
from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_imports_from_conftest():
    """Several folders have a conftest.py; pytest imports each as the module ``conftest``, so
    ``from conftest import`` gets whichever was loaded first: import from testkit instead."""
    offenders = [str(p.relative_to(TESTS)) for p in TESTS.rglob("*.py")
                 if p.name not in ("testkit.py", "test_hygiene.py")
                 and "from conftest import" in p.read_text()]
    assert offenders == []


def test_no_merge_conflict_markers_in_the_repository():
    """Several people merge into main all day; a conflict committed unresolved must fail the
    run here, with the file named, not as a syntax error somewhere else."""
    import subprocess

    root = TESTS.parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True
                           ).stdout.split() or [str(p.relative_to(root)) for p in root.rglob("*")
                                                if p.is_file() and ".git" not in p.parts]
    offenders = []
    for name in files:
        path = root / name
        if path.suffix not in (".py", ".md", ".html", ".sh", ".yaml", ".yml", ".txt", ".cfg",
                               ".ini", ".toml", ".json", ".mako", ".service", ""):
            continue
        try:
            lines = path.read_text(errors="replace").splitlines()
        except (OSError, IsADirectoryError):
            continue
        if any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in lines):
            offenders.append(name)
    assert offenders == [], f"unresolved merge conflicts in {offenders}"


def test_migrations_form_one_line():
    """Each helper's migration chains after the head it saw; two landings on the same head give
    alembic two heads and `panda db upgrade` refuses to run. Caught here in milliseconds."""
    import re

    versions = TESTS.parent / "server" / "migrations" / "versions"
    revs: dict[str, str | None] = {}
    for path in versions.glob("*.py"):
        text = path.read_text()
        rev = re.search(r'^revision\s*=\s*"([^"]+)"', text, re.M)
        if rev is None:
            continue
        down = re.search(r'^down_revision\s*=\s*(?:"([^"]+)"|None)', text, re.M)
        revs[rev.group(1)] = down.group(1) if down else None
    parents = [d for d in revs.values() if d]
    heads = sorted(r for r in revs if r not in parents)
    assert len(heads) == 1, f"several migration heads: {heads} (re-chain the newer one)"
    shared = sorted({d for d in parents if parents.count(d) > 1})
    assert shared == [], f"migrations with the same parent: {shared}"
