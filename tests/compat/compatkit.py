"""Shared names of the compatibility tests (a uniquely named module: several test folders have a
conftest.py, so tests import from here, not from ``conftest``)."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

VENV = Path(os.environ.get("PANDA_WMS_PILOT3_VENV", "/var/tmp/panda-wms-pilot3-venv"))
PILOT_USER = "pandap3"          # made for these tests; pilot 3 never runs as root
SITE = "LOCAL_DEMO"


def adler32_hex(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"
