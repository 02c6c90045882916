"""Fixtures shared by every test. Helpers live in testkit.py (import them from there)."""
from __future__ import annotations

import pytest

from testkit import start_server, stop_server


@pytest.fixture
def panda_server(tmp_path):
    """A real server on SQLite in a temporary folder, knowing no sites."""
    server = start_server(tmp_path / "server")
    yield server
    stop_server(server)
