"""Plugin drivers: the one class (or object) registered under a name in an entry-point group.

Copytools (``panda.copytools``), scheduler backends (``panda.schedulers``) and the server's data
movers (``panda.datamovers``) are all loaded here, so a missing or broken plugin is reported the
same way everywhere: in the caller's own error type, naming the group and what is installed.
stevedore is imported inside ``load_driver``, the one exception to this package's standard-library
rule: only a process that loads a driver pays for it. Where stevedore is not installed (the
one-file pilot leaves it out: stevedore 5.10 needs Python 3.11, the pilot runs on 3.10) the
standard library's entry points load the driver, with the same errors. The pilot asks for
those (``use_stevedore=False``) also where stevedore is installed: its monitors, its sandbox
runtime and every other plugin it looks up come from one scan of the installed distributions
(``entry_points``), where each stevedore or standard-library lookup scanned them all again
(~2-8 ms a scan, on the way to the payload, where a node's Python has many distributions).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

_scan: tuple[tuple[str, ...], Any] | None = None     # (sys.path, every entry point on it)


def entry_points(group: str, name: str | None = None) -> Any:
    """The standard library's entry points of ``group`` (and ``name``), in ``sys.path`` order,
    from one scan of every distribution per process and ``sys.path``."""
    global _scan
    from importlib.metadata import entry_points as scan  # imported here: it is slow to import

    key = tuple(sys.path)
    if _scan is None or _scan[0] != key:
        _scan = (key, scan())
    found = _scan[1]
    return found.select(group=group) if name is None else found.select(group=group, name=name)


def installed_names(group: str) -> list[str]:
    """The names registered in entry-point ``group``, sorted."""
    return sorted({ep.name for ep in entry_points(group)})


def load_driver(group: str, name: str, *, invoke_kwds: Mapping[str, Any] | None = None,
                invoke: bool = True, error: type[Exception] = LookupError,
                kind: str = "driver", use_stevedore: bool = True) -> Any:
    """The driver ``name`` of ``group``: constructed with ``invoke_kwds`` or, with
    ``invoke=False``, the registered object itself (a class the caller constructs).
    ``use_stevedore=False``: from ``entry_points`` even where stevedore is installed.

    A name the group lacks, or a driver that fails to import or to construct, raises ``error``
    whose message names the ``kind`` of driver, the group and its installed names. An ``error``
    the driver raises itself (a backend refusing an option) passes unchanged: it already says why.
    """
    driver, NoMatches = None, _NoMatches
    if use_stevedore:
        try:
            from stevedore import driver
            from stevedore.exception import NoMatches
        except ImportError:
            pass

    try:
        if driver is None:
            return _load_without_stevedore(group, name, invoke, dict(invoke_kwds or {}))
        return driver.DriverManager(group, name, invoke_on_load=invoke,
                                    invoke_kwds=dict(invoke_kwds or {})).driver
    except NoMatches:
        raise error(f"no {kind} {name!r} in entry-point group {group} "
                    f"{_installed(group)}") from None
    except error:
        raise
    except Exception as exc:  # import error, bad options, two plugins under one name
        raise error(f"{kind} {name!r} in entry-point group {group} failed to load: "
                    f"{type(exc).__name__}: {exc} {_installed(group)}") from exc


class _NoMatches(Exception):
    """No entry point of that name (stevedore's NoMatches, without stevedore)."""


def _load_without_stevedore(group: str, name: str, invoke: bool,
                            invoke_kwds: dict[str, Any]) -> Any:
    """stevedore's DriverManager, as the standard library does it: one entry point, loaded
    and, with ``invoke``, called with ``invoke_kwds``; _NoMatches when there is none."""
    found = {ep.value: ep for ep in entry_points(group, name)}
    if not found:
        raise _NoMatches(name)
    if len(found) > 1:
        raise RuntimeError(f"{len(found)} plugins are registered as {name!r}: "
                           f"{', '.join(sorted(found))}")
    plugin = next(iter(found.values())).load()
    return plugin(**invoke_kwds) if invoke else plugin


def _installed(group: str) -> str:
    return f"(installed: {', '.join(installed_names(group)) or 'none'})"
