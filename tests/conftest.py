"""Fixtures shared by every test. Helpers live in testkit.py (import them from there)."""
from __future__ import annotations

import signal
import subprocess

import pytest

from peers import start_se
from testkit import start_server, stop_server


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Modules with more tests marked ``slow`` first, each module's tests in their order.
    scripts/test-all.sh hands whole modules to the xdist workers in this order
    (``--dist loadscope --no-loadscope-reorder``), so the long ones start at once rather than
    last, alone on one worker while the others idle."""
    slow: dict[str, int] = {}          # module -> its slow tests, in the order first seen
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        slow[module] = slow.get(module, 0) + (item.get_closest_marker("slow") is not None)
    rank = {m: i for i, m in enumerate(sorted(slow, key=lambda m: -slow[m]))}
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])


def pytest_configure(config):
    """Children that tests stop with SIGINT (Ctrl-C) must not inherit it ignored: a shell
    starts background jobs (``cmd &`` without job control) with SIGINT ignored, Python then
    keeps it ignored, and so would every process a test starts (and they would never stop)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def panda_server(tmp_path):
    """A real server on SQLite in a temporary folder, knowing no sites."""
    server = start_server(tmp_path / "server")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def se(tmp_path_factory):
    """``panda se`` on a free port, shared by a module's tests (copytools, storage element)."""
    server = start_se(tmp_path_factory.mktemp("se") / "root")
    yield server
    server.stop()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs: writes past it fail with ENOSPC like a full disk (needs root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
