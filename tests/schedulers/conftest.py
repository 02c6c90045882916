"""Fixtures of the scheduler tests (helpers are imported from testkit and the kits here)."""
from __future__ import annotations

import os

import pytest

from arc_ce import ArcUnavailable, session_ce


@pytest.fixture(scope="module")
def arc_ce(request):
    """The session's real A-REX, installed and started once, shared by every module."""
    if os.geteuid() != 0:
        pytest.skip("a real A-REX needs root to install and start")
    try:
        return session_ce(request.config)
    except ArcUnavailable as exc:
        pytest.fail(f"A-REX could not start: {exc}")
