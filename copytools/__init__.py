"""Copytools: move one file between a worker node and a storage element, verified.

Each tool is a driver (an entry point) in the ``panda.copytools`` group (see docs/copytools.md).
The pilot uses ``load(name, **options)`` and ``run_transfer(tool, transfer, direction, ...)``.
"""
from __future__ import annotations

from panda_core.drivers import installed_names, load_driver

from .base import CopyTool, Transfer, TransferError, TransferResult, parse_checksum
from .runner import run_transfer

__all__ = ["CopyTool", "Transfer", "TransferError", "TransferResult", "UnknownCopyTool",
           "available", "load", "parse_checksum", "run_transfer"]

GROUP = "panda.copytools"


class UnknownCopyTool(LookupError):
    """The site config names a copytool that is not installed or does not load."""


def available() -> list[str]:
    """Names of the installed copytools."""
    return installed_names(GROUP)


def load(name: str, **options) -> CopyTool:
    """Construct the copytool ``name`` with the site config's options. Looked up in the
    process's one entry-point scan (``panda_core.drivers.entry_points``, which the pilot's
    monitors came from), not by stevedore's own: its import and scan cost a pilot ~10-25 ms
    before each stage-in and stage-out (measured at load 13)."""
    return load_driver(GROUP, name, invoke_kwds=options, error=UnknownCopyTool, kind="copytool",
                       use_stevedore=False)
