"""Real peers for the copytool tests, all on 127.0.0.1: the HTTP storage element (``panda se``),
Debian's xrootd, a server that never answers, and a tiny tmpfs for full-disk errors."""
from __future__ import annotations

import os
import subprocess
import zlib

import pytest

from copytools.testing import HungServer, start_se, start_xrootd, xrootd_available


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


@pytest.fixture(scope="module")
def se(tmp_path_factory):
    server = start_se(tmp_path_factory.mktemp("se") / "root")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def xrootd():
    why = xrootd_available()
    if why:
        pytest.skip(why)
    server = start_xrootd()  # in its own temp folder (see start_xrootd), removed by stop()
    yield server
    server.stop()


@pytest.fixture
def hung():
    with HungServer() as server:
        yield server


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


@pytest.fixture
def payload(tmp_path):
    """A 3 MiB + 7 bytes random file (several chunks, not chunk aligned)."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    return path, data
