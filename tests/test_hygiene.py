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
