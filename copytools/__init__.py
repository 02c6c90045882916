"""Copytools: move one file between a worker node and a storage element, verified.

Each tool is a stevedore driver in the ``panda.copytools`` group (see docs/copytools.md).
The pilot uses ``load(name, **options)`` and ``run_transfer(tool, transfer, direction, ...)``.
"""
from __future__ import annotations

from .base import CopyTool, Transfer, TransferError, TransferResult, parse_checksum
from .runner import run_transfer

__all__ = ["CopyTool", "Transfer", "TransferError", "TransferResult", "UnknownCopyTool",
           "available", "load", "parse_checksum", "run_transfer"]

GROUP = "panda.copytools"


class UnknownCopyTool(LookupError):
    """The site config names a copytool that is not installed."""


def available() -> list[str]:
    """Names of the installed copytools."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load(name: str, **options) -> CopyTool:
    """Construct the copytool ``name`` with the site config's options (stevedore driver)."""
    from stevedore import driver
    from stevedore.exception import NoMatches

    try:
        mgr = driver.DriverManager(GROUP, name, invoke_on_load=True, invoke_kwds=options,
                                   on_load_failure_callback=_reraise)
    except NoMatches:
        raise UnknownCopyTool(f"unknown copytool {name!r}; installed: "
                              f"{', '.join(available()) or 'none'}") from None
    return mgr.driver


def _reraise(manager, entrypoint, exc):
    raise exc
