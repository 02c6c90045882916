"""Plugin drivers: the one class (or object) registered under a name in an entry-point group.

Copytools (``panda.copytools``), scheduler backends (``panda.schedulers``) and the server's data
movers (``panda.datamovers``) are all loaded here, so a missing or broken plugin is reported the
same way everywhere: in the caller's own error type, naming the group and what is installed.
stevedore is imported inside ``load_driver``, the one exception to this package's standard-library
rule: only a process that loads a driver pays for it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def installed_names(group: str) -> list[str]:
    """The names registered in entry-point ``group``, sorted."""
    from importlib.metadata import entry_points  # imported here: it is slow to import

    return sorted({ep.name for ep in entry_points(group=group)})


def load_driver(group: str, name: str, *, invoke_kwds: Mapping[str, Any] | None = None,
                invoke: bool = True, error: type[Exception] = LookupError,
                kind: str = "driver") -> Any:
    """The driver ``name`` of ``group``: constructed with ``invoke_kwds`` or, with
    ``invoke=False``, the registered object itself (a class the caller constructs).

    A name the group lacks, or a driver that fails to import or to construct, raises ``error``
    whose message names the ``kind`` of driver, the group and its installed names. An ``error``
    the driver raises itself (a backend refusing an option) passes unchanged: it already says why.
    """
    from stevedore import driver
    from stevedore.exception import NoMatches

    try:
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


def _installed(group: str) -> str:
    return f"(installed: {', '.join(installed_names(group)) or 'none'})"
