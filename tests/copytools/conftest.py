"""Real peers for the copytool tests, all on 127.0.0.1: Debian's xrootd and a server that never
answers (the storage element ``se`` and the full disk ``tiny_fs`` are in tests/conftest.py)."""
from __future__ import annotations

import os
import zlib

import pytest

from peers import HungServer, start_xrootd, xrootd_available


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


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
def payload(tmp_path):
    """A 3 MiB + 7 bytes random file (several chunks, not chunk aligned)."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    return path, data
